"""Attention alone, forward + backward, on a CPU: bf16 flash vs bf16 math vs fp32 flash on upcast inputs.

    python bench/attention_speed.py [--repeats=3]

Why: torch's CPU flash-attention backward is slow in bf16 (precision.py runs bf16 training attention on
the math backend for that reason); this prints, per shape the lora_speed bench meets, the milliseconds of
one ``scaled_dot_product_attention`` forward and backward under each choice, so the choice can be
re-checked on another CPU or torch version. Shapes: (batch, heads, tokens, head dim)."""

from __future__ import annotations

import argparse
from time import perf_counter

SHAPES = {
    "MiniLM titles": (80, 12, 24, 32),
    "CLIP ViT-B/32 vision": (237, 12, 50, 64),
    "CLIP text": (237, 8, 20, 64),
}


def milliseconds(shape, dtype, backend, upcast: bool, repeats: int) -> float:
    import torch
    from torch.nn.attention import sdpa_kernel

    q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))

    def step():
        with sdpa_kernel(backend):
            inputs = (q.float(), k.float(), v.float()) if upcast else (q, k, v)
            out = torch.nn.functional.scaled_dot_product_attention(*inputs)
        out.sum().backward()

    step()  # warm-up
    start = perf_counter()
    for _ in range(repeats):
        step()
    return (perf_counter() - start) / repeats * 1000


def main(argv=None) -> None:
    import torch
    from torch.nn.attention import SDPBackend

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per forward + backward")
    print(f"{'shape':<24}{'bf16 flash':>12}{'bf16 math':>12}{'fp32 flash (upcast)':>22}")
    for name, shape in SHAPES.items():
        flash = milliseconds(shape, torch.bfloat16, SDPBackend.FLASH_ATTENTION, False, args.repeats)
        math = milliseconds(shape, torch.bfloat16, SDPBackend.MATH, False, args.repeats)
        upcast = milliseconds(shape, torch.bfloat16, SDPBackend.FLASH_ATTENTION, True, args.repeats)
        print(f"{name:<24}{flash:>12.1f}{math:>12.1f}{upcast:>22.1f}")


if __name__ == "__main__":
    main()
