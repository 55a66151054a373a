"""PerPEFT for RecBole: personalised parameter-efficient fine-tuning of multimodal foundation models for
sequential recommendation. Importing the package does nothing else: the models, datasets and trainers live in
its modules (``recbole_perpeft.quick_start`` runs a model as the command line does)."""

__version__ = "0.1.0"


def load(checkpoint_or_result, overrides=None):
    """A trained run from its checkpoint or result JSON, for recommendations (recbole_perpeft/recommend.py).
    Imported on call: ``import recbole_perpeft`` stays light (serving.py needs neither RecBole nor transformers)."""
    from recbole_perpeft.recommend import load as load_run

    return load_run(checkpoint_or_result, overrides)
