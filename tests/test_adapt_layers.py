"""``adapt_layers: k``: a peft adapter on the top k text layers only, the frozen lower layers' token states
cached once (fp16, memory-mapped), a step running forward and backward through the top k layers alone.

On a tiny BERT (the text side of the MiniLM + EfficientNet pair) and a tiny CLIP's text tower, both with
2 layers: the item vectors through the cache equal the full encoder's with the same adapter weights; only
the top layers carry adapter parameters and get gradients, the lower layers never run in a step; the cache
is built once and reused; the bad settings are refused with the key named."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from peft.tuners.tuners_utils import BaseTunerLayer

from recbole_perpeft.adapters.frozen import FrozenFamily
from recbole_perpeft.adapters.peft_adapter import top_layers_kwargs
from recbole_perpeft.encoders.clip import ClipFoundation
from recbole_perpeft.encoders.text_image import TextImageFoundation
from recbole_perpeft.model.precision import Precision
from tests.tiny import (
    REPO_ROOT,
    build_model,
    make_tiny_clip,
    make_varied_title_dataset,
    quick_config,
    run_script,
)

DATASET = "topkds"
N_LAYERS = 2  # both tiny encoders
N_ITEMS = 25
ADAPTER_MARKERS = ("lora_", "ia3_")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # RecBole writes log_tensorboard/ under the working directory


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT with random weights and MiniLM's tokenizer: the pair's text encoder, small."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from recbole_perpeft.encoders.text_image import default_text_encoder_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(default_text_encoder_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                        intermediate_size=64)  # fmt: skip
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def dataset_keys(tmp_path_factory):
    """25 items, titles of 1 to 12 words (token lengths differ: several length buckets), item 107 untitled."""
    return make_varied_title_dataset(tmp_path_factory.mktemp("data"), DATASET, N_ITEMS, untitled=("107",))


@pytest.fixture
def make_config(tmp_path, dataset_keys, tiny_clip, tiny_bert):
    def make(foundation="text_image", **overrides):
        keys = {**dataset_keys, "foundation_model": foundation, "clip_path": tiny_clip.path,
                "text_encoder_path": tiny_bert, "topk": [5, 10], "valid_metric": "hit@10"}  # fmt: skip
        return quick_config(tmp_path, **{**keys, **overrides})

    return make


def adapter_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith("item_tower.foundation.")
            and any(m in n for m in ADAPTER_MARKERS)}  # fmt: skip


def layer_of(name: str) -> int:
    """The transformer layer index in a parameter name (BERT: ``layer.<i>.``, CLIP: ``layers.<i>.``)."""
    parts = name.split(".")
    return next(int(parts[i + 1]) for i, p in enumerate(parts) if p in ("layer", "layers") and parts[i + 1].isdigit())


def text_items(tower) -> torch.Tensor:
    return torch.nonzero(tower.has("text")).flatten()


@torch.no_grad()
def randomise_adapters(model, seed=0) -> None:
    """Non-trivial adapter weights (LoRA's B starts at zero, which would make any comparison vacuous)."""
    g = torch.Generator().manual_seed(seed)
    for name in adapter_names(model):
        param = dict(model.named_parameters())[name]
        param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=g) if "ia3_" in name
                    else 0.3 * torch.randn(param.shape, generator=g))  # fmt: skip


# --- the vectors: cached top layers == the full encoder -------------------------------------------------


@pytest.mark.parametrize("foundation", ["text_image", "clip"])
@pytest.mark.parametrize("k", [1, N_LAYERS])
def test_item_vectors_through_the_cache_equal_the_full_encoder(make_config, foundation, k):
    _, model, *_ = build_model("GlobalPEFT", DATASET, make_config(foundation, adapt_layers=k))
    model.eval()
    randomise_adapters(model)
    tower, family = model.item_tower, model.item_tower.family
    assert family.top_layer == N_LAYERS - k and family.token_states is not None
    items = text_items(tower)
    with torch.no_grad():
        full = FrozenFamily.foundation_vectors(family, "text", items)  # the whole encoder, adapter inside
        cached = family.adapted_vectors("text", items)  # the training path: cache, length buckets, top layers
        # The same top layers fed fp32 states computed now: equal up to float noise ...
        inputs = tower.item_inputs("text", items)
        ids, mask = inputs["input_ids"].long(), inputs["attention_mask"].long()
        fresh = tower.foundation.text_states_entering(ids, mask, family.top_layer)
        exact = tower.foundation.encode_text_from(family.top_layer, fresh, ids, mask)
    torch.testing.assert_close(exact, full, rtol=1e-5, atol=1e-5)
    # ... and through the fp16 cache up to its rounding (about 1e-3 relative).
    torch.testing.assert_close(cached, full, rtol=2e-2, atol=2e-3)
    # The adapter does act on these vectors (the comparison is not vacuous).
    with torch.no_grad(), family.peft_models[0].disable_adapter():
        plain = FrozenFamily.foundation_vectors(family, "text", items)
    assert (plain - full).abs().max() > 1e-2


def test_precision_autocast_and_length_buckets_apply_to_the_top_layers(make_config):
    _, model, *_ = build_model("GlobalPEFT", DATASET, make_config(adapt_layers=1))
    model.eval()
    randomise_adapters(model)
    tower, family = model.item_tower, model.item_tower.family
    items = text_items(tower)
    assert len(tower.text_buckets(items)) > 1  # titles of several lengths: several buckets
    with torch.no_grad():
        bucketed = family.adapted_vectors("text", items)
        tower.max_padding_ratio = None
        one_forward = family.adapted_vectors("text", items)
        tower.precision = Precision("bf16")
        seen = []
        hook = tower.foundation.text_model.encoder.layer[1].output.dense.register_forward_hook(
            lambda module, args, out: seen.append(out.dtype))
        lowered = family.adapted_vectors("text", items)
        hook.remove()
    torch.testing.assert_close(bucketed, one_forward, rtol=1e-5, atol=1e-5)
    assert seen == [torch.bfloat16] and lowered.dtype == torch.float32
    torch.testing.assert_close(lowered, one_forward, rtol=5e-2, atol=5e-2)


# --- where the adapter is, where gradients go, what runs -------------------------------------------------


@pytest.mark.parametrize("foundation, peft_type", [("text_image", "LORA"), ("text_image", "IA3"), ("clip", "LORA"),
                                                   ("clip", "IA3")])  # fmt: skip
def test_only_the_top_layers_carry_the_adapter_and_get_gradients(make_config, foundation, peft_type):
    _, full_model, *_ = build_model("GlobalPEFT", DATASET, make_config(foundation, peft_type=peft_type))
    _, model, train_data, *_ = build_model("GlobalPEFT", DATASET,
                                           make_config(foundation, peft_type=peft_type, adapt_layers=1))  # fmt: skip
    adapters = adapter_names(model)
    assert adapters and {layer_of(n) for n in adapters} == {N_LAYERS - 1}
    # The same adapter as the all-layers run's, on the top layer only.
    top = {n for n in adapter_names(full_model) if layer_of(n) == N_LAYERS - 1}
    assert adapters == top and len(adapter_names(full_model)) == N_LAYERS * len(top)

    stack, _ = model.item_tower.foundation.text_layer_stack()
    calls = {"lower": 0, "top": 0}
    hooks = [stack[0].register_forward_hook(lambda *a: calls.__setitem__("lower", calls["lower"] + 1)),
             stack[1].register_forward_hook(lambda *a: calls.__setitem__("top", calls["top"] + 1))]  # fmt: skip
    randomise_adapters(model)  # LoRA's B starts at zero, and with it A's gradient
    model.train()
    loss = model.calculate_loss(next(iter(train_data)))
    loss.backward()
    for hook in hooks:
        hook.remove()
    assert calls["lower"] == 0 and calls["top"] >= 1  # the frozen lower layer never runs in a step
    params = dict(model.named_parameters())
    foundation_grads = {n for n, p in params.items() if n.startswith("item_tower.foundation.") and p.grad is not None}
    assert foundation_grads == adapters and all(params[n].grad.abs().sum() > 0 for n in adapters)
    assert all(not p.requires_grad for n, p in params.items() if n.startswith("item_tower.foundation.")
               and n not in adapters)  # fmt: skip


def test_perpeft_group_adapters_sit_on_the_same_top_layers(make_config):
    _, model, *_ = build_model("GlobalPEFT", DATASET, make_config(adapt_layers=1))
    tower = model.item_tower
    tower.add_groups(2)
    for group in range(2):
        names = tower.adapter_parameters(tower.group_adapter(group))
        assert names and {layer_of(n) for n in names} == {N_LAYERS - 1}
    layers = {layer_of(n) for n, m in tower.foundation.named_modules() if isinstance(m, BaseTunerLayer)}
    assert layers == {N_LAYERS - 1}


def test_moda_experts_sit_on_the_top_layers_too(make_config):
    # MoDA is a peft custom LoRA layer: layers_to_transform applies; the check at build compares the vectors.
    _, model, *_ = build_model("GlobalPEFT", DATASET, make_config("clip", peft_type="MODA", adapt_layers=1))
    tuned = [n for n, m in model.item_tower.foundation.named_modules() if isinstance(m, BaseTunerLayer)]
    assert tuned and {layer_of(n) for n in tuned} == {N_LAYERS - 1}
    assert all(type(m).__name__ == "MoDALinear" for n, m in model.item_tower.foundation.named_modules() if n in tuned)


# --- the cache -------------------------------------------------------------------------------------------


def test_token_state_cache_is_built_once_and_reused(make_config, monkeypatch):
    config_dict = make_config(adapt_layers=1)
    _, first, *_ = build_model("GlobalPEFT", DATASET, config_dict)
    states = first.item_tower.family.token_states
    assert states.build_seconds is not None and os.path.basename(states.path).startswith("tokens-text-layer1-")
    on_disk = np.load(states.path, mmap_mode="r")
    seq_len = config_dict["text_max_length"]
    assert isinstance(states.array, np.memmap) and on_disk.dtype == np.float16
    assert on_disk.shape == (first.item_tower.input_ids.shape[0], seq_len * 32)
    meta = json.loads(open(states.path[: -len(".npy")] + ".json").read())
    assert meta["entering_layer"] == 1 and meta["n_layers"] == N_LAYERS and meta["seq_len"] == seq_len
    no_title = ~first.item_tower.has("text")
    assert not np.any(np.asarray(on_disk[no_title.numpy()]))  # padding row and the title-less item: zeros

    def boom(*args, **kwargs):
        raise AssertionError("the lower layers ran although their token states are cached")

    monkeypatch.setattr(TextImageFoundation, "text_states_entering", boom)
    _, second, *_ = build_model("GlobalPEFT", DATASET, config_dict)
    again = second.item_tower.family.token_states
    assert again.build_seconds is None and again.path == states.path
    items = text_items(second.item_tower)
    assert torch.equal(again.gather_tokens(items), states.gather_tokens(items))
    monkeypatch.undo()

    # The key covers k (another entering layer) and the tokenisation (another max length).
    _, other_k, *_ = build_model("GlobalPEFT", DATASET, make_config(adapt_layers=2))
    _, other_len, *_ = build_model("GlobalPEFT", DATASET, make_config(adapt_layers=1, text_max_length=12))
    paths = {states.path, other_k.item_tower.family.token_states.path, other_len.item_tower.family.token_states.path}
    assert len(paths) == 3 and len(glob.glob(os.path.join(os.path.dirname(states.path), "tokens-text-layer*.npy"))) == 3


def test_a_cache_that_does_not_match_the_encoder_is_an_error(make_config, monkeypatch):
    config_dict = make_config("clip", adapt_layers=1)
    _, model, *_ = build_model("GlobalPEFT", DATASET, config_dict)
    path = model.item_tower.family.token_states.path
    array = np.load(path)
    noise = np.random.default_rng(0).normal(0, 1, array.shape).astype(np.float16)
    np.save(path, array + noise * (array != 0))  # a stale file under the right key (a constant shift would not
    # do: CLIP's final layer norm removes it)
    with pytest.raises(RuntimeError, match="differ from the full encoder's.*Delete that file"):
        build_model("GlobalPEFT", DATASET, config_dict)


# --- refused settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"adapt_layers": 3}, r"adapt_layers: 3, but the text encoder has 2 layers"),
    ({"adapt_layers": 0}, r"adapt_layers must be ~ .* or a positive int"),
    ({"adapt_layers": "all"}, r"adapt_layers must be ~"),
    ({"adapt_layers": 1, "foundation_model": "clip", "adapt_image_tower": True}, r"Set adapt_image_tower: False"),
    ({"adapt_layers": 1, "peft_type": "IISAN"}, r"peft_type IISAN does not adapt inside the encoder"),
    ({"adapt_layers": 1, "peft_config": {"layers_to_transform": [0]}}, r"remove \['layers_to_transform'\]"),
])  # fmt: skip
def test_bad_settings_are_refused_naming_the_key(make_config, overrides, message):
    config_dict = make_config(**{k: v for k, v in overrides.items() if k != "foundation_model"},
                              foundation=overrides.get("foundation_model", "text_image"))  # fmt: skip
    with pytest.raises(ValueError, match=message):
        build_model("GlobalPEFT", DATASET, config_dict)


def test_a_method_without_layer_selection_needs_target_modules():
    from transformers import BertConfig, BertModel

    module = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    kwargs = top_layers_kwargs("IA3", {"target_modules": ["key", "intermediate.dense"]}, {}, module, [1], "layer")
    assert kwargs["target_modules"] == r"(?:.*\.)?layer\.(?:1)\.(?:.*\.)?(?:intermediate\.dense|key)"
    with pytest.raises(ValueError, match="no layers_to_transform, and its target_modules"):
        top_layers_kwargs("IA3", {}, {}, module, [1], "layer")  # no targets known for a bare IA3 here
    lora = top_layers_kwargs("LORA", {"r": 2}, {}, module, [1], "layer")
    assert lora == {"r": 2, "layers_to_transform": [1], "layers_pattern": "layer"}


def test_clip_foundation_names_its_text_layers(tiny_clip):
    clip = ClipFoundation({"clip_path": tiny_clip.path, "text_max_length": 16})
    stack, pattern = clip.text_layer_stack()
    assert pattern == "layers" and len(stack) == N_LAYERS and stack is clip.clip.text_model.encoder.layers


# --- the command line ---------------------------------------------------------------------------------------


def test_a_run_with_adapt_layers_trains_with_the_top_layers_adapter_only(make_config, tmp_path):
    config_file = tmp_path / "keys.yaml"
    config_file.write_text(yaml.safe_dump(make_config(epochs=1)))
    args = ["--model=GlobalPEFT", f"--dataset={DATASET}", f"--config_files={config_file}",
            f"--result_file={tmp_path / 'r.json'}", "--adapt_layers=1"]  # fmt: skip
    result = run_script(args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["adapt_layers"] == 1 and "hit@10" in report["test_result"]
    # LoRA r=4 on query and value (32 wide) of one layer: 2 x (4 x 32 + 32 x 4).
    assert report["trainable_parameters"]["peft_adapter"] == 2 * (4 * 32 + 32 * 4)


def test_the_speed_bench_prints_the_top_layer_rows(tmp_path):
    bench = REPO_ROOT / "bench" / "lora_speed.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, str(bench), "--tiny", "--setups=pair", "--no_epochs", "--precisions=fp32,bf16",
         "--adapt_layers=1,2", f"--workdir={tmp_path}"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for k in (1, 2):
        step = next(line for line in lines if line.startswith(f"step s, adapt_layers={k} of 2"))
        assert len(re.findall(r"\d+\.\d+", step)) == 3  # fp32, bf16, bf16/fp32
        ratio = next(line for line in lines if line.startswith(f"step adapt_layers={k} / all layers"))
        assert all(float(v) > 0 for v in re.findall(r"\d+\.\d+", ratio))
        assert any(line.startswith(f"token-state cache, adapt_layers={k}") and "MiB fp16, built in" in line
                   for line in lines)  # fmt: skip
