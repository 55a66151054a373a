"""The analysis pictures. Every function writes one PNG and returns its path; figures are sized to stay
small (a README can hold them). Built with matplotlib's object API (``Figure``, saved by the Agg canvas
that a ``.png`` path selects): no display needed, and importing this module leaves the user's pyplot
backend and open figures alone."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _subplots(*args, figsize, **kwargs):
    """``plt.subplots`` without pyplot: a figure no pyplot state holds (nothing to close)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def _short(text: str, length: int = 28) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def group_sizes(sizes: list[int], path: str, title: str = "Users per interest group") -> str:
    """Bar chart of the group sizes, largest first, each bar labelled with its group and count."""
    order = np.argsort(-np.asarray(sizes), kind="stable")
    fig, ax = _subplots(figsize=(max(3.5, 0.5 * len(sizes) + 2), 3))
    bars = ax.bar(range(len(sizes)), [sizes[g] for g in order], color="tab:blue")
    ax.bar_label(bars, fontsize=8)
    ax.set_xticks(range(len(sizes)), [f"g{g}" for g in order])
    ax.set_xlabel("group (sorted by size)")
    ax.set_ylabel("users")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def attention_heatmap(
    tokens: list[str], adapters: list[str], weights: np.ndarray, path: str, title: str, note: str | None = None
) -> str:
    """Adapters x tokens heatmap of attention distributions (rows sum to one), values written in; with
    group adapters, a second panel shows each row minus the global adapter's (diverging colours), where
    small per-group shifts are visible."""
    weights = np.asarray(weights)
    panels = 2 if len(adapters) > 1 and adapters[0] == "global" else 1
    width = max(4, 0.55 * len(tokens) + 1.8)
    fig, axes = _subplots(1, panels, figsize=(width * panels, 0.42 * len(adapters) + 1.6), squeeze=False)
    shown = [(weights, "viridis", 0.0, max(float(weights.max()), 1e-9), "attention")]
    if panels == 2:
        diff = weights - weights[:1]
        bound = max(float(np.abs(diff).max()), 1e-9)
        shown.append((diff, "RdBu_r", -bound, bound, "minus the global adapter's"))
    for ax, (values, cmap, low, high, label) in zip(axes[0], shown, strict=True):
        image = ax.imshow(values, cmap=cmap, aspect="auto", vmin=low, vmax=high)
        ax.set_xticks(range(len(tokens)), tokens, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(adapters)), adapters, fontsize=8)
        if len(tokens) * len(adapters) <= 240:
            digits = 2 if low == 0 else 3
            for (r, c), value in np.ndenumerate(values):
                dark = value > low + 0.6 * (high - low) if low == 0 else abs(value) > 0.6 * high
                ax.text(
                    c,
                    r,
                    f"{value:.{digits}f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if dark == (low == 0) else "white",
                )
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
        ax.set_title(label, fontsize=8)
    fig.suptitle(_short(title, 90), fontsize=9)
    if note:
        fig.text(0.01, -0.02, note, fontsize=7, wrap=True, va="top")
    fig.tight_layout()
    return _save(fig, path)


def jsd_matrix(matrix: np.ndarray, adapters: list[str], path: str, title: str) -> str:
    """Adapter x adapter mean JSD heatmap, in the power of ten that puts the largest value in [1, 10)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    top = float(matrix.max())
    exponent = -int(np.floor(np.log10(top))) if top > 0 else 0
    values = matrix * 10.0**exponent
    fig, ax = _subplots(figsize=(0.6 * len(adapters) + 2.4, 0.5 * len(adapters) + 1.6))
    image = ax.imshow(values, cmap="magma")
    ax.set_xticks(range(len(adapters)), adapters, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(adapters)), adapters, fontsize=8)
    for (r, c), value in np.ndenumerate(values):
        colour = "black" if value > 0.6 * max(values.max(), 1e-12) else "white"
        ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    scale = f" ×10$^{{{exponent}}}$" if exponent else ""
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label=f"JSD{scale} (bits)")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def gradcam_panels(cams, path: str, title: str) -> str:
    """The item's image with each adapter's Grad-CAM over it, side by side; the maps share one colour
    scale (the largest value over the adapters), so a weaker map looks weaker."""
    import torch
    import torch.nn.functional as F

    size = cams.pixels.shape[:2]
    upsampled = F.interpolate(
        torch.as_tensor(cams.maps, dtype=torch.float32)[:, None], size=size, mode="bilinear", align_corners=False
    )[:, 0].numpy()
    top = max(float(upsampled.max()), 1e-12)
    n = len(cams.adapters)
    fig, axes = _subplots(1, n + 1, figsize=(1.9 * (n + 1), 2.4))
    axes[0].imshow(cams.pixels)
    axes[0].set_title("image", fontsize=8)
    for ax, name, heat, score in zip(axes[1:], cams.adapters, upsampled, cams.scores, strict=True):
        ax.imshow(cams.pixels)
        ax.imshow(heat / top, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(f"{name}\nscore {score:.2f}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(_short(title, 100), fontsize=9)
    return _save(fig, path)


def contact_sheet(case: dict, thumbnail, path: str, history: int = 5) -> str:
    """Rows: the user's last items and the held-out test item, then each ranking's top-k; thumbnails from
    ``thumbnail(item_id) -> HxWx3 uint8 or None``; the test item framed in red wherever it appears."""
    rows = [("history", case["history_ids"][-history:] + [case["test_item_id"]])]
    rows += [(f"{r['name']}\n(test item at {r['test_rank']})", r["item_ids"]) for r in case["rankings"]]
    titles = {}
    for entry, item in zip(case["history"], case["history_ids"], strict=True):
        titles[item] = entry["title"] or entry["item"]
    for ranking in case["rankings"]:
        for entry, item in zip(ranking["items"], ranking["item_ids"], strict=True):
            titles[item] = entry["title"] or entry["item"]
    titles[case["test_item_id"]] = case["test_item"]["title"] or case["test_item"]["item"]
    columns = max(len(items) for _, items in rows)
    fig, axes = _subplots(len(rows), columns, figsize=(1.25 * columns + 1, 1.75 * len(rows)), squeeze=False)
    for r, (label, items) in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(items):
                ax.axis("off")
                continue
            item = items[c]
            image = thumbnail(item)
            if image is not None:
                ax.imshow(image)
            is_test = item == case["test_item_id"]
            for spine in ax.spines.values():
                spine.set_edgecolor("red" if is_test else "lightgrey")
                spine.set_linewidth(3 if is_test else 0.5)
            caption = ("TEST: " if is_test else "") + titles.get(item, str(item))
            ax.set_xlabel(_short(caption, 18), fontsize=6)
        axes[r][0].set_ylabel(label, fontsize=7)
    fig.suptitle(f"user {case['user']} (group {case['group']})", fontsize=9)
    return _save(fig, path)


def metric_vs_groups(points: dict, path: str, title: str) -> str:
    """``points``: {metric label: ([n_groups], [values])}; one line per metric against the number of groups."""
    fig, ax = _subplots(figsize=(4.5, 3))
    for label, (ns, values) in points.items():
        ax.plot(ns, values, marker="o", label=label)
    all_ns = sorted({n for ns, _ in points.values() for n in ns})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_ns, [str(n) for n in all_ns])
    ax.set_xlabel("n_groups")
    ax.set_ylabel("metric")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def training_curves(curves: dict, path: str, title: str, metric: str | None = None) -> str:
    """Per stage: training loss, a validation metric and seconds per epoch, against the run's epoch
    (stage 2 continues after stage 1). ``curves`` as ``curves.parse_log`` / ``curves.from_result`` give it."""
    panels = [("train_loss", "training loss"), ("valid", metric or "valid score"), ("seconds", "s / epoch")]
    panels = [(key, label) for key, label in panels if any(stage.get(key) for stage in curves.values())]
    if not panels:
        raise ValueError("no per-epoch values to plot (the log has no epoch lines, the result no per_epoch seconds).")
    fig, axes = _subplots(1, len(panels), figsize=(3.4 * len(panels), 2.8), squeeze=False)
    offset = 0
    for stage, values in curves.items():
        epochs = np.asarray(values.get("epoch") or range(len(values.get("seconds") or [])))
        for ax, (key, _) in zip(axes[0], panels, strict=True):
            series = values.get(key)
            if key == "valid" and series:
                series = series.get(metric) if metric else values.get("valid_score")
            if series:
                ax.plot(offset + epochs[: len(series)] + 1, series, marker="o", label=stage)
        offset += int(epochs.max()) + 1 if len(epochs) else 0
    for ax, (_, label) in zip(axes[0], panels, strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (stage 2 continues after stage 1)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_short(title, 100), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def cost_bars(rows: list[dict], path: str, title: str) -> str:
    """Two panels: trainable parameters (stacked: group-specific and shared) and seconds per training
    epoch (one bar per model and stage). ``rows`` as ``curves.cost_rows`` gives them."""
    n_bars = sum(max(len(r["epoch_seconds"]), 1) for r in rows)
    fig, (left, right) = _subplots(1, 2, figsize=(3 + 1.6 * len(rows) + 1.3 * n_bars, 3.4))
    names = [r["label"] for r in rows]
    shared = [r["parameters"]["shared"] for r in rows]
    grouped = [r["parameters"]["group_specific"] for r in rows]
    left.bar(names, shared, label="shared / global", color="tab:blue")
    bars = left.bar(names, grouped, bottom=shared, label="group-specific", color="tab:orange")
    left.bar_label(bars, labels=[f"{(s + g) / 1e3:,.0f}k" for s, g in zip(shared, grouped, strict=True)], fontsize=7)
    left.set_ylabel("trainable parameters")
    left.legend(fontsize=7)
    labels, seconds = [], []
    for r in rows:
        for stage, value in r["epoch_seconds"].items():
            labels.append(f"{r['label']}\n{stage}" if stage else r["label"])  # (labels are unique: seeds differ)
            seconds.append(value)
    bars = right.bar(labels, seconds, color="tab:green")
    right.bar_label(bars, labels=[f"{s:.0f}" for s in seconds], fontsize=7)
    right.set_ylabel("s / training epoch (mean)")
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
