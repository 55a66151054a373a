"""A trained PerPEFT run, rebuilt for analysis: Config, dataset, splits and the model with its groups.

A stage-2 checkpoint (``saved/PerPEFT-<dataset>-seed<s>-<time>.pth``) holds the trained weights and the
run's ``model``, ``dataset`` and ``seed`` (``compat.SafeCheckpointMixin`` keeps only those config keys);
the grouping lies beside it in ``<stem>-groups.pt``. The rest of the run's settings come, in this order
(later wins):

1. RecBole's and our property files for that model and dataset (what a run gets by default);
2. the run's result JSON (``--result_file`` of the run), whose ``config`` is the resolved config: every
   key whose value differs from (1) is taken as one of the run's overrides;
3. ``n_groups`` from the groups file (the number of adapters the checkpoint holds);
4. the caller's ``--key=value`` overrides (``--image_dir`` on another machine, ``--peft_type`` when there
   is no result JSON, ...).

The model is then built as ``quick_start.run`` builds it, the checkpoint loaded strictly (a mismatch
names what to pass) and the groups attached; it is returned in eval mode."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from recbole_perpeft.quick_start import json_safe

# Keys RecBole derives from others (or from the machine): never taken back from a result JSON.
DERIVED_KEYS = {
    "model",
    "dataset",
    "MODEL_TYPE",
    "MODEL_INPUT_TYPE",
    "eval_type",
    "device",
    "local_rank",
    "single_spec",
    "valid_metric_bigger",
    "train_neg_sample_args",
    "valid_neg_sample_args",
    "test_neg_sample_args",
    "eval_neg_sample_args",
    "is_parallel",
    "config_files",
    "global_checkpoint",
    "gpu_id",
    "use_gpu",
    "nproc",  # (a run on several processes is analysed in one)
    "world_size",
    "ip",
    "port",
    "offset",
}


@dataclass
class LoadedRun:
    """What the analysis functions read: ``model`` (eval mode), its ``groups`` and the data."""

    checkpoint: str
    config: object  # recbole_perpeft.config.Config
    model: object  # PerPEFT (or another two-stage model)
    groups: object  # recbole_perpeft.grouping.UserGroups
    train_dataset: object
    valid_data: object
    test_data: object

    @property
    def item_tokens(self) -> list[str]:
        return list(self.train_dataset.field2id_token[self.train_dataset.iid_field])

    @property
    def user_tokens(self) -> list[str]:
        return list(self.train_dataset.field2id_token[self.train_dataset.uid_field])

    @property
    def titles(self) -> list[str]:
        return self.train_dataset.item_texts()

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    def item_ids(self, tokens) -> list[int]:
        """Internal ids of external item tokens; an unknown token is an error naming it."""
        return _ids(tokens, self.item_tokens, "item", "--items")

    def user_ids(self, tokens) -> list[int]:
        return _ids(tokens, self.user_tokens, "user", "--users")


def _ids(tokens, known: list[str], kind: str, option: str) -> list[int]:
    index = {t: i for i, t in enumerate(known) if i > 0}
    missing = [str(t) for t in tokens if str(t) not in index]
    if missing:
        raise ValueError(
            f"{option}: unknown {kind} token(s) {missing[:5]} (not in the run's dataset after "
            f"filtering; {kind} tokens are the ids of the atomic files, e.g. {known[1:4]})."
        )
    return [index[str(t)] for t in tokens]


def read_result(path: str) -> dict:
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"result file {path} cannot be read as a result JSON ({err}).") from None
    if not isinstance(result, dict) or not isinstance(result.get("config"), dict):
        raise ValueError(f"result file {path} has no 'config': give the JSON a run wrote with --result_file.")
    return result


def recovered_overrides(model: str, dataset: str, resolved: dict) -> dict:
    """The keys of a run's resolved config (a result JSON's ``config``) that differ from what the property
    files give ``model`` on ``dataset``: the run's own settings, as overrides."""
    from recbole_perpeft.config import Config

    defaults = Config(model=model, dataset=dataset, config_dict={}).final_config_dict
    overrides = {}
    for key, value in resolved.items():
        if key in DERIVED_KEYS or (key in defaults and json_safe(defaults[key]) == value):
            continue
        if key == "data_path" and isinstance(value, str) and os.path.basename(value.rstrip("/")) == dataset:
            value = os.path.dirname(value.rstrip("/"))  # RecBole appends the dataset name itself
        overrides[key] = value
    return overrides


def groups_path(checkpoint: str) -> str:
    from recbole_perpeft.resume import best_checkpoint_path
    from recbole_perpeft.two_stage import groups_file

    return groups_file(best_checkpoint_path(checkpoint))


def run_settings(checkpoint: str, result: dict | None = None, overrides: dict | None = None) -> tuple[str, str, dict]:
    """(model, dataset, config_dict) that rebuild the run of ``checkpoint`` (see the module docstring)."""
    from recbole_perpeft.resume import load_checkpoint

    saved = load_checkpoint(checkpoint)["config"]
    model, dataset = str(saved["model"]), str(saved["dataset"])
    config_dict = {"seed": int(saved["seed"])}
    if result is not None:
        if result.get("model") != model or str(result.get("dataset")) != dataset:
            raise ValueError(
                f"the result JSON is a {result.get('model')} run on {result.get('dataset')}, the "
                f"checkpoint {checkpoint} a {model} run on {dataset}: give the pair one run wrote."
            )
        config_dict.update(recovered_overrides(model, dataset, result["config"]))
        config_dict["seed"] = int(saved["seed"])
    groups = groups_path(checkpoint)
    if not os.path.isfile(groups):
        raise FileNotFoundError(
            f"no groups file {groups} beside {checkpoint}: give a stage-2 checkpoint of a "
            "two-stage run (PerPEFT), not a stage-1 (-stage1-GlobalPEFT) one."
        )
    config_dict["n_groups"] = int(torch.load(groups, weights_only=True)["n_groups"])
    config_dict.update(overrides or {})
    return model, dataset, config_dict


def load_run(
    checkpoint: str | None = None, result_file: str | None = None, overrides: dict | None = None, config_file_list=None
) -> LoadedRun:
    """Rebuild and load a stage-2 run from its checkpoint (or the one its result JSON names)."""
    from recbole.utils import init_seed

    from recbole_perpeft.config import Config
    from recbole_perpeft.data import create_dataset, data_preparation
    from recbole_perpeft.grouping import UserGroups
    from recbole_perpeft.resume import load_checkpoint
    from recbole_perpeft.utils import get_model

    result = read_result(result_file) if result_file else None
    if checkpoint is None:
        if result is None or not result.get("checkpoint"):
            raise ValueError("give --checkpoint=<a stage-2 .pth> or --result=<the run's result JSON>.")
        checkpoint = str(result["checkpoint"])
    model_name, dataset_name, config_dict = run_settings(checkpoint, result, overrides)
    config = Config(model=model_name, dataset=dataset_name, config_file_list=config_file_list, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    model_class = get_model(config["model"])
    train_data, valid_data, test_data = data_preparation(config, dataset, model_class)
    init_seed(config["seed"], config["reproducibility"])
    model = model_class(config, train_data._dataset).to(config["device"])
    state = load_checkpoint(checkpoint, map_location=config["device"])["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        hint = "" if result else " or the run's result JSON (--result=r.json)"
        raise ValueError(
            f"{checkpoint} does not fit the {model_name} built from its settings: give the run's "
            f"--key=value settings (peft_type, foundation_model, modalities, ...){hint}. "
            f"({str(err)[:300]})"
        ) from None
    groups = UserGroups.from_state(torch.load(groups_path(checkpoint), weights_only=True))
    if len(groups.labels) != train_data._dataset.user_num:
        raise ValueError(
            f"the groups file of {checkpoint} has {len(groups.labels)} users, the rebuilt dataset "
            f"{train_data._dataset.user_num}: the data settings differ from the run's (user_sample_ratio,"
            " filtering, data_path?)."
        )
    model.set_groups(groups)
    model.eval()
    return LoadedRun(checkpoint, config, model, groups, train_data._dataset, valid_data, test_data)


# --- what the analyses read off the training data ------------------------------------------------------------


def user_item_matrix(train_dataset):
    """[n_users, n_items] scipy CSR, 1 where the user has the item in its training sequence (every item
    is some augmented row's target or in its item list)."""
    from scipy.sparse import csr_matrix

    feat = train_dataset.inter_feat
    rows = np.concatenate(
        [feat[train_dataset.item_id_list_field].numpy(), feat[train_dataset.iid_field].numpy()[:, None]], axis=1
    )
    users = np.repeat(feat[train_dataset.uid_field].numpy(), rows.shape[1])
    items = rows.reshape(-1)
    keep = items > 0
    shape = (train_dataset.user_num, train_dataset.item_num)
    matrix = csr_matrix((np.ones(int(keep.sum()), dtype=np.float32), (users[keep], items[keep])), shape=shape)
    matrix.data[:] = 1.0  # duplicates were summed
    return matrix


@contextmanager
def activated(tower, group):
    """Route the item tower through ``group``'s adapter (None: the global one), then back to the global
    one (what evaluation code expects after it)."""
    tower.activate(group)
    try:
        yield
    finally:
        tower.activate(None)


def adapter_names(n_groups: int) -> list[tuple[str, int | None]]:
    """[("global", None), ("group 0", 0), ...]: the adapters an analysis compares, in order."""
    return [("global", None)] + [(f"group {g}", g) for g in range(n_groups)]
