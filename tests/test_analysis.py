"""recbole_perpeft.analysis on two tiny PerPEFT runs (tiny CLIP, both towers adapted, 2 groups, seeds 2024
and 2025): loading a run back from its files, token attention, JSD, profiles, Grad-CAM, case study, the
command line, curves, cost and the n_groups sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import jensenshannon

from recbole_perpeft.analysis import curves as curves_module
from recbole_perpeft.analysis.attention import adapter_attention, pooling_weights, text_encoder, title_items
from recbole_perpeft.analysis.case_study import case_study, held_out_rows, ranking_scores
from recbole_perpeft.analysis.divergence import divergence_report, inter_cluster_per_item, jsd, match_groups
from recbole_perpeft.analysis.gradcam import group_gradcam, group_user_means
from recbole_perpeft.analysis.loading import load_run, read_result, user_item_matrix
from recbole_perpeft.analysis.profiles import group_profiles
from recbole_perpeft.analysis.sweep import sweep
from recbole_perpeft.resume import load_checkpoint
from tests.tiny import REPO_ROOT, make_atomic_dataset, make_tiny_clip, two_stage_keys

DATASET = "analysisds"
SEEDS = (2024, 2025)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two finished tiny PerPEFT runs (result JSON, checkpoint, groups file each)."""
    from recbole_perpeft.quick_start import run

    root = tmp_path_factory.mktemp("analysis")
    clip = make_tiny_clip(root / "clip")
    data_keys = make_atomic_dataset(root / "data", DATASET, n_users=40, n_items=40)
    keys = {**two_stage_keys(root, data_keys, clip.path), "state": "WARNING"}
    results = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for seed in SEEDS:
            path = root / f"r{seed}.json"
            run("PerPEFT", DATASET, config_dict={**keys, "seed": seed}, result_file=str(path))
            results.append(str(path))
    return SimpleNamespace(root=root, keys=keys, results=results, clip_path=clip.path)


@pytest.fixture(scope="module")
def loaded(env):
    return load_run(result_file=env.results[0])


@pytest.fixture(scope="module")
def table(loaded):
    return adapter_attention(loaded.model, title_items(loaded.model), loaded.item_tokens)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # RecBole's trainer writes log_tensorboard/ under the working directory


# --- loading -----------------------------------------------------------------------------------------------


def test_load_run_rebuilds_the_trained_model_and_groups(env, loaded):
    result = read_result(env.results[0])
    assert loaded.checkpoint == result["checkpoint"]
    assert loaded.config["foundation_model"] == "clip" and loaded.config["adapt_image_tower"] is True
    assert loaded.config["n_groups"] == 2 and loaded.seed == SEEDS[0]
    state = load_checkpoint(loaded.checkpoint)["state_dict"]
    own = loaded.model.state_dict()
    assert state.keys() == own.keys()
    for key, value in state.items():
        assert torch.equal(own[key], value), key
    groups = torch.load(result["groups_file"], weights_only=True)
    assert np.array_equal(loaded.groups.labels, groups["labels"].numpy())
    assert loaded.groups.sizes() == result["groups"]["sizes"]
    assert not loaded.model.training


def test_load_run_names_what_to_give_when_settings_do_not_fit(env):
    checkpoint = read_result(env.results[0])["checkpoint"]
    wrong = {**env.keys, "peft_type": "IA3"}
    with pytest.raises(ValueError, match="does not fit.*--key=value"):
        load_run(checkpoint, overrides=wrong)
    stage1 = read_result(env.results[0])["global_checkpoint"]
    with pytest.raises(FileNotFoundError, match="no groups file"):
        load_run(stage1, overrides=env.keys)


# --- token attention and JSD -----------------------------------------------------------------------------------


def test_attention_is_a_distribution_per_adapter_and_item(loaded, table):
    n_items = int(loaded.model.item_tower.has("text").sum())
    assert table.adapters == ["global", "group 0", "group 1"]
    assert table.weights.shape[:2] == (3, n_items) and len(table.item_tokens) == n_items
    for a in range(3):
        for i in range(n_items):
            n = table.lengths[i]
            assert table.weights[a, i, :n].sum() == pytest.approx(1.0, abs=1e-9)
            assert (table.weights[a, i, :n] > 0).all() and (table.weights[a, i, n:] == 0).all()


def test_clip_attention_is_the_eos_row_of_the_last_layer(loaded, table):
    """The group-1 distribution of an item, recomputed from transformers' own attention output."""
    foundation, tower = loaded.model.item_tower.foundation, loaded.model.item_tower
    i = 3
    ids = torch.as_tensor(table.input_ids[i : i + 1, : table.lengths[i]])
    weights = pooling_weights(foundation, ids, torch.ones_like(ids))
    assert weights[0].argmax() == table.lengths[i] - 1 and weights.sum() == 1  # EOS closes the title
    tower.activate(1)
    foundation.clip.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = text_encoder(foundation)(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True)
    finally:
        foundation.clip.set_attn_implementation("sdpa")
        tower.activate(None)
    expected = out.attentions[-1][0].mean(0)[table.lengths[i] - 1].double().numpy()
    np.testing.assert_allclose(table.distributions(i)[2], expected / expected.sum(), atol=1e-6)


def test_jsd_is_scipys_squared_distance_zero_for_identical_adapters(loaded):
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(7), size=5), rng.dirichlet(np.ones(7), size=5)
    expected = [jensenshannon(a, b, base=2) ** 2 for a, b in zip(p, q, strict=True)]
    np.testing.assert_allclose(jsd(p, q), expected, atol=1e-12)
    assert (jsd(p, p) == 0).all()
    # Group adapters copied from the global one (stage 2 before training): identical maps, JSD exactly 0.
    model = loaded.model
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model.item_tower.copy_global_to_groups()
        items = title_items(model)[:8]
        fresh = adapter_attention(model, items, loaded.item_tokens)
        assert (inter_cluster_per_item(fresh) == 0).all()
    finally:
        model.load_state_dict(saved)


def test_trained_groups_attend_differently(table):
    assert (inter_cluster_per_item(table) > 0).all()


def test_groups_of_two_runs_are_matched_by_their_users():
    users = [f"u{i}" for i in range(12)]
    first = dict(zip(users, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], strict=True))
    second = {u: {0: 2, 1: 0, 2: 1}[g] for u, g in first.items()}  # the same groups, labelled otherwise
    second["u0"] = 0  # one user moved
    matches = sorted(match_groups(first, second))
    assert [(a, b) for a, b, _ in matches] == [(0, 2), (1, 0), (2, 1)]
    assert [j for _, _, j in matches] == pytest.approx([3 / 4, 4 / 5, 1.0])  # Jaccard of the user sets


def test_divergence_report_inter_and_intra_cluster(env, loaded, table):
    other = load_run(result_file=env.results[1])
    other_table = adapter_attention(other.model, title_items(other.model), other.item_tokens)
    labels = [{r.user_tokens[u]: int(g) for u, g in enumerate(r.groups.labels) if u > 0} for r in (loaded, other)]
    report = divergence_report([table, other_table], labels, list(SEEDS))
    assert report["n_items"] == len(table.items)
    assert report["inter_cluster"]["mean"] > 0 and report["intra_cluster"]["mean"] > 0
    assert report["inter_cluster_across_runs"]["n"] == len(table.items)
    pairs = report["cross_run_matches"][0]["matched_groups"]
    assert len(pairs) == 2 and {p["group_a"] for p in pairs} == {0, 1}
    matrix = np.asarray(report["runs"][0]["adapter_matrix"])
    assert matrix.shape == (3, 3) and np.allclose(matrix, matrix.T) and (np.diag(matrix) == 0).all()


# --- profiles, Grad-CAM, case study -----------------------------------------------------------------------------


def test_profiles_count_the_groups_users(loaded):
    profiles = group_profiles(loaded.train_dataset, loaded.groups, top_words=50)
    labels = loaded.groups.labels
    assert profiles["sizes"] == loaded.groups.sizes() and profiles["users_grouped"] == int((labels >= 0).sum())
    has = user_item_matrix(loaded.train_dataset).toarray() > 0
    titles = loaded.titles
    for profile in profiles["groups"]:
        members = np.flatnonzero(labels == profile["group"])
        for entry in profile["words"]:
            with_word = [i for i, t in enumerate(titles) if entry["word"] in t.lower().split()]
            share = has[members][:, with_word].any(1).mean()
            assert entry["group_share"] == pytest.approx(share)
            assert entry["group_share"] >= entry["overall_share"] or entry["score"] <= 0


def test_gradcam_maps_and_scores_per_group(loaded):
    model = loaded.model
    means = group_user_means(model, loaded.train_dataset, loaded.groups)
    item = 5
    cams = group_gradcam(model, item, means)
    assert cams.adapters == ["global", "group 0", "group 1"]
    assert cams.maps.shape == (3, 4, 4) and (cams.maps >= 0).all()  # 32 px / 8 px patches
    assert cams.pixels.shape == (32, 32, 3) and cams.pixels.dtype == np.uint8
    for a, group in enumerate([None, 0, 1]):  # the differentiated score is the group's item-table score
        expected = float(model.item_table(group)[item] @ means[group])
        assert cams.scores[a] == pytest.approx(expected, abs=1e-4)
    self_cams = group_gradcam(model, item, target="self")
    assert self_cams.scores[1] == pytest.approx(float(model.item_table(0)[item].square().sum()), abs=1e-4)


def test_case_study_ranks_as_full_sort_evaluation(loaded):
    user = int(np.flatnonzero(loaded.groups.labels == 1)[0])
    case = case_study(loaded, user, k=5)
    assert case["group"] == 1 and [r["group"] for r in case["rankings"]] == [None, 1, 0]
    row = held_out_rows(loaded)[user]
    target = int(loaded.test_data._dataset.inter_feat["item_id"][row])
    assert case["test_item_id"] == target
    seen = set(np.flatnonzero(user_item_matrix(loaded.train_dataset)[user].toarray()[0])) | set(case["history_ids"])
    for ranking in case["rankings"]:
        assert len(ranking["item_ids"]) == 5 and not set(ranking["item_ids"]) & seen
        scores = ranking_scores(loaded, [user], ranking["group"])[0]
        assert ranking["item_ids"] == torch.topk(scores, 5).indices.tolist()
        assert ranking["test_rank"] == int((scores > scores[target]).sum()) + 1


# --- the command line ---------------------------------------------------------------------------------------


def analyze_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "recbole_perpeft.analyze", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TRANSFORMERS_OFFLINE": "1"},
    )


def test_cli_writes_every_part(env, tmp_path):
    out = tmp_path / "out"
    proc = analyze_cli(
        f"--result={','.join(env.results)}", f"--out={out}", "--state=WARNING", "--top_k=5", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == list(SEEDS) and summary["jsd"]["intra_cluster"]["mean"] > 0
    assert len(summary["items"]["tokens"]) == 4 and len(summary["case_study"]) == 2
    for name in (
        "profiles.json",
        "profiles.md",
        "jsd.json",
        "jsd.md",
        "attention.json",
        "gradcam.json",
        "case_study.json",
        "case_study.md",
        "summary.md",
    ):
        assert (out / name).stat().st_size > 0, name
    pngs = [
        out / "group_sizes.png",
        out / "jsd_matrix.png",
        *(out / "attention").glob("*.png"),
        *(out / "gradcam").glob("*.png"),
        *(out / "case_study").glob("*.png"),
    ]
    assert len(pngs) == 2 + 4 + 4 + 2
    for png in pngs:
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] > 100
        assert png.stat().st_size < 200_000
    assert "intra-cluster" in (out / "jsd.md").read_text()
    proc = analyze_cli(f"--result={env.results[0]}", "--items=nope", f"--out={out}", cwd=tmp_path)
    assert proc.returncode != 0 and "--items: unknown item token(s) ['nope']" in proc.stderr


# --- curves, cost, sweep ------------------------------------------------------------------------------------------

LOG = """Wed 02 Dec 2026 14:01:29 INFO  Stage 1: GlobalPEFT, 2 epochs -> saved/x-stage1-GlobalPEFT.pth
Wed 02 Dec 2026 14:01:30 INFO  epoch 0 training [time: 1.50s, train loss: 10.5000]
Wed 02 Dec 2026 14:01:30 INFO  epoch 0 evaluating [time: 0.10s, valid_score: 0.100000]
Wed 02 Dec 2026 14:01:30 INFO  valid result: \nhit@10 : 0.1    ndcg@10 : 0.05
Wed 02 Dec 2026 14:01:31 INFO  epoch 1 training [time: 1.40s, train loss: 9.2500]
Wed 02 Dec 2026 14:01:31 INFO  epoch 1 evaluating [time: 0.10s, valid_score: 0.150000]
Wed 02 Dec 2026 14:01:31 INFO  valid result: \nhit@10 : 0.15    ndcg@10 : 0.07
Wed 02 Dec 2026 14:01:32 INFO  Stage 2: PerPEFT, 1 epochs, weight_decay 0.0 -> saved/x.pth
Wed 02 Dec 2026 14:01:33 INFO  epoch 0 training [time: 2.00s, train loss: 8.0000]
Wed 02 Dec 2026 14:01:33 INFO  epoch 0 evaluating [time: 0.20s, valid_score: 0.200000]
Wed 02 Dec 2026 14:01:33 INFO  valid result: \nhit@10 : 0.2    ndcg@10 : 0.09
Wed 02 Dec 2026 14:01:34 INFO  test result: OrderedDict([('hit@10', 0.3)])
""".replace("\\n", "\n")


def test_parse_log_splits_stages_and_reads_loss_and_metrics():
    curves = curves_module.parse_log(LOG)
    assert list(curves) == ["stage 1 (GlobalPEFT)", "stage 2 (PerPEFT)"]  # (one stage-2 run: no weight decay shown)
    first, second = curves.values()
    assert first["epoch"] == [0, 1] and first["train_loss"] == [10.5, 9.25] and first["seconds"] == [1.5, 1.4]
    assert first["valid"] == {"hit@10": [0.1, 0.15], "ndcg@10": [0.05, 0.07]} and first["valid_score"] == [0.1, 0.15]
    assert second["valid"]["hit@10"] == [0.2] and second["train_loss"] == [8.0]


def test_curves_and_cost_commands(env, tmp_path):
    (tmp_path / "run.log").write_text(LOG)
    out = tmp_path / "plots"
    proc = analyze_cli(
        "curves", f"--log={tmp_path / 'run.log'}", f"--result={env.results[0]}", f"--out={out}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "run-curves.png").is_file() and json.loads((out / "run-curves.json").read_text())
    perpeft = read_result(env.results[0])
    rows = curves_module.cost_rows([perpeft])
    parameters = perpeft["trainable_parameters"]
    assert rows[0]["parameters"]["group_specific"] == (
        parameters["group_specific/peft_adapters"] + parameters["group_specific/projectors"]
    )
    assert set(rows[0]["epoch_seconds"]) == {"stage 1", "stage 2"}
    proc = analyze_cli("cost", f"--results={env.results[0]},{env.results[1]}", f"--out={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "cost.png").is_file() and "group-specific" in (out / "cost.md").read_text()


def test_sweep_runs_each_n_once_and_shares_stage_1(env, tmp_path, monkeypatch):
    from recbole_perpeft import quick_start

    calls = []
    real_run = quick_start.run

    def counting_run(model, dataset, config_file_list=None, config_dict=None, **kwargs):
        calls.append(dict(config_dict))
        return real_run(model, dataset, config_file_list, config_dict=config_dict, **kwargs)

    monkeypatch.setattr(quick_start, "run", counting_run)
    keys = {**env.keys, "state": "INFO", "stage2_epochs": 1}
    summary = sweep(DATASET, "1,2", out_dir=tmp_path / "sw", overrides=keys)
    assert [c["n_groups"] for c in calls] == [1, 2]
    assert "global_checkpoint" not in calls[0] and calls[1]["global_checkpoint"].endswith("-stage1-GlobalPEFT.pth")
    assert set(summary["runs"]) == {"1", "2"} and summary["runs"]["2"]["n_groups_used"] == 2
    for name in ("sweep.json", "sweep.md", "sweep.png", "curves-n1.png", "curves-n2.png"):
        assert (tmp_path / "sw" / name).is_file(), name
    log = Path(tmp_path / "sw" / "runs" / "PerPEFT-n2-seed2024.log").read_text()
    assert "epoch 0 training" in log and "Stage 1: GlobalPEFT from" in log
    calls.clear()
    sweep(DATASET, [2, 1], out_dir=tmp_path / "sw", overrides=keys)  # finished runs are reused
    assert calls == []
