"""recbole_perpeft: personalised PEFT of multimodal foundation models for sequential recommendation."""


def load(checkpoint_or_result, overrides=None):
    """A trained run from its checkpoint or result JSON, for recommendations (recbole_perpeft/recommend.py).
    Imported on call: ``import recbole_perpeft`` stays light (serving.py needs neither RecBole nor transformers)."""
    from recbole_perpeft.recommend import load as load_run

    return load_run(checkpoint_or_result, overrides)
