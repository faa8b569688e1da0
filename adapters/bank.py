"""The adapter bank: resident adapter sets stacked per module, so one forward pass serves a
batch that mixes adapter sets of different methods and ranks.

Per (layer, module) the bank keeps tensors of shape [slots, contexts, ...]; LoRA is padded to
`max_rank` with zeros and has its scaling folded into B; a component a slot does not use holds
its neutral value (zero LoRA, zero bias, unit IA3), so it changes nothing. A component is
allocated the first time any slot uses it on that module, so a bank that only ever holds LoRA
sets pays nothing for IA3 or BitFit. Connectors are stacked the same way.

Which set goes into which slot, and when a slot may be reused, is the caller's business (the
service's registry); the bank only stores. It is not thread-safe by itself: one owner (the
engine's worker thread) writes slots between forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from adapters.adapter_set import AdapterSet
from adapters.backbone import LMDims
from adapters.config import IA3_INPUT_SIDE, LM_MODULES, ConnectorSpec
from adapters.weights import NUM_CONTEXTS, StackedWeights


class BankError(ValueError):
    """An adapter set does not fit this bank (the message names the setting to change)."""


@dataclass
class _ModuleStore:
    d_in: int
    d_out: int
    ia3_on_input: bool
    num_slots: int
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    ia3: torch.Tensor | None = None
    view: StackedWeights | None = field(default=None, repr=False)
    # What each slot holds beyond neutral values: (LoRA rank written, bias, IA3), so that a
    # load or clear resets only what the slot's previous set wrote.
    held: list[tuple[int, bool, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.held = [(0, False, False)] * self.num_slots


class AdapterBank:
    """`num_slots` resident adapter sets for one backbone, on one device."""

    def __init__(
        self,
        dims: LMDims,
        connector: ConnectorSpec,
        num_slots: int,
        max_rank: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_slots < 1:
            raise BankError("the bank needs at least one slot (device_slots >= 1)")
        self.dims = dims
        self.connector_spec = connector
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.device = torch.device(device)
        self.dtype = dtype
        self._stores: dict[tuple[int, str], _ModuleStore] = {
            (layer, name): _ModuleStore(
                dims.in_features[name], dims.out_features[name], name in IA3_INPUT_SIDE, num_slots
            )
            for layer in range(dims.num_layers)
            for name in LM_MODULES
        }
        self._connector = {
            name: torch.zeros((num_slots, *shape), device=self.device, dtype=dtype)
            for name, shape in _connector_shapes(connector).items()
        }
        self.occupied: list[bool] = [False] * num_slots
        self.ranks: list[int] = [0] * num_slots  # LoRA rank per slot (0: no LoRA)
        self.specific: list[bool] = [False] * num_slots  # slot holds context-specific weights

    # --- writing ---------------------------------------------------------------------
    def load(self, slot: int, adapter: AdapterSet) -> None:
        """Copy `adapter` into `slot`, replacing whatever was there.

        One pass: each tensor is copied straight into the slot (LoRA B multiplied by the
        set's scaling on the way), and only what the previous set wrote beyond that is reset
        to neutral values."""
        config = adapter.config
        if config.method == "lora" and config.rank > self.max_rank:
            raise BankError(
                f"adapter rank {config.rank} is greater than the bank's max_rank {self.max_rank}; "
                "raise max_rank (CTXPEFT_MAX_RANK) to serve it"
            )
        if config.connector != self.connector_spec:
            raise BankError(
                f"connector {config.connector} does not match the backbone's {self.connector_spec}"
            )
        if config.num_layers != self.dims.num_layers:
            raise BankError(
                f"adapter has {config.num_layers} layers, the backbone {self.dims.num_layers}"
            )
        self._check_slot(slot)
        method, scaling = config.method, config.scaling
        with torch.no_grad():
            tensors = adapter.tensors()
            for name, store in self._connector.items():
                store[slot].copy_(tensors[name])
            for (layer, name), module in self._stores.items():
                source = adapter.module_source(layer, name)
                if source is None:
                    self._write(slot, module)
                    continue
                prefix, cols = source
                if method == "lora":
                    b = tensors[f"{prefix}.lora_B"]
                    lora = (tensors[f"{prefix}.lora_A"], b if cols is None else b[..., cols])
                    self._write(slot, module, lora=lora, scaling=scaling)
                elif method == "bitfit":
                    self._write(slot, module, bias=tensors[f"{prefix}.bias"])
                else:
                    self._write(slot, module, ia3=tensors[f"{prefix}.ia3"])
        self.occupied[slot] = True
        self.ranks[slot] = config.rank if config.method == "lora" else 0
        self.specific[slot] = not config.agnostic

    def clear(self, slot: int) -> None:
        """Reset `slot` to neutral values."""
        self._check_slot(slot)
        with torch.no_grad():
            for store in self._stores.values():
                self._write(slot, store)
            for t in self._connector.values():
                t[slot].zero_()
        self.occupied[slot] = False
        self.ranks[slot] = 0
        self.specific[slot] = False

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise BankError(f"slot {slot} out of range 0..{self.num_slots - 1}")

    def _write(
        self,
        slot: int,
        store: _ModuleStore,
        lora: tuple[torch.Tensor, torch.Tensor] | None = None,
        bias: torch.Tensor | None = None,
        ia3: torch.Tensor | None = None,
        scaling: float = 1.0,
    ) -> None:
        """Write one module's tensors ([C, ...] as stored in the set; an agnostic set's one
        context is broadcast to both) into `slot`, LoRA B times `scaling`, and neutral values
        where the previous set wrote something this one does not."""
        old_rank, old_bias, old_ia3 = store.held[slot]
        rank = 0
        if lora is not None:
            if store.lora_A is None:
                store.lora_A = self._zeros(store.d_in, self.max_rank)
                store.lora_B = self._zeros(self.max_rank, store.d_out)
                store.view = None
            assert store.lora_B is not None
            lora_a, lora_b = lora
            rank = lora_a.shape[-1]
            store.lora_A[slot, :, :, :rank].copy_(lora_a)
            dst = store.lora_B[slot, :, :rank, :]
            torch.mul(lora_b.expand_as(dst), scaling, out=dst)
        if old_rank > rank:
            assert store.lora_A is not None and store.lora_B is not None
            store.lora_A[slot, :, :, rank:old_rank].zero_()
            store.lora_B[slot, :, rank:old_rank, :].zero_()
        if bias is not None:
            if store.bias is None:
                store.bias = self._zeros(store.d_out)
                store.view = None
            store.bias[slot].copy_(bias)
        elif old_bias:
            assert store.bias is not None
            store.bias[slot].zero_()
        if ia3 is not None:
            if store.ia3 is None:
                width = store.d_in if store.ia3_on_input else store.d_out
                store.ia3 = self._zeros(width).fill_(1.0)
                store.view = None
            store.ia3[slot].copy_(ia3)
        elif old_ia3:
            assert store.ia3 is not None
            store.ia3[slot].fill_(1.0)
        store.held[slot] = (rank, bias is not None, ia3 is not None)

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(
            (self.num_slots, NUM_CONTEXTS, *shape), device=self.device, dtype=self.dtype
        )

    # --- WeightSource ----------------------------------------------------------------
    def stacked(self, layer: int, module: str) -> StackedWeights | None:
        store = self._stores.get((layer, module))
        if store is None or (store.lora_A is None and store.bias is None and store.ia3 is None):
            return None
        if store.view is None:
            store.view = StackedWeights(
                store.lora_A, store.lora_B, store.bias, store.ia3, store.ia3_on_input
            )
        return store.view

    def lora_rank(self, slots: torch.Tensor | Sequence[int]) -> int:
        return max((self.ranks[s] for s in _host_slots(slots)), default=0)

    def context_specific(self, slots: torch.Tensor | Sequence[int]) -> bool:
        return any(self.specific[s] for s in _host_slots(slots))

    def connect(self, features: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Each row's features through its own slot's connector: [B, n, d_vis] -> [B, n, d_model]."""
        features = features.to(device=self.device, dtype=self.dtype)
        c = {name: t.index_select(0, slots) for name, t in self._connector.items()}
        if self.connector_spec.kind == "linear":
            return torch.baddbmm(
                c["connector.bias"].unsqueeze(1), features, c["connector.weight"].transpose(1, 2)
            )
        h = torch.baddbmm(
            c["connector.fc1.bias"].unsqueeze(1),
            features,
            c["connector.fc1.weight"].transpose(1, 2),
        )
        h = nn.functional.gelu(h)
        return torch.baddbmm(
            c["connector.fc2.bias"].unsqueeze(1), h, c["connector.fc2.weight"].transpose(1, 2)
        )

    def nbytes(self) -> int:
        """Bytes the bank's tensors occupy (all slots)."""
        tensors = [
            t
            for s in self._stores.values()
            for t in (s.lora_A, s.lora_B, s.bias, s.ia3)
            if t is not None
        ]
        tensors += list(self._connector.values())
        return sum(t.numel() * t.element_size() for t in tensors)


def _host_slots(slots: torch.Tensor | Sequence[int]) -> set[int]:
    """Distinct slot ids; a tensor costs a device-to-host read, a host list nothing."""
    return set(slots.tolist() if isinstance(slots, torch.Tensor) else slots)


def _connector_shapes(spec: ConnectorSpec) -> dict[str, tuple[int, ...]]:
    if spec.kind == "linear":
        return {
            "connector.weight": (spec.out_features, spec.in_features),
            "connector.bias": (spec.out_features,),
        }
    return {
        "connector.fc1.weight": (spec.hidden_features, spec.in_features),
        "connector.fc1.bias": (spec.hidden_features,),
        "connector.fc2.weight": (spec.out_features, spec.hidden_features),
        "connector.fc2.bias": (spec.out_features,),
    }
