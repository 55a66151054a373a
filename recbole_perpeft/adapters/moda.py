"""MoDA (SDA paper): modality-disentangled low-rank experts as a peft custom LoRA layer.

The rank ``r`` is split into ``n_experts`` experts of rank ``r / n_experts``; a gate maps a learned
condition embedding (e.g. the modality index) to softmax weights over the experts:
``y = W0 x + sum_e w_e * B_e A_e x * scaling``, with LoRA's scaling ``lora_alpha / r``.

Named adapters share one expert pool: the first adapter of a layer owns it (``moda_A.<first>.weight``,
``moda_B.<first>.weight``, expert ``e`` being rows ``e*k:(e+1)*k`` of A and the same columns of B, so one
expert is exactly LoRA), and every adapter owns only a gate (``moda_gate.<name>.embedding.weight``
[n_conditions, condition_dim], ``moda_gate.<name>.proj.{weight,bias}``). Groups thus mix the same experts
differently. The condition of the next forward is set with :func:`set_condition`.

As an adapter family (``peft_type: MODA``, :class:`MoDAFamily`): the condition is the modality being
encoded; defaults in ``properties/adapter/MODA.yaml``."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from recbole_perpeft.adapters.base import GLOBAL_ADAPTER, group_adapter_name
from recbole_perpeft.adapters.peft_adapter import PeftFamily
from recbole_perpeft.adapters.registry import family_defaults, register_adapter_family

# The expert/gate sizes' defaults: the family's YAML, so a bare MoDAConfig matches a run's defaults.
_YAML = family_defaults("MODA").get("peft_config") or {}


@dataclass
class MoDAConfig(LoraConfig):
    """LoraConfig plus the expert/gate sizes; registers :class:`MoDALinear` for ``nn.Linear`` targets so
    ``get_peft_model(module, MoDAConfig(...))`` builds MoDA layers (peft type stays LORA)."""

    n_experts: int = field(
        default=_YAML.get("n_experts", 4), metadata={"help": "experts sharing the rank r (r % n_experts == 0)"}
    )
    n_conditions: int = field(default=1, metadata={"help": "number of conditions, e.g. modalities"})
    condition_dim: int = field(
        default=_YAML.get("condition_dim", 8), metadata={"help": "size of the learned condition embedding"}
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("n_experts", "n_conditions", "condition_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoDA {name} must be >= 1, got {getattr(self, name)}.")
        check_rank(self.r, self.n_experts)
        # peft's experimental custom-layer API: tried before its own Linear.
        self._register_custom_module({nn.Linear: MoDALinear})


def check_rank(r: int, n_experts: int) -> None:
    if r % n_experts:
        raise ValueError(f"MoDA rank r={r} must be divisible by n_experts={n_experts} (each expert gets r/n_experts).")


class MoDAGate(nn.Module):
    """Condition embedding -> softmax weights over the experts of one adapter."""

    def __init__(self, n_conditions: int, condition_dim: int, n_experts: int):
        super().__init__()
        self.embedding = nn.Embedding(n_conditions, condition_dim)
        self.proj = nn.Linear(condition_dim, n_experts)
        # zero logits: every condition starts as the uniform mixture (i.e. plain LoRA of rank r)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    @property
    def n_conditions(self) -> int:
        return self.embedding.num_embeddings

    def forward(self, condition: int | None = None) -> torch.Tensor:
        """Expert weights [n_experts] for one condition, or [n_conditions, n_experts] for all (None)."""
        emb = self.embedding.weight if condition is None else self.embedding.weight[condition]
        return torch.softmax(self.proj(emb), dim=-1)


class MoDALinear(nn.Module, LoraLayer):
    """peft LoRA layer for ``nn.Linear`` with a shared expert pool and one gate per named adapter.

    Subclassing LoraLayer is what makes peft call ``update_layer`` on ``add_adapter`` and reach this layer in
    ``set_adapter``/``delete_adapter``."""

    adapter_layer_names = ("moda_A", "moda_B", "moda_gate")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_rslora")

    def __init__(self, base_layer, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        if not isinstance(self.get_base_layer(), nn.Linear):
            raise TypeError(f"MoDA supports nn.Linear targets only, got {type(self.get_base_layer()).__name__}.")
        if config.fan_in_fan_out:
            raise ValueError("MoDA does not support fan_in_fan_out=True (nn.Linear stores [out, in]).")
        self.moda_A = nn.ModuleDict()
        self.moda_B = nn.ModuleDict()
        self.moda_gate = nn.ModuleDict()
        self.pool_owner: str | None = None  # the first adapter: its name keys the shared pool
        self.n_experts = 0
        self.condition = 0  # set by set_condition; read at every forward
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        n_experts = getattr(config, "n_experts", None)
        if n_experts is None:
            raise ValueError(f"MoDA layers need a MoDAConfig (adapter '{adapter_name}'), not {type(config).__name__}.")
        if r <= 0:
            raise ValueError(f"MoDA rank r must be positive, got {r}.")
        check_rank(r, n_experts)
        if config.lora_bias or config.use_dora:
            raise ValueError("MoDA supports neither lora_bias nor use_dora.")
        if self.pool_owner is None:
            self.pool_owner, self.n_experts = adapter_name, n_experts
            self.moda_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
            self.moda_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
            self.reset_pool(config.init_lora_weights)
        elif (r, n_experts) != (self.r[self.pool_owner], self.n_experts):
            raise ValueError(
                f"MoDA adapter '{adapter_name}' shares the expert pool of '{self.pool_owner}' and must use its "
                f"r={self.r[self.pool_owner]} and n_experts={self.n_experts}, got r={r}, n_experts={n_experts}."
            )
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = config.use_rslora
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.moda_gate[adapter_name] = MoDAGate(config.n_conditions, config.condition_dim, n_experts)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_pool(self, init_lora_weights) -> None:
        a, b = self.moda_A[self.pool_owner].weight, self.moda_B[self.pool_owner].weight
        if init_lora_weights is False:  # keep nn.Linear's random init for both (peft's convention for tests)
            return
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif str(init_lora_weights).lower() == "gaussian":
            nn.init.normal_(a, std=1 / a.shape[0])
        else:
            raise ValueError(f"MoDA supports init_lora_weights True, False or 'gaussian', got {init_lora_weights!r}.")
        nn.init.zeros_(b)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        # peft would freeze the pool whenever its owner is inactive, but every adapter's forward uses it.
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        if self.pool_owner is not None:
            trainable = not inference_mode and any(name in self.moda_gate for name in names)
            self.moda_A[self.pool_owner].requires_grad_(trainable)
            self.moda_B[self.pool_owner].requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name == self.pool_owner and len(self.moda_gate) > 1:
            raise ValueError(f"Cannot delete MoDA adapter '{adapter_name}': it owns the expert pool the others share.")
        super().delete_adapter(adapter_name)
        if adapter_name == self.pool_owner:
            self.pool_owner = None

    @property
    def n_conditions(self) -> int:
        """Conditions every adapter of this layer accepts."""
        return min(gate.n_conditions for gate in self.moda_gate.values())

    def check_condition(self, condition: int) -> int:
        condition = operator.index(condition)
        if not 0 <= condition < self.n_conditions:
            raise ValueError(f"MoDA condition must be in [0, {self.n_conditions}), got {condition}.")
        return condition

    def gate_weights(self, adapter_name: str | None = None) -> torch.Tensor:
        """Expert weights [n_conditions, n_experts] of an adapter's gate (default: the first active one)."""
        return self.moda_gate[adapter_name or self.active_adapters[0]]()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        # The delta weight depends on the condition of each forward, so no single merged weight exists.
        raise NotImplementedError("MoDA layers cannot be merged: their update depends on the current condition.")

    def unmerge(self) -> None:
        pass  # nothing is ever merged

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("MoDA does not support per-sample adapter_names (mixed-adapter batches).")
        kwargs.pop("alora_offsets", None)  # peft's variant kwarg, never for the base layer
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.pool_owner is None:
            return result
        lora_A, lora_B = self.moda_A[self.pool_owner], self.moda_B[self.pool_owner]
        condition = self.check_condition(self.condition)
        out_dtype = result.dtype
        x = self._cast_input_dtype(x, lora_A.weight.dtype)
        for name in self.active_adapters:  # several active adapters add up, as in LoRA
            if name not in self.moda_gate:
                continue
            # one weight per rank slot: expert e covers k = r / n_experts consecutive slots
            mix = self.moda_gate[name](condition).repeat_interleave(self.r[name] // self.n_experts)
            result = result + lora_B(lora_A(self.lora_dropout[name](x)) * mix) * self.scaling[name]
        return result.to(out_dtype)

    def __repr__(self) -> str:
        return "moda." + super().__repr__()


def moda_layers(model: nn.Module) -> list[MoDALinear]:
    return [m for m in model.modules() if isinstance(m, MoDALinear)]


def is_moda(model: nn.Module) -> bool:
    """Whether ``model`` (a PeftModel or the module peft was injected into) has MoDA layers."""
    return bool(moda_layers(model))


def set_condition(model: nn.Module, condition: int) -> int:
    """Make every MoDA layer in ``model`` use ``condition`` from the next forward on; return the previous one.

    Validated on all layers first, so a bad index leaves the model unchanged."""
    layers = moda_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoDA layers to set a condition on.")
    condition = operator.index(condition)
    for layer in layers:
        layer.check_condition(condition)
    previous = layers[0].condition
    for layer in layers:
        layer.condition = condition
    return previous


@register_adapter_family("MODA")
class MoDAFamily(PeftFamily):
    """MoDA on the adapted encoders; the gate's condition is the index of the modality being encoded.
    A group's adapter is a gate only: the global adapter's expert pool is shared, frozen in stage 2."""

    @staticmethod
    def config_class(peft_type: str) -> type:
        return MoDAConfig

    def complete_kwargs(self, kwargs: dict, tower) -> dict:
        return {"n_conditions": len(tower.foundation.modalities), **kwargs}

    def foundation_vectors(self, modality: str, items: torch.Tensor) -> torch.Tensor:
        if self.peft_models:  # none when no modality is adapted (e.g. image only, image tower frozen)
            set_condition(self.foundation, self.foundation.modalities.index(modality))
        return super().foundation_vectors(modality, items)

    @torch.no_grad()
    def copy_global_to_groups(self) -> None:
        """Gate by gate, over peft's per-adapter containers (``adapter_layer_names``): peft's state-dict
        helpers select MoDA's keys only from peft 0.21 on, and the pool has no group entry to copy."""
        for layer in moda_layers(self.foundation):
            for attr in layer.adapter_layer_names:
                container = getattr(layer, attr)
                for group in range(self.n_groups):
                    name = group_adapter_name(group)
                    if name in container and GLOBAL_ADAPTER in container:
                        container[name].load_state_dict(container[GLOBAL_ADAPTER].state_dict())
