"""Mixed precision of the trainable in-foundation path (config ``precision``: auto | fp32 | bf16 | fp16).

Only the per-batch forward of the adapted encoders (the frozen foundation with a peft adapter inside)
runs under ``torch.autocast``: that is where a step spends its time. Master weights, the optimizer,
the projector, the recommender and the loss stay float32 (the encoder's output is cast back before
the projector). The frozen caches (frozen features, side networks' layer states) are built in float32
whatever this key says, so their contents and cache keys do not depend on it.

``auto`` picks bf16 where the device computes it natively (CUDA with ``torch.cuda.is_bf16_supported()``;
a CPU with AVX512-BF16 or AMX) and fp32 elsewhere: bf16 keeps fp32's exponent range, so it needs no loss
scaling. fp16 is refused on a CPU rather than turned into bf16: CPUs have no fast fp16 matmul, fp16
needs loss scaling that only the CUDA trainer does (RecBole's GradScaler), and silently running
another format than the one asked for would change results; ``auto`` is the portable choice."""

from __future__ import annotations

import contextlib
import weakref
from logging import getLogger

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from recbole_perpeft.config_values import choice

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch's CPU flash-attention kernel is slow in bf16: its backward took 34 ms a call against 4 ms in fp32 on
# MiniLM's shapes (16 users' titles, AVX512-BF16), 41% of a bf16 step, so the bf16 epoch was 0.77x fp32's
# where the matmuls alone give 0.5x. The math backend (matmul + softmax, bf16 matmuls) does the same work at
# about fp32 flash's cost. Without gradients (item tables) the flash forward is the faster one and is kept.
# Only the adapted encoders' forward runs inside this context (the recommender's attention is RecBole's
# matmul code).
CPU_BF16_ATTENTION = [SDPBackend.MATH]
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16 / AMX; "bf16": aarch64's feature flag


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return {flag for line in f if line.split(":")[0].strip() in ("flags", "Features")
                    for flag in line.split(":", 1)[1].split()}  # fmt: skip
    except OSError:
        return set()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX; aarch64's BF16). Asks torch's own
    CPU feature probe where it has one (``torch.cpu.get_capabilities``), else /proc/cpuinfo.
    ``torch.backends.cpu.get_cpu_capability()`` is no help: it says "AVX512" with or without BF16."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        try:
            found = capabilities()
            if found.get("avx512_bf16") or found.get("amx_bf16"):
                return True
        except Exception:  # a private probe: its absence or failure only means "ask /proc/cpuinfo"
            pass
    return bool(_cpuinfo_flags() & set(CPU_BF16_FLAGS))


def device_has_bf16(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return cpu_has_bf16()
    return False  # other backends: fp32 unless asked for explicitly


def device_type_of(device) -> str:
    if device is None:
        return "cpu"
    return device.type if isinstance(device, torch.device) else torch.device(str(device)).type


def resolve_precision(value, device=None) -> str:
    """``precision`` for a run on ``device`` (a torch.device or a string; None: CPU) -> fp32 | bf16 | fp16.
    ValueError naming the key and the allowed values for anything else."""
    requested = "auto" if value is None else str(value).strip().lower()
    choice(requested, PRECISIONS, "precision", given=value)
    device_type = device_type_of(device)
    if requested == "auto":
        return "bf16" if device_has_bf16(device_type) else "fp32"
    if requested == "fp16" and device_type != "cuda":
        raise ValueError(
            f"precision: fp16 needs a CUDA device, this run is on {device_type}: CPUs have no fast fp16 and fp16 "
            "needs loss scaling, which only the CUDA trainer does. Use precision: bf16 (or auto) on a CPU."
        )
    if requested == "bf16" and not device_has_bf16(device_type):
        getLogger().warning(f"precision: bf16 asked for, but this {device_type} has no native bf16: it is "
                            "emulated and may well be slower than fp32 (precision: auto picks fp32 here).")  # fmt: skip
    return requested


@contextlib.contextmanager
def _cpu_bf16_training(dtype):
    with torch.autocast("cpu", dtype=dtype), sdpa_kernel(CPU_BF16_ATTENTION):
        yield


class Precision:
    """A resolved precision: :meth:`autocast` wraps the adapted encoders' forward."""

    def __init__(self, name: str, requested: str | None = None):
        if name not in DTYPES:
            raise ValueError(f"a resolved precision is fp32, bf16 or fp16, got {name!r}.")
        self.name, self.requested = name, requested or name
        self.dtype = DTYPES[name]

    @classmethod
    def from_config(cls, config, device=None) -> Precision:
        value = config["precision"] if "precision" in config else None
        return cls(resolve_precision(value, device), "auto" if value is None else str(value).lower())

    def autocast(self, device_type: str):
        """The context for a forward on ``device_type``. fp32 disables autocast explicitly, so that an outer
        one (RecBole's ``enable_amp``) cannot lower the adapted path behind this key's back."""
        if not torch.amp.is_autocast_available(device_type):
            return contextlib.nullcontext()
        if self.name == "fp32":
            return torch.autocast(device_type, enabled=False)
        if device_type == "cpu" and self.name == "bf16" and torch.is_grad_enabled():
            return _cpu_bf16_training(self.dtype)
        return torch.autocast(device_type, dtype=self.dtype)

    @contextlib.contextmanager
    def lowered(self, linears: list, device_type: str):
        """Inside :meth:`autocast`: the weights and biases of the frozen ``linears`` (``nn.Linear``; any whose
        weight requires grad is left alone) swapped for copies in this precision's dtype for the forward.
        autocast casts a weight that requires no grad again at every call (it caches casts of trainable leaves
        only): on a CPU that was 30% of a bf16 LoRA step of one user (MiniLM, 4 length buckets). The copies
        are autocast's own cast, made once and kept while the weight is unchanged (its version counter),
        so the forward computes the same values."""
        if self.name == "fp32" or not torch.amp.is_autocast_available(device_type):
            yield
            return
        if not hasattr(self, "_lowered"):
            self._lowered = weakref.WeakKeyDictionary()  # linear -> (versions, {name: lowered tensor})
        swapped = []
        try:
            for linear in linears:
                params = {k: v for k, v in linear._parameters.items() if v is not None}
                if any(v.requires_grad for v in params.values()) or any(v.dtype != torch.float32 for v in
                                                                        params.values()):  # fmt: skip
                    continue
                versions = tuple(v._version for v in params.values())
                cached = self._lowered.get(linear)
                if cached is None or cached[0] != versions:
                    cached = versions, {k: v.detach().to(self.dtype) for k, v in params.items()}
                    self._lowered[linear] = cached
                swapped.append((linear, params))
                linear._parameters.update(cached[1])  # plain tensors in place of the Parameters, for this forward
            yield
        finally:
            for linear, params in swapped:
                linear._parameters.update(params)

    def __repr__(self) -> str:
        return f"Precision({self.name!r}, requested={self.requested!r})"
