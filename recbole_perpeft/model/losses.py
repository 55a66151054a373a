"""Auxiliary and alternative training losses for the multimodal sequential recommenders.

* :class:`CrossModalAlignment` — SDA's structure-aware cross-modal alignment (CMSA) between the
  two modality vectors of an item, with SDA's InfoNCE ablation as a variant.
* :func:`inbatch_popularity_ce` — the in-batch softmax cross-entropy with popularity (logQ)
  correction used by IISAN / CROSSAN, as an alternative to Eq. 1's one-negative BCE.
* :func:`sampled_softmax_ce` — softmax cross-entropy over the positive and K sampled negatives shared
  by the batch, with the logQ correction of the sampling distribution and accidental hits masked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recbole_perpeft.config_values import choice

VARIANTS = ("cmsa", "infonce")
# Range the learnable temperature is clamped to when used: below 0.01 (CLIP's logit-scale cap of
# 100) the softmaxes saturate and gradients explode; above 1 cosine logits in [-1, 1] are too flat.
TAU_MIN, TAU_MAX = 0.01, 1.0


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """Half / bfloat16 inputs are upcast: the softmaxes below are computed in at least float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def cmsa_loss(x: torch.Tensor, y: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """SDA's CMSA loss for already L2-normalised ``x`` [N, D] (modality 1) and ``y`` [N, D] (modality 2).

    Instead of InfoNCE's one-hot (diagonal) targets, which treat similar items as hard negatives, the
    cross-modal distribution softmax(x yᵀ / τ) is pulled towards a *structural* target built from the
    intra-modal similarities, T = softmax(((x xᵀ + y yᵀ) / 2) / τ). Both directions are used (rows:
    modality 1 -> 2; columns: 2 -> 1, i.e. Sᵀ against the transposed structure), averaged.

    T is computed without gradient: it is a target (teacher), so the loss moves the cross-modal
    similarities towards the item structure instead of also bending the structure towards the current
    cross-modal scores (which would let both collapse onto each other). KL divergence (not soft
    cross-entropy) is used so that the loss is exactly zero when the two distributions coincide
    (e.g. x == y), rather than the target's entropy.
    """
    x, y = _as_float(x), _as_float(y)
    logits = x @ y.T / tau  # S: rows = modality-1 items, columns = modality-2 items
    with torch.no_grad():
        structure = (x @ x.T + y @ y.T) / 2 / tau
        log_target_rows = F.log_softmax(structure, dim=1)
        log_target_cols = F.log_softmax(structure.T, dim=1)  # the structure is symmetric; kept explicit
    kl_rows = F.kl_div(F.log_softmax(logits, dim=1), log_target_rows, reduction="batchmean", log_target=True)
    kl_cols = F.kl_div(F.log_softmax(logits.T, dim=1), log_target_cols, reduction="batchmean", log_target=True)
    return (kl_rows + kl_cols) / 2


def infonce_loss(x: torch.Tensor, y: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP-style cross-entropy with diagonal targets, both directions) for
    already L2-normalised ``x``, ``y`` [N, D]: SDA's ablation of CMSA."""
    x, y = _as_float(x), _as_float(y)
    logits = x @ y.T / tau
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class CrossModalAlignment(nn.Module):
    """Auxiliary cross-modal alignment loss between an item's two modality vectors (SDA, CMSA).

    Each modality gets a linear head onto a shared ``align_dim`` space (L2-normalised); the
    temperature τ is learnable, stored as log τ (positive, scale-free updates) and clamped to
    [TAU_MIN, TAU_MAX] when used. ``variant`` "cmsa" is the structure-aware loss (:func:`cmsa_loss`),
    "infonce" SDA's ablation with one-hot targets (:func:`infonce_loss`).
    """

    def __init__(self, dims: dict[str, int], align_dim: int = 64, temperature: float = 0.07, variant: str = "cmsa"):
        super().__init__()
        dims = dict(dims)
        if len(dims) != 2:
            raise ValueError(
                f"CrossModalAlignment needs exactly two modalities, got {len(dims)}: {sorted(dims)}. "
                "Cross-modal alignment is undefined for a single-modality item tower."
            )
        for name, width in dims.items():
            if not isinstance(width, int) or width <= 0:
                raise ValueError(f"Input width of modality {name!r} must be a positive int, got {width!r}.")
        if align_dim <= 0:
            raise ValueError(f"align_dim must be positive, got {align_dim}.")
        if not TAU_MIN <= temperature <= TAU_MAX:
            raise ValueError(f"temperature must lie in [{TAU_MIN}, {TAU_MAX}], got {temperature}.")
        choice(variant, VARIANTS, "alignment variant")
        self.modalities = tuple(dims)
        self.variant = variant
        self.heads = nn.ModuleDict({name: nn.Linear(width, align_dim) for name, width in dims.items()})
        self.log_tau = nn.Parameter(torch.tensor(math.log(temperature)))

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.clamp(math.log(TAU_MIN), math.log(TAU_MAX)).exp()

    def project(self, vectors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The two modalities' normalised head outputs (X, Y), each [N, align_dim], in ``dims`` order."""
        if set(vectors) != set(self.modalities):
            raise ValueError(f"Expected vectors for modalities {sorted(self.modalities)}, got {sorted(vectors)}.")
        rows = {m: vectors[m].shape[0] for m in self.modalities}
        if len(set(rows.values())) != 1:
            raise ValueError(f"Modalities must have the same items (rows), got {rows}.")
        out = []
        for m in self.modalities:
            head = self.heads[m]
            out.append(F.normalize(head(vectors[m].to(head.weight.dtype)), dim=-1))
        return out[0], out[1]

    def forward(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar alignment loss over the N items given (rows = items that have both modalities;
        the caller filters out items with a missing modality or padding)."""
        x, y = self.project(vectors)
        if x.shape[0] < 2:
            # No pair to contrast: a zero that stays in the graph (grads are zeros, not None / NaN).
            return 0.0 * (sum(p.sum() for p in self.heads.parameters()) + self.log_tau)
        loss_fn = cmsa_loss if self.variant == "cmsa" else infonce_loss
        return loss_fn(x, y, self.tau)


def item_log_popularity(counts: torch.Tensor) -> torch.Tensor:
    """log p(item) with add-one smoothing: log((count + 1) / (Σ count + n_items)), [n_items].

    Smoothing keeps unseen items and the padding id 0 finite, so the logQ correction never
    produces ±inf logits."""
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D [n_items], got shape {tuple(counts.shape)}.")
    if (counts < 0).any():
        raise ValueError("Item counts must be non-negative.")
    counts = counts if counts.is_floating_point() else counts.to(torch.get_default_dtype())
    smoothed = counts + 1
    return smoothed.log() - smoothed.sum().log()


def inbatch_popularity_ce(
    user: torch.Tensor,
    targets: torch.Tensor,
    item_vectors: torch.Tensor,
    item_ids: torch.Tensor,
    log_popularity: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-batch softmax cross-entropy with popularity (logQ) correction (IISAN, Fu et al. SIGIR 2024;
    CROSSAN, Fu et al. 2025; correction from Yi et al. RecSys 2019).

    ``user`` [P, H] are the user states at P real positions (padding removed) whose next item is
    ``targets`` [P]; ``item_vectors`` [U, H] are the vectors of the U distinct items of the batch
    ``item_ids`` [U], which serve as the shared candidate set (each target must be among them).
    logits = user @ item_vectorsᵀ − log p(item): in-batch negatives are sampled proportionally to
    popularity, so without the correction popular items are over-penalised; subtracting log p
    (applied to every column, target included) makes the sampled softmax an unbiased estimate of the
    full one. Returns the mean cross-entropy with each target's column.
    """
    if user.dim() != 2 or item_vectors.dim() != 2 or user.shape[1] != item_vectors.shape[1]:
        raise ValueError(
            "user [P, H] and item_vectors [U, H] must share H, "
            f"got {tuple(user.shape)} and {tuple(item_vectors.shape)}."
        )
    if targets.shape != (user.shape[0],) or item_ids.shape != (item_vectors.shape[0],):
        raise ValueError(
            f"targets must be [P] and item_ids [U], got {tuple(targets.shape)} for P={user.shape[0]} "
            f"and {tuple(item_ids.shape)} for U={item_vectors.shape[0]}."
        )
    if user.shape[0] == 0:  # no real position: a zero that keeps the graph, not the NaN of an empty mean
        return 0.0 * (user.sum() + item_vectors.sum())
    sorted_ids, order = item_ids.sort()
    if item_ids.numel() > 1 and (sorted_ids[1:] == sorted_ids[:-1]).any():
        raise ValueError("item_ids must be distinct: a duplicated candidate would count the target as a negative.")
    slot = torch.searchsorted(sorted_ids, targets).clamp(max=max(item_ids.numel() - 1, 0))
    found = sorted_ids[slot] == targets if item_ids.numel() else torch.zeros_like(targets, dtype=torch.bool)
    if not found.all():
        missing = targets[~found].unique()[:10].tolist()
        raise ValueError(f"Targets {missing} are not among the in-batch candidate item_ids.")
    columns = order[slot]
    logits = user @ item_vectors.T
    if log_popularity is not None:
        logits = logits - log_popularity[item_ids].to(logits.dtype)
    return F.cross_entropy(logits, columns)


def sampled_softmax_ce(
    user: torch.Tensor,
    pos: torch.Tensor,
    pos_items: torch.Tensor,
    neg: torch.Tensor,
    neg_items: torch.Tensor,
    neg_log_q: torch.Tensor,
) -> torch.Tensor:
    """Sampled softmax cross-entropy (Jean et al. ACL 2015; Bengio & Senécal 2008) with negatives shared by
    every position of the batch.

    ``user`` [P, H] are the user states at P positions whose next item is ``pos_items`` [P] with vector
    ``pos`` [P, H]; ``neg`` [K, H] the vectors of the K shared negatives ``neg_items`` [K]; ``neg_log_q``
    [K] the log-probability that each negative is in the sample (uniform over a pool of N, K drawn without
    replacement: log(K / N); 0 when the whole pool was taken).

    Logits of a position: [u·p, u·n_1 − log Q_1, ..., u·n_K − log Q_K]. What is subtracted is log Q of
    each negative only: the positive is in the candidate set with probability 1 (log 1 = 0). Why: the
    full softmax's denominator over the pool is Σ_i exp(u·v_i); Σ_k exp(u·n_k) / Q_k, the corrected
    negatives' term, is an unbiased (Horvitz-Thompson) estimate of it, so each sampled negative stands for
    N / K items of the pool. Without the correction the K negatives would count once each, a softmax over
    K + 1 items (a loss too easy, whose push on the negatives is N / K times too weak). Accidental hits, a
    negative equal to the position's positive, get logit −inf: that item is the target there, already
    counted as the positive. Returns the mean cross-entropy over the P positions."""
    if user.dim() != 2 or pos.shape != user.shape or neg.dim() != 2 or neg.shape[1] != user.shape[1]:
        raise ValueError(f"user and pos must be [P, H] and neg [K, H], got {tuple(user.shape)}, {tuple(pos.shape)} "
                         f"and {tuple(neg.shape)}.")
    if pos_items.shape != (user.shape[0],) or neg_items.shape != (neg.shape[0],) or neg_log_q.shape != neg_items.shape:
        raise ValueError(f"pos_items must be [P], neg_items and neg_log_q [K], got {tuple(pos_items.shape)}, "
                         f"{tuple(neg_items.shape)} and {tuple(neg_log_q.shape)}.")
    if user.shape[0] == 0:  # no real position: a zero that keeps the graph
        return 0.0 * (user.sum() + neg.sum())
    positive = (user * pos).sum(-1, keepdim=True)  # [P, 1]
    negative = user @ neg.T - neg_log_q.to(user.dtype)  # [P, K]
    negative = negative.masked_fill(neg_items.unsqueeze(0) == pos_items.unsqueeze(1), float("-inf"))
    logits = torch.cat([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
