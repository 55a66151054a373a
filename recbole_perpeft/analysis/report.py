"""The whole analysis of a PerPEFT run into one folder: profiles, token attention, JSD, Grad-CAM, case study.

:func:`analyze` is what ``recbole-perpeft analyze --checkpoint=...`` runs; every part is also a
function of its own module (profiles, attention, divergence, gradcam, case_study). Files written in ``out``:

- ``profiles.json``, ``profiles.md``, ``group_sizes.png``
- ``attention/<item>.png`` (adapters x tokens), ``attention.json`` (the shown items' distributions)
- ``jsd.json``, ``jsd.md``, ``jsd_matrix.png`` (inter- and, given several checkpoints, intra-cluster JSD)
- ``gradcam/<item>.png``, ``gradcam.json``
- ``case_study.json``, ``case_study.md``, ``case_study/<user>.png`` (when the items have images)
- ``summary.md``: what was analysed, how, and the headline numbers."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image

from recbole_perpeft.analysis import plots
from recbole_perpeft.analysis.attention import (
    adapter_attention,
    attention_note,
    pooling_description,
    title_items,
    token_labels,
)
from recbole_perpeft.analysis.case_study import case_markdown, case_study, default_users
from recbole_perpeft.analysis.divergence import divergence_report, inter_cluster_per_item, markdown_table
from recbole_perpeft.analysis.gradcam import __doc__ as GRADCAM_DOC
from recbole_perpeft.analysis.gradcam import group_gradcam, group_user_means, map_agreement, target_layer
from recbole_perpeft.analysis.loading import load_run, user_item_matrix
from recbole_perpeft.analysis.profiles import group_profiles, profiles_markdown
from recbole_perpeft.quick_start import json_safe

PARTS = ("profiles", "attention", "jsd", "gradcam", "case")
TARGET_TEXT = {
    "users": "<v_g(i), mean interest vector of group g's users>, v_g(i) = ID embedding + group g's projector output",
    "self": "<v_g(i), v_g(i)>, v_g(i) = ID embedding + group g's projector output",
}


def _write(path: str, payload) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        if isinstance(payload, str):
            f.write(payload)
        else:
            json.dump(json_safe(payload), f, indent=2)
    return path


def _file_name(token: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(token))


def default_items(run, table, n_items: int) -> tuple[list[int], str]:
    """Half the items whose attention differs most between groups, half the most popular (training
    interactions); among items with a title, and an image when the run has images."""
    tower = run.model.item_tower
    usable = tower.has("text").clone() if "text" in tower.modalities else torch.ones_like(tower.has("image"))
    if "image" in tower.modalities:
        usable &= tower.has("image")
    usable[0] = False
    popularity = np.asarray(user_item_matrix(run.train_dataset).sum(0)).ravel()
    chosen, rule = [], "the most popular items (training users)"
    if table is not None and len([a for a in table.adapters if a.startswith("group")]) >= 2:
        per_item = inter_cluster_per_item(table)
        ranked = [int(table.items[i]) for i in np.argsort(-per_item, kind="stable") if usable[int(table.items[i])]]
        chosen = ranked[: n_items // 2]
        rule = f"the {len(chosen)} items whose attention differs most between groups, then the most popular ones"
    for item in np.argsort(-popularity, kind="stable").tolist():
        if len(chosen) >= n_items:
            break
        if usable[item] and item not in chosen:
            chosen.append(int(item))
    return chosen, rule


def analyze(
    checkpoints=None,
    result_files=None,
    out: str = "analysis",
    items=None,
    users=None,
    overrides=None,
    config_file_list=None,
    parts=PARTS,
    top_k: int = 10,
    n_items: int = 4,
    gradcam_target: str = "users",
    max_jsd_items: int | None = None,
) -> dict:
    """Analyse the run of ``checkpoints[0]`` (or ``result_files[0]``); further checkpoints (same setting, other
    seeds) enter the intra-cluster JSD. Returns the summary (also in ``out/summary.md``)."""
    checkpoints, result_files = list(checkpoints or []), list(result_files or [])
    count = max(len(checkpoints), len(result_files))
    if count == 0:
        raise ValueError("give --checkpoint=<stage-2 .pth>[,...] or --result=<result JSON>[,...].")
    for name, given in (("--checkpoint", checkpoints), ("--result", result_files)):
        if given and len(given) != count:
            raise ValueError(f"{name} lists {len(given)} files, the other option {count}: give one per run, in order.")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}.")
    runs = [
        load_run(
            checkpoints[i] if checkpoints else None,
            result_files[i] if result_files else None,
            overrides,
            config_file_list,
        )
        for i in range(count)
    ]
    main = runs[0]
    os.makedirs(out, exist_ok=True)
    summary = {
        "checkpoint": main.checkpoint,
        "model": main.config["model"],
        "dataset": main.config["dataset"],
        "seeds": [r.seed for r in runs],
        "n_groups": main.groups.n_groups,
        "peft_type": str(main.config["peft_type"]),
        "foundation_model": str(main.config["foundation_model"]),
        "outputs": {},
        "notes": [],
    }
    outputs = summary["outputs"]
    dataset = str(main.config["dataset"])

    if "profiles" in parts:
        profiles = group_profiles(main.train_dataset, main.groups)
        outputs["profiles"] = [
            _write(f"{out}/profiles.json", profiles),
            _write(f"{out}/profiles.md", profiles_markdown(profiles, dataset)),
            plots.group_sizes(
                profiles["sizes"], f"{out}/group_sizes.png", f"Users per group ({dataset}, {profiles['method']})"
            ),
        ]

    differs, note = attention_note(main.model)
    summary["attention"] = {"groups_differ": differs, "note": note}
    tables = None
    if "text" in main.model.item_tower.modalities and {"attention", "jsd"} & set(parts):
        summary["attention"]["pooling"] = pooling_description(main.model.item_tower.foundation)
        tables = []
        for run in runs if differs else runs[:1]:
            candidates = title_items(run.model)  # (the padding item 0 has no title)
            if max_jsd_items:
                candidates = candidates[:max_jsd_items]
            tables.append(adapter_attention(run.model, candidates, run.item_tokens))
    if items:
        chosen, rule = main.item_ids(items), "given with --items"
    else:
        chosen, rule = default_items(main, tables[0] if tables else None, n_items)
    summary["items"] = {"tokens": [main.item_tokens[i] for i in chosen], "rule": rule}

    if tables and "attention" in parts:
        outputs["attention"], shown = [], []
        table = tables[0]
        rows = {int(i): r for r, i in enumerate(table.items)}
        for item in chosen:
            if item not in rows:
                continue
            r = rows[item]
            tokens = token_labels(main.model.item_tower.foundation.tokenizer, table.input_ids[r, : table.lengths[r]])
            weights = table.distributions(r)
            title = (
                f"{main.titles[item]} (item {main.item_tokens[item]}): last-layer attention from the pooling position"
            )
            outputs["attention"].append(
                plots.attention_heatmap(
                    tokens,
                    table.adapters,
                    weights,
                    f"{out}/attention/{_file_name(main.item_tokens[item])}.png",
                    title,
                    None if differs else note,
                )
            )
            shown.append(
                {
                    "item": main.item_tokens[item],
                    "title": main.titles[item],
                    "tokens": tokens,
                    "adapters": table.adapters,
                    "weights": weights.round(6).tolist(),
                }
            )
        _write(f"{out}/attention.json", {**summary["attention"], "items": shown})
        outputs["attention"].append(f"{out}/attention.json")

    if "jsd" in parts and tables:
        if differs:
            labels = [{r.user_tokens[u]: int(g) for u, g in enumerate(r.groups.labels) if u > 0} for r in runs]
            report = divergence_report(tables, labels, [r.seed for r in runs])
            summary["jsd"] = {k: report.get(k) for k in ("inter_cluster", "intra_cluster", "inter_cluster_across_runs")}
            matrix = np.asarray(report["runs"][0]["adapter_matrix"])
            outputs["jsd"] = [
                _write(f"{out}/jsd.json", report),
                _write(f"{out}/jsd.md", markdown_table(report)),
                plots.jsd_matrix(
                    matrix,
                    tables[0].adapters,
                    f"{out}/jsd_matrix.png",
                    f"Mean title-attention JSD between adapters (seed {main.seed})",
                ),
            ]
        else:
            outputs["jsd"] = [_write(f"{out}/jsd.json", {"note": note})]
            summary["notes"].append(f"JSD: {note}")

    if "gradcam" in parts:
        outputs["gradcam"] = _gradcam(main, chosen, gradcam_target, out, summary)

    if "case" in parts:
        if users:
            user_ids, user_rule = main.user_ids(users), "given with --users"
        else:
            user_ids, user_rule = default_users(main)
        cases = [case_study(main, u, k=top_k) for u in user_ids]
        outputs["case"] = [
            _write(f"{out}/case_study.json", {"rule": user_rule, "cases": cases}),
            _write(f"{out}/case_study.md", case_markdown(cases, user_rule)),
        ]
        tower = main.model.item_tower
        if "image" in tower.modalities:

            def thumbnail(item, size=96):
                if not bool(tower.has("image")[item]):
                    return None
                pixels = tower.item_inputs("image", torch.tensor([item]))["pixels"][0].permute(1, 2, 0).cpu().numpy()
                return np.asarray(Image.fromarray(pixels).resize((size, size)))  # small: the sheet stays light

            for case in cases:
                outputs["case"].append(
                    plots.contact_sheet(case, thumbnail, f"{out}/case_study/{_file_name(case['user'])}.png")
                )
        summary["case_study"] = [
            {"user": c["user"], "group": c["group"], "test_rank": {r["name"]: r["test_rank"] for r in c["rankings"]}}
            for c in cases
        ]

    _write(f"{out}/summary.json", summary)
    _write(f"{out}/summary.md", summary_markdown(summary))
    return summary


def _gradcam(run, chosen: list[int], target: str, out: str, summary: dict) -> list[str]:
    tower = run.model.item_tower
    if "image" not in tower.modalities:
        summary["notes"].append("Grad-CAM: this run has no image modality.")
        return []
    _, _, layer = target_layer(tower.foundation)
    means = group_user_means(run.model, run.train_dataset, run.groups) if target == "users" else None
    files, records = [], []
    for item in chosen:
        if not bool(tower.has("image")[item]):
            continue
        cams = group_gradcam(run.model, item, means, target)
        files.append(
            plots.gradcam_panels(
                cams,
                f"{out}/gradcam/{_file_name(run.item_tokens[item])}.png",
                f"{run.titles[item]} (item {run.item_tokens[item]}): Grad-CAM per adapter",
            )
        )
        records.append(
            {
                "item": run.item_tokens[item],
                "title": run.titles[item],
                "adapters": cams.adapters,
                "scores": cams.scores,
                "map_max": cams.maps.reshape(len(cams.maps), -1).max(1).tolist(),
                "map_shape": list(cams.maps.shape[1:]),
                "group_map_cosine": map_agreement(cams),
            }
        )
    summary["gradcam"] = {"target": TARGET_TEXT[target], "feature_map": layer}
    files.append(_write(f"{out}/gradcam.json", {**summary["gradcam"], "method": GRADCAM_DOC, "items": records}))
    return files


def summary_markdown(summary: dict) -> str:
    lines = [
        f"# Analysis of {summary['model']} on {summary['dataset']}",
        "",
        f"Checkpoint `{summary['checkpoint']}` ({summary['n_groups']} groups, peft_type {summary['peft_type']}, "
        f"{summary['foundation_model']}); seeds {', '.join(map(str, summary['seeds']))}.",
        "",
    ]
    attention = summary.get("attention") or {}
    if attention:
        lines += [f"- Token attention: {attention['note']}"]
        if attention.get("pooling"):
            lines += [f"- Pooling position: {attention['pooling']}."]
    if summary.get("items"):
        lines += [f"- Items shown: {', '.join(summary['items']['tokens'])} ({summary['items']['rule']})."]
    jsd = summary.get("jsd")
    if jsd:

        def fmt(s):
            return "n/a" if not s else f"{s['mean']:.3e} bits (std {s['std']:.3e} over {s['n']} item values)"

        lines += [
            f"- JSD inter-cluster: {fmt(jsd['inter_cluster'])}",
            f"- JSD intra-cluster: {fmt(jsd['intra_cluster'])}",
            f"- JSD inter-cluster across runs: {fmt(jsd.get('inter_cluster_across_runs'))}",
        ]
    if summary.get("gradcam"):
        gradcam = summary["gradcam"]
        lines += [f"- Grad-CAM differentiates {gradcam['target']} w.r.t. {gradcam['feature_map']}."]
    for case in summary.get("case_study") or []:
        ranks = ", ".join(f"{name}: {rank}" for name, rank in case["test_rank"].items())
        lines += [f"- Case study user {case['user']} (group {case['group']}): test item rank {ranks}."]
    lines += [f"- Note: {n}" for n in summary.get("notes", [])]
    lines += ["", "## Files", ""]
    for part, files in summary["outputs"].items():
        lines += [f"- {part}: " + ", ".join(f"`{os.path.basename(str(f))}`" for f in files)]
    return "\n".join(lines) + "\n"
