"""Jensen-Shannon divergence between token-attention distributions (paper Table 7).

JSD(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m), m = (p + q) / 2, in bits (base 2: between 0 and 1), per item over
the title's tokens; ``scipy.spatial.distance.jensenshannon`` is its square root.

- inter-cluster: the same item under two different groups' adapters of one run, averaged over the group
  pairs, then over items (and over runs when several are given);
- intra-cluster: the same item under *the same group's* adapter in runs with different seeds. Cluster
  labels are arbitrary per run (each seed fits its own K-Means), so the groups of two runs are first
  matched by their users: the assignment (``scipy.optimize.linear_sum_assignment``) that maximises the
  summed Jaccard overlap of the matched groups' user sets; each matched pair is one intra-cluster pair;
- inter-cluster across runs: the unmatched group pairs of those same runs. Intra-cluster pairs compare
  adapters trained from different stage-1 models, while inter-cluster pairs within a run share one; this
  third number has the same cross-run footing as intra-cluster, so the two compare like for like."""

from __future__ import annotations

from itertools import combinations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import rel_entr

from recbole_perpeft.analysis.attention import AttentionTable


def jsd(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
    """Jensen-Shannon divergence in bits along ``axis`` (distributions that each sum to one there)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = (p + q) / 2
    return (rel_entr(p, m).sum(axis) + rel_entr(q, m).sum(axis)) / (2 * np.log(2))


def group_rows(table: AttentionTable) -> list[int]:
    """Indices in ``table.adapters`` of the groups' adapters (not the global one)."""
    return [i for i, name in enumerate(table.adapters) if name.startswith("group ")]


def adapter_matrix(table: AttentionTable) -> np.ndarray:
    """[A, A] mean over items of the JSD between every two adapters (global and groups) of one run."""
    n = len(table.adapters)
    matrix = np.zeros((n, n))
    for a, b in combinations(range(n), 2):
        matrix[a, b] = matrix[b, a] = jsd(table.weights[a], table.weights[b]).mean()
    return matrix


def inter_cluster_per_item(table: AttentionTable) -> np.ndarray:
    """[N] per item, the mean JSD over pairs of different groups' adapters."""
    pairs = list(combinations(group_rows(table), 2))
    if not pairs:
        raise ValueError("inter-cluster JSD needs at least two groups' attention (see attention_note).")
    return np.mean([jsd(table.weights[a], table.weights[b]) for a, b in pairs], axis=0)


def match_groups(labels_a: dict, labels_b: dict) -> list[tuple[int, int, float]]:
    """Pair the groups of two runs by their users: ``labels_*`` map user token -> group (-1: none).
    Returns (group in a, group in b, Jaccard overlap of their user sets), the assignment maximising the
    summed overlap (unequal group counts leave some groups unmatched)."""
    users = sorted(set(labels_a) & set(labels_b))
    a = np.array([labels_a[u] for u in users])
    b = np.array([labels_b[u] for u in users])
    keep = (a >= 0) & (b >= 0)
    a, b = a[keep], b[keep]
    if not len(a):
        raise ValueError("the two runs have no grouped user in common: their groups cannot be matched.")
    n_a, n_b = int(a.max()) + 1, int(b.max()) + 1
    both = np.zeros((n_a, n_b))
    np.add.at(both, (a, b), 1)
    union = np.bincount(a, minlength=n_a)[:, None] + np.bincount(b, minlength=n_b)[None, :] - both
    jaccard = both / np.maximum(union, 1)
    rows, cols = linear_sum_assignment(-jaccard)
    return [(int(r), int(c), float(jaccard[r, c])) for r, c in zip(rows, cols, strict=True)]


def aligned(first: AttentionTable, second: AttentionTable) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the items both tables hold with the same title tokens (runs on the same data and
    text encoder hold all of them)."""
    where = {token: i for i, token in enumerate(second.item_tokens)}
    rows_a, rows_b = [], []
    for i, token in enumerate(first.item_tokens):
        j = where.get(token)
        if j is not None and first.lengths[i] == second.lengths[j]:
            n = first.lengths[i]
            if np.array_equal(first.input_ids[i, :n], second.input_ids[j, :n]):
                rows_a.append(i)
                rows_b.append(j)
    if not rows_a:
        raise ValueError(
            "the runs share no item with the same title tokens: intra-cluster JSD needs runs of one "
            "dataset and text encoder."
        )
    return np.array(rows_a), np.array(rows_b)


def _summary(values: np.ndarray) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "n": int(len(values)),
    }


def cross_run(first: AttentionTable, second: AttentionTable, matches) -> tuple[np.ndarray, np.ndarray, list]:
    """Per item: mean JSD over matched group pairs (intra-cluster) and over unmatched ones (inter-cluster
    across runs), and the per-pair means."""
    rows_a, rows_b = aligned(first, second)
    index_a, index_b = group_rows(first), group_rows(second)
    matched = {(a, b): overlap for a, b, overlap in matches}
    intra, inter, pairs = [], [], []
    for ga, gb in ((ga, gb) for ga in range(len(index_a)) for gb in range(len(index_b))):
        values = jsd(first.weights[index_a[ga]][rows_a], second.weights[index_b[gb]][rows_b])
        (intra if (ga, gb) in matched else inter).append(values)
        if (ga, gb) in matched:
            pairs.append({"group_a": ga, "group_b": gb, "user_jaccard": matched[ga, gb], "jsd": float(values.mean())})
    return np.mean(intra, axis=0), (np.mean(inter, axis=0) if inter else np.array([])), pairs


def divergence_report(tables: list[AttentionTable], labels: list[dict], seeds: list[int]) -> dict:
    """Inter-cluster (per run), intra-cluster and inter-cluster-across-runs JSD (see the module docstring).
    ``labels[r]``: user token -> group of run r. With one run, only the inter-cluster part."""
    report = {
        "unit": "Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint), per item, averaged over items",
        "n_items": int(len(tables[0].items)),
        "runs": [
            {
                "seed": s,
                "adapters": t.adapters,
                "inter_cluster": _summary(inter_cluster_per_item(t)),
                "adapter_matrix": adapter_matrix(t).round(6).tolist(),
            }
            for t, s in zip(tables, seeds, strict=True)
        ],
    }
    report["inter_cluster"] = _summary(np.concatenate([inter_cluster_per_item(t) for t in tables]))
    if len(tables) < 2:
        report["intra_cluster"] = None
        report["note"] = "one run: intra-cluster JSD needs checkpoints of the same setting with other seeds."
        return report
    intra, inter, comparisons = [], [], []
    for r in range(1, len(tables)):
        matches = match_groups(labels[0], labels[r])
        per_intra, per_inter, pairs = cross_run(tables[0], tables[r], matches)
        comparisons.append({"seeds": [seeds[0], seeds[r]], "matched_groups": pairs})
        intra.append(per_intra)
        if len(per_inter):
            inter.append(per_inter)
    report["intra_cluster"] = _summary(np.concatenate(intra))
    report["inter_cluster_across_runs"] = _summary(np.concatenate(inter)) if inter else None
    report["cross_run_matches"] = comparisons
    return report


def markdown_table(report: dict) -> str:
    """The JSD report as a Markdown table (x100, mean (std) over items)."""

    def cell(summary):
        return "n/a" if not summary else f"{summary['mean']:.3e} ({summary['std']:.3e})"

    lines = [
        f"Token-attention JSD ({report['unit']}; {report['n_items']} items)",
        "",
        "| pairs | JSD, mean (std) over items |",
        "|---|---:|",
        f"| inter-cluster (different groups, same run) | {cell(report['inter_cluster'])} |",
    ]
    if report.get("intra_cluster"):
        lines.append(f"| intra-cluster (same group matched by users, other seed) | {cell(report['intra_cluster'])} |")
        lines.append(
            f"| inter-cluster across runs (unmatched groups, other seed) | "
            f"{cell(report.get('inter_cluster_across_runs'))} |"
        )
        for comparison in report["cross_run_matches"]:
            matched = ", ".join(
                f"{p['group_a']}↔{p['group_b']} (users Jaccard {p['user_jaccard']:.2f})"
                for p in comparison["matched_groups"]
            )
            lines.append(f"\nSeeds {comparison['seeds'][0]} / {comparison['seeds'][1]}: groups matched {matched}.")
    else:
        lines.append(f"\n{report.get('note', '')}")
    return "\n".join(lines) + "\n"
