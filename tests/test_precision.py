"""``precision`` (autocast of the adapted encoders' per-batch forward) and the length buckets that encode
a batch's titles with at most 10% padding: resolution of ``auto``, refused values, bf16 inside the
adapted encoder with fp32 weights/outputs/loss, fp32 caches, and bucketed == unbucketed in fp32."""

from __future__ import annotations

import logging
import os
import random

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from recbole_perpeft.model import precision
from recbole_perpeft.model.length_buckets import MAX_PADDING_RATIO, length_buckets, padded_tokens, resolve_text_batching
from recbole_perpeft.model.precision import Precision, resolve_precision
from tests.tiny import (
    build_config,
    build_model,
    make_tiny_clip,
    make_varied_title_dataset,
    quick_config,
)

DATASET = "precds"
N_ITEMS = 25
ALLOWED = "auto, fp32, bf16, fp16"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # RecBole writes log_tensorboard/ under the working directory


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # bf16 kernels on tiny shapes stall for seconds with 2 threads on this CPU (oneDNN per-shape set-up
    # contending); one thread keeps the module fast. Restored for the tests that follow.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def dataset_keys(tmp_path_factory):
    """The tiny dataset with titles of 1 to 12 words, so that a batch's token lengths differ widely."""
    return make_varied_title_dataset(tmp_path_factory.mktemp("data"), DATASET, N_ITEMS)


@pytest.fixture
def make_config(tmp_path, dataset_keys, tiny_clip):
    def make(foundation="clip", **overrides):
        keys = {**dataset_keys, "foundation_model": foundation, "clip_path": tiny_clip.path, "text_max_length": 64}
        keys.update({"topk": [5, 10], "valid_metric": "hit@10", **overrides})
        return quick_config(tmp_path, **keys)

    return make


# --- resolving the key -----------------------------------------------------------------------------------


def test_auto_is_bf16_where_the_device_has_it_and_fp32_elsewhere(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision(None, torch.device("cpu")) == "bf16"  # unset: auto
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("AUTO", None) == "fp32"  # no device: the CPU

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_precision("auto", "cuda:0") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert resolve_precision("fp16", "cuda") == "fp16"
    assert resolve_precision("fp32", "cuda") == "fp32"


def test_cpu_bf16_probe_reads_torch_capabilities_then_cpuinfo(monkeypatch):
    def capabilities(**found):
        return lambda: {"avx512_bf16": False, "amx_bf16": False, **found}

    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: {"avx2", "avx512f"})
    monkeypatch.setattr(torch.cpu, "get_capabilities", capabilities(), raising=False)
    assert precision.cpu_has_bf16() is False
    monkeypatch.setattr(torch.cpu, "get_capabilities", capabilities(avx512_bf16=True), raising=False)
    assert precision.cpu_has_bf16() is True
    monkeypatch.setattr(torch.cpu, "get_capabilities", capabilities(amx_bf16=True), raising=False)
    assert precision.cpu_has_bf16() is True

    def broken():
        raise RuntimeError("no probe")

    monkeypatch.setattr(torch.cpu, "get_capabilities", broken, raising=False)
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: {"avx2", "amx_bf16"})
    assert precision.cpu_has_bf16() is True
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: {"fp", "asimd", "bf16"})  # aarch64
    assert precision.cpu_has_bf16() is True
    monkeypatch.setattr(precision, "_cpuinfo_flags", set)
    assert precision.cpu_has_bf16() is False


@pytest.mark.parametrize("value", ["fp64", "half", "float16", 16, ""])
def test_unknown_values_are_refused_naming_the_key_and_the_allowed_values(value):
    with pytest.raises(ValueError, match=f"precision must be one of {ALLOWED}, got"):
        resolve_precision(value, "cpu")


def test_fp16_on_a_cpu_is_refused_and_bf16_without_hardware_warns(monkeypatch, caplog):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device.*bf16"):
        resolve_precision("fp16", "cpu")
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert resolve_precision("bf16", "cpu") == "bf16"  # asked for explicitly: honoured
    assert "no native bf16" in caplog.text


def test_config_refuses_a_bad_precision_before_loading_data(make_config):
    with pytest.raises(ValueError, match=f"precision must be one of {ALLOWED}, got 'fp64'"):
        build_config("GlobalPEFT", DATASET, make_config(precision="fp64"))
    assert build_config("GlobalPEFT", DATASET, make_config(precision="bf16"))["precision"] == "bf16"
    assert build_config("GlobalPEFT", DATASET, make_config(precision=None))["precision"] is None  # auto


def test_fp32_holds_under_an_outer_autocast():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with Precision("fp32").autocast("cpu"):
            assert (a @ b).dtype == torch.float32
        with Precision("bf16").autocast("cpu"):
            assert (a @ b).dtype == torch.bfloat16


def test_cpu_bf16_attention_avoids_the_slow_flash_kernel():
    """torch's CPU flash-attention backward is several times slower in bf16 than in fp32; under bf16 the
    adapted path's attention runs on the math backend, with the same result within bf16 rounding."""
    q, k, v = (torch.randn(2, 4, 8, 16, requires_grad=True) for _ in range(3))
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with Precision("bf16").autocast("cpu"):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    assert "Flash" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with torch.no_grad(), Precision("bf16").autocast("cpu"):  # inference: the flash forward is the fast one
        assert torch.backends.cuda.flash_sdp_enabled()  # (torch's backend switches, CPU included)
    with Precision("bf16").autocast("cpu"):
        assert not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # restored on exit
    with Precision("fp32").autocast("cpu"):  # fp32 keeps torch's own choice (flash is the fast one there)
        assert "Flash" in type(torch.nn.functional.scaled_dot_product_attention(q, k, v).grad_fn).__name__


# --- bf16 on the adapted path only ------------------------------------------------------------------------


def output_dtypes(module: torch.nn.Module, kind: type) -> tuple[list, list]:
    """(dtypes seen at the outputs of every ``kind`` sub-module, hook handles)."""
    seen, handles = [], []
    for sub in module.modules():
        if isinstance(sub, kind):
            handles.append(sub.register_forward_hook(lambda m, args, out: seen.append(out.dtype)))
    return seen, handles


@pytest.mark.parametrize("foundation", ["clip", "text_image"])
def test_bf16_runs_inside_the_adapted_encoder_while_weights_outputs_and_loss_stay_fp32(
    make_config, foundation, caplog, tmp_path, monkeypatch
):
    # The CPU's own bf16 support only adds the "emulated" warning (tested above); pin it so the log
    # checked here is the same on every CI machine (stop 23's CI ran on an AVX2-only CPU and failed).
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    with caplog.at_level(logging.INFO):
        config = make_config(foundation, precision="bf16", cache_dir=str(tmp_path / "bf16-cache"))
        _, model, train_data, _, _ = build_model("GlobalPEFT", DATASET, config)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision:")] == [
        "precision: bf16 -> bf16, autocast over the per-batch forward of ['text']; "
        "weights, optimizer, projector and loss in fp32"
    ]  # logged once per model
    tower = model.item_tower
    assert tower.precision.dtype == torch.bfloat16
    adapted, adapted_hooks = output_dtypes(tower.foundation, BaseTunerLayer)
    projected, projector_hooks = output_dtypes(tower.projector, torch.nn.Linear)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model.calculate_loss(next(iter(train_data)))
    assert adapted and set(adapted) == {torch.bfloat16}  # every LoRA-wrapped layer ran in bf16
    assert projected and set(projected) == {torch.float32}  # cast back before the projector
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    lora = tower.adapter_parameters(tower.GLOBAL_ADAPTER)
    assert lora and all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora.values())
    assert any(p.grad.abs().sum() > 0 for p in lora.values())
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # master weights
    assert {s.dtype for state in optimizer.state.values() for s in state.values() if s.ndim} == {torch.float32}
    items = torch.arange(1, model.n_items)
    parts, per_modality = tower.encode(items)
    assert {v.dtype for v in [*parts.values(), *per_modality.values()]} == {torch.float32}
    for handle in adapted_hooks + projector_hooks:
        handle.remove()

    # The frozen image features (cached, not adapted) are the fp32 ones, under the same cache key.
    fp32_config = make_config(foundation, precision="fp32", cache_dir=str(tmp_path / "fp32-cache"))
    _, reference, *_ = build_model("GlobalPEFT", DATASET, fp32_config)
    assert torch.equal(tower.features.image, reference.item_tower.features.image)
    names = {d: sorted(os.listdir(tmp_path / d / DATASET)) for d in ("bf16-cache", "fp32-cache")}
    assert names["bf16-cache"] == names["fp32-cache"]


# --- length buckets ---------------------------------------------------------------------------------------


def test_buckets_keep_padding_within_the_bound_and_cover_every_row_once():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(1, 300)
        if trial % 3 == 0:
            lengths = [rng.randint(1, 40) for _ in range(n)]
        elif trial % 3 == 1:  # product titles: mostly 10-30 tokens, cut at 32
            lengths = [min(32, max(3, int(rng.lognormvariate(3.0, 0.4)))) for _ in range(n)]
        else:
            lengths = [rng.choice([2, 3, 40]) for _ in range(n)]
        lengths = torch.tensor(lengths)
        buckets = length_buckets(lengths)
        assert torch.equal(torch.cat(buckets).sort().values, torch.arange(n))
        assert padded_tokens(lengths, buckets) <= 1.1 * int(lengths.sum())
        for bucket in buckets:  # longest first within a bucket, buckets in decreasing length
            assert torch.equal(lengths[bucket], lengths[bucket].sort(descending=True).values)


def test_buckets_do_not_degenerate():
    assert len(length_buckets(torch.full((50,), 7))) == 1  # equal lengths: one forward
    assert len(length_buckets(torch.arange(20, 30).repeat(5))) <= 2  # close lengths: shared padding
    lonely = length_buckets(torch.tensor([60] + [10] * 30))  # the bound wins over the minimum size
    assert [len(b) for b in lonely] == [1, 30]
    # Short titles, where one token is 50%, share a bucket on the slack of the long ones ...
    mixed = torch.tensor([20] * 20 + [3] * 3 + [2] * 30)
    assert [len(b) for b in length_buckets(mixed)] == [20, 33]
    # ... which they cannot do alone.
    assert [len(b) for b in length_buckets(torch.tensor([3] * 3 + [2] * 30))] == [3, 30]
    assert length_buckets(torch.tensor([], dtype=torch.long)) == []
    assert [b.tolist() for b in length_buckets(torch.tensor([0, 0]))] == [[0, 1]]  # empty titles: one column


@pytest.mark.parametrize("foundation", ["clip", "text_image"])
def test_bucketed_encoding_equals_unbucketed_vectors_and_adapter_gradients(make_config, foundation):
    # Random LoRA A and B: the adapter changes the vectors, and both get gradients.
    config = make_config(foundation, precision="fp32", peft_config={"init_lora_weights": False})
    _, model, *_ = build_model("GlobalPEFT", DATASET, config)
    model.eval()  # no dropout anywhere: two passes must agree
    tower = model.item_tower
    items = torch.nonzero(tower.has("text")).flatten()
    lengths = tower.attention_mask[items].sum(1)
    buckets = tower.text_buckets(items)
    assert len(buckets) > 1
    assert padded_tokens(lengths, buckets) <= 1.1 * int(lengths.sum()) < len(items) * int(lengths.max())
    weights = torch.randn(len(items), tower.modality_dims["text"], generator=torch.Generator().manual_seed(0))
    adapter = tower.adapter_parameters(tower.GLOBAL_ADAPTER)

    def encode(ratio):
        tower.max_padding_ratio = ratio
        model.zero_grad(set_to_none=True)
        vectors = tower.encode(items)[1]["text"]
        (vectors * weights).sum().backward()
        return vectors.detach(), {name: p.grad.clone() for name, p in adapter.items()}

    bucketed, bucketed_grads = encode(1.1)
    padded, padded_grads = encode(None)
    assert bucketed.dtype == torch.float32
    torch.testing.assert_close(bucketed, padded, rtol=1e-5, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in padded_grads.values())
    for name, grad in padded_grads.items():  # to 1e-5 of the gradient's scale (fp32 sums over other shapes)
        scale = float(grad.abs().max())
        close = torch.isclose(bucketed_grads[name], grad, rtol=1e-5, atol=1e-5 * scale)
        assert close.all(), f"{name}: {float((bucketed_grads[name] - grad).abs().max()):.3g} off (scale {scale:.3g})"
    # Both equal each title encoded alone (no padding at all): the attention masks and pooling are right.
    with torch.no_grad():
        alone = torch.cat([tower.family.foundation_vectors("text", items[i : i + 1]) for i in range(len(items))])
    torch.testing.assert_close(bucketed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("value", "device_type", "ratio"), [
    ("auto", "cpu", MAX_PADDING_RATIO), (None, "cpu", MAX_PADDING_RATIO), ("auto", "cuda", None),
    ("buckets", "cuda", MAX_PADDING_RATIO), (" Trim ", "cpu", None), ("trim", "cuda", None),
])  # fmt: skip
def test_text_batching_buckets_on_a_cpu_and_trims_on_a_gpu_unless_told(value, device_type, ratio):
    assert resolve_text_batching(value, device_type) == ratio


@pytest.mark.parametrize("value", ["on", True, "pad", ""])
def test_text_batching_refuses_other_values_naming_the_key(value):
    with pytest.raises(ValueError, match="text_batching must be one of auto, buckets, trim"):
        resolve_text_batching(value, "cpu")


def test_text_batching_reaches_the_item_tower(make_config):
    for value, ratio in (("trim", None), ("buckets", MAX_PADDING_RATIO), ("auto", MAX_PADDING_RATIO)):
        _, model, *_ = build_model("GlobalPEFT", DATASET, make_config("text_image", text_batching=value))
        assert model.item_tower.max_padding_ratio == ratio, value
        items = torch.nonzero(model.item_tower.has("text")).flatten()
        assert (len(model.item_tower.text_buckets(items)) == 1) == (ratio is None), value
