"""``recbole-perpeft export``: a trained run as item tables + SASRec encoder weights + grouping, for
:class:`recbole_perpeft.serving.TableRecommender` (torch and safetensors only).

What is written (``DIR/model.safetensors`` and ``DIR/recommender.json``):

* ``table.global``: every item's vector under the global path; PerPEFT adds ``table.group.<g>`` per group.
  The foundation model and the adapters are spent here, once: they are not needed to serve.
* ``encoder.global.*`` (and PerPEFT's shared ``encoder.groups.*``): the SASRec encoder, mapped from RecBole's
  TransformerEncoder layout to ``torch.nn.TransformerEncoderLayer``'s (serving.SequenceEncoder).
* ``grouping.*``: each known user's group and what assigns new users (K-Means centres / GMM parameters).
* ``users.*``: each known user's last ``MAX_ITEM_LIST_LENGTH`` items and every item it has (``exclude_seen``),
  and its sequence vector from them (``users.vectors``; PerPEFT: under its own group), computed here once by the
  full model's own code in batches, as the paper's App. D.2 does for item tables: a known user is then served by
  one matmul against its group's table, without the encoder (``users.precomputed`` marks who has one).
* the JSON: item and user tokens by internal id, the encoder's sizes, the grouping's method, the run's config.

Served: our sequence models with the SASRec backbone (GlobalPEFT, FrozenMM, WithoutMM, LargeGlobalPEFT,
SharedGroupPEFT, PerPEFT with hard groups) and RecBole's SASRec. Others (graph backbones, the personal-vector
baselines, other RecBole models) score users in ways a table and this encoder do not hold: refused by name."""

from __future__ import annotations

import json
import os

import torch

from recbole_perpeft.quick_start import json_safe
from recbole_perpeft.serving import ACTIVATIONS, FORMAT, META_FILE, WEIGHTS_FILE


def encoder_state(module) -> tuple[dict, dict]:
    """(serving.SequenceEncoder state, its sizes) from a module with RecBole SASRec's ``position_embedding``,
    ``LayerNorm`` and ``trm_encoder`` (our SASRecEncoder, or RecBole's SASRec itself)."""
    state = {
        "position.weight": module.position_embedding.weight,
        "norm.weight": module.LayerNorm.weight,
        "norm.bias": module.LayerNorm.bias,
    }
    layers = module.trm_encoder.layer
    for i, layer in enumerate(layers):
        attention, feed_forward, prefix = layer.multi_head_attention, layer.feed_forward, f"layers.{i}."
        for part in ("weight", "bias"):
            state[f"{prefix}self_attn.in_proj_{part}"] = torch.cat(
                [getattr(getattr(attention, name), part) for name in ("query", "key", "value")]
            )
            for mine, theirs in (("self_attn.out_proj", attention.dense), ("norm1", attention.LayerNorm),
                                 ("linear1", feed_forward.dense_1), ("linear2", feed_forward.dense_2),
                                 ("norm2", feed_forward.LayerNorm)):  # fmt: skip
                state[f"{prefix}{mine}.{part}"] = getattr(theirs, part)
    attention = layers[0].multi_head_attention
    sizes = {
        "hidden_size": int(module.position_embedding.weight.shape[1]),
        "n_layers": len(layers),
        "n_heads": int(attention.num_attention_heads),
        "inner_size": int(layers[0].feed_forward.dense_1.out_features),
        "layer_norm_eps": float(module.LayerNorm.eps),
        "max_seq_length": int(module.position_embedding.weight.shape[0]),
    }
    return state, sizes


def model_parts(model, config) -> tuple[dict, dict, dict | None]:
    """(tables, encoders, PerPEFT's grouping or None) of a model the export serves, else ValueError."""
    from recbole_perpeft.model.personalisation import PersonalisedGlobalPEFT
    from recbole_perpeft.model.sequential_recommender.globalpeft import GlobalPEFT
    from recbole_perpeft.model.sequential_recommender.perpeft import PerPEFT

    name = type(model).__name__
    if isinstance(model, GlobalPEFT) and not isinstance(model, PersonalisedGlobalPEFT):
        if model.backbone_name != "SASRec":
            raise ValueError(f"export serves the SASRec backbone; this {name} has {model.backbone_name} (its user "
                             "vectors come from the training graph): serve it with recommend --checkpoint.")
        if not isinstance(model, PerPEFT):
            return {"global": model.item_table(None)}, {"global": model.backbone.encoder}, None
        if model.soft_groups > 1:
            raise ValueError(f"export serves hard groups; this run mixes soft_groups={model.soft_groups}: export "
                             "with --soft_groups=1, or serve it with recommend --checkpoint.")
        tables = {"global": model.item_table(None)}
        tables.update({f"group.{g}": model.item_table(g) for g in range(model.item_tower.n_groups)})
        encoders = {"global": model.global_backbone.encoder, "groups": model.backbone.encoder}
        return tables, encoders, model.user_groups
    if name == "SASRec" and hasattr(model, "trm_encoder"):  # RecBole's
        return {"global": model.item_embedding.weight}, {"global": model}, None
    raise ValueError(f"export serves SASRec-style models (GlobalPEFT, FrozenMM, PerPEFT, RecBole's SASRec, ...); "
                     f"{name} scores users otherwise: serve it with recommend --checkpoint.")


@torch.no_grad()
def known_user_vectors(model, recommender, device, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """([n_users, H] each known user's sequence vector from its stored history, [n_users] which users have one)
    by the full model's code (``user_vectors`` under the user's group; RecBole's SASRec: ``forward``), exactly as
    recommend.Recommender scores them. PerPEFT's users left out of the grouping (and user 0) get none."""
    from recbole.data.interaction import Interaction

    from recbole_perpeft.model.sequential_recommender.perpeft import PerPEFT

    n_users = len(recommender.user_tokens)
    vectors, precomputed = None, torch.zeros(n_users, dtype=torch.bool)
    for start in range(1, n_users, batch_size):
        users = torch.arange(start, min(start + batch_size, n_users))
        seqs, lengths = recommender.histories[users], recommender.lengths[users].clamp(min=1)
        if not hasattr(model, "user_vectors"):  # RecBole's SASRec
            batch_vectors, done = model.forward(seqs.to(device), lengths.to(device)), torch.ones_like(users, dtype=bool)
        else:
            batch = Interaction({model.USER_ID: users, model.ITEM_SEQ: seqs, model.ITEM_SEQ_LEN: lengths}).to(device)
            if not isinstance(model, PerPEFT):
                batch_vectors, done = model.user_vectors(batch, None), torch.ones_like(users, dtype=bool)
            else:
                groups = model.group_of_user.cpu()[users]
                done, batch_vectors = groups >= 0, None
                for group in groups[done].unique().tolist():
                    rows = torch.nonzero(groups == group).flatten()
                    part = model.user_vectors(batch[rows.to(device)], group)
                    if batch_vectors is None:
                        batch_vectors = torch.zeros(len(users), part.shape[1], device=part.device)
                    batch_vectors[rows.to(device)] = part
                if batch_vectors is None:
                    continue
        if vectors is None:
            vectors = torch.zeros(n_users, batch_vectors.shape[1])
        vectors[users] = batch_vectors.float().cpu()
        precomputed[users] = done
    return vectors, precomputed


def grouping_parts(groups, model) -> tuple[dict, dict]:
    meta = {"method": groups.method, "n_groups": int(groups.n_groups), "seed": int(groups.seed)}
    weights = {"grouping.labels": model.group_of_user}
    if groups.method == "kmeans":
        weights["grouping.centers"] = torch.from_numpy(groups.centers)
    elif groups.method == "gmm":
        for key in ("gmm_weights", "gmm_means", "gmm_covariances"):
            weights[f"grouping.{key}"] = torch.from_numpy(getattr(groups, key))
    return meta, weights


@torch.no_grad()
def export(run, directory: str, recommender=None) -> str:
    """Write the export of ``run`` (a recommend.TrainedRun; ``recommender`` its Recommender if built) into
    ``directory``; returns it."""
    from safetensors.torch import save_file

    model, config = run.model, run.config
    tables, encoders, groups = model_parts(model, config)
    if str(config["hidden_act"]) not in ACTIVATIONS:
        raise ValueError(f"hidden_act {config['hidden_act']!r}: the export's torch layers compute {ACTIVATIONS}.")
    weights = {f"table.{k}": v for k, v in tables.items()}
    sizes = None
    for name, module in encoders.items():
        state, sizes = encoder_state(module)
        weights.update({f"encoder.{name}.{k}": v for k, v in state.items()})
    sizes["hidden_act"] = str(config["hidden_act"])
    grouping = None
    if groups is not None:
        grouping, grouping_weights = grouping_parts(groups, model)
        weights.update(grouping_weights)
    recommender = recommender or run.recommender()
    weights.update({"users.histories": recommender.histories, "users.lengths": recommender.lengths,
                    "users.seen_indptr": recommender.seen_indptr, "users.seen_indices": recommender.seen_indices})
    vectors, precomputed = known_user_vectors(model, recommender, config["device"])
    if vectors is not None:
        weights.update({"users.vectors": vectors, "users.precomputed": precomputed})
    meta = {
        "format": FORMAT,
        "model": run.model_name,
        "dataset": run.dataset_name,
        "checkpoint": os.path.abspath(run.checkpoint),
        "item_tokens": recommender.item_tokens,
        "user_tokens": recommender.user_tokens,
        "encoder": sizes,
        "encoders": list(encoders),
        "grouping": grouping,
        "config": json_safe(config.final_config_dict),
    }
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()},
              os.path.join(directory, WEIGHTS_FILE))  # fmt: skip
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return directory
