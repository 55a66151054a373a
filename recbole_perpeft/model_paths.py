"""Where a model of ours lives, found by file name without importing it or anything else of the package
(RecBole-GNN's convention: model ``X`` is class ``X`` in ``model/<kind>_recommender/x.py``). Apart from
utils.py so that low-level modules (data/utils.py) can ask "is this one of our general models?" without
importing the trainers that utils.py brings in."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

MODEL_PACKAGE = "recbole_perpeft.model"
KIND_SUFFIX = "_recommender"  # model kind folders, as RecBole's: sequential_recommender, general_recommender, ...


def model_kinds() -> list[str]:
    """The model kind folders of recbole_perpeft/model/ (``<kind>_recommender/``), so a new kind needs no
    registration; other folders there (backbones, ...) hold building blocks, not models."""
    package = importlib.import_module(MODEL_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.ispkg and m.name.endswith(KIND_SUFFIX))


def model_module(model_name: str) -> str | None:
    """``recbole_perpeft.model.<kind>.<model_name lower-cased>`` if such a file exists (RecBole-GNN's
    convention: model ``X`` is class ``X`` in ``x.py``), else None. Found without importing it, so
    ``--model=X`` imports only X (and its encoders), not every model."""
    if not model_name.isidentifier():  # a dotted or odd name would make find_spec import what it names
        return None
    for kind in model_kinds():
        path = f"{MODEL_PACKAGE}.{kind}.{model_name.lower()}"
        if importlib.util.find_spec(path) is not None:
            return path
    return None
