"""Recommendations out of trained runs (docs/recommend.md): ``recbole_perpeft.load(checkpoint)`` with nothing
re-supplied, top-k by token equal to RecBole's ``full_sort_topk`` (exclude_seen off) and free of seen items
(on), PerPEFT's new users as ``PerPEFT.recommend`` serves them, the export's exact round trip, an export loaded
without RecBole or transformers, and the ``recommend`` / ``export`` subcommands with bad rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recbole.utils.case_study import full_sort_topk

import recbole_perpeft
from recbole_perpeft.serving import WEIGHTS_FILE, TableRecommender
from tests.tiny import REPO_ROOT, load_entry_point, make_atomic_dataset, make_tiny_clip, two_stage_keys

DATASET = "recds"
MODELS = ("GlobalPEFT", "FrozenMM", "SASRec", "PerPEFT")
K = 5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each model trained for one epoch (PerPEFT: 1 + 1) through quick_start.run; their result JSONs."""
    from recbole_perpeft.quick_start import run

    root = tmp_path_factory.mktemp("recommend")
    clip = make_tiny_clip(root / "clip")
    data_keys = make_atomic_dataset(root / "data", DATASET, n_users=40, n_items=40)
    keys = {**two_stage_keys(root, data_keys, clip.path), "state": "WARNING", "MAX_ITEM_LIST_LENGTH": 6}
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # RecBole's log_tensorboard/
        for model in MODELS:
            config = dict(keys)
            if model == "SASRec":  # RecBole's own: none of the multimodal keys
                config = {k: v for k, v in keys.items() if k not in ("foundation_model", "clip_path")}
            result_file = root / f"{model}.json"
            run(model, DATASET, config_dict=config, result_file=str(result_file))
            results[model] = json.loads(result_file.read_text()) | {"result_file": str(result_file)}
    return {"root": root, "results": results, "inter": root / "data" / DATASET / f"{DATASET}.inter"}


def sequences(inter_file: Path) -> dict[str, list[str]]:
    """User token -> item tokens in time order, from the atomic file (the source of truth)."""
    rows = [line.split("\t") for line in inter_file.read_text().splitlines()[1:]]
    out: dict[str, list[tuple[float, str]]] = {}
    for user, item, time in rows:
        out.setdefault(user, []).append((float(time), item))
    return {u: [i for _, i in sorted(v)] for u, v in out.items()}


@pytest.fixture(scope="module")
def loaded(runs):
    """model -> (TrainedRun, Recommender), each loaded from its checkpoint alone."""
    out = {}
    for model, result in runs["results"].items():
        run = recbole_perpeft.load(result["checkpoint"])
        out[model] = (run, run.recommender(batch_size=7))  # (several batches)
    return out


@pytest.mark.parametrize("model", MODELS)
def test_known_users_get_full_sort_topk_and_no_seen_item(loaded, runs, model):
    run, rec = loaded[model]
    assert run.config["MAX_ITEM_LIST_LENGTH"] == 6 and run.config["hidden_size"] == 16  # the run's, recovered
    test = run.loaders[2]
    data = test.dataset
    uids = data.inter_feat[data.uid_field]
    expected_scores, expected = full_sort_topk(uids.numpy(), run.model, test, K)
    tokens = [rec.user_tokens[u] for u in uids.tolist()]
    lists, sizes = data.inter_feat[data.item_id_list_field], data.inter_feat[data.item_list_length_field]
    histories = [[rec.item_tokens[i] for i in lists[r, : sizes[r]].tolist()] for r in range(len(uids))]
    got = rec.recommend(user=tokens, history=histories, k=K, exclude_seen=False)
    assert [g.items for g in got] == [[rec.item_tokens[i] for i in row] for row in expected.tolist()]
    assert torch.allclose(torch.tensor([g.scores for g in got]), expected_scores.float().cpu(), atol=1e-5)

    truth = sequences(runs["inter"])
    for user, result in zip(tokens, rec.recommend(user=tokens, k=K), strict=True):
        assert len(result.items) == K and not set(result.items) & set(truth[user])
    # A known user alone is scored from its whole stored history (the atomic file's last L items).
    alone = rec.recommend(user=tokens[:6], k=K, exclude_seen=False)
    given = rec.recommend(user=tokens[:6], history=[truth[u][-6:] for u in tokens[:6]], k=K, exclude_seen=False)
    assert [a.items for a in alone] == [g.items for g in given]


def test_perpeft_new_users_are_served_as_the_model_serves_them(loaded, runs):
    run, rec = loaded["PerPEFT"]
    truth = sequences(runs["inter"])
    histories = [truth[u][:n] for u, n in zip(sorted(truth), [1, 3, 5, 8, 2, 9, 4], strict=False)]
    got = rec.recommend(history=histories, k=K, exclude_seen=False)
    for history, result in zip(histories, got, strict=True):
        items, group = run.model.recommend([rec.item_index[t] for t in history], K)
        assert result.items == [rec.item_tokens[i] for i in items] and result.group == group
    known = rec.recommend(user=sorted(truth)[:5], k=K)
    assert [r.group for r in known] == run.model.group_of_user[[rec.user_index[u] for u in sorted(truth)[:5]]].tolist()


@pytest.mark.parametrize("model", MODELS)
def test_export_round_trip_is_exact(loaded, runs, model, tmp_path):
    run, rec = loaded[model]
    out = run.export(str(tmp_path / "export"))
    served = TableRecommender.load(out)
    from safetensors.torch import load_file

    weights = load_file(str(Path(out) / WEIGHTS_FILE))
    table = run.model.item_embedding.weight if model == "SASRec" else run.model.item_table(None)
    assert torch.equal(weights["table.global"], table.detach().cpu())
    users = rec.user_tokens[1:]
    truth = sequences(runs["inter"])
    histories = [truth[u][:n] for u, n in zip(users, [1, 2, 4, 7, 3], strict=False)]
    for exclude_seen in (True, False):
        for kwargs in ({"user": users}, {"history": histories}):
            full = rec.recommend(**kwargs, k=K, exclude_seen=exclude_seen)
            exported = served.recommend(**kwargs, k=K, exclude_seen=exclude_seen)
            assert [r.items for r in exported] == [r.items for r in full]
            assert [r.group for r in exported] == [r.group for r in full]
            assert torch.allclose(torch.tensor([r.scores for r in exported]), torch.tensor([r.scores for r in full]),
                                  atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("model", MODELS)
def test_an_export_serves_known_users_without_the_encoder(loaded, runs, model, tmp_path, monkeypatch):
    """Known users' vectors are stored at export: serving them runs no encoder (and gives the full model's
    top-k); a history given with a request, or a new user, still runs it."""
    run, rec = loaded[model]
    out = run.export(str(tmp_path / "export"))
    served = TableRecommender.load(out)
    assert bool(served.precomputed[1:].all()) and not bool(served.precomputed[0])
    # An export written before the vectors were stored still serves known users (through the encoder).
    from safetensors.torch import load_file

    weights = {k: v for k, v in load_file(str(Path(out) / WEIGHTS_FILE)).items() if not k.startswith("users.v")}
    older = TableRecommender(served.meta, {k: v for k, v in weights.items() if k != "users.precomputed"})
    assert older.user_vectors is None
    assert [r.items for r in older.recommend(user=rec.user_tokens[1:], k=K)] == [
        r.items for r in served.recommend(user=rec.user_tokens[1:], k=K)]
    calls = []
    for encoder in served.encoders.values():
        monkeypatch.setattr(encoder, "forward", lambda *a, **kw: calls.append(1) or pytest.fail("encoder ran"))
    users = rec.user_tokens[1:]
    full = rec.recommend(user=users, k=K)
    exported = served.recommend(user=users, k=K)
    assert [r.items for r in exported] == [r.items for r in full] and [r.group for r in exported] == [
        r.group for r in full]
    assert torch.allclose(torch.tensor([r.scores for r in exported]), torch.tensor([r.scores for r in full]), atol=1e-5)
    assert not calls
    monkeypatch.undo()
    truth = sequences(runs["inter"])
    with monkeypatch.context() as mp:
        encoder = served.encoders["groups" if "groups" in served.encoders else "global"]
        forward = encoder.forward
        mp.setattr(encoder, "forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
        served.recommend(user=users[0], history=truth[users[0]][:3], k=K)
    assert calls


def test_an_export_loads_and_serves_without_recbole_or_transformers(loaded, tmp_path):
    run, rec = loaded["PerPEFT"]
    out = run.export(str(tmp_path / "export"))
    code = (
        "import sys, json\n"
        "from recbole_perpeft.serving import TableRecommender\n"
        f"t = TableRecommender.load({out!r})\n"
        f"r = t.recommend(user={rec.user_tokens[1]!r}, k=3)\n"
        f"h = t.recommend(history={rec.item_tokens[1:4]!r}, k=3)\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'recbole', 'transformers', 'peft', 'sklearn'})\n"
        "print(json.dumps({'items': r.items, 'new': h.items, 'heavy': heavy}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["heavy"] == []
    assert printed["items"] == rec.recommend(user=rec.user_tokens[1], k=3).items
    assert printed["new"] == rec.recommend(history=rec.item_tokens[1:4], k=3).items


def test_recommend_and_export_commands_write_good_rows_and_one_error_line_per_bad_row(loaded, runs, tmp_path):
    run, rec = loaded["GlobalPEFT"]
    main = load_entry_point().main
    histories = tmp_path / "histories.jsonl"
    histories.write_text("\n".join([
        json.dumps(rec.item_tokens[1:4]),
        json.dumps({"user": rec.user_tokens[2]}),
        json.dumps({"user": "nobody"}),
        json.dumps(["101", "no-such-item"]),
        json.dumps([]),
        "not json",
        "",
        json.dumps({"user": rec.user_tokens[3], "history": rec.item_tokens[5:7]}),
    ]) + "\n")  # fmt: skip
    export_dir = tmp_path / "export"
    main(["export", f"--checkpoint={run.checkpoint}", f"--out={export_dir}"])
    outputs = {}
    for source in (f"--checkpoint={run.checkpoint}", f"--export={export_dir}"):
        out = tmp_path / f"out{len(outputs)}.jsonl"
        main(["recommend", source, f"--histories={histories}", "--k=4", f"--out={out}"])
        outputs[source] = [json.loads(line) for line in out.read_text().splitlines()]
        errors = Path(f"{out}.errors.txt").read_text().splitlines()
        assert [e.split(":")[0] for e in errors] == ["line 3", "line 4", "line 5", "line 6"]
        assert "'nobody'" in errors[0] and "'no-such-item'" in errors[1] and "empty history" in errors[2]
    rows = list(outputs.values())[0]
    assert [r["line"] for r in rows] == [1, 2, 8] and all(len(r["items"]) == 4 for r in rows)
    assert rows[0]["items"] == rec.recommend(history=rec.item_tokens[1:4], k=4).items
    assert [r["items"] for r in rows] == [r["items"] for r in list(outputs.values())[1]]

    users = tmp_path / "users.txt"
    users.write_text(f"{rec.user_tokens[1]}\nghost\n")
    out = tmp_path / "users.jsonl"
    main(["recommend", f"--result={runs['results']['GlobalPEFT']['result_file']}", f"--users={users}", "--k=2",
          "--exclude_seen=false", f"--out={out}", f"--errors={tmp_path / 'bad.txt'}"])  # fmt: skip
    assert json.loads(out.read_text())["items"] == rec.recommend(user=rec.user_tokens[1], k=2, exclude_seen=False).items
    assert (tmp_path / "bad.txt").read_text().startswith("line 2: unknown user token 'ghost'")


def test_a_checkpoint_without_its_config_asks_for_the_result_json(runs, tmp_path):
    result = runs["results"]["SASRec"]
    state = torch.load(result["checkpoint"], weights_only=True)
    del state["run_config"]
    old = tmp_path / "old.pth"
    torch.save(state, old)
    with pytest.raises(ValueError, match="result JSON"):
        recbole_perpeft.load(str(old))
    patched = tmp_path / "r.json"
    patched.write_text(json.dumps({**json.loads(Path(result["result_file"]).read_text()), "checkpoint": str(old)}))
    run = recbole_perpeft.load(str(patched))
    assert run.config["MAX_ITEM_LIST_LENGTH"] == 6 and run.recommender().recommend(user="u1", k=3).items


@pytest.mark.parametrize("method", ["kmeans", "gmm", "random"])
def test_the_exports_group_assignment_is_the_groupings_own(method):
    """TableRecommender.assign (torch only) against UserGroups.assign (numpy / scikit-learn), as
    PerPEFT.recommend calls it: one user at a time."""
    import numpy as np

    from recbole_perpeft.export import grouping_parts
    from recbole_perpeft.grouping import fit_user_groups

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 4)) * 3
    vectors = (centres[rng.integers(3, size=60)] + rng.normal(size=(60, 4))).astype(np.float32)
    groups = fit_user_groups(vectors, np.arange(1, 61), 61, n_groups=3, method=method, seed=7)
    model = type("Model", (), {"group_of_user": torch.as_tensor(groups.labels)})()
    meta, weights = grouping_parts(groups, model)
    served = TableRecommender.__new__(TableRecommender)
    served.grouping, served.group_weights = meta, {k[len("grouping."):]: v for k, v in weights.items()}
    new = (centres[rng.integers(3, size=40)] + 1.5 * rng.normal(size=(40, 4))).astype(np.float32)
    expected = [int(groups.assign(v[None])[0]) for v in new]
    assert served.assign(torch.from_numpy(new)).tolist() == expected
    if method != "random":
        assert len(set(expected)) > 1  # (the check covers several groups)


@pytest.mark.parametrize("model", ["BPR", "GRU4Rec"])
def test_other_recbole_models_load_and_serve_what_they_can(model, tmp_path, monkeypatch):
    """A general model (BPR) serves its known users only; another sequential one (GRU4Rec) new users too;
    neither exports (their scoring is not a table + SASRec encoder), each refusal naming the model."""
    from recbole.data.interaction import Interaction

    from recbole_perpeft.quick_start import run

    monkeypatch.chdir(tmp_path)
    keys = make_atomic_dataset(tmp_path / "data", "otherds", n_users=30, n_items=25, with_images=False)
    config = {"epochs": 1, "checkpoint_dir": str(tmp_path / "saved"), "show_progress": False, "state": "WARNING",
              "topk": [5], "valid_metric": "hit@5", **keys}  # fmt: skip
    loaded = recbole_perpeft.load(run(model, "otherds", config_dict=config)["checkpoint"])
    rec = loaded.recommender()
    users = rec.user_tokens[1:]
    got = rec.recommend(user=users, k=K, exclude_seen=False)
    ids = torch.tensor([rec.user_index[u] for u in users])
    if model == "BPR":
        with torch.no_grad():
            scores = loaded.model.full_sort_predict(Interaction({loaded.model.USER_ID: ids})).view(len(ids), -1)
        scores[:, 0] = -torch.inf
        assert [g.items for g in got] == [[rec.item_tokens[i] for i in row] for row in scores.topk(K).indices.tolist()]
        with pytest.raises(ValueError, match="BPR scores only the users it was trained on"):
            rec.recommend(history=["101"], k=K)
    else:
        assert len(rec.recommend(history=["101", "102"], k=K).items) == K
        assert all(len(g.items) == K for g in got)
    with pytest.raises(ValueError, match=f"{model} scores users otherwise"):
        loaded.export(str(tmp_path / "export"))
