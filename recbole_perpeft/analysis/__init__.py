"""Analysis of trained PerPEFT runs: what the groups are and what each group's adapter looks at.

One concern a module; ``recbole-perpeft analyze`` (``recbole_perpeft/analyze.py``) is the command
line over them:

- ``loading``: rebuild a run from its stage-2 checkpoint (and result JSON) -> :class:`LoadedRun`
- ``profiles``: group sizes, distinctive title words and items
- ``attention``: last-layer title attention from the pooling position, under each adapter
- ``divergence``: Jensen-Shannon divergence inter-/intra-cluster (groups matched across seeds by users)
- ``gradcam``: Grad-CAM per group on item images
- ``case_study``: a user's top-k under GlobalPEFT, its own group and another group
- ``curves``: per-epoch curves from logs and result JSONs; trainable parameters and epoch time
- ``sweep``: PerPEFT over several n_groups
- ``plots``: the PNGs; ``report``: all of it into one folder

Heavy imports (torch models, matplotlib) happen in the modules, so ``import recbole_perpeft.analysis``
stays cheap."""

from __future__ import annotations

__all__ = [
    "LoadedRun",
    "load_run",
    "group_profiles",
    "adapter_attention",
    "divergence_report",
    "jsd",
    "group_gradcam",
    "case_study",
    "parse_log",
    "sweep",
    "analyze",
]

_WHERE = {
    "LoadedRun": "loading",
    "load_run": "loading",
    "group_profiles": "profiles",
    "adapter_attention": "attention",
    "divergence_report": "divergence",
    "jsd": "divergence",
    "group_gradcam": "gradcam",
    "case_study": "case_study",
    "parse_log": "curves",
    "sweep": "sweep",
    "analyze": "report",
}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"recbole_perpeft.analysis.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'recbole_perpeft.analysis' has no attribute {name!r}")
