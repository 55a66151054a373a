"""Model lookup by name, RecBole-GNN style: ``--model=X`` is class ``X`` in
``recbole_perpeft/model/<kind>_recommender/x.py`` (any such folder), else RecBole's model ``X``."""

from __future__ import annotations

import importlib
import sys

import pytest
from recbole.trainer import Trainer

from recbole_perpeft import utils
from recbole_perpeft.resume import ResumableTrainerMixin
from recbole_perpeft.utils import get_model, get_trainer, our_model_names

OURS = [
    "GlobalPEFT",
    "FrozenMM",
    "PerPEFT",
    "UserLevel1",
    "UserLevel2",
    "GroupLevel1",
    "GroupLevel2",
    "LargeGlobalPEFT",
    "SharedGroupPEFT",
    "WithoutMM",
    "LATTICE",
    "BM3",
]


@pytest.mark.parametrize("name", OURS)
def test_each_of_our_models_is_found(name):
    model_class = get_model(name)
    assert model_class.__name__ == name
    kind = "general" if name in ("LATTICE", "BM3") else "sequential"
    assert model_class.__module__ == f"recbole_perpeft.model.{kind}_recommender.{name.lower()}"


def test_a_recbole_model_is_recboles():
    from recbole.model.sequential_recommender.sasrec import SASRec

    assert get_model("SASRec") is SASRec
    trainer = get_trainer(SASRec.type, "SASRec")
    assert issubclass(trainer, ResumableTrainerMixin) and issubclass(trainer, Trainer)


def test_our_models_are_listed_without_importing_them():
    before = set(sys.modules)
    assert set(OURS) <= set(our_model_names())
    assert not {m for m in set(sys.modules) - before if m.startswith("recbole_perpeft.model.sequential_recommender.")}


@pytest.mark.parametrize("name", ["NoSuchModel", "", "a.b", "__init__"])
def test_an_unknown_name_lists_our_models(name):
    with pytest.raises(ValueError) as err:
        get_model(name)
    message = str(err.value)
    assert f"Unknown model '{name}'" in message and "case-sensitive" in message
    assert ", ".join(sorted(OURS)) in message  # every model of ours, found by scanning the folders


@pytest.mark.parametrize("name", ["globalpeft", "GLOBALPEFT", "Perpeft", "sasrec"])
def test_a_name_in_the_wrong_case_is_refused(name):
    with pytest.raises(ValueError, match=f"Unknown model '{name}'.*case-sensitive"):
        get_model(name)


@pytest.fixture
def general_kind(tmp_path, monkeypatch):
    """A new model kind folder, toy_recommender/ with a model ToyModel, as if shipped in recbole_perpeft/model/
    (general_recommender/ exists now: LATTICE, BM3)."""
    package = importlib.import_module("recbole_perpeft.model")
    folder = tmp_path / "toy_recommender"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "toymodel.py").write_text(
        "class ToyTrainer:\n    pass\n\n\nclass ToyModel:\n    trainer_class = ToyTrainer\n"
    )
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    importlib.invalidate_caches()
    yield
    for name in [m for m in sys.modules if m.startswith("recbole_perpeft.model.toy_recommender")]:
        del sys.modules[name]


def test_a_new_model_kind_folder_needs_no_registration(general_kind):
    assert "toy_recommender" in utils.model_kinds()
    toy = get_model("ToyModel")
    assert toy.__module__ == "recbole_perpeft.model.toy_recommender.toymodel"
    assert "ToyModel" in our_model_names()
    assert get_trainer(None, "ToyModel") is toy.trainer_class  # a model of ours may name its trainer
    with pytest.raises(ValueError, match="ToyModel"):
        get_model("toymodel")
