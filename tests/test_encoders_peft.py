"""Foundation encoders (tiny CLIP, MiniLM + EfficientNet-Lite0), peft attachment, the Eq. 1 loss,
FrozenMM's caches, checkpoints without frozen weights and missing-modality placeholders."""

from __future__ import annotations

import glob
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from recbole.data.interaction import Interaction
from transformers import AutoModel, CLIPModel

from recbole_perpeft.adapters import attach_peft, build_peft_config
from recbole_perpeft.data.dataloader import NEG_LIST, TARGET_LIST
from recbole_perpeft.encoders.base import FoundationModel
from recbole_perpeft.encoders.clip import ClipFoundation, load_clip
from recbole_perpeft.encoders.text_image import default_text_encoder_path
from recbole_perpeft.model.item_tower import ItemTower
from recbole_perpeft.utils import get_trainer, trainable_parameters_by_component
from tests.tiny import TINY_MEAN, TINY_STD, build_model, make_atomic_dataset, make_tiny_clip, quick_config

DATASET = "tinyds"
ADAPTER_MARKERS = ("lora_", "ia3_", "hada_")
TRAINABLE_PREFIXES = (
    "item_tower.projector.",
    "item_tower.placeholders.",
    "item_id_embedding.",
    "sequence_encoder.",
    "backbone.",  # the recommender over the item vectors (SASRec), once backbones are pluggable
)
NO_IMAGE_ITEM, NO_TITLE_ITEM = "105", "107"


def is_adapter(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_MARKERS)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    # RecBole's trainer writes log_tensorboard/ under the working directory.
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def dataset_keys(tmp_path_factory):
    """25 items; item 105 has no image file, item 107 an empty title."""
    root = tmp_path_factory.mktemp("data")
    return make_atomic_dataset(root, DATASET, missing_images=[NO_IMAGE_ITEM], empty_titles=[NO_TITLE_ITEM])


@pytest.fixture
def make_config(tmp_path, dataset_keys, tiny_clip):
    def make(foundation="clip", **overrides):
        keys = {**dataset_keys, "foundation_model": foundation, "clip_path": tiny_clip.path}
        keys.update({"topk": [5, 10], "valid_metric": "hit@10", **overrides})  # 25 items: top-30 is refused
        return quick_config(tmp_path, **keys)

    return make


# --- tiny CLIP through the product's loading path ---------------------------------------------------


def clip_foundation(path, text_max_length=16):
    return ClipFoundation({"clip_path": path, "text_max_length": text_max_length})


def test_tiny_clip_reloads_through_clip_foundation(tiny_clip):
    foundation = clip_foundation(tiny_clip.path)
    loaded, original = foundation.clip.state_dict(), tiny_clip.model.state_dict()
    assert loaded.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(loaded[key], value), key
    assert all(not p.requires_grad for p in foundation.parameters())
    # Preprocessing comes from the checkpoint's preprocessor_config.json.
    assert foundation.image_size == 32
    assert foundation.image_mean == tuple(TINY_MEAN) and foundation.image_std == tuple(TINY_STD)
    assert foundation.out_dims == {"text": 16, "image": 16}

    titles = ["the blue river 3", "king 12", "a"]
    tokens = foundation.tokenizer(titles, max_length=16, padding="max_length", truncation=True, return_tensors="pt")
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        text = foundation.encode("text", {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})
        image = foundation.encode("image", {"pixels": pixels})
        mean, std = torch.tensor(TINY_MEAN).view(1, 3, 1, 1), torch.tensor(TINY_STD).view(1, 3, 1, 1)
        reference = tiny_clip.model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=(pixels.float() / 255 - mean) / std,
        )
    assert text.shape == (3, 16) and image.shape == (2, 16)
    # CLIPModel.forward returns the same projections, L2-normalised.
    torch.testing.assert_close(F.normalize(text, dim=-1), reference.text_embeds)
    torch.testing.assert_close(F.normalize(image, dim=-1), reference.image_embeds)


def test_tiny_clip_pools_text_at_the_tokenizers_eos(tiny_clip):
    foundation = clip_foundation(tiny_clip.path)
    tokenizer, text_config = foundation.tokenizer, foundation.clip.config.text_config
    assert tokenizer.eos_token_id == text_config.eos_token_id
    assert tokenizer.bos_token_id == text_config.bos_token_id
    assert tokenizer.pad_token_id == text_config.pad_token_id

    titles = ["the blue river 3", "king 12"]
    tokens = tokenizer(titles, max_length=24, padding="max_length", truncation=True, return_tensors="pt")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    eos_positions = (ids == tokenizer.eos_token_id).int().argmax(-1)
    assert eos_positions.tolist() == [int(n) - 1 for n in mask.sum(1)]  # EOS closes each title
    with torch.no_grad():
        out = foundation.clip.text_model(input_ids=ids, attention_mask=mask)
        pooled = foundation.encode_text(ids, mask)
        shorter = tokenizer(titles, max_length=20, padding="max_length", truncation=True, return_tensors="pt")
        pooled_less_padding = foundation.encode_text(shorter["input_ids"], shorter["attention_mask"])
    # The pooled vector is the hidden state at the EOS position ...
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), eos_positions])
    # ... so titles differ, and padding after EOS changes nothing.
    assert not torch.allclose(pooled[0], pooled[1], atol=1e-4)
    torch.testing.assert_close(pooled, pooled_less_padding)


@pytest.mark.parametrize("path", ["/nonexistent/clip-dir", "no-such-org/no-such-clip-model"])
def test_load_clip_failure_names_the_path_and_clip_path(path):
    with pytest.raises(OSError) as info:
        load_clip(path)
    assert path in str(info.value)
    assert "clip_path" in str(info.value)


# --- peft on the encoders ----------------------------------------------------------------------------

# The paper's targets (adapters/peft_adapter.py): LoRA on query/value, (IA)3 on key, value and
# the first feed-forward layer; matched on the end of the wrapped layers' names.
PEFT_TARGETS = {
    ("bert", "LORA"): {"attention.self.query", "attention.self.value"},
    ("bert", "IA3"): {"attention.self.key", "attention.self.value", "intermediate.dense"},
    ("clip", "LORA"): {"self_attn.q_proj", "self_attn.v_proj"},
    ("clip", "IA3"): {"self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"},
}


def load_backbone(kind, tiny_clip):
    if kind == "bert":
        return AutoModel.from_pretrained(default_text_encoder_path()).eval()
    return CLIPModel.from_pretrained(tiny_clip.path).eval()


def backbone_output(kind, module, tiny_clip):
    if kind == "bert":
        ids = torch.tensor([[101, 2158, 2300, 102]])
        return module(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    tokens = tiny_clip.tokenizer(["the blue river 3"], return_tensors="pt")
    pixels = torch.linspace(-1, 1, 3 * 32 * 32).view(1, 3, 32, 32)
    out = module(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    return torch.cat([out.text_embeds, out.image_embeds], dim=-1)


@pytest.mark.parametrize("peft_type", ["LORA", "IA3"])
@pytest.mark.parametrize("kind", ["bert", "clip"])
def test_attach_peft_adds_only_trainable_adapters_on_the_paper_targets(kind, peft_type, tiny_clip):
    module = load_backbone(kind, tiny_clip)
    module.requires_grad_(False)
    with torch.no_grad():
        before = backbone_output(kind, module, tiny_clip)
    handle = attach_peft(module, peft_type)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter(n) for n in trainable)
    assert all(not p.requires_grad for n, p in module.named_parameters() if not is_adapter(n))
    wrapped = [name for name, m in handle.named_modules() if isinstance(m, BaseTunerLayer)]
    targets = PEFT_TARGETS[(kind, peft_type)]
    matched = {t for t in targets for name in wrapped if name.endswith(t)}
    assert matched == targets
    assert all(any(name.endswith(t) for t in targets) for name in wrapped)
    # LoRA's B = 0 and (IA)3's scales = 1 at initialisation: the adapted encoder starts as the frozen one.
    with torch.no_grad():
        torch.testing.assert_close(backbone_output(kind, module, tiny_clip), before)


def test_unknown_peft_type_raises_value_error_listing_options(tiny_clip):
    with pytest.raises(ValueError) as info:
        build_peft_config("NOPE", "bert")
    message = str(info.value)
    assert "NOPE" in message and "LORA" in message and "IA3" in message
    assert "IISAN" in message and "CROSSAN" in message  # the side networks are peft_types too
    with pytest.raises(ValueError, match="peft_type 'nope' is unknown"):
        attach_peft(CLIPModel.from_pretrained(tiny_clip.path), "nope")


def test_another_peft_method_attaches_with_target_modules_override():
    module = AutoModel.from_pretrained(default_text_encoder_path())
    module.requires_grad_(False)
    attach_peft(module, "LOHA", {"target_modules": ["query", "value"], "r": 2, "alpha": 4})
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("hada_" in n for n in trainable)
    assert any(".query." in n for n in trainable) and any(".value." in n for n in trainable)


LOHA = {"peft_type": "LOHA", "peft_config": {"r": 2, "alpha": 4, "target_modules": ["query", "value"]}}
GRADIENT_CASES = [
    pytest.param("text_image", {"peft_type": "LORA"}, id="minilm-lora"),
    pytest.param("text_image", {"peft_type": "IA3"}, id="minilm-ia3"),
    pytest.param("clip", {"peft_type": "LORA"}, id="clip-lora"),
    pytest.param("clip", {"peft_type": "IA3"}, id="clip-ia3"),
    pytest.param("clip", {"peft_type": "LORA", "adapt_image_tower": True}, id="clip-lora-both-towers"),
    pytest.param("text_image", LOHA, id="minilm-loha"),  # any peft method, by configuration only
]


def adapter_submodules(foundation):
    """What peft injected beside each frozen layer (``lora_A``, ``lora_dropout``, ``ia3_l``, ...)."""
    for layer in foundation.modules():
        if isinstance(layer, BaseTunerLayer):
            for name, child in layer.named_children():
                if name != "base_layer":
                    yield from child.modules()


def test_lora_dropout_acts_in_training_only(make_config):
    _, model, train_data, _, _ = build_model("GlobalPEFT", DATASET, make_config(peft_config={"lora_dropout": 0.5}))
    dropouts = [m for m in adapter_submodules(model.item_tower.foundation) if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.5 for m in dropouts)
    items = torch.arange(1, 9)
    with torch.no_grad():
        model.train()
        assert all(m.training for m in dropouts)
        first, second = model.item_tower(items), model.item_tower(items)
        assert not torch.equal(first, second)  # a new dropout mask per forward
        model.eval()
        assert not any(m.training for m in dropouts)
        assert torch.equal(model.item_tower(items), model.item_tower(items))


@pytest.mark.parametrize("foundation, overrides", GRADIENT_CASES)
def test_globalpeft_backward_reaches_only_trainable_components(make_config, foundation, overrides):
    _, model, train_data, _, _ = build_model("GlobalPEFT", DATASET, make_config(foundation, **overrides))
    expected_adapted = {"text", "image"} if overrides.get("adapt_image_tower") else {"text"}
    assert set(model.item_tower.adapted) == expected_adapted
    model.train()
    foundation = model.item_tower.foundation
    adapter_parts = {id(m) for m in adapter_submodules(foundation)}
    assert adapter_parts and all(m.training for m in adapter_submodules(foundation))  # adapter dropout acts
    assert not any(m.training for m in foundation.modules() if id(m) not in adapter_parts)  # frozen: eval mode
    batch = next(iter(train_data))
    loss = model.calculate_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()

    params = dict(model.named_parameters())
    with_grad = {n for n, p in params.items() if p.grad is not None}
    adapters = {n for n in params if n.startswith("item_tower.foundation.") and is_adapter(n)}
    assert adapters, "no peft parameters were attached"
    for name in with_grad:
        assert (name in adapters) or name.startswith(TRAINABLE_PREFIXES), f"gradient on {name}"
    frozen = [n for n in params if n.startswith("item_tower.foundation.") and n not in adapters]
    assert frozen and all(not params[n].requires_grad and params[n].grad is None for n in frozen)
    # Every trainable parameter takes part (no adapter on a tower whose features are cached) ...
    assert with_grad == {n for n, p in params.items() if p.requires_grad}
    # ... and the adapter actually moves the loss.
    assert any(params[n].grad.abs().sum() > 0 for n in adapters)

    counts = trainable_parameters_by_component(model)
    assert counts["peft_adapter"] == sum(params[n].numel() for n in adapters)
    assert counts["projector"] == sum(p.numel() for n, p in params.items() if n.startswith("item_tower.projector."))
    assert counts["item_id_embedding"] == model.item_id_embedding.weight.numel()
    assert counts["total"] == sum(p.numel() for p in params.values() if p.requires_grad)
    assert counts["total"] == sum(v for k, v in counts.items() if k not in ("total", "foundation_model_frozen"))
    assert counts["foundation_model_frozen"] == sum(params[n].numel() for n in frozen)


# --- Eq. 1 ---------------------------------------------------------------------------------------------


def hand_made_batch(model, n_items):
    length = model.max_seq_length
    g = torch.Generator().manual_seed(0)
    lengths = [length, 4, 1]
    seq = torch.zeros(3, length, dtype=torch.long)
    pos = torch.zeros_like(seq)
    for b, n in enumerate(lengths):
        items = torch.randperm(n_items - 1, generator=g)[: n + 1] + 1
        seq[b, :n], pos[b, :n] = items[:n], items[1:]
    neg = torch.randint(1, n_items, seq.shape, generator=g)
    return {
        model.ITEM_SEQ: seq,
        model.ITEM_SEQ_LEN: torch.tensor(lengths),
        TARGET_LIST: pos,
        NEG_LIST: neg,
    }, lengths


def test_globalpeft_loss_is_eq1_over_real_positions(make_config):
    _, model, *_ = build_model("GlobalPEFT", DATASET, make_config("clip"))
    model.eval()  # no dropout: the loss is a deterministic function of the batch
    n_items = model.n_items
    fields, lengths = hand_made_batch(model, n_items)
    loss = model.calculate_loss(Interaction(fields))

    seq, pos, neg = fields[model.ITEM_SEQ], fields[TARGET_LIST], fields[NEG_LIST]
    with torch.no_grad():
        vectors = model.item_vectors(torch.arange(n_items))
        output = model.backbone.encode(vectors[seq], seq)
    terms = []
    for b, n in enumerate(lengths):
        for t in range(n):
            p = torch.dot(output[b, t], vectors[pos[b, t]]).double()
            q = torch.dot(output[b, t], vectors[neg[b, t]]).double()
            terms.append(-torch.log(torch.sigmoid(p)) - torch.log(1 - torch.sigmoid(q)))
    assert len(terms) == sum(lengths) == int((pos > 0).sum())
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)

    # Negatives at padding positions do not contribute; one at a real position does.
    padded = fields.copy()
    padded[NEG_LIST] = torch.where(pos > 0, neg, (neg % (n_items - 1)) + 1)
    assert not torch.equal(padded[NEG_LIST], neg)
    torch.testing.assert_close(model.calculate_loss(Interaction(padded)), loss)
    changed = fields.copy()
    changed[NEG_LIST] = neg.clone()
    changed[NEG_LIST][1, 0] = pos[1, 0]  # the positive as a negative: a different loss
    assert not torch.allclose(model.calculate_loss(Interaction(changed)), loss)


# --- FrozenMM -------------------------------------------------------------------------------------------


def test_frozenmm_has_no_peft_and_caches_frozen_features(make_config, tmp_path, monkeypatch):
    config_dict = make_config("text_image")
    calls = []
    original_encode = FoundationModel.encode

    def counting_encode(self, modality, inputs):
        calls.append(modality)
        return original_encode(self, modality, inputs)

    monkeypatch.setattr(FoundationModel, "encode", counting_encode)
    config, first, *_ = build_model("FrozenMM", DATASET, config_dict)
    assert config["peft_type"] is None
    assert set(calls) == {"text", "image"}
    assert first.item_tower.adapted == [] and first.item_tower.peft_models == []
    assert not any(is_adapter(n) for n, _ in first.named_parameters())
    assert all(not p.requires_grad for p in first.item_tower.foundation.parameters())
    counts = trainable_parameters_by_component(first)
    assert "peft_adapter" not in counts and counts["total"] > 0
    cached = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "cache" / DATASET / "features-*.pt")))
    assert [name.split("-")[1] for name in cached] == ["image", "text"]

    def fail(*args, **kwargs):
        raise AssertionError("the frozen encoder ran again instead of reading the cache")

    monkeypatch.setattr(FoundationModel, "encode", fail)
    _, second, *_ = build_model("FrozenMM", DATASET, config_dict)
    for modality in ("text", "image"):
        assert torch.equal(getattr(second.item_tower.features, modality), getattr(first.item_tower.features, modality))
    second.eval()
    first.eval()
    torch.testing.assert_close(second.item_table(), first.item_table())  # ... still never encoding


def test_frozen_image_features_are_the_eval_mode_encoder_output(make_config, tmp_path):
    """Cached features must not depend on which items share an encoding batch (EfficientNet's
    batch norm in training mode would use batch statistics, and its drop-connect is random)."""
    towers = []
    for batch_size in (256, 3):
        cache_dir = str(tmp_path / f"cache-{batch_size}")
        config_dict = make_config("text_image", encode_batch_size=batch_size, cache_dir=cache_dir)
        towers.append(build_model("FrozenMM", DATASET, config_dict)[1].item_tower)
    torch.testing.assert_close(towers[0].features.image, towers[1].features.image)
    tower = towers[0]
    assert not tower.foundation.training and not any(m.training for m in tower.foundation.modules())
    items = torch.nonzero(tower.has_image).flatten()[:2]
    with torch.no_grad():
        one_by_one = torch.cat([tower.family.foundation_vectors("image", items[i : i + 1]) for i in range(len(items))])
    torch.testing.assert_close(tower.features.image[items], one_by_one, rtol=1e-4, atol=1e-5)


def test_item_table_is_computed_once_per_evaluation(make_config, monkeypatch):
    # 25 items: rank the top 5/10 (RecBole's topk cannot exceed the number of items).
    keys = make_config("clip", eval_batch_size=8, encode_batch_size=1024, topk=[5, 10], valid_metric="hit@10")
    config, model, _, valid_data, _ = build_model("FrozenMM", DATASET, keys)
    model.eval()
    table = model.item_table()
    assert model.item_table() is table
    model.train()
    in_training = model.item_table()
    assert in_training is not table and model.item_table() is not in_training  # recomputed while training
    model.eval()
    assert model.item_table() is not table  # parameters may have changed in between
    assert model.item_table() is model.item_table()

    calls = []
    forward = model.item_tower.forward
    monkeypatch.setattr(model.item_tower, "forward", lambda items: calls.append(len(items)) or forward(items))
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    assert len(list(valid_data)) > 1  # several evaluation batches ...
    trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
    assert calls == [model.n_items]  # ... one item-tower pass
    trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
    assert calls == [model.n_items, model.n_items]


def test_official_item_vector_mix_scales_a_normalised_projection(make_config):
    # The official code's item vector: ID embedding + 0.5 * LayerNorm(MLP(...)).
    _, plain, _, _, _ = build_model("FrozenMM", DATASET, make_config("clip"), seed=1)
    keys = make_config("clip", projector_output_norm=True, multimodal_weight=0.5)
    _, model, _, _, _ = build_model("FrozenMM", DATASET, keys, seed=1)
    assert isinstance(model.item_tower.projector["mlp"][-1], torch.nn.LayerNorm)
    assert not isinstance(plain.item_tower.projector["mlp"][-1], torch.nn.LayerNorm)
    assert plain.item_tower.multimodal_weight == 1
    model.eval()
    items = torch.arange(1, model.n_items)
    with torch.no_grad():
        projected = model.item_tower(items)
        vectors = model.item_vectors(items)
    torch.testing.assert_close(projected.std(dim=1, unbiased=False), torch.full((len(items),), 0.5), atol=1e-3, rtol=0)
    torch.testing.assert_close(vectors, model.item_id_embedding(items) + projected)
    with pytest.raises(ValueError, match="multimodal_weight must be a number"):
        build_model("FrozenMM", DATASET, make_config("clip", multimodal_weight="half"))


def test_item_id_norm_penalty_adds_the_tables_norm_to_the_loss(make_config):
    # The official code's l2_emb: weight x ||item ID table|| (Frobenius, not squared) in every step's loss.
    _, plain, train_data, _, _ = build_model("FrozenMM", DATASET, make_config("clip"), seed=1)
    _, model, _, _, _ = build_model("FrozenMM", DATASET, make_config("clip", item_id_norm_penalty=0.5), seed=1)
    assert plain.item_id_norm_penalty == 0 and model.item_id_norm_penalty == 0.5
    plain.eval(), model.eval()  # no dropout: the two losses differ by the penalty alone
    batch = next(iter(train_data))
    with torch.no_grad():
        expected = plain.calculate_loss(batch) + 0.5 * model.item_id_embedding.weight.norm()
    loss = model.calculate_loss(batch)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    plain.calculate_loss(batch).backward()
    weight = model.item_id_embedding.weight
    # every row gets the penalty's gradient, rows no position of the batch used included
    added = weight.grad - plain.item_id_embedding.weight.grad
    torch.testing.assert_close(added, 0.5 * weight.detach() / weight.detach().norm())
    for bad in (-1e-6, "small"):
        with pytest.raises(ValueError, match="item_id_norm_penalty must be a number"):
            build_model("FrozenMM", DATASET, make_config("clip", item_id_norm_penalty=bad))


# --- checkpoints -----------------------------------------------------------------------------------------


def test_state_dict_keeps_adapters_drops_frozen_foundation_and_round_trips(make_config, tmp_path):
    config_dict = make_config("clip")
    _, trained, train_data, _, _ = build_model("GlobalPEFT", DATASET, config_dict, seed=1)
    with torch.no_grad():  # as if trained: adapters away from their identity initialisation
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    state = trained.state_dict()
    params = dict(trained.named_parameters())
    assert {n for n, p in params.items() if p.requires_grad} <= state.keys()
    assert any(is_adapter(k) for k in state)
    frozen = [n for n, p in params.items() if n.startswith("item_tower.foundation.") and not p.requires_grad]
    assert frozen and not set(frozen) & state.keys()
    assert all(is_adapter(k) for k in state if k.startswith("item_tower.foundation."))

    torch.save(state, tmp_path / "model.pth")
    loaded = torch.load(tmp_path / "model.pth", weights_only=True)
    _, fresh, *_ = build_model("GlobalPEFT", DATASET, config_dict, seed=2)
    batch = next(iter(train_data))
    trained.eval()
    fresh.eval()
    assert not torch.allclose(fresh.full_sort_predict(batch), trained.full_sort_predict(batch))
    fresh.load_state_dict(loaded)
    torch.testing.assert_close(fresh.item_table(), trained.item_table())
    torch.testing.assert_close(fresh.full_sort_predict(batch), trained.full_sort_predict(batch))

    adapter_key = next(k for k in loaded if is_adapter(k))
    for missing in (adapter_key, "item_tower.projector.mlp.0.weight"):
        incomplete = {k: v for k, v in loaded.items() if k != missing}
        with pytest.raises(RuntimeError, match="missing"):
            fresh.load_state_dict(incomplete)
        fresh.load_state_dict(incomplete, strict=False)  # allowed when asked for
    with pytest.raises(RuntimeError, match="unexpected"):
        fresh.load_state_dict({**loaded, "item_tower.not_a_weight": torch.zeros(1)})


# --- missing modalities ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["GlobalPEFT", "FrozenMM"])
def test_items_without_image_or_title_get_the_learned_placeholder(make_config, model_name, caplog):
    with caplog.at_level(logging.WARNING):
        _, model, train_data, _, _ = build_model(model_name, DATASET, make_config("clip"))
    tower = model.item_tower
    assert set(tower.modalities) == {"image", "text"}
    assert tower.adapted == (["text"] if model_name == "GlobalPEFT" else [])
    assert "1 of 25 items have no usable image" in caplog.text
    assert "1 of 25 items have no text" in caplog.text

    dataset = train_data._dataset
    no_image = dataset.token2id(dataset.iid_field, NO_IMAGE_ITEM)
    no_title = dataset.token2id(dataset.iid_field, NO_TITLE_ITEM)
    assert not tower.has_image[no_image] and tower.has_text[no_image]
    assert not tower.has_text[no_title] and tower.has_image[no_title]
    assert int(tower.has_image.sum()) == int(tower.has_text.sum()) == 24  # padding row 0 has neither

    items = torch.tensor([no_image, no_title])
    with torch.no_grad():
        image, text = tower.family.modality_vector("image", items), tower.family.modality_vector("text", items)
    assert torch.equal(image[0], tower.placeholders["image"]) and not torch.equal(image[1], tower.placeholders["image"])
    assert torch.equal(text[1], tower.placeholders["text"]) and not torch.equal(text[0], tower.placeholders["text"])


def test_no_images_at_all_runs_text_only_with_a_warning(make_config, tmp_path, caplog):
    keys = make_atomic_dataset(tmp_path / "noimg", "noimg", with_images=False)
    config_dict = {**make_config("text_image"), **keys}
    with caplog.at_level(logging.WARNING):
        _, model, train_data, _, _ = build_model("GlobalPEFT", "noimg", config_dict)
    assert "No item images found" in caplog.text
    tower = model.item_tower
    assert isinstance(tower, ItemTower) and tower.modalities == ["text"]
    assert set(tower.placeholders) == {"text"} and not hasattr(tower, "has_image")
    assert tower.projector["mlp"][0].in_features == tower.foundation.out_dims["text"]
    model.train()
    loss = model.calculate_loss(next(iter(train_data)))
    assert torch.isfinite(loss)
    model.eval()
    assert model.item_table().shape == (model.n_items, config_dict["hidden_size"])


# --- adapter_learning_rate ------------------------------------------------------------------------------


def test_adapter_learning_rate_gives_the_adapter_its_own_optimizer_group(make_config):
    config, model, *_ = build_model("GlobalPEFT", DATASET, make_config(peft_type="ia3", adapter_learning_rate=3e-3))
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    adapter_group, rest_group = trainer.optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    adapter = {names[id(p)] for p in adapter_group["params"]}
    assert adapter and all("ia3_" in n for n in adapter)
    assert adapter == {n for n, p in model.named_parameters() if p.requires_grad and is_adapter(n)}
    assert adapter_group["lr"] == 3e-3 and rest_group["lr"] == config["learning_rate"]
    rest = {names[id(p)] for p in rest_group["params"]}
    assert rest and all(n.startswith(TRAINABLE_PREFIXES) for n in rest)


@pytest.mark.parametrize("model_name, overrides", [("GlobalPEFT", {}), ("FrozenMM", {"adapter_learning_rate": 3e-3})])
def test_one_optimizer_group_without_adapter_learning_rate_or_adapter(make_config, model_name, overrides):
    config, model, *_ = build_model(model_name, DATASET, make_config(**overrides))
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    (group,) = trainer.optimizer.param_groups
    assert group["lr"] == config["learning_rate"]
    assert len(group["params"]) == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("model_name", ["GlobalPEFT", "FrozenMM", "WithoutMM"])  # refused even where nothing uses it
@pytest.mark.parametrize("bad", [0, -1e-3, "fast", True])
def test_bad_adapter_learning_rate_is_refused_by_name(make_config, model_name, bad):
    with pytest.raises(ValueError, match="adapter_learning_rate"):  # (by the Config, since numbers are checked there)
        config, model, *_ = build_model(model_name, DATASET, make_config(adapter_learning_rate=bad))
        get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
