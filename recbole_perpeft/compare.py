"""Compare models over several seeds, paper Table 2 style: mean (std) of the test metrics, paired t-tests.

    python run_recbole_perpeft.py --model=SASRec,FrozenMM,GlobalPEFT,PerPEFT --dataset=ml-100k --seeds=3 \\
        --result_file=table.json [--ttest=PerPEFT] [--config_files=a.yaml] [--key=value ...]

Every model is trained with every seed through :func:`recbole_perpeft.quick_start.run`, with the same
``--config_files`` and ``--key=value`` overrides plus ``seed``. ``--seeds=N`` runs seeds ``seed, seed+1, ...,
seed+N-1`` from the config's ``seed`` (2024 in recbole_perpeft/properties/overall.yaml); ``--seeds=1,5,9`` names them.
Runs go seed by seed, the models of a seed in the given order.

- Each run writes its own result JSON to ``<stem>.runs/<model>-seed<s>.json`` beside the result file. A run
  whose JSON is already there (same model, dataset and seed) is reused, not redone: an interrupted
  comparison continues where it stopped when the same command is run again. Delete the file (or the folder)
  to redo a run, e.g. after changing an override (a reused run whose config differs from an override is
  reported). With ``--extend``, a run whose config differs only in a shorter schedule (``epochs``, or a two-stage
  model's ``stage2_epochs``) is continued to the one asked by ``--resume`` from its checkpoints, which ends as
  the longer run from scratch would (recbole_perpeft/extend_runs.py).
- Two-stage models (those with ``load_global``: PerPEFT, SharedGroupPEFT and the group-level baselines) share one
  stage 1 per seed: the first grouped model of a seed trains GlobalPEFT, and its ``global_checkpoint`` is
  passed as ``global_checkpoint`` to the seed's later grouped models (unless ``--global_checkpoint`` is given,
  which then holds for all of them).
- Underneath, a comparison runs *rows* (:class:`Row`: a label, a model and the row's own overrides, e.g.
  "w/o group negatives" = PerPEFT with ``group_negatives=False``; :func:`run_rows`, used by
  recbole_perpeft/reproduce/); ``--model=A,B`` is the rows (A, A, {}), (B, B, {}). A row's runs are
  ``<label as a file name>-seed<s>.json``. Grouped rows share a seed's stage 1 only where their stage-1
  settings agree: overrides that differ only in stage-2 keys (:data:`STAGE2_KEYS`) and the model share one,
  a row with other ``modalities`` (or any other stage-1 key) trains its own.
- Aggregation, per model and test metric (``hit@20``, ``hit@30``, ``ndcg@20``, ``ndcg@30``, or whichever
  ``metric@k`` keys all runs have): mean and sample standard deviation (ddof=1; 0 with one seed).
- Paired t-test (``scipy.stats.ttest_rel``) of the reference model (``--ttest=NAME``; default: the last model
  listed) against every other model, per metric, over the seeds both ran: ``NaN`` (``null`` in the JSON,
  ``n/a`` in the table) with fewer than two seeds or identical values.
- ``--runs_from=NAME=PATH,...`` (:func:`parse_runs_from`): rows read from finished runs elsewhere instead of
  trained, e.g. a reproduce table's row or another comparison's runs: ``PATH`` is a folder holding
  ``<NAME>-seed<s>.json`` or a folder plus a file label (``DIR/w-o-MM`` for ``DIR/w-o-MM-seed<s>.json``).
  ``NAME`` is one of ``--model``; it may be any label (``PerPEFT-2soft``), its model is the one its runs
  recorded. A NAME given again adds a place (seeds run into several folders; the first holding a seed's run
  wins). Every seed's run must be found (checked before anything trains); nothing is copied.
- Output: the result JSON ``{dataset, seeds, models, metrics, runs: {model: {seed: path}},
  results: {model: {metric: {mean, std, per_seed}}}, ttest: {reference, p_values: {model: {metric: p}}}}``
  and ``<stem>.md``: a Markdown table (metrics x100, ``mean (std)``, best mean per column in bold, ``†`` where
  the reference differs with p < 0.05) and a table of the p-values; the Markdown is printed too.

The statistics (mean, std, t-tests) and the JSON and Markdown report are pure functions of result
dictionaries, in recbole_perpeft/compare_report.py (re-exported here)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple

from recbole_perpeft.compare_report import (  # noqa: F401 - re-exported: callers import them from here too
    MARKER,
    METRIC_ORDER,
    PAPER_METRICS,
    SIGNIFICANCE,
    aggregate,
    common_metrics,
    mean_std,
    paired_ttest,
    render_markdown,
    summarise,
    table_header,
    ttest_p_values,
    write_report,
)

MAX_SEED_COUNT = 100  # a larger count is a seed typed as a count
DEFAULT_SEEDS = 1  # a comparison without --seeds: each model once, with the config's seed
# Keys that only change stage 2 of a two-stage model (what it does after loading the trained GlobalPEFT, its
# evaluation included): grouped rows whose overrides differ only in these (and in the model) share a stage 1.
STAGE2_KEYS = frozenset(
    {"group_negatives", "grouping_method", "n_groups", "soft_groups", "soft_group_weighting",
     "soft_group_temperature", "stage2_epochs", "weight_decay_grid", "personal_vector_position", "grouping_sequence"}
)  # fmt: skip
# Not stage-1 settings either: the seed is matched separately, a given checkpoint replaces stage 1, and a
# two-stage model ignores `epochs` (stage 1 trains stage1_epochs: two_stage.stage_config).
NOT_STAGE1_KEYS = STAGE2_KEYS | {"seed", "global_checkpoint", "epochs"}


class Row(NamedTuple):
    """One row of a comparison: ``model`` run with the comparison's overrides plus ``overrides``; ``label``
    names it in the tables and (as :func:`safe_name`) its run files."""

    label: str
    model: str
    overrides: dict = {}  # never mutated (rows are read only)


# --- arguments ---------------------------------------------------------------------------------------------


def parse_models(value) -> list[str]:
    """'A,B, C' (or a list) -> ['A', 'B', 'C']; empty names and repeated models are errors."""
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n).strip() for n in value]
    if not names or any(not n for n in names):
        raise ValueError(f"--model needs comma-separated model names, got {value!r}.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"a model is listed more than once: {', '.join(repeated)}.")
    return names


def parse_seeds(value) -> int | list[int]:
    """'3' -> 3 (that many seeds from the config's seed); '1,2,3' (or a list) -> [1, 2, 3]."""
    if isinstance(value, bool):
        raise ValueError(f"--seeds must be a number of seeds or a comma-separated list of seeds, got {value!r}.")
    if isinstance(value, int):
        count = value
    elif isinstance(value, (list, tuple)):
        return _seed_list(list(value), value)
    else:
        text = str(value).strip()
        if "," in text:
            return _seed_list([s.strip() for s in text.split(",") if s.strip()], value)
        try:
            count = int(text)
        except ValueError:
            raise ValueError(
                f"--seeds must be a number of seeds (--seeds=3) or a comma-separated list (--seeds=1,2,3), "
                f"got {value!r}."
            ) from None
    if count < 1:
        raise ValueError(f"--seeds must be at least 1, got {value!r}.")
    if count > MAX_SEED_COUNT:  # --seeds=2025 meant seed 2025, not 2,025 runs per row
        raise ValueError(f"--seeds={value} would run {count} seeds per model; for the one seed {count} write "
                         f"--seeds={count}, (a list), or --seed={count} without --seeds.")
    return count


def _seed_list(items, original) -> list[int]:
    try:
        seeds = [int(s) for s in items]
    except (TypeError, ValueError):
        raise ValueError(f"--seeds: every seed must be an integer, got {original!r}.") from None
    if not seeds:
        raise ValueError(f"--seeds: no seed in {original!r}.")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: a seed is repeated in {original!r}.")
    return seeds


def resolve_seeds(seeds, base_seed) -> list[int]:
    """The seeds to run: a list as given; a count n -> base_seed, ..., base_seed + n - 1.
    ``base_seed`` may be a callable (only called for a count)."""
    seeds = parse_seeds(seeds)
    if isinstance(seeds, list):
        return seeds
    base = int(base_seed() if callable(base_seed) else base_seed)
    return [base + i for i in range(seeds)]


def config_seed(model: str, dataset: str, config_file_list=None, overrides=None) -> int:
    """The ``seed`` a run of ``model`` would use (command line > YAML files > properties > RecBole)."""
    overrides = dict(overrides or {})
    if "seed" in overrides:
        try:
            return int(overrides["seed"])
        except (TypeError, ValueError):
            raise ValueError(f"seed must be an integer, got {overrides['seed']!r}.") from None
    from recbole_perpeft.config import Config

    return int(Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=overrides)["seed"])


def output_paths(result_file) -> tuple[Path, Path]:
    """result JSON 'out/table.json' -> per-run folder 'out/table.runs', Markdown 'out/table.md'."""
    path = Path(result_file)
    if path.suffix == ".md":
        raise ValueError(f"--result_file is the comparison's JSON (the Markdown goes beside it), got {path}.")
    stem = path.with_suffix("") if path.suffix == ".json" else path
    return stem.parent / (stem.name + ".runs"), stem.parent / (stem.name + ".md")


def safe_name(label: str) -> str:
    """A row label as a file name: 'w/o group negatives' -> 'w-o-group-negatives' ('PerPEFT' stays)."""
    name = re.sub(r"[^A-Za-z0-9_.+=-]+", "-", str(label)).strip("-.")
    if not name:
        raise ValueError(f"row label {label!r} has no character usable in a file name.")
    return name


def run_file(runs_dir, label: str, seed: int) -> Path:
    return Path(runs_dir) / f"{safe_name(label)}-seed{seed}.json"


def check_rows(rows) -> list[Row]:
    """Rows as :class:`Row` s, with distinct labels and distinct run-file names."""
    rows = [row if isinstance(row, Row) else Row(*row) for row in rows]
    if not rows:
        raise ValueError("no rows to run.")
    files = {}
    for row in rows:
        name = safe_name(row.label)
        if name in files:
            raise ValueError(f"rows {files[name]!r} and {row.label!r} would share the run files {name}-seed*.json: "
                             "give them distinct labels.")  # fmt: skip
        files[name] = row.label
    return rows


def stage1_key(overrides: dict) -> str:
    """What a grouped row's stage 1 depends on among its overrides (values as RecBole reads them): rows with
    the same key can share one stage-1 GlobalPEFT per seed."""
    settings = {k: _as_config_value(v) for k, v in overrides.items() if k not in NOT_STAGE1_KEYS}
    return json.dumps(settings, sort_keys=True, default=str)


def is_grouped(model: str) -> bool:
    """Does the model start from a trained GlobalPEFT (``load_global``: PerPEFT, the group-level baselines,
    SharedGroupPEFT), so that it can take a seed's shared ``global_checkpoint``? Unknown names raise ValueError."""
    from recbole_perpeft.utils import get_model

    return callable(getattr(get_model(model), "load_global", None))


# --- running ---------------------------------------------------------------------------------------------------


def _given(value) -> bool:
    return value is not None and str(value).strip() not in ("", "None", "none", "null", "~")


def load_run(path, model: str | None, dataset: str, seed: int, quiet: bool = False):
    """The result JSON of an earlier run of (model, dataset, seed) at ``path``, or None (absent / other run).
    ``model`` None: a run of any model."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
        config = result.get("config") or {}
        same = (
            (model is None or result.get("model") == model)
            and str(result.get("dataset")) == str(dataset)
            and int(config.get("seed")) == int(seed)
            and isinstance(result.get("test_result"), dict)
        )
    except (OSError, ValueError, TypeError, AttributeError):
        same = False
    if not same:
        if not quiet:
            print(f"[compare] {path} is not a finished run of {model} on {dataset} with seed {seed}: running it again")
        return None
    return result


def _as_config_value(value):
    """A --key=value string as RecBole's Config reads it (Config._convert_config_dict)."""
    if not isinstance(value, str):
        return value
    try:
        converted = eval(value)  # noqa: S307 - what RecBole itself does with command-line values
        return converted if converted is None or isinstance(converted, (str, int, float, list, tuple, dict)) else value
    except Exception:
        return {"true": True, "false": False}.get(value.lower(), value)


# Keys read case-insensitively (peft_type iisan is IISAN): a reused run differing only in case is the same run.
CASE_FREE_KEYS = ("peft_type", "loss_type")


def changed_values(result: dict, overrides: dict) -> dict:
    """{key: (the earlier run's value, the value asked now)} of the overrides its resolved config disagrees with."""
    config = result.get("config") or {}
    changed = {}
    for key, value in overrides.items():
        if key in ("seed", "global_checkpoint"):
            continue
        try:
            wanted = json.loads(json.dumps(_as_config_value(value)))
        except (TypeError, ValueError):
            continue
        have = config.get(key)
        if key in CASE_FREE_KEYS and isinstance(have, str) and isinstance(wanted, str):
            have, wanted = have.upper(), wanted.upper()
        if key == "data_path" and isinstance(wanted, str) and have != wanted:  # RecBole's Config appends
            wanted = os.path.join(wanted, str(result.get("dataset")))  # the dataset's name
        if key not in config or have != wanted:
            changed[key] = (config.get(key), value if key == "data_path" else wanted)
    return changed


def describe_changes(changed: dict) -> list[str]:
    """changed_values as the reuse warning prints them."""
    return [f"{key}={have!r} (now {wanted!r})" for key, (have, wanted) in changed.items()]


def changed_keys(result: dict, overrides: dict) -> list[str]:
    """Overrides an earlier run's resolved config disagrees with (to warn when reusing it)."""
    return describe_changes(changed_values(result, overrides))


def finished_stage1(rows, dataset: str, seed: int, runs_dir, overrides: dict) -> dict:
    """{stage1_key: checkpoint} of the stage 1 that this seed's finished runs of the two-stage ``rows`` used."""
    found = {}
    for row in rows:
        result = load_run(run_file(runs_dir, row.label, seed), row.model, dataset, seed, quiet=True)
        checkpoint = (result or {}).get("global_checkpoint")
        if _given(checkpoint) and os.path.isfile(str(checkpoint)):
            found.setdefault(stage1_key({**overrides, **row.overrides}), str(checkpoint))
    return found


def _refusal(path, reason: str) -> str:
    return f"{path} cannot be continued to the schedule asked: {reason}"


def check_extensions(rows, grouped: dict, dataset: str, seed_list, runs_dir, overrides: dict) -> None:
    """--extend, before anything trains: every finished run the command would continue can be continued, or a
    ValueError names each one that cannot and why (a refusal met halfway would leave the table half extended)."""
    from recbole_perpeft.extend_runs import extension

    refused = []
    for seed in seed_list:
        for row in rows:
            path = run_file(runs_dir, row.label, seed)
            result = load_run(path, row.model, dataset, seed, quiet=True)
            if result is None:
                continue
            lengths = extension(result, changed_values(result, {**overrides, **row.overrides}), grouped[row.model])
            if isinstance(lengths, str):
                refused.append(_refusal(path, lengths))
    if refused:
        raise ValueError("--extend: nothing was trained: " + "; ".join(refused) + ".")


def check_jobs(jobs, extend: bool = False) -> int:
    """--jobs as a positive int; --extend continues runs one after another (jobs 1)."""
    try:
        count = int(str(jobs).strip())
    except (TypeError, ValueError):
        raise ValueError(f"--jobs must be a number of runs at once (e.g. --jobs=2), got {jobs!r}.") from None
    if count < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs!r}.")
    if count > 1 and extend:
        raise ValueError("--extend continues finished runs one at a time: leave out --jobs (or give --jobs=1).")
    return count


def run_rows(rows, dataset: str, seed_list, runs_dir, config_file_list=None, overrides=None, log="compare",
             skip=None, stage1_from=None, extend=False, jobs=1) -> tuple[dict, dict]:
    """Train (or reuse) every (row, seed), seed by seed, the rows of a seed in order; return ``runs``
    ({label: {seed: run file}}) and ``test_results`` ({label: {seed: test_result}}).

    ``skip(row)``: a reason not to run a row (printed once; the row gets no runs), or None. ``stage1_from``:
    more rows (the rest of a table) whose finished runs' stage 1 the two-stage rows may share. ``extend``: a
    finished run that only trained a shorter schedule is continued to this one (recbole_perpeft/extend_runs.py).
    ``jobs`` > 1: that many runs at once, each a subprocess (recbole_perpeft/experiments/executor.py)."""
    from recbole_perpeft import quick_start
    from recbole_perpeft.extend_runs import SCHEDULE_KEYS, extend_run, extension, schedule_key

    rows = check_rows(rows)
    overrides = dict(overrides or {})
    jobs = check_jobs(jobs, extend)
    grouped = {row.model: is_grouped(row.model) for row in rows}  # also checks every name before anything trains
    reasons = {row.label: skip(row) if skip else None for row in rows}
    for label, reason in reasons.items():
        if reason:
            print(f"[{log}] skipping {label}: {reason}", flush=True)
    todo = [row for row in rows if not reasons[row.label]]
    sharing = list({row.label: row for row in [*todo, *(stage1_from or [])] if is_grouped(row.model)}.values())
    user_global = _given(overrides.get("global_checkpoint"))
    total = len(todo) * len(seed_list)
    print(f"[{log}] {len(todo)} rows x {len(seed_list)} seeds ({', '.join(map(str, seed_list))}) on "
          f"{dataset}: {total} runs, results in {runs_dir}/", flush=True)  # fmt: skip
    if extend:
        check_extensions(todo, grouped, dataset, seed_list, runs_dir, overrides)
    if jobs > 1:
        from recbole_perpeft.experiments.executor import run_rows_parallel

        return run_rows_parallel(todo, grouped, dataset, seed_list, runs_dir, config_file_list, overrides, log,
                                 sharing, user_global, jobs, store=sys.modules[__name__])  # fmt: skip
    runs = {row.label: {} for row in todo}
    test_results = {row.label: {} for row in todo}
    done = 0
    for seed in seed_list:
        # This seed's GlobalPEFT checkpoints, by stage-1 settings (stage1_key); those of finished runs first, so
        # that a row placed before the run that trained its stage 1 (or a later --rows call) takes it too.
        stage1 = {} if user_global else finished_stage1(sharing, dataset, seed, runs_dir, overrides)
        for row in todo:
            done += 1
            row_overrides = {**overrides, **row.overrides}
            key = stage1_key(row_overrides)
            path = run_file(runs_dir, row.label, seed)
            result = load_run(path, row.model, dataset, seed)
            changed = changed_values(result, row_overrides) if result is not None else {}
            lengths = extension(result, changed, grouped[row.model]) if result is not None and extend else None
            if isinstance(lengths, str):  # (check_extensions saw it continuable: its files changed since)
                raise ValueError(f"--extend: {_refusal(path, lengths)}.")
            if lengths is not None:
                print(f"[{log}] run {done} of {total}: {row.label} seed {seed}: extending {path} "
                      f"({schedule_key(grouped[row.model])} {lengths[0]} -> {lengths[1]})", flush=True)  # fmt: skip
                result = extend_run(quick_start.run, result, path, lengths, grouped[row.model],
                                    dict(model=row.model, dataset=dataset, config_file_list=config_file_list,
                                         config_dict={**row_overrides, "seed": seed}))  # fmt: skip
            elif result is not None:
                print(f"[{log}] run {done} of {total}: {row.label} seed {seed}: reusing {path}", flush=True)
                if changed:
                    hint = " (or continue it to more epochs with --extend)" if set(changed) <= set(SCHEDULE_KEYS) \
                        and not extend else ""
                    print(f"[{log}] warning: {path} was run with {', '.join(describe_changes(changed))}; delete it "
                          f"to redo it{hint}")
            else:
                config_dict = {**row_overrides, "seed": seed}
                note = ""
                if grouped[row.model] and key in stage1 and not user_global:
                    config_dict["global_checkpoint"] = stage1[key]
                    note = f" (stage 1 from {stage1[key]})"
                print(f"[{log}] run {done} of {total}: {row.label} seed {seed}{note}", flush=True)
                if path.is_file():
                    path.unlink()  # another run's or a broken file: this run's result replaces it
                result = quick_start.run(
                    row.model, dataset, config_file_list, config_dict=config_dict, result_file=str(path)
                )
                if not path.is_file():
                    quick_start.write_json(str(path), result)
            if grouped[row.model] and not user_global and key not in stage1:
                checkpoint = result.get("global_checkpoint")
                if _given(checkpoint) and os.path.isfile(str(checkpoint)):
                    stage1[key] = str(checkpoint)
            runs[row.label][seed] = str(path)
            test_results[row.label][seed] = result["test_result"]
    return runs, test_results


# --- rows from finished runs (--runs_from) ------------------------------------------------------------------


def parse_runs_from(value) -> dict[str, list[Path]]:
    """'NAME=PATH,NAME=PATH' (or a dict of a path or a list of paths) -> {NAME: [Path(PATH), ...]}: the rows a
    comparison reads instead of training. A NAME given again adds a place (seeds run into several folders)."""
    if not value:
        return {}
    if isinstance(value, dict):
        pairs = [(str(k).strip(), str(v).strip()) for k, vs in value.items()
                 for v in (vs if isinstance(vs, (list, tuple)) else [vs])]  # fmt: skip
    else:
        pairs = []
        for item in (i.strip() for i in str(value).split(",")):
            name, sep, path = item.partition("=")
            if item and not sep:
                raise ValueError(f"--runs_from: {item!r} is not NAME=PATH (e.g. --runs_from=SASRec=old.runs).")
            if item:
                pairs.append((name.strip(), path.strip()))
    sources = {}
    for name, path in pairs:
        if not name or not path:
            raise ValueError(f"--runs_from: {name}={path} needs both a row name and a path.")
        sources.setdefault(name, []).append(Path(path))
    return sources


def source_run_file(source: Path, name: str, seed: int) -> Path:
    """A --runs_from place's run of ``seed``: ``<folder>/<NAME>-seed<s>.json``, or ``<folder>/<label>-seed<s>.json``
    for a PATH ``<folder>/<label>`` that is not a folder."""
    source = Path(source)
    return run_file(source, name, seed) if source.is_dir() else source.parent / f"{source.name}-seed{seed}.json"


def read_source_rows(sources: dict, dataset: str, seed_list, overrides: dict) -> tuple[dict, dict]:
    """``runs`` and ``test_results`` (as :func:`run_rows`) of the --runs_from rows: each seed's run from the first
    of the row's places holding a finished run of ``dataset`` with that seed. Every seed must be found, and a
    row's runs must be of one model, or nothing is returned."""
    runs, test_results = {}, {}
    for name, places in sources.items():
        runs[name], test_results[name], models = {}, {}, {}
        for seed in seed_list:
            tried = [source_run_file(place, name, seed) for place in places]
            # Lazily: the places after the first that holds this seed's run are not read.
            found = ((path, load_run(path, None, dataset, seed, quiet=True)) for path in tried)
            path, result = next(((p, r) for p, r in found if r is not None), (None, None))
            if result is None:
                other = f"not a finished run on {dataset} with seed {seed}"
                why = "; ".join(f"{p}: {other if p.is_file() else 'no such file'}" for p in tried)
                raise FileNotFoundError(
                    f"--runs_from {name}: no run of seed {seed} ({why}). Point PATH at the folder (or folder/label) "
                    f"of that row's runs, add another {name}=PATH, or leave seed {seed} out of --seeds.")  # fmt: skip
            models.setdefault(result.get("model"), []).append(seed)
            changed = changed_keys(result, overrides)
            if changed:
                print(f"[compare] warning: {path} was run with {', '.join(changed)}")
            runs[name][seed], test_results[name][seed] = str(path), result["test_result"]
        if len(models) > 1:
            raise ValueError(f"--runs_from {name}: its runs are of several models ({models}, model: seeds).")
        print(f"[compare] {name} ({next(iter(models))}): {len(seed_list)} runs from "
              f"{', '.join(map(str, places))}", flush=True)  # fmt: skip
    return runs, test_results


def _known_model(name: str) -> bool:
    try:
        is_grouped(name)
    except ValueError:
        return False
    return True


def compare(
    models,
    dataset: str,
    seeds=DEFAULT_SEEDS,
    config_file_list=None,
    overrides=None,
    result_file=None,
    reference=None,
    runs_from=None,
    extend=False,
    jobs=1,
) -> dict:
    """Train (or reuse) every (model, seed), write the comparison JSON and Markdown; return the JSON dict.
    ``runs_from`` ({name: path} or 'NAME=PATH,...'): rows read from finished runs, not trained. ``extend``:
    finished runs of a shorter schedule are continued to this one (run_rows). ``jobs``: runs at once (run_rows)."""
    models = parse_models(models)
    overrides = dict(overrides or {})
    sources = parse_runs_from(runs_from)
    unknown = [name for name in sources if name not in models]
    if unknown:
        raise ValueError(f"--runs_from names {', '.join(unknown)}, not in --model ({', '.join(models)}).")
    reference = reference or models[-1]
    if reference not in models:
        raise ValueError(f"--ttest={reference}: not one of the compared models ({', '.join(models)}).")
    trained = [model for model in models if model not in sources]
    for model in trained:
        is_grouped(model)  # every name checked before anything trains (or a seed is looked up)
    base = next((m for m in models if m not in sources or _known_model(m)), None)
    if base is None and not isinstance(parse_seeds(seeds), list):
        raise ValueError("--seeds as a count counts from the config's seed, which no row here names a model for: "
                         "give the seeds as a list (--seeds=2024,2025,2026).")  # fmt: skip
    seed_list = resolve_seeds(seeds, lambda: config_seed(base, dataset, config_file_list, overrides))
    result_file = Path(result_file or f"comparison-{dataset}.json")
    runs_dir, markdown_file = output_paths(result_file)
    runs, test_results = read_source_rows(sources, dataset, seed_list, overrides)  # before anything trains
    if trained:
        more_runs, more_results = run_rows([Row(m, m, {}) for m in trained], dataset, seed_list, runs_dir,
                                           config_file_list, overrides, extend=extend, jobs=jobs)  # fmt: skip
        runs.update(more_runs)
        test_results.update(more_results)
    runs = {model: runs[model] for model in models}
    test_results = {model: test_results[model] for model in models}
    summary = summarise(dataset, models, seed_list, test_results, reference=reference, runs=runs)
    markdown = write_report(summary, result_file, markdown_file)
    print("\n" + markdown, flush=True)
    print(f"[compare] written {result_file} and {markdown_file}", flush=True)
    return summary
