"""RecBole's Config, aware of our models and our property files.

Order of precedence (lowest first): RecBole's own property files, ours
(``properties/overall.yaml``, ``properties/model/<model>.yaml``, ``properties/dataset/<dataset>.yaml``),
the user's ``config_file_list``, then ``config_dict`` (the entry point puts the command line there).
"""

from __future__ import annotations

import os
from pathlib import Path

from recbole.config import Config as RecBoleConfig

from recbole_perpeft.compat import check_environment
from recbole_perpeft.utils import get_model

PROPERTIES_DIR = Path(__file__).resolve().parent / "properties"  # package data (setup.cfg)
MODALITIES = ("text", "image")


class Config(RecBoleConfig):
    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None):
        check_environment()
        super().__init__(model, dataset, config_file_list, config_dict)
        self._check_values()

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
        for path in [PROPERTIES_DIR / "overall.yaml", *model_files, PROPERTIES_DIR / "dataset" / f"{dataset}.yaml"]:
            if path.is_file():
                loaded = self._update_internal_config_dict(str(path)) or {}
                if path.parent.name == "dataset":
                    self.parameters["Dataset"] += [k for k in loaded if k not in self.parameters["Dataset"]]
        if self.internal_config_dict.get("loss_type") == "CE":
            # RecBole's CE models (SASRec, BERT4Rec, GRU4Rec, ...) score all items: no sampled negatives.
            self.internal_config_dict["train_neg_sample_args"] = None

    def _set_default_parameters(self):
        data_root = self.final_config_dict["data_path"]
        super()._set_default_parameters()
        data_path = self.final_config_dict["data_path"]
        inter_file = os.path.join(data_path, f"{self.dataset}.inter")
        if not os.path.isfile(inter_file):
            # Known datasets (Amazon 2023, importable layouts) are prepared on first use.
            from recbole_perpeft.data.prepare import ensure_atomic_files  # only needed when files are missing

            if not ensure_atomic_files(self.final_config_dict):
                raise FileNotFoundError(
                    f"Dataset '{self.dataset}' not found: no atomic file {inter_file}. Put RecBole atomic "
                    f"files ({self.dataset}.inter, {self.dataset}.item) in {data_path}, or set --data_path; "
                    "dataset/README.md lists the datasets we know and how to get them."
                )
        if self.final_config_dict.get("image_dir") is None:
            self.final_config_dict["image_dir"] = os.path.join(data_root, self.dataset, "images")

    def _check_values(self):
        cfg = self.final_config_dict
        ratio = cfg.get("user_sample_ratio")
        if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
            raise ValueError(f"user_sample_ratio must be a number in (0, 1], got {ratio!r}.")
        modalities = cfg.get("modalities")
        if modalities is not None:
            if isinstance(modalities, str):
                modalities = cfg["modalities"] = [modalities]
            unknown = [m for m in modalities if m not in MODALITIES]
            if unknown or not modalities:
                raise ValueError(f"modalities must be a non-empty subset of {list(MODALITIES)}, got {modalities!r}.")
