"""Length buckets: encode a batch's titles in sub-batches of similar token length, so that the padded
tokens the encoder computes stay within ``max_ratio`` (1.1) of the real ones.

A batch's titles are padded to its longest one; with product titles of 5 to 32 tokens that wastes about
a quarter of the encoder's work (amazon-scientific: 5,200 real tokens padded to 6,700 per step).
Sorting the items by length and encoding runs of similar lengths together removes most of it. The
vectors are the same up to float noise: padded positions are masked out of attention and of mean
pooling, CLIP pools at the EOS token, and positions count from the start of each title."""

from __future__ import annotations

import torch

from recbole_perpeft.config_values import choice

MAX_PADDING_RATIO = 1.1  # sum(padded tokens) <= 1.1 * sum(real tokens) over a batch
MIN_BUCKET = 8  # below this a sub-batch is merged into a neighbour when the bound allows
TEXT_BATCHING = ("auto", "buckets", "trim")


def resolve_text_batching(value, device_type: str) -> float | None:
    """Config ``text_batching`` on a device of ``device_type`` -> the bucket bound (``MAX_PADDING_RATIO``)
    or None (one forward per batch, trimmed to its longest title).

    ``auto`` buckets on a CPU and trims on a GPU. A CPU is compute-bound: padded tokens are time, and
    buckets made a MiniLM LoRA step 0.75x the trimmed one in fp32 (README, speed). A GPU at these sizes is
    launch-bound: each bucket is another full pass of the encoder's small kernels. On an H200, buckets made
    the bench's step 2.3x slower (``bench/gpu_check.sh``, bf16 0.061 s against 0.027 s) and a GlobalPEFT
    LoRA epoch on amazon-scientific 6.7x slower (3.4 steps/s against 22.7; README, GPU)."""
    requested = "auto" if value is None else str(value).strip().lower()
    choice(requested, TEXT_BATCHING, "text_batching", given=value,
           hint="(buckets: sub-batches of similar title length; trim: one forward per batch)")  # fmt: skip
    if requested == "auto":
        requested = "buckets" if device_type == "cpu" else "trim"
    return MAX_PADDING_RATIO if requested == "buckets" else None


def padded_tokens(lengths: torch.Tensor, buckets: list[torch.Tensor]) -> int:
    """The tokens the encoder computes when each bucket is padded to its longest title."""
    return sum(len(b) * max(int(lengths[b].max()), 1) for b in buckets if len(b))


def length_buckets(lengths: torch.Tensor, max_ratio: float = MAX_PADDING_RATIO,
                   min_size: int = MIN_BUCKET) -> list[torch.Tensor]:  # fmt: skip
    """Split rows by ``lengths`` (real tokens per row) into buckets: a list of index tensors into
    ``lengths`` (on its device), together every row once, longest titles first.

    The rows sorted by length start as one bucket per distinct length (no padding at all). Adjacent
    buckets are then merged, the merge adding the fewest padded tokens first, while the batch's padded
    tokens stay <= ``max_ratio`` x its real tokens: as few encoder calls as the bound allows. Merges
    that absorb a bucket smaller than ``min_size`` go first, so stray lengths join a neighbour before
    the budget goes elsewhere; the bound wins where the two conflict (a lone 60-token title among
    10-token ones stays alone). The budget is the batch's, not each bucket's: short titles, where one
    token is a large fraction, can share a bucket on the slack the long ones leave."""
    if len(lengths) == 0:
        return []
    order = torch.argsort(lengths, descending=True, stable=True)
    sizes = [max(int(v), 1) for v in lengths[order].tolist()]  # an empty title still takes one column
    buckets: list[list[int]] = []  # [start, end, width] over the sorted rows
    for i, size in enumerate(sizes):
        if buckets and buckets[-1][2] == size:
            buckets[-1][1] = i + 1
        else:
            buckets.append([i, i + 1, size])
    real = padded = sum(sizes)
    while len(buckets) > 1:
        best = None
        for k in range(len(buckets) - 1):  # at most one bucket per distinct length: a few dozen
            wide, narrow = buckets[k], buckets[k + 1]
            extra = (narrow[1] - narrow[0]) * (wide[2] - narrow[2])  # the narrow rows padded to the wide
            if padded + extra > max_ratio * real:
                continue
            small = min(wide[1] - wide[0], narrow[1] - narrow[0]) < min_size
            key = (not small, extra, k)
            if best is None or key < best:
                best = key
        if best is None:
            break
        _, extra, k = best
        padded += extra
        buckets[k : k + 2] = [[buckets[k][0], buckets[k + 1][1], buckets[k][2]]]
    return [order[start:end] for start, end, _ in buckets]
