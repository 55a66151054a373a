"""Model/trainer registry (ours first, then RecBole's) and parameter accounting."""

from __future__ import annotations

import importlib

from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_perpeft.compat import with_safe_checkpoints
from recbole_perpeft.resume import ResumableTrainerMixin

# name -> module path, so `--model=X` does not import every model (and its encoders) to find one.
MODELS = {
    "GlobalPEFT": "recbole_perpeft.model.sequential_recommender.globalpeft",
    "FrozenMM": "recbole_perpeft.model.sequential_recommender.frozenmm",
    "PerPEFT": "recbole_perpeft.model.sequential_recommender.perpeft",
    "UserLevel1": "recbole_perpeft.model.sequential_recommender.userlevel1",
    "UserLevel2": "recbole_perpeft.model.sequential_recommender.userlevel2",
    "GroupLevel1": "recbole_perpeft.model.sequential_recommender.grouplevel1",
    "GroupLevel2": "recbole_perpeft.model.sequential_recommender.grouplevel2",
    "LargeGlobalPEFT": "recbole_perpeft.model.sequential_recommender.largeglobalpeft",
    "SharedGroupPEFT": "recbole_perpeft.model.sequential_recommender.sharedgrouppeft",
}


def get_model(model_name: str):
    """Our model class if we have one, else RecBole's; a clear error naming both lists otherwise."""
    if model_name in MODELS:
        return getattr(importlib.import_module(MODELS[model_name]), model_name)
    try:
        return recbole_get_model(model_name)
    except (ValueError, ImportError, AttributeError):
        # RecBole raises ValueError for an unknown name, but its search first imports every model
        # package (exlib_recommender needs lightgbm/xgboost: ImportError), and a name that differs
        # from a model only in case finds its module but not the class (AttributeError).
        raise ValueError(
            f"Unknown model '{model_name}': it is neither a recbole_perpeft model "
            f"({', '.join(sorted(MODELS))}) nor a model RecBole ships (e.g. SASRec, BERT4Rec, GRU4Rec). "
            "Model names are case-sensitive."
        ) from None


def get_trainer(model_type, model_name: str):
    """The trainer for a model; every trainer writes checkpoints that load with weights_only=True and
    resume reproducibly (recbole_perpeft/resume.py)."""
    if model_name in MODELS:
        from recbole_perpeft.trainer import PEFTTrainer

        return getattr(get_model(model_name), "trainer_class", PEFTTrainer)
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
