"""Where a level-1 model's weakness sits: its test metrics read at the output it was trained to predict from,
and at the last item's output instead (the personal vector ignored when it comes after the items, since
attention is causal).

    python bench/level1_readout.py RUN_JSON [RUN_JSON ...] [--personal_vector_position=end]

Each RUN_JSON is a finished GroupLevel1 run (``compare`` / ``reproduce`` write them under ``runs/``) whose
checkpoint and groups file are still where it says. Runs from before ``personal_vector_position`` existed
were trained with the vector at the end: pass ``--personal_vector_position=end`` for them (the key's
default is start, and a checkpoint does not record its layout). Prints both readouts per run and their
means (x100)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def readouts(result_file: str, overrides: dict) -> dict:
    from recbole.trainer import Trainer

    from recbole_perpeft.analysis.loading import load_run
    from recbole_perpeft.model.personalisation import PromptPersonalVector

    result = json.loads(Path(result_file).read_text())
    if result.get("model") != "GroupLevel1":  # (the loader rebuilds two-stage runs: UserLevel1 has no groups file)
        raise SystemExit(f"{result_file} is a {result.get('model')} run, not a GroupLevel1 one.")
    run = load_run(checkpoint=result["checkpoint"], result_file=result_file, overrides=overrides)
    assert isinstance(run.model, PromptPersonalVector)
    trainer = Trainer(run.config, run.model)
    out = {"layout": run.model.personal_vector_position,
           "as_trained": dict(trainer.evaluate(run.test_data, load_best_model=False, show_progress=False))}
    # The last item sits at index length - 1 (end layout) or length (start layout): read the output there.
    shift = 0 if run.model.at_start else 1
    run.model.user_positions = types.MethodType(lambda self, lengths: lengths - shift, run.model)
    run.model.train(), run.model.eval()  # drop the cached item tables (same weights; a clean evaluation)
    out["last_item"] = dict(trainer.evaluate(run.test_data, load_best_model=False, show_progress=False))
    return out


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    files = [a for a in args if not a.startswith("--")]
    overrides = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    if not files:
        raise SystemExit(__doc__)
    rows = {f: readouts(f, overrides) for f in files}
    metrics = list(next(iter(rows.values()))["as_trained"])
    print(f"\n{'run':<48}{'layout':>8}  readout    " + "".join(f"{m:>10}" for m in metrics))
    for f, row in rows.items():
        for readout in ("as_trained", "last_item"):
            cells = "".join(f"{100 * row[readout][m]:>10.2f}" for m in metrics)
            print(f"{Path(f).name:<48}{row['layout']:>8}  {readout:<11}{cells}")
    for readout in ("as_trained", "last_item"):
        means = "".join(f"{100 * sum(r[readout][m] for r in rows.values()) / len(rows):>10.2f}" for m in metrics)
        print(f"{'mean':<48}{'':>8}  {readout:<11}{means}")


if __name__ == "__main__":
    main()
