"""Each RecBole-1.2.1 compatibility fix in recbole_perpeft.compat (and setup.cfg) has a test that fails without it."""

from __future__ import annotations

import configparser
import math
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from recbole.trainer import Trainer
from recbole.utils import ModelType

from recbole_perpeft import compat
from recbole_perpeft.config import Config
from recbole_perpeft.data import create_dataset, data_preparation

REPO_ROOT = Path(__file__).resolve().parents[1]


def install_requires() -> str:
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg")
    return parser["options"]["install_requires"]


# --- numpy 1.24 to 2.x, pandas<3, no ray ---------------------------------------------------------------


def requirement(name: str) -> str:
    (line,) = [r.strip() for r in install_requires().splitlines() if r.strip().split(">")[0].split("<")[0] == name]
    return line


NUMPY_MAJOR = int(np.__version__.split(".")[0])


def test_setup_cfg_admits_numpy_2_and_pins_pandas_below_3():
    # A numpy<2 pin made pip downgrade a user's numpy 2 without a word; the aliases are restored instead.
    assert requirement("numpy") == "numpy>=1.24"
    assert requirement("pandas") == "pandas>=2.0,<3"
    assert requirement("scipy")  # imported by compare_report.py and analysis/loading.py


def test_recbole_config_constructs_on_the_installed_numpy(base_config):
    # RecBole's Config.compatibility_settings reads np.float_, np.complex_, np.unicode_ (gone in numpy 2).
    config = Config(model="SASRec", dataset="ml-100k", config_dict=base_config)
    assert config["model"] == "SASRec" and config["dataset"] == "ml-100k"
    assert config["MODEL_TYPE"] == ModelType.SEQUENTIAL
    assert np.float is np.float_ is np.float64  # set by compatibility_settings


@pytest.mark.skipif(NUMPY_MAJOR < 2, reason=f"needs a real numpy 2 (numpy {np.__version__} installed; .ci/run's "
                    "numpy-2 leg runs this file under numpy 2)")  # fmt: skip
def test_real_numpy_2_lacks_the_aliases_until_restored():
    # In a fresh interpreter: numpy 2 itself has none of the three names, RecBole's Config fails without
    # the restore, and the restore maps each to the type numpy 1 defined it as.
    result = run_python(
        """
        import numpy as np
        from recbole.config import Config
        print("BEFORE", [hasattr(np, n) for n in ("float_", "complex_", "unicode_")])
        try:
            Config(model="SASRec", dataset="ml-100k", config_dict={"data_path": "/nonexistent"})
        except AttributeError as err:
            print("RECBOLE", err)
        from recbole_perpeft import compat
        compat.check_environment()
        print("AFTER", np.float_ is np.float64, np.complex_ is np.complex128, np.unicode_ is np.str_)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "BEFORE [False, False, False]" in result.stdout
    assert "RECBOLE" in result.stdout and "float_" in result.stdout
    assert "AFTER True True True" in result.stdout


def test_restoring_the_aliases_changes_nothing_numpy_has():
    before = {name: getattr(np, name) for name in ("float64", "complex128", "str_", "int_", "bool_")}
    compat.restore_numpy_aliases()
    compat.restore_numpy_aliases()  # idempotent
    assert {name: getattr(np, name) for name in before} == before
    assert np.float_ is np.float64 and np.complex_ is np.complex128 and np.unicode_ is np.str_


def test_check_environment_accepts_installed_versions():
    compat.check_environment()  # raises on pandas 3
    assert int(pd.__version__.split(".")[0]) <= compat.PANDAS_MAX_MAJOR


def test_check_environment_refuses_pandas_3_in_one_line_with_the_fix(monkeypatch):
    monkeypatch.setattr(compat.pd, "__version__", "3.1.0")
    with pytest.raises(ImportError) as err:
        compat.check_environment()
    message = str(err.value)
    assert "\n" not in message and "pandas 3.1.0" in message and "pandas<3" in message
    assert "fillna(inplace=True)" in message and "_remap" in message  # both causes
    assert message.endswith(f'Fix: {sys.executable} -m pip install "pandas>=2,<3"')  # this interpreter's pip


def test_pandas_fix_command_without_pip_uses_uv(monkeypatch):
    real_find_spec = compat.importlib.util.find_spec
    monkeypatch.setattr(compat.importlib.util, "find_spec", lambda n: None if n == "pip" else real_find_spec(n))
    assert compat.pandas_fix_command() == f'uv pip install --python {sys.executable} "pandas>=2,<3"'


def test_config_fails_early_on_pandas_3(monkeypatch, base_config):
    monkeypatch.setattr(compat.pd, "__version__", "3.0.0")
    with pytest.raises(ImportError, match="pandas 3.0.0"):
        Config(model="SASRec", dataset="ml-100k", config_dict=base_config)


def test_uv_override_drops_ray_and_nothing_else():
    # RecBole's ray<=2.6.3 has no wheel for Python 3.12+; the uv table in pyproject.toml removes it with a
    # marker that is never true (any other override would silently change a version).
    text = (REPO_ROOT / "pyproject.toml").read_text()  # (no tomllib: Python 3.10 has none)
    table = text[text.index("[tool.uv]") :]
    (overrides,) = re.findall(r"^override-dependencies = (.*)$", table, re.M)
    assert overrides == """["ray; sys_platform == 'never'"]"""


# --- pandas<3 ----------------------------------------------------------------------------------------


def test_missing_atomic_values_are_filled(toy_dataset, toy_config):
    # Item "3" has an empty title (token_seq) and item "2" an empty price (float). Under pandas 3 RecBole's
    # fillna(inplace=True) is a no-op: the title NaN breaks the token split and the price stays NaN.
    config = toy_config("GlobalPEFT", toy_dataset)
    dataset = create_dataset(config)
    item_feat = dataset.item_feat
    assert isinstance(item_feat, pd.DataFrame)  # not built yet: the frame RecBole filled
    assert not item_feat["price"].isna().any()
    assert not dataset.inter_feat["timestamp"].isna().any()
    assert all(isinstance(v, np.ndarray) for v in item_feat["title"])

    tokens = dataset.field2id_token["item_id"]
    row = {token: i for i, token in enumerate(tokens)}
    prices = item_feat.set_index("item_id")["price"]
    titles = item_feat.set_index("item_id")["title"]

    # The missing price is the mean of the prices that were given.
    given = [price for token, price in toy_dataset.prices.items() if price is not None and token in row]
    assert math.isclose(prices[row["2"]], float(np.mean(given)), rel_tol=1e-9)
    for token, price in toy_dataset.prices.items():
        if price is not None and token in row:
            assert prices[row[token]] == price
    # The empty title is an empty token sequence; the others keep all their tokens.
    assert len(titles[row["3"]]) == 0
    title_tokens = dataset.field2id_token["title"]
    assert [title_tokens[t] for t in titles[row["1"]]] == toy_dataset.titles["1"].split()
    # ... and survives build() (data_preparation) as a padded row.
    data_preparation(config, dataset)
    assert dataset.item_feat["title"][row["3"]].sum().item() == 0
    assert not torch.isnan(dataset.item_feat["price"]).any()


# --- torch weights_only -----------------------------------------------------------------------------


@pytest.fixture
def sasrec_run(toy_dataset, toy_config, in_tmp_path):
    """A tiny SASRec, its data and a config whose outputs stay in tmp_path."""
    from recbole.model.sequential_recommender import SASRec
    from recbole.utils import init_seed

    config = toy_config("SASRec", toy_dataset, hidden_size=8, inner_size=16, n_layers=1, n_heads=1)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)

    def new_model(seed):
        init_seed(seed, True)
        return SASRec(config, train_data._dataset)

    return config, new_model, test_data


def test_with_safe_checkpoints_is_idempotent_and_keeps_the_trainer():
    safe = compat.with_safe_checkpoints(Trainer)
    assert issubclass(safe, Trainer) and issubclass(safe, compat.SafeCheckpointMixin)
    assert safe.__mro__[1] is compat.SafeCheckpointMixin  # the mixin's _save_checkpoint wins
    assert compat.with_safe_checkpoints(safe) is safe
    assert safe.__name__ == "Trainer"


def test_get_trainer_always_writes_safe_checkpoints():
    from recbole_perpeft.utils import get_trainer

    assert issubclass(get_trainer(ModelType.SEQUENTIAL, "SASRec"), compat.SafeCheckpointMixin)
    assert issubclass(get_trainer(ModelType.GENERAL, "BPR"), compat.SafeCheckpointMixin)
    assert issubclass(get_trainer(ModelType.SEQUENTIAL, "GlobalPEFT"), compat.SafeCheckpointMixin)


def test_safe_checkpoint_loads_with_weights_only(sasrec_run):
    config, new_model, test_data = sasrec_run
    model = new_model(1)
    trainer = compat.with_safe_checkpoints(Trainer)(config, model)
    trainer.best_valid_score = np.float64(0.25)  # RecBole's metrics are numpy scalars
    trainer.cur_step = 2
    trainer._save_checkpoint(3, verbose=False)

    path = Path(trainer.saved_model_file)
    assert path.is_file() and path.parent == Path(config["checkpoint_dir"])
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["config"]["model"] == "SASRec"
    assert checkpoint["epoch"] == 3 and checkpoint["cur_step"] == 2
    assert checkpoint["best_valid_score"] == 0.25 and type(checkpoint["best_valid_score"]) is float
    assert checkpoint["state_dict"].keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(checkpoint["state_dict"][name], value)


def test_recbole_resume_and_evaluate_read_safe_checkpoints(sasrec_run):
    config, new_model, test_data = sasrec_run
    safe_trainer = compat.with_safe_checkpoints(Trainer)
    saved = safe_trainer(config, new_model(1))
    saved.best_valid_score = np.float64(0.5)
    saved._save_checkpoint(4, verbose=False)
    original = {k: v.clone() for k, v in saved.model.state_dict().items()}

    # RecBole's own, unchanged resume_checkpoint (torch.load with torch's weights_only default).
    other_model = new_model(2)
    assert not all(torch.equal(original[k], v) for k, v in other_model.state_dict().items())
    resumed = safe_trainer(config, other_model)
    resumed.resume_checkpoint(saved.saved_model_file)
    assert resumed.start_epoch == 5
    assert resumed.best_valid_score == 0.5
    for name, value in other_model.state_dict().items():
        assert torch.equal(value, original[name])

    # ... and evaluate(load_best_model=True) loads the same file.
    third = safe_trainer(config, new_model(3))
    result = third.evaluate(test_data, load_best_model=True, model_file=saved.saved_model_file)
    assert set(result) == {"hit@5", "ndcg@5"}
    for name, value in third.model.state_dict().items():
        assert torch.equal(value, original[name])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_unpatched_recbole_checkpoint_is_refused_by_weights_only(sasrec_run, tmp_path):
    # The failure the mixin addresses: RecBole pickles its Config into every checkpoint.
    config, new_model, _ = sasrec_run
    trainer = Trainer(config, new_model(1))
    path = tmp_path / "recbole.pth"
    trainer._save_checkpoint(1, verbose=False, saved_model_file=str(path))
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
        torch.load(path, weights_only=True)
    with pytest.raises(pickle.UnpicklingError):
        Trainer(config, new_model(2)).resume_checkpoint(str(path))


# --- ray / recbole.quick_start ----------------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )


def test_our_entry_points_never_import_ray_or_recbole_quick_start():
    result = run_python(
        """
        import sys
        import recbole_perpeft.quick_start
        import recbole_perpeft.trainer
        from recbole.utils import ModelType
        from recbole_perpeft.utils import get_trainer
        get_trainer(ModelType.SEQUENTIAL, "SASRec")
        get_trainer(ModelType.SEQUENTIAL, "GlobalPEFT")
        print("LOADED", sorted(m for m in ("ray", "recbole.quick_start") if m in sys.modules))
        """
    )
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout


def test_recbole_quick_start_is_the_hazard():
    # Control for the test above: importing recbole.quick_start either fails (ray needs pkg_resources)
    # or drags ray in. Either way our code must not touch it.
    result = run_python(
        """
        import sys
        try:
            import recbole.quick_start
        except ImportError as err:
            print("FAILED", type(err).__name__, err)
        else:
            print("RAY", "ray" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "FAILED" in result.stdout or "RAY True" in result.stdout


# --- RecBole's multi-process training (recbole_perpeft/distributed.py replaces it) ------------------------------


def test_trainers_keep_the_model_unwrapped_under_a_distributed_config(sasrec_run):
    config, new_model, _ = sasrec_run
    safe = compat.with_safe_checkpoints(Trainer)
    mro = safe.__mro__
    assert mro.index(compat.AbstractTrainerWithoutDDP) == mro.index(Trainer) + 1  # Trainer's super().__init__
    config["single_spec"] = False  # what Config sets in a process of a multi-process run
    try:
        # RecBole's own: DistributedDataParallel(model, device_ids=[local_rank]), CUDA and a process group only.
        with pytest.raises((RuntimeError, ValueError)):
            Trainer(config, new_model(1))
        model = new_model(1)
        trainer = safe(config, model)
        assert trainer.model is model and not hasattr(trainer, "distributed_model")
    finally:
        config["single_spec"] = True


def test_only_global_rank_0_writes_checkpoints(sasrec_run, monkeypatch):
    config, new_model, _ = sasrec_run
    trainer = compat.with_safe_checkpoints(Trainer)(config, new_model(1))
    config["single_spec"] = False
    try:
        # local_rank is 0 on every machine's first process: RecBole would write one checkpoint per machine.
        monkeypatch.setattr(compat.dist, "get_rank", lambda: 4)
        trainer._save_checkpoint(0, verbose=False)
        assert not Path(trainer.saved_model_file).exists()
        monkeypatch.setattr(compat.dist, "get_rank", lambda: 0)
        trainer._save_checkpoint(0, verbose=False)
        assert Path(trainer.saved_model_file).is_file()
    finally:
        config["single_spec"] = True


def test_distributed_device_is_gloo_on_a_cpu_and_eval_rows_merge(monkeypatch):
    from recbole.evaluator.collector import DataStruct

    from recbole_perpeft.launch import free_port

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # GPUs there, but gpu_id names too few
    with pytest.raises(ValueError, match=r"nproc=2 processes on GPUs need as many GPUs in gpu_id.*--gpu_id=0,1"):
        compat.init_distributed_device({"gpu_id": "0", "local_rank": 0, "nproc": 2})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = {"gpu_id": "0", "local_rank": 0, "nproc": 1, "world_size": 1, "ip": "localhost",
           "port": free_port("localhost"), "offset": 0}  # fmt: skip
    compat.init_distributed_device(cfg)  # RecBole's would ask for NCCL
    try:
        assert compat.dist.get_backend() == "gloo"
        assert cfg["device"] == torch.device("cpu") and cfg["single_spec"] is False
        struct = DataStruct()
        struct.set("rec.topk", torch.tensor([[1, 0, 1], [0, 0, 1]]))
        struct.set("data.num_items", 25)
        merged = compat.merge_eval_structs(struct)
        assert merged["rec.topk"].tolist() == [[1, 0, 1], [0, 0, 1]] and merged["data.num_items"] == 25
    finally:
        compat.dist.destroy_process_group()


def test_recbole_distributed_evaluation_is_the_hazard(sasrec_run):
    # Why our evaluation shares out whole batches and gathers rows (compat.merge_eval_structs): RecBole's
    # DistributedSampler pads the users to a multiple of the world size by repeating some ...
    sampler = torch.utils.data.distributed.DistributedSampler(list(range(5)), num_replicas=2, rank=1, shuffle=False)
    assert list(sampler) == [1, 3, 0]  # user 0 is evaluated twice
    # ... and _map_reduce weights each rank's metrics by len(batched_data), a 4-tuple for every batch.
    _, _, test_data = sasrec_run
    assert all(len(batch) == 4 for batch in test_data)
