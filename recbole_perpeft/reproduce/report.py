"""A reproduced table as Markdown (the paper's layout, one block per PEFT type) and as PNG charts.

Pure functions of the JSON payload that recbole_perpeft.reproduce writes; every block's table is
recbole_perpeft.compare_report.render_markdown's (metrics x100, mean (std), best in bold, † against PerPEFT)."""

from __future__ import annotations

from pathlib import Path

from recbole_perpeft.compare_report import MARKER, SIGNIFICANCE, render_markdown

HEADINGS = {"2": "Table 2: PerPEFT against the baselines", "3": "Table 3: ablations",
            "4": "Table 4: PerPEFT against non-sequential multimodal recommenders",
            "missing": "PerPEFT and GlobalPEFT with item images removed"}  # fmt: skip


def _cell(entry) -> str:
    return f"{entry['mean'] * 100:.2f} ({entry['std'] * 100:.2f})"


def missing_table(blocks, metric: str) -> list[str]:
    """| Model | 0% | 25% | 50% |: ``metric`` x100, mean (std), against the share of images removed."""
    shares = [b for b in blocks if b.get("x") is not None and metric in b["summary"]["metrics"]]
    models = list(dict.fromkeys(name for b in shares for name in b["summary"]["models"]))
    header = "| Model | " + " | ".join(f"{b['x'] * 100:g}%" for b in shares) + " |"
    lines = [f"`{metric}` (x100, mean (std)) against the share of item images removed:", "", header,
             "|---|" + "---:|" * len(shares)]  # fmt: skip
    for model in models:
        cells = [_cell(b["summary"]["results"][model][metric]) if model in b["summary"]["results"] else "skipped"
                 for b in shares]  # fmt: skip
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def render_document(payload: dict) -> str:
    """The whole Markdown file: what was run, then every block's table and p-values, skipped rows, the
    paper's source."""
    seeds, training = payload["seeds"], payload["equal_training"]
    plural = "s" if len(seeds) != 1 else ""
    lines = [
        f"# {HEADINGS.get(payload['table'], payload['table'])} ({payload['dataset']})",
        "",
        f"Test metrics x100, mean (std) over {len(seeds)} seed{plural} ({', '.join(map(str, seeds))}); the best "
        f"mean of each block in bold; {MARKER} where a paired t-test against the block's PerPEFT (its last row "
        f"where PerPEFT was not run) gives p < {SIGNIFICANCE}.",
    ]
    if training.get("single_stage_epochs") is not None:
        lines.append(f"Equal training: single-stage models {training['single_stage_epochs']} epochs (stage1_epochs + "
                     f"stage2_epochs), two-stage models {training['stage1_epochs']} + {training['stage2_epochs']}; "
                     "two-stage rows with the same stage-1 settings share one stage 1 per seed.")  # fmt: skip
    else:
        lines.append(f"Single-stage models {training['epochs']} epochs (--epochs), two-stage models "
                     f"{training['stage1_epochs']} + {training['stage2_epochs']}.")  # fmt: skip
    for block in payload["blocks"]:
        lines += ["", render_markdown(block["summary"], title=f"## {block['title']}", paper=block["paper"]).rstrip()]
    if payload["table"] == "missing" and payload["blocks"]:
        lines += ["", "## Summary", "", *missing_table(payload["blocks"], payload["metric"])]
    if payload["skipped"]:
        lines += ["", "Skipped rows:", ""] + [f"- {label}: {why}" for label, why in payload["skipped"].items()]
    if payload.get("paper_note"):
        lines += ["", payload["paper_note"]]
    return "\n".join(lines) + "\n"


def _figure(n_panels: int, width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(2, n_panels)
    rows = -(-n_panels // cols)
    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(figure)  # rendered by Agg whatever backend pyplot would pick
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return figure, axes


def bar_chart(payload: dict, path) -> Path:
    """One panel per metric; in each, a group of bars per block (PEFT type), one bar per row, x100 with the
    seeds' standard deviation as error bars. Row colours are the same in every panel and block."""
    blocks = payload["blocks"]
    metrics = blocks[0]["summary"]["metrics"]
    names = list(dict.fromkeys(name for b in blocks for name in b["summary"]["models"]))
    widest = max(len(b["summary"]["models"]) for b in blocks)
    figure, axes = _figure(len(metrics), max(5.0, 0.35 * widest * len(blocks) + 2), 3.6)
    from matplotlib import colormaps

    colours = colormaps["tab10" if len(names) <= 10 else "tab20"]
    width = 0.8 / widest
    labelled = set()  # each row once in the legend (its bars have the same colour everywhere)
    for ax, metric in zip(axes[: len(metrics)], metrics, strict=True):
        for g, block in enumerate(blocks):
            models = block["summary"]["models"]
            for i, name in enumerate(models):
                entry = block["summary"]["results"][name].get(metric)
                if entry is None:
                    continue
                label = None if name in labelled else name
                labelled.add(name)
                ax.bar(g + (i - (len(models) - 1) / 2) * width, entry["mean"] * 100, width * 0.9,
                       yerr=entry["std"] * 100, capsize=2, color=colours(names.index(name) % colours.N),
                       label=label)  # fmt: skip
        ax.set_xticks(range(len(blocks)), [b["title"] for b in blocks])
        ax.set_ylabel(f"{metric} (x100)")
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = [], []
    for ax in axes[: len(metrics)]:
        h, lab = ax.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    figure.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), fontsize=8)
    figure.suptitle(f"{HEADINGS.get(payload['table'], payload['table'])} ({payload['dataset']}): mean and std "
                    f"over {len(payload['seeds'])} seed(s)")  # fmt: skip
    figure.savefig(path, dpi=120)
    return Path(path)


def line_chart(payload: dict, path) -> Path:
    """The missing table: ``payload['metric']`` x100 against the share of images removed, a line per model,
    the seeds' standard deviation as error bars."""
    metric = payload["metric"]
    points = {}
    for block in payload["blocks"]:
        if block.get("x") is None:
            continue
        for name, entry in block["summary"]["results"].items():
            if metric in entry:
                points.setdefault(name, []).append((block["x"] * 100, entry[metric]["mean"] * 100,
                                                    entry[metric]["std"] * 100))  # fmt: skip
    figure, (ax,) = _figure(1, 6.0, 4.0)
    for name, values in points.items():
        xs, means, stds = zip(*sorted(values), strict=True)
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name)
    ax.set_xlabel("item images removed (%)")
    ax.set_ylabel(f"test {metric} (x100)")
    ax.set_title(f"{payload['dataset']}: mean and std over {len(payload['seeds'])} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.savefig(path, dpi=120)
    return Path(path)
