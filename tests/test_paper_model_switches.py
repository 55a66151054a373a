"""The model-side switches of the `paper` preset (issue 39 item 2), each against a literal re-statement of
the official PerPEFT code's computation (kswoo97/PerPEFT) or its stated sizes: the projector, the pre-LN
SASRec, the original IISAN and the grouping's sequence and stage-1 epoch. Each default stays today's form."""

from __future__ import annotations

import copy
import glob
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from recbole_perpeft.adapters.iisan import IISAN, OriginalIISAN, iisan_network
from recbole_perpeft.data import create_dataset
from recbole_perpeft.grouping import grouping_source
from recbole_perpeft.model.backbones.lightgcn import LightGCNBackbone
from recbole_perpeft.model.backbones.sasrec import SASRecBackbone
from recbole_perpeft.model.item_tower import ItemTower, UnitLength
from recbole_perpeft.model.sequence_encoder import OfficialSASRecEncoder, SASRecEncoder, build_sequence_encoder
from tests.conftest import build_atomic_dataset, config_for

PRESET = Path(__file__).resolve().parents[1] / "recbole_perpeft" / "properties" / "preset" / "paper.yaml"
MAX_LEN, HIDDEN = 5, 8


class FakeConfig(dict):
    def __missing__(self, key):  # RecBole's Config answers None for keys it lacks
        return None


def sasrec_config(**overrides) -> FakeConfig:
    keys = dict(hidden_size=HIDDEN, inner_size=HIDDEN, n_layers=2, n_heads=2, hidden_dropout_prob=0.3,
                attn_dropout_prob=0.3, hidden_act="relu", layer_norm_eps=1e-8, initializer_range=0.02,
                sasrec_variant="official")  # fmt: skip
    return FakeConfig(keys, **overrides)


def recbole_mask(seq: torch.Tensor) -> torch.Tensor:
    """RecBole's extended causal mask over non-padding keys ([B, 1, L, L], 0 or -10000)."""
    causal = torch.tril(torch.ones(seq.shape[1], seq.shape[1], dtype=torch.bool))
    return torch.where(causal[None, None] & (seq != 0)[:, None, None, :], 0.0, -10000.0)


# --- 1. the item vector's projector ----------------------------------------------------------------------


def test_preset_projector_is_the_official_mmprojector_over_unit_length_vectors():
    preset = yaml.safe_load(PRESET.read_text())
    config = FakeConfig(preset, hidden_size=32)
    dims = {"image": 512, "text": 512}
    projector = ItemTower._projector(config, dims).eval()
    mlp = projector["mlp"]
    assert [type(m) for m in mlp] == [nn.Linear, nn.LayerNorm, nn.ReLU, nn.Dropout, nn.Linear, nn.LayerNorm]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[4].out_features) == (1024, 64, 32)
    assert mlp[1].eps == mlp[5].eps == 1e-8 and mlp[3].p == 0.0
    assert all(isinstance(projector["norms"][m], UnitLength) for m in dims)
    for module in mlp:  # weights away from their init, so that every LayerNorm's affine part counts
        for param in module.parameters():
            param.data.normal_()
    parts = {m: torch.randn(3, d) * 5 for m, d in dims.items()}
    x = torch.cat([nn.functional.normalize(parts["image"], dim=-1), nn.functional.normalize(parts["text"], dim=-1)], 1)
    ln = [(mlp[1].weight, mlp[1].bias), (mlp[5].weight, mlp[5].bias)]
    hidden = torch.relu(nn.functional.layer_norm(mlp[0](x), (64,), *ln[0], eps=1e-8))
    expected = nn.functional.layer_norm(mlp[4](hidden), (32,), *ln[1], eps=1e-8)
    got = projector["mlp"](torch.cat([projector["norms"][m](v) for m, v in parts.items()], -1))
    assert torch.allclose(got, expected, atol=1e-5)
    assert preset["multimodal_weight"] == 0.5  # item vector = ID + 0.5 * this


def test_modality_norm_official_leaves_side_network_outputs_as_they_are():
    config = FakeConfig(modality_norm="official", hidden_size=32)
    dims = {"intra_text": 512, "intra_image": 768, "inter": 512}
    side = ItemTower._projector(config, dims, side_network=True)
    assert all(isinstance(n, nn.Identity) for n in side["norms"].values())
    assert all(isinstance(n, UnitLength) for n in ItemTower._projector(config, dims)["norms"].values())


def test_default_projector_keeps_its_form_and_state_keys():
    config = FakeConfig(hidden_size=32, projector_hidden_size=256, projector_dropout=0.1)
    projector = ItemTower._projector(config, {"text": 384, "image": 1280})
    assert [type(m) for m in projector["mlp"]] == [nn.Linear, nn.GELU, nn.Dropout, nn.Linear]
    assert all(isinstance(n, nn.LayerNorm) and n.eps == 1e-5 for n in projector["norms"].values())
    assert set(projector.state_dict()) == {
        "norms.text.weight", "norms.text.bias", "norms.image.weight", "norms.image.bias",
        "mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias",
    }  # fmt: skip


@pytest.mark.parametrize(("key", "value"), [("modality_norm", "batchnorm"), ("projector_activation", "tanh")])
def test_projector_refuses_an_unknown_choice_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"{key}.*{value}"):
        ItemTower._projector(FakeConfig({key: value}, hidden_size=8), {"text": 4})


# --- 2. SASRec: the official pre-LN variant ------------------------------------------------------------------


def official_forward(encoder: OfficialSASRecEncoder, item_emb: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """The official log2feats, written as it is: right-aligned sequences (padding first), positions 1..L
    (0 at padding), x * sqrt(d) + position, Q = LN(x), x = Q + MHA(Q, x, x), x = LN(x), x += FFN(x), final
    LN. Padding keys are masked here (the only departure, see sequence_encoder's docstring)."""
    n = (seq > 0).sum(1)
    length = seq.shape[1]
    right = torch.stack([torch.roll(row, int(length - k), 0) for row, k in zip(item_emb, n, strict=True)])
    right_seq = torch.stack([torch.roll(row, int(length - k), 0) for row, k in zip(seq, n, strict=True)])
    positions = torch.arange(1, length + 1).repeat(len(seq), 1) * (right_seq != 0)
    x = right * math.sqrt(item_emb.shape[-1]) + encoder.position_embedding(positions)
    causal = ~torch.tril(torch.ones(length, length, dtype=torch.bool))
    for block in encoder.blocks:
        q = block.attention_norm(x)
        x = q + block.attention(q, x, x, attn_mask=causal, key_padding_mask=right_seq == 0, need_weights=False)[0]
        x = block.ffn_norm(x)
        x = x + block.ffn(x)
    x = encoder.final_norm(x)
    # back to left-aligned rows (the real positions are the ones compared)
    return torch.stack([torch.roll(row, -int(length - k), 0) for row, k in zip(x, n, strict=True)])


def test_official_sasrec_matches_the_official_forward_with_positions_counted_from_the_end():
    torch.manual_seed(0)
    encoder = build_sequence_encoder(sasrec_config(), MAX_LEN).eval()
    assert isinstance(encoder, OfficialSASRecEncoder)
    seq = torch.tensor([[3, 1, 4, 1, 5], [2, 7, 0, 0, 0], [9, 0, 0, 0, 0]])
    item_emb = torch.randn(3, MAX_LEN, HIDDEN) * (seq > 0).unsqueeze(-1)
    got = encoder(item_emb, recbole_mask(seq))
    expected = official_forward(encoder, item_emb, seq)
    real = seq > 0
    assert torch.allclose(got[real], expected[real], atol=1e-5)
    # the most recent item has position L whatever the length: a 2-item user's last state differs from
    # what positions 1, 2 (counted from the start) give
    encoder.position_embedding.weight.data[1:] = torch.randn(MAX_LEN, HIDDEN)
    again = encoder(item_emb, recbole_mask(seq))
    assert torch.allclose(again[real], official_forward(encoder, item_emb, seq)[real], atol=1e-5)


def test_official_sasrec_blocks_have_the_official_sizes_and_xavier_init():
    torch.manual_seed(0)
    config = sasrec_config(hidden_size=32, inner_size=32, n_heads=4)
    encoder = build_sequence_encoder(config, 10)
    assert [type(m) for m in encoder.blocks[0].ffn] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.Dropout]
    assert encoder.blocks[0].ffn[0].out_features == 32 and len(encoder.blocks) == 2
    assert encoder.final_norm.eps == 1e-8 and torch.equal(encoder.final_norm.weight, torch.ones(32))
    assert torch.equal(encoder.position_embedding.weight[0], torch.zeros(32))  # the padding position
    weight = encoder.blocks[0].ffn[0].weight
    assert abs(weight.std().item() - math.sqrt(2 / 64)) < 0.03  # xavier_normal, not normal(0.02)
    assert isinstance(build_sequence_encoder(sasrec_config(sasrec_variant="recbole"), 10), SASRecEncoder)
    with pytest.raises(ValueError, match="sasrec_variant.*pre_ln"):
        build_sequence_encoder(sasrec_config(sasrec_variant="pre_ln"), 10)


# --- 3. IISAN: the original network ------------------------------------------------------------------------

CLIP_WIDTHS = {"text": [512] * 7, "image": [768] * 7}  # CLIP B/32, every other of 13 hidden states


def test_original_iisan_has_the_official_parameter_count():
    net = iisan_network(CLIP_WIDTHS, FakeConfig(iisan_variant="original"))
    assert isinstance(net, OriginalIISAN) and net.n_blocks == 7
    own = sum(p.numel() for name, p in net.named_parameters() if "placeholders" not in name)
    # official: 7 x (image 768-32-768, text 512-32-512, inter 512-32-512 blocks + a 768->512 map) + 3 x 7 gates
    per_layer = (768 * 32 + 32 + 32 * 768 + 768) + 2 * (512 * 32 + 32 + 32 * 512 + 512) + (768 * 512 + 512)
    assert own == 7 * per_layer + 21 == 3_572_149
    assert net.out_dims == {"intra_text": 512, "intra_image": 768, "inter": 512}
    assert type(iisan_network(CLIP_WIDTHS, FakeConfig())) is IISAN  # the default: ours
    with pytest.raises(ValueError, match="iisan_variant.*paper"):
        iisan_network(CLIP_WIDTHS, FakeConfig(iisan_variant="paper"))


def test_original_iisan_computes_the_official_forward():
    torch.manual_seed(0)
    net = iisan_network(CLIP_WIDTHS, FakeConfig(iisan_variant="original"))
    for param in net.parameters():
        param.data.normal_(std=0.1)
    text, image = torch.randn(4, 7, 512), torch.randn(4, 7, 768)
    present = {m: torch.ones(4, dtype=torch.bool) for m in CLIP_WIDTHS}
    parts, _ = net({"text": list(text.unbind(1)), "image": list(image.unbind(1))}, present)
    # the official IISAN.forward, weight_scalar rows: text, image, inter
    w = torch.sigmoid(torch.stack([net.intra_gates["text"], net.intra_gates["image"], net.inter_gates]))
    for i in range(7):
        if i == 0:
            zt, zi = text[:, 0], image[:, 0]
            zc = w[2, 0] * text[:, 0] + (1 - w[2, 0]) * net.inter_maps[0](image[:, 0])
        else:
            zt = w[0, i] * zt + (1 - w[0, i]) * text[:, i]
            zi = w[1, i] * zi + (1 - w[1, i]) * image[:, i]
            zc = w[2, i] * text[:, i] + (1 - w[2, i]) * net.inter_maps[i](image[:, i]) + zc
        zt, zi, zc = (block(z) for block, z in ((net.intra["text"][i], zt), (net.intra["image"][i], zi),
                                                (net.inter[i], zc)))  # fmt: skip
    assert list(parts) == ["intra_text", "intra_image", "inter"]
    for got, expected in zip(parts.values(), (zt, zi, zc), strict=True):
        assert torch.allclose(got, expected, atol=1e-5)


# --- 4. grouping: which sequence -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_switches")
    data = build_atomic_dataset(root / "data", n_items=60, images=False)
    base = {"checkpoint_dir": str(root / "saved"), "cache_dir": str(root / "cache"), "show_progress": False,
            "device": "cpu", "use_gpu": False, "state": "WARNING", "reproducibility": True}  # fmt: skip
    config = config_for("GlobalPEFT", data, base, MAX_ITEM_LIST_LENGTH=MAX_LEN, hidden_size=HIDDEN, inner_size=16,
                        n_heads=2, train_batch_size=4, sasrec_variant="official")  # fmt: skip
    train, valid, _ = create_dataset(config).build()
    tokens = train.field2id_token
    item_id = {t: i for i, t in enumerate(tokens["item_id"])}
    # Leave-one-out: the second last item is the validation item.
    history = {u: [item_id[t] for t in data.sequences[tokens["user_id"][u]][:-1]] for u in range(1, train.user_num)}
    return SimpleNamespace(config=config, train=train, valid=valid, history=history)


def test_train_valid_interest_vectors_read_the_validation_item_last(toy):
    backbone = SASRecBackbone(toy.config, toy.train).eval()
    assert isinstance(backbone.encoder, OfficialSASRecEncoder)
    table = torch.randn(toy.train.item_num, HIDDEN)
    users, vectors = backbone.interest_vectors(toy.train, table, batch_size=7, valid_dataset=toy.valid)
    assert users.tolist() == sorted(toy.history)
    seqs = [toy.history[u][-MAX_LEN:] for u in users.tolist()]
    seq = torch.tensor([s + [0] * (MAX_LEN - len(s)) for s in seqs])
    states = backbone.encode(table[seq], seq)
    expected = states[torch.arange(len(seqs)), torch.tensor([len(s) for s in seqs]) - 1]
    assert np.allclose(vectors, expected.detach().numpy(), atol=1e-5)
    _, train_only = backbone.interest_vectors(toy.train, table, batch_size=7)
    assert not np.allclose(train_only, vectors)


def test_grouping_keys_default_to_ours_and_refuse_unknown_values(toy):
    assert grouping_source(FakeConfig()) == ("train", "best")
    assert grouping_source(FakeConfig(grouping_sequence="train_valid", grouping_checkpoint="LAST")) == (
        "train_valid", "last")  # fmt: skip
    with pytest.raises(ValueError, match="grouping_checkpoint.*final"):
        grouping_source(FakeConfig(grouping_checkpoint="final"))
    with pytest.raises(ValueError, match="grouping_sequence.*all"):
        grouping_source(FakeConfig(grouping_sequence="all"))
    lightgcn = LightGCNBackbone(toy.config, toy.train)
    with pytest.raises(ValueError, match="grouping_sequence: train_valid"):
        lightgcn.interest_vectors(toy.train, torch.randn(toy.train.item_num, HIDDEN), 8, valid_dataset=toy.valid)


# --- all switches at the official values: stage 1 with tiny CLIP and the original IISAN ----------------------


@pytest.fixture(scope="module")
def paper_stage1(tmp_path_factory):
    """The tiny CLIP two-stage setup under --preset=paper (every key of preset/paper.yaml), IISAN."""
    from recbole.utils import init_seed

    from recbole_perpeft.config import Config
    from recbole_perpeft.data import data_preparation
    from recbole_perpeft.utils import get_model
    from tests.tiny import make_atomic_dataset, make_tiny_clip, two_stage_keys

    root = tmp_path_factory.mktemp("paper_stage1")
    clip = make_tiny_clip(root / "clip")
    keys = two_stage_keys(root, make_atomic_dataset(root / "data", "paperds", n_users=30, n_items=30), clip.path)
    keys.update(preset="paper", peft_type="IISAN", adapt_image_tower=False, state="WARNING")  # the whole preset
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        config = Config(model="PerPEFT", dataset="paperds", config_dict=keys)
        init_seed(config["seed"], True)
        train_data, valid_data, _ = data_preparation(config, create_dataset(config), get_model("PerPEFT"))
    return SimpleNamespace(root=root, config=config, train_data=train_data, valid_data=valid_data)


def run_stage1(env, monkeypatch, checkpoint: str):
    """TwoStageTrainer.stage1 with ``grouping_checkpoint``; after stage 1's real fit the weights are moved and
    written as the -last checkpoint (as a later, worse epoch would), so the best and the last epoch differ."""
    from recbole.utils import init_seed

    from recbole_perpeft import two_stage
    from recbole_perpeft.resume import load_checkpoint
    from recbole_perpeft.utils import get_model

    fit, moved = two_stage.PEFTTrainer.fit, {}

    def fit_then_move(trainer, *args, **kwargs):
        result = fit(trainer, *args, **kwargs)
        with torch.no_grad():
            trainer.model.item_id_embedding.weight.add_(1.0)
        trainer._save_last(trainer._last_epoch)
        moved.update(copy.deepcopy(trainer.model.state_dict()))
        trainer.model.item_id_embedding.weight.data.zero_()  # the weights in memory are not what stage 1 hands on
        return result

    monkeypatch.setattr(two_stage.PEFTTrainer, "fit", fit_then_move)
    monkeypatch.chdir(env.root)
    config = copy.copy(env.config)
    config.final_config_dict = dict(env.config.final_config_dict, grouping_checkpoint=checkpoint,
                                    checkpoint_dir=str(env.root / f"saved-{checkpoint}"))  # fmt: skip
    init_seed(config["seed"], True)
    trainer = two_stage.TwoStageTrainer(config, get_model("PerPEFT")(config, env.train_data._dataset))
    model = trainer.stage1(env.train_data, env.valid_data, show_progress=False)
    stem = str(env.root / f"saved-{checkpoint}" / "*-stage1-GlobalPEFT")
    (best_file,) = [f for f in glob.glob(stem + "*.pth") if not f.endswith("-last.pth")]
    assert trainer.global_checkpoint == (best_file.replace(".pth", "-last.pth") if checkpoint == "last" else best_file)
    return model, moved, load_checkpoint(best_file)["state_dict"]


@pytest.mark.parametrize("checkpoint", ["best", "last"])
def test_paper_keys_train_stage1_and_group_from_the_chosen_epoch(paper_stage1, monkeypatch, checkpoint):
    from recbole_perpeft.two_stage import group_users

    model, moved, best = run_stage1(paper_stage1, monkeypatch, checkpoint)
    tower = model.item_tower
    assert isinstance(tower.side, OriginalIISAN) and isinstance(model.backbone.encoder, OfficialSASRecEncoder)
    assert all(isinstance(n, nn.Identity) for n in tower.projector["norms"].values())  # official: side outputs as-is
    assert tower.multimodal_weight == 0.5
    ids = model.item_id_embedding.weight[1:]  # xavier_normal (std sqrt(2 / (n_items + 32)) ~ 0.18), not normal(0.02)
    assert ids.std().item() > 0.1
    state = model.state_dict()
    wanted = moved if checkpoint == "last" else best
    other = best if checkpoint == "last" else moved
    key = "item_id_embedding.weight"
    assert torch.equal(state[key], wanted[key].to(state[key].device)) and not torch.equal(state[key], other[key])
    groups = group_users(model, paper_stage1.train_data._dataset, paper_stage1.config,
                         paper_stage1.valid_data._dataset)  # fmt: skip
    assert sum(groups.sizes()) == 30


def test_comparison_rows_share_stage1_across_grouping_sequence_but_not_grouping_checkpoint():
    from recbole_perpeft.compare import stage1_key

    base = stage1_key({"peft_type": "IISAN"})
    assert stage1_key({"peft_type": "IISAN", "grouping_sequence": "train_valid"}) == base  # a stage-2 choice
    assert stage1_key({"peft_type": "IISAN", "grouping_checkpoint": "last"}) != base  # another stage-1 file
