"""RecBole's Config, aware of our models and our property files.

Order of precedence (lowest first): RecBole's own property files, ours
(``properties/overall.yaml``, ``properties/model/<model>.yaml`` along the class MRO,
``properties/backbone/<backbone>.yaml``, the preset's ``properties/preset/<preset>.yaml`` (presets.py),
``properties/dataset/<dataset>.yaml``),
the user's ``config_file_list``, then ``config_dict`` (the entry point puts the command line there).
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from pathlib import Path

import recbole
import torch
import yaml
from recbole.config import Config as RecBoleConfig

from recbole_perpeft.compat import check_environment, init_distributed_device
from recbole_perpeft.config_checks import check_numbers, check_valid_metric, requested_device
from recbole_perpeft.config_values import choice
from recbole_perpeft.data.checks import embedded_dataset_path
from recbole_perpeft.model.precision import PRECISIONS
from recbole_perpeft.presets import PER_PEFT_TYPE, merge_preset_mappings, preset_keys
from recbole_perpeft.property_files import PROPERTIES_DIR
from recbole_perpeft.utils import get_model

MODALITIES = ("text", "image")
# Property folders of components a run chooses by a key: properties/<folder>/<value of key>.yaml is layered
# over the model's YAMLs and under the dataset's.
COMPONENT_FILES = (("backbone", "backbone"),)
# Keys a user may set for their own code (or "*" for any): not refused as unknown.
EXTRA_KEYS = "extra_keys"
# Keys RecBole's Config sets itself or reads off the command line, not from any YAML or config[...] read.
CONFIG_KEYS = {"model", "dataset", "config_files", "MODEL_TYPE", "MODEL_INPUT_TYPE", EXTRA_KEYS}


def yaml_keys(folder: Path) -> set[str]:
    keys = set()
    for path in folder.rglob("*.yaml"):
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            keys |= set(loaded)
    return keys


@functools.lru_cache(maxsize=1)
def known_keys() -> frozenset[str]:
    """Every key some property file declares (RecBole's, for all its models and datasets, and ours)
    and every key RecBole's code reads as config[<name>]: a key outside this set has no effect."""
    recbole_dir = Path(recbole.__file__).resolve().parent
    keys = yaml_keys(recbole_dir / "properties") | (yaml_keys(PROPERTIES_DIR) - {PER_PEFT_TYPE}) | CONFIG_KEYS
    read = re.compile(r"""(?:config|final_config_dict|self)\[\s*["']([A-Za-z_][A-Za-z0-9_]*)["']\s*\]""")
    for path in recbole_dir.rglob("*.py"):
        keys |= set(read.findall(path.read_text(encoding="utf-8")))
    return frozenset(keys)


def check_known_keys(given: dict) -> None:
    """Refuse keys nothing reads (a misspelling would be silently ignored), naming the closest known
    one; ``extra_keys: [k, ...]`` (or ``"*"``) lets a user's own keys through."""
    extra = given.get(EXTRA_KEYS) or []
    if extra == "*":
        return
    extra = {extra} if isinstance(extra, str) else set(extra)
    known = known_keys()
    for key in given:
        if key in known or key in extra:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(
            f"unknown config key '{key}': {hint}No property file declares it and nothing reads it. If it is a key "
            f"of your own, list it under {EXTRA_KEYS} (e.g. --{EXTRA_KEYS}=[{key}])."
        )


class Config(RecBoleConfig):
    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None):
        check_environment()
        super().__init__(model, dataset, config_file_list, config_dict)
        self._check_values()

    def _load_config_files(self, file_list):
        """RecBole's, naming the file (and line) of a YAML error, or a file that is not a mapping."""
        merged = {}
        for file in file_list or []:
            with open(file, encoding="utf-8") as f:
                try:
                    loaded = yaml.load(f.read(), Loader=self.yaml_loader)
                except yaml.YAMLError as err:
                    mark = getattr(err, "problem_mark", None)
                    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                    raise ValueError(f"config file {file}:{where}: not valid YAML ({problem}).") from None
            if loaded is None:
                continue
            if not isinstance(loaded, dict):
                raise ValueError(f"config file {file} must hold `key: value` lines, not a {type(loaded).__name__}.")
            merged.update(loaded)
        return merged

    def _load_cmd_line(self):
        # RecBole reads sys.argv itself; we parse the command line in run_recbole_perpeft.py and pass
        # it as config_dict, so Config behaves the same under pytest or from a notebook.
        return {}

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
        if model is None:
            raise KeyError("No model given: pass --model=NAME (e.g. GlobalPEFT, FrozenMM, SASRec).")
        if isinstance(model, str):
            model_class = get_model(model)
        else:
            model_class, model = model, model.__name__
        dataset = dataset if dataset is not None else self.external_config_dict.get("dataset")
        if dataset is None:
            raise KeyError("No dataset given: pass --dataset=NAME (e.g. ml-100k).")
        return model, model_class, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        if not PROPERTIES_DIR.is_dir():
            raise FileNotFoundError(
                f"recbole_perpeft's property files are not at {PROPERTIES_DIR}: they ship as package data "
                "(recbole_perpeft/properties/); reinstall the package (`pip install .` or `pip install -e .`)."
            )
        # A model's YAML extends its parents' (FrozenMM.yaml only says what differs from GlobalPEFT.yaml).
        lineage = [c.__name__ for c in reversed(model_class.__mro__) if c.__module__.startswith("recbole_perpeft")]
        model_files = [PROPERTIES_DIR / "model" / f"{name}.yaml" for name in lineage or [model]]
        for path in [PROPERTIES_DIR / "overall.yaml", *model_files]:
            if path.is_file():
                self._update_internal_config_dict(str(path))
        # Then the chosen components' own files (a backbone's keys, e.g. LightGCN's learning rate), which
        # the model's YAML names a default for and the user may choose otherwise.
        for folder, key in COMPONENT_FILES:
            chosen = self.external_config_dict.get(key, self.internal_config_dict.get(key))
            path = PROPERTIES_DIR / folder / f"{chosen}.yaml"
            if chosen is not None and path.is_file():
                self._update_internal_config_dict(str(path))
        # Then the preset (--preset=paper: the official code's values), which the dataset's file and the user's
        # files and command line still override.
        preset, peft_type = (self.external_config_dict.get(key, self.internal_config_dict.get(key))
                             for key in ("preset", "peft_type"))  # fmt: skip
        keys = preset_keys(preset, peft_type, lambda text: yaml.load(text, Loader=self.yaml_loader))
        self.internal_config_dict.update(keys)
        self.preset_keys = set(keys)
        path = PROPERTIES_DIR / "dataset" / f"{dataset}.yaml"
        if path.is_file():
            loaded = self._update_internal_config_dict(str(path)) or {}
            self.parameters["Dataset"] += [k for k in loaded if k not in self.parameters["Dataset"]]
        if self.internal_config_dict.get("loss_type") == "CE":
            # RecBole's CE models (SASRec, BERT4Rec, GRU4Rec, ...) score all items: no sampled negatives.
            self.internal_config_dict["train_neg_sample_args"] = None

    def _get_final_config_dict(self):
        final = super()._get_final_config_dict()
        merge_preset_mappings(final, self.internal_config_dict, self.external_config_dict, self.preset_keys)
        return final

    def _init_device(self):
        # One process of a multi-process run (recbole_perpeft/launch.py sets local_rank): RecBole's own
        # asks for NCCL and CUDA whatever the machine has; ours uses gloo on a CPU.
        asked = requested_device(self.external_config_dict)
        if "local_rank" in self.final_config_dict:
            init_distributed_device(self.final_config_dict)
        else:
            super()._init_device()
        cfg = self.final_config_dict
        if asked == "cpu":  # RecBole's _init_device reads only gpu_id (it would pick CUDA where there is one)
            cfg["device"] = torch.device("cpu")
        elif asked is not None and cfg["device"].type != "cuda":
            # RecBole falls back to the CPU without a word: right for its default gpu_id, not for a GPU asked for.
            raise ValueError(
                f"{asked} asks for a GPU, but torch sees no CUDA device (torch {torch.__version__}, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): run on the CPU with "
                "--use_gpu=False (or without --gpu_id / --device), or on a machine with that GPU."
            )

    def _set_default_parameters(self):
        # The atomic files are not looked for here: a known dataset is prepared (downloaded) on first use by
        # recbole_perpeft.data.create_dataset, so building a Config (e.g. only to read its seed) never downloads.
        # Checked first: RecBole's own defaults read topk and valid_metric (a TypeError on a bad one).
        check_known_keys(self.external_config_dict)
        check_numbers(self.final_config_dict, self.internal_config_dict, self.external_config_dict)
        data_root = self.final_config_dict["data_path"]
        super()._set_default_parameters()  # data_path becomes <data_path>/<dataset>
        if self.dataset == "ml-100k":  # RecBole: always its bundled copy; ours: data_path first (data/checks.py)
            self.final_config_dict["data_path"] = embedded_dataset_path(
                self.dataset, data_root, self.final_config_dict["data_path"], "data_path" in self.external_config_dict
            )
        if self.final_config_dict.get("image_dir") is None:
            self.final_config_dict["image_dir"] = os.path.join(data_root, self.dataset, "images")

    def _check_values(self):
        cfg = self.final_config_dict
        check_valid_metric(cfg)
        for key in ("peft_config", "peft_defaults", "peft_targets"):
            if cfg.get(key) is not None and not isinstance(cfg[key], dict):
                raise ValueError(f"{key} must be a mapping such as {{r: 8, lora_dropout: 0.1}}, got {cfg[key]!r}.")
        precision = cfg.get("precision")  # the device-dependent part (fp16 on a CPU) is the item tower's
        if precision is not None:
            choice(str(precision).lower(), PRECISIONS, "precision", given=precision)
        modalities = cfg.get("modalities")
        if modalities is not None:
            if isinstance(modalities, str):
                modalities = cfg["modalities"] = [modalities]
            unknown = [m for m in modalities if m not in MODALITIES]
            if unknown or not modalities:
                raise ValueError(f"modalities must be a non-empty subset of {list(MODALITIES)}, got {modalities!r}.")
