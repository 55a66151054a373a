"""The seam between the item tower and an adapter method: :class:`AdapterFamily`.

The item tower (``recbole_perpeft.model.item_tower.ItemTower``) owns the foundation model, the per-item
inputs (tokens, pixels, which items have which modality), the missing-modality placeholders and the
projector(s); a family owns the adapter: how items become the named vectors the projector concatenates,
and PerPEFT's per-group copies of the adapter. What a family may read from the tower (its ``tower``):
``foundation``, ``modalities``, ``item_inputs(modality, items)``, ``has(modality)`` (bool per item),
``encode_batch_size``, ``show_progress``, ``active_placeholders()``, ``precision`` (autocast for the
per-batch forward of adapted encoders) and ``text_buckets(items)`` (sub-batches by title length).

A family's state lives either inside the foundation (peft layers: their keys are foundation keys, found
with :meth:`AdapterFamily.is_adapter_key`) or in the modules it hands the tower (:meth:`modules`),
registered there under their names, so checkpoint keys stay ``item_tower.<name>.*`` (``side``,
``group_sides``) whatever the family."""

from __future__ import annotations

import copy
from itertools import chain
from logging import getLogger

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from recbole_perpeft.adapters.registry import family_settings

GLOBAL_ADAPTER = "default"  # peft's name for the first adapter: PerPEFT's global one


def group_adapter_name(group: int) -> str:
    """The name of group ``group``'s adapter (peft named adapter)."""
    return f"group_{group}"


def tuner_state_keys(root: nn.Module) -> set[str]:
    """Every parameter and buffer name (relative to ``root``) that peft injected: whatever sits on a
    tuner layer beside its ``base_layer`` (the frozen layer it wraps), of any adapter. Read off peft's
    layer structure, so a base-model weight whose name merely looks like an adapter's is not matched."""
    keys = set()
    for module_name, layer in root.named_modules():
        if isinstance(layer, BaseTunerLayer):
            prefix = f"{module_name}." if module_name else ""
            for key, _ in chain(layer.named_parameters(), layer.named_buffers()):
                if not key.startswith("base_layer."):
                    keys.add(prefix + key)
    return keys


def named_adapter_parameters(root: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """The parameters of one named peft adapter in ``root``, by their names in ``root``: the entries
    for ``adapter`` of every tuner layer's ``adapter_layer_names`` containers (peft's own record of
    which attributes hold per-adapter weights)."""
    found = {}
    for module_name, layer in root.named_modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr, None)
            if container is None or adapter not in container:
                continue
            entry, prefix = container[adapter], f"{module_name}.{attr}.{adapter}"
            if isinstance(entry, nn.Parameter):
                found[prefix] = entry
            else:
                found.update({f"{prefix}.{name}": p for name, p in entry.named_parameters()})
    return found


class AdapterFamily:
    """One adapter method behind the item tower. Subclasses register with
    ``@register_adapter_family("NAME")`` and set, in ``__init__``:

    - ``out_dims``: the named vectors :meth:`encode` returns for the projector, and their widths;
    - ``modality_dims``: the width of each per-modality vector (for auxiliary losses such as CMSA);
    - ``placeholder_dims``: per modality, the width of a learned placeholder the tower keeps for items
      without that modality (empty: the family handles missing modalities itself).

    PerPEFT calls :meth:`add_groups` once, then :meth:`activate` per batch; the global adapter then
    stays frozen for the global path, every group's adapter trainable."""

    name = ""  # set by register_adapter_family
    peft_models: list = []  # peft handles (PeftModel) of the foundation's adapted encoders
    adapted: list[str] = []  # the modalities whose encoder runs per batch with an adapter inside

    def __init__(self, config, tower, store):
        self.tower = tower
        self.foundation = tower.foundation
        self.out_dims: dict[str, int] = {}
        self.modality_dims: dict[str, int] = {}
        self.placeholder_dims: dict[str, int] = {}
        self.n_groups = 0
        self.active_group: int | None = None
        self._adapter_keys: set[str] | None = None

    @classmethod
    def settings(cls, config) -> dict:
        """This family's config keys for the run: its YAML's defaults under the user's values."""
        return family_settings(cls.name, config)

    def modules(self) -> dict[str, nn.Module]:
        """Modules the family keeps outside the foundation, registered on the tower under these names
        (asked again after :meth:`add_groups`)."""
        return {}

    def encode(self, items: torch.Tensor) -> tuple[dict, dict]:
        """[U] item ids -> (the named vectors for the projector (``out_dims``), one vector per modality),
        through the active group's adapter (the global one when ``activate(None)``)."""
        raise NotImplementedError

    def adapter_module(self) -> nn.Module:
        """What holds the trainable adapter (its trainable parameters are the adapter's)."""
        return self.foundation

    def is_adapter_key(self, key: str) -> bool:
        """Whether a foundation parameter/buffer name (relative to the foundation, or with a prefix such as
        ``item_tower.foundation.``) is an adapter's, trainable or not, rather than a frozen weight."""
        if self._adapter_keys is None:
            self._adapter_keys = tuner_state_keys(self.foundation)
        while key not in self._adapter_keys:
            if "." not in key:
                return False
            key = key.split(".", 1)[1]  # drop one leading component of a prefixed key
        return True

    def forget_adapter_keys(self) -> None:
        """Call after adding adapters to the foundation (:meth:`is_adapter_key` caches their names)."""
        self._adapter_keys = None

    # --- per-group adapters (PerPEFT) ------------------------------------------------------------------

    def add_groups(self, n_groups: int) -> None:
        """One adapter per group, each a copy of the global one (which then stays frozen)."""
        raise ValueError(f"peft_type {self.name}: this adapter family has nothing to personalise per group.")

    def copy_global_to_groups(self) -> None:
        """Every group's adapter := the global one (e.g. after loading a stage-1 state)."""
        raise NotImplementedError

    def group_parameters(self, group: int) -> list[nn.Parameter]:
        raise NotImplementedError

    def activate(self, group: int | None) -> None:
        """Route the next encodes through ``group``'s adapter (None: the global one). Every group's adapter
        stays trainable (one optimizer for all: an inactive adapter gets no gradient), the global frozen."""
        if group is not None and not 0 <= group < self.n_groups:
            raise ValueError(f"group {group} out of range: this adapter has {self.n_groups} groups.")
        self.active_group = group

    # --- LargeGlobalPEFT -------------------------------------------------------------------------------

    @classmethod
    def scaled(cls, config, factor: int) -> tuple[dict, dict]:
        """Config updates that make this adapter ``factor`` times larger, and what was scaled
        ({key: (base, scaled)}). Default: nothing to scale (the projector alone is)."""
        peft_type = str(config["peft_type"]).upper()
        getLogger().warning(f"LargeGlobalPEFT: peft_type {peft_type} has no rank r; only the projector is scaled.")
        return {}, {}

    def base_parameter_count(self, base_config, factor: int) -> int:
        """The trainable adapter parameters at the size ``base_config`` gives (before :meth:`scaled`):
        for LargeGlobalPEFT's PerPEFT-equivalent estimate. Default: as built (nothing was scaled)."""
        return sum(p.numel() for p in self.adapter_module().parameters() if p.requires_grad)


class ModuleFamily(AdapterFamily):
    """A family whose adapter is one module beside the foundation (``network``): per group a deep copy,
    registered on the tower as ``side`` and ``group_sides`` (hence ``ItemTower.side``)."""

    def __init__(self, config, tower, store, network: nn.Module):
        super().__init__(config, tower, store)
        self.network = network
        self.group_networks: nn.ModuleList | None = None

    @property
    def active_network(self) -> nn.Module:
        return self.network if self.active_group is None else self.group_networks[self.active_group]

    def modules(self) -> dict[str, nn.Module]:
        found = {"side": self.network}
        if self.group_networks is not None:
            found["group_sides"] = self.group_networks
        return found

    def adapter_module(self) -> nn.Module:
        return self.network

    def add_groups(self, n_groups: int) -> None:
        self.group_networks = nn.ModuleList(copy.deepcopy(self.network) for _ in range(n_groups))
        self.network.requires_grad_(False)
        self.n_groups = n_groups

    @torch.no_grad()
    def copy_global_to_groups(self) -> None:
        for network in self.group_networks or []:
            network.load_state_dict(self.network.state_dict())

    def group_parameters(self, group: int) -> list[nn.Parameter]:
        return list(self.group_networks[group].parameters())
