"""Grad-CAM per group on item images (paper Fig. 8).

What is differentiated (``target``), for item i under adapter g (the global one, or group g's):

- ``users`` (default): ⟨v_g(i), ū_g⟩, where v_g(i) = ID embedding(i) + group g's projector over the item's
  modality vectors (its adapter's, for an adapted tower) is the item vector group g's users are scored
  against, and ū_g the mean interest vector of group g's training users under group g's model (their
  backbone state after their last training items; the global path: all grouped users). It is the score the
  group's average user gives the item (SASRec; with LightGCN the item vector before propagation).
- ``self``: ⟨v_g(i), v_g(i)⟩, the squared length of the group's item vector.

It is differentiated with respect to the image encoder's last feature map (:func:`target_layer`):

- EfficientNet-Lite0 (text_image): the output of its last convolution (``_conv_head``, 1x1 to 1280
  channels; 7x7 at 224 px), before the head's batch norm and swish;
- CLIP ViT: the patch tokens entering the last transformer layer (the CLS token left out), as a
  √P x √P grid.

Grad-CAM: channel weights = the gradient averaged over positions, map = ReLU(Σ_k weight_k · A_k).
The image tower's weights are frozen and its features usually cached; here they are recomputed for the
analysed items from their pixels with gradients enabled (a forward hook turns the feature map into a leaf
tensor). With a frozen tower every group sees the same features: the groups differ through their
projectors (and ū_g); with a side network (IISAN, CROSSAN), through its image blocks too."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from recbole_perpeft.analysis.loading import activated, adapter_names
from recbole_perpeft.config_values import choice

TARGETS = ("users", "self")


@dataclass
class GroupCams:
    item: int
    adapters: list[str]
    maps: np.ndarray  # [A, h, w] Grad-CAM maps (not normalised)
    scores: list[float]  # the differentiated value per adapter
    pixels: np.ndarray  # [S, S, 3] uint8, the image as the encoder saw it


def target_layer(foundation) -> tuple[torch.nn.Module, str, str]:
    """(module, "output" or "input" of it, a description) of the feature map Grad-CAM reads."""
    if hasattr(foundation, "image_model") and hasattr(foundation.image_model, "_conv_head"):
        return (
            foundation.image_model._conv_head,
            "output",
            "EfficientNet-Lite0: output of the last convolution (_conv_head), channels x h x w",
        )
    clip = getattr(foundation, "clip", None)
    if clip is not None:
        return (
            clip.vision_model.encoder.layers[-1],
            "input",
            "CLIP ViT: patch tokens entering the last transformer layer (CLS left out), as a grid",
        )
    raise ValueError(f"Grad-CAM: no known image feature map in {type(foundation).__name__}.")


@contextmanager
def captured(module: torch.nn.Module, where: str):
    """Every forward of ``module`` gets its output (or first input) replaced by a leaf tensor that
    requires grad, kept in the yielded dict under "activation"."""
    holder = {}

    def leaf(tensor):
        holder["activation"] = tensor.detach().requires_grad_(True)
        return holder["activation"]

    if where == "output":
        handle = module.register_forward_hook(lambda _m, _args, output: leaf(output))
    else:

        def pre_hook(_module, args, kwargs):
            if args:
                return (leaf(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": leaf(kwargs["hidden_states"])}

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield holder
    finally:
        handle.remove()


def image_parts(tower, items: torch.Tensor) -> dict:
    """The projector's inputs for ``items`` under the active adapter, the image path recomputed from
    pixels (with grad, through any hook) and the rest as the model computes it (without grad)."""
    from recbole_perpeft.adapters.frozen import FrozenFamily
    from recbole_perpeft.adapters.side_network import SideNetworkFamily

    family = tower.family
    if isinstance(family, SideNetworkFamily):
        with torch.no_grad():
            states = {m: family.layer_states[m].gather(items) for m in tower.modalities}
        layers = family.layer_states["image"].layers
        states["image"] = [
            s.float() for s in tower.foundation.layer_states("image", tower.item_inputs("image", items), layers)
        ]
        present = {m: tower.has(m)[items] for m in tower.modalities}
        return family.active_network(states, present)[0]
    if isinstance(family, FrozenFamily):  # FROZEN and every peft family
        with torch.no_grad():
            parts = dict(family.encode(items)[0])
        if "image" not in parts:
            raise ValueError(f"Grad-CAM: peft_type {family.name} gives the projector no image vector.")
        parts["image"] = family.foundation_vectors("image", items).float()
        return parts
    raise ValueError(
        f"Grad-CAM: adapter family {type(family).__name__} is not supported (peft methods, FROZEN, side networks are)."
    )


@torch.no_grad()
def group_user_means(model, train_dataset, groups, batch_size: int = 256) -> dict:
    """{group (None: global): mean interest vector [H] of its training users under its own model}."""
    labels = torch.as_tensor(groups.labels)
    means = {}
    for _, group in adapter_names(groups.n_groups):
        users, vectors = model.backbone_for(group).interest_vectors(train_dataset, model.item_table(group), batch_size)
        vectors = torch.as_tensor(vectors)
        in_group = labels[torch.as_tensor(users)]
        keep = in_group >= 0 if group is None else in_group == group
        means[group] = vectors[keep].mean(0).to(model.item_id_embedding.weight.device)
    return means


def cam_from(activation: torch.Tensor, gradient: torch.Tensor, where: str) -> np.ndarray:
    """Grad-CAM map [h, w] of one item from its feature map and the gradient there."""
    if where == "output":  # [1, C, h, w]
        weights = gradient.mean(dim=(2, 3), keepdim=True)
        return torch.relu((weights * activation).sum(1))[0].detach().cpu().numpy()
    tokens, grads = activation[0, 1:], gradient[0, 1:]  # [P, D] patch tokens (CLS left out)
    side = int(round(len(tokens) ** 0.5))
    if side * side != len(tokens):
        raise ValueError(f"Grad-CAM: {len(tokens)} patch tokens do not form a square grid.")
    return torch.relu(tokens @ grads.mean(0)).reshape(side, side).detach().cpu().numpy()


def group_gradcam(
    model, item: int, user_means: dict | None = None, target: str = "users", n_groups: int | None = None
) -> GroupCams:
    """Grad-CAM of one item (internal id, with an image) under the global adapter and every group's."""
    choice(target, TARGETS, "gradcam target")
    if target == "users" and user_means is None:
        raise ValueError("target 'users' needs the groups' mean user vectors (group_user_means).")
    tower = model.item_tower
    if "image" not in tower.modalities:
        raise ValueError("Grad-CAM: this run has no image modality.")
    items = torch.tensor([int(item)], device=tower.has_image.device)
    if not bool(tower.has("image")[items]):
        raise ValueError(f"Grad-CAM: item {item} has no image.")
    module, where, _ = target_layer(tower.foundation)
    adapters = adapter_names(tower.n_groups if n_groups is None else n_groups)
    maps, scores = [], []
    for _, group in adapters:
        with activated(tower, group), captured(module, where) as holder, torch.enable_grad():
            parts = image_parts(tower, items)
            vector = model.id_embedding_for(group)(items)[0] + tower.project(parts)[0]
            score = vector @ (user_means[group] if target == "users" else vector)
            if "activation" not in holder:
                raise RuntimeError(
                    "Grad-CAM: the image encoder's feature map was not computed (side_layers without the last state?)."
                )
            gradient = torch.autograd.grad(score, holder["activation"])[0]
        maps.append(cam_from(holder["activation"], gradient, where))
        scores.append(float(score.detach()))
    pixels = tower.item_inputs("image", items)["pixels"][0].permute(1, 2, 0).cpu().numpy()
    return GroupCams(int(item), [name for name, _ in adapters], np.stack(maps), scores, pixels)


def map_agreement(cams: GroupCams) -> float | None:
    """Mean cosine similarity between the groups' maps (global left out): 1 = the same map up to scale,
    0 = no overlap (maps are non-negative); two all-zero maps count as the same. None with one group."""
    rows = [m.ravel().astype(np.float64) for name, m in zip(cams.adapters, cams.maps, strict=True) if name != "global"]
    if len(rows) < 2:
        return None
    values = []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            norms = np.linalg.norm(rows[i]) * np.linalg.norm(rows[j])
            if norms > 0:
                values.append(float(rows[i] @ rows[j] / norms))
            else:
                values.append(1.0 if not rows[i].any() and not rows[j].any() else 0.0)
    return float(np.mean(values))
