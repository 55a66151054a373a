"""Model/trainer lookup (ours first, then RecBole's) and parameter accounting."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil

from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_perpeft.compat import with_safe_checkpoints
from recbole_perpeft.model_paths import MODEL_PACKAGE, model_kinds, model_module  # noqa: F401 - re-exported
from recbole_perpeft.resume import ResumableTrainerMixin


def our_model(model_name: str) -> type | None:
    """Our model class named exactly ``model_name`` (case-sensitive), or None."""
    path = model_module(model_name)
    if path is None:
        return None
    model_class = getattr(importlib.import_module(path), model_name, None)
    return model_class if isinstance(model_class, type) else None


def our_model_names() -> list[str]:
    """Every model of ours, by scanning the kind folders: in ``x.py``, the class whose lower-cased name is
    ``x``. Read from the source (ast), not imported: for an error message, it must not need the encoders."""
    names = []
    for kind in model_kinds():
        package = importlib.import_module(f"{MODEL_PACKAGE}.{kind}")
        for info in pkgutil.iter_modules(package.__path__):
            if info.ispkg:
                continue
            spec = importlib.util.find_spec(f"{package.__name__}.{info.name}")
            source = spec.loader.get_source(spec.name) if spec is not None and spec.loader is not None else None
            if not source:
                continue
            tree = ast.parse(source)
            names += [n.name for n in tree.body if isinstance(n, ast.ClassDef) and n.name.lower() == info.name]
    return sorted(names)


def get_model(model_name: str):
    """Our model class if we have one, else RecBole's; a clear error naming both lists otherwise."""
    model_class = our_model(model_name)
    if model_class is not None:
        return model_class
    try:
        model_class = recbole_get_model(model_name)
    except (ValueError, ImportError, AttributeError):
        # RecBole raises ValueError for an unknown name, but its search first imports every model
        # package (exlib_recommender needs lightgbm/xgboost: ImportError), and a name that differs
        # from a model only in case finds its module but not the class (AttributeError).
        model_class = None
    if not isinstance(model_class, type):  # RecBole returns any attribute of a module it finds ("__init__")
        raise ValueError(
            f"Unknown model '{model_name}': it is neither a recbole_perpeft model "
            f"({', '.join(our_model_names())}) nor a model RecBole ships (e.g. SASRec, BERT4Rec, GRU4Rec). "
            "Model names are case-sensitive."
        )
    return model_class


def get_trainer(model_type, model_name: str):
    """The trainer for a model; every trainer writes checkpoints that load with weights_only=True and
    resume reproducibly (recbole_perpeft/resume.py)."""
    model_class = our_model(model_name)
    if model_class is not None:
        # Imported here: the trainer (and where it lives) is only needed once a model of ours runs.
        from recbole_perpeft.trainer import PEFTTrainer

        return getattr(model_class, "trainer_class", PEFTTrainer)
    trainer = with_safe_checkpoints(recbole_get_trainer(model_type, model_name))
    return type(trainer.__name__, (ResumableTrainerMixin, trainer), {})


def count_parameters(module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def trainable_parameters_by_component(model) -> dict:
    """Trainable parameter counts per component; our models name their components, others by child."""
    if hasattr(model, "parameter_components"):
        components = model.parameter_components()
    else:
        components = dict(model.named_children())
    counts = {name: m if isinstance(m, int) else count_parameters(m) for name, m in components.items()}
    counts = {name: n for name, n in counts.items() if n}
    counts["total"] = count_parameters(model)
    if hasattr(model, "foundation_parameter_count"):
        counts["foundation_model_frozen"] = model.foundation_parameter_count()
    return counts
