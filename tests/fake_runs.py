"""A stand-in for ``quick_start.run`` in the tests of the runners (compare, reproduce): no training; each call
is recorded and answered with a result shaped like the real one, its metrics from a formula."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


class FakeRun:
    """Records each call as {"model", "config", "result_file"}; the result echoes the run's config and gives
    hit@k1 = v, hit@k2 = v + 0.1, ndcg@k1 = v / 2, ndcg@k2 = v / 2 + ``ndcg_offset`` with v = ``value(model,
    config)``. A ``grouped`` model without a global_checkpoint "trains" stage 1: a new file under ``root``
    named by ``stage1_name(model, seed, n_calls)``."""

    def __init__(self, root: Path, value: Callable[[str, dict], float], grouped, topk=(5, 10), ndcg_offset=0.05,
                 stage1_name: Callable[[str, int, int], str] = lambda model, seed, n: f"stage1-{model}-{seed}.pth"):
        self.root, self.value, self.grouped, self.calls = root, value, set(grouped), []
        self.topk, self.ndcg_offset, self.stage1_name = topk, ndcg_offset, stage1_name

    def __call__(self, model, dataset, config_file_list=None, config_dict=None, result_file=None, **kwargs):
        config = dict(config_dict)
        self.calls.append({"model": model, "config": config, "result_file": result_file})
        v, (k1, k2) = self.value(model, config), self.topk
        metrics = {f"hit@{k1}": v, f"hit@{k2}": v + 0.1, f"ndcg@{k1}": v / 2, f"ndcg@{k2}": v / 2 + self.ndcg_offset}
        result = {"model": model, "dataset": dataset, "config": {**config, "model": model}, "test_result": metrics}
        if model in self.grouped:
            checkpoint = config.get("global_checkpoint")
            if checkpoint is None:
                checkpoint = self.root / self.stage1_name(model, config["seed"], len(self.calls))
                checkpoint.write_bytes(b"fake")
            result["global_checkpoint"] = str(checkpoint)
        return result


def install(monkeypatch, fake: FakeRun, *modules) -> FakeRun:
    """Put ``fake`` in place of quick_start.run, and its grouped models as ``is_grouped`` of ``modules``."""
    from recbole_perpeft import quick_start

    monkeypatch.setattr(quick_start, "run", fake)
    for module in modules:
        monkeypatch.setattr(module, "is_grouped", lambda model: model in fake.grouped)
    return fake
