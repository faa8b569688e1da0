"""One adapter set: a connector plus per-context LoRA / IA3 / BitFit tensors for the LM.

Tensor names (the on-disk layout of adapter.safetensors; C = number of contexts of the set):
    connector.weight [d_model, d_vis], connector.bias [d_model]            (linear)
    connector.fc1.{weight,bias}, connector.fc2.{weight,bias}              (mlp)
    lm.layers.{i}.{target}.lora_A [C, d_in, r]
    lm.layers.{i}.{target}.lora_B [C, r, d_out]
    lm.layers.{i}.{target}.bias   [C, d_out]                               (BitFit)
    lm.layers.{i}.{target}.ia3    [C, d]                                   (IA3)
`target` is a module name, or `gate_up_proj` for the fused gate+up LoRA (lora_B width
2 x intermediate: gate half first, then up).

An `AdapterSet` is an `nn.Module` (trainable) and a `WeightSource` with one slot, so training
runs through exactly the layers that serve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from adapters.backbone import LMDims
from adapters.config import (
    FUSED_GATE_UP,
    IA3_INPUT_SIDE,
    AdapterConfig,
    ConnectorSpec,
)
from adapters.weights import NUM_CONTEXTS, StackedWeights


def tensor_shapes(config: AdapterConfig, dims: LMDims) -> dict[str, tuple[int, ...]]:
    """Every tensor an adapter set of `config` has on a backbone of `dims`, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    conn = config.connector
    if conn.kind == "linear":
        shapes["connector.weight"] = (conn.out_features, conn.in_features)
        shapes["connector.bias"] = (conn.out_features,)
    else:
        shapes["connector.fc1.weight"] = (conn.hidden_features, conn.in_features)
        shapes["connector.fc1.bias"] = (conn.hidden_features,)
        shapes["connector.fc2.weight"] = (conn.out_features, conn.hidden_features)
        shapes["connector.fc2.bias"] = (conn.out_features,)
    c = len(config.contexts)
    for layer in range(config.num_layers):
        for target in config.targets:
            d_in, d_out = _target_dims(target, dims)
            prefix = f"lm.layers.{layer}.{target}"
            if config.method == "lora":
                shapes[f"{prefix}.lora_A"] = (c, d_in, config.rank)
                shapes[f"{prefix}.lora_B"] = (c, config.rank, d_out)
            elif config.method == "bitfit":
                shapes[f"{prefix}.bias"] = (c, d_out)
            else:
                shapes[f"{prefix}.ia3"] = (c, d_in if target in IA3_INPUT_SIDE else d_out)
    return shapes


def _target_dims(target: str, dims: LMDims) -> tuple[int, int]:
    if target == FUSED_GATE_UP:
        return dims.in_features["gate_proj"], dims.out_features["gate_proj"] + dims.out_features[
            "up_proj"
        ]
    return dims.in_features[target], dims.out_features[target]


def lm_parameter_count(config: AdapterConfig, dims: LMDims) -> int:
    """Trainable LM-adapter parameters (the connector excluded), as the paper's Table 3 counts."""
    return sum(math.prod(s) for n, s in tensor_shapes(config, dims).items() if n.startswith("lm."))


def _key(name: str) -> str:
    # nn.ParameterDict keys cannot contain dots.
    return name.replace(".", "__")


class AdapterSet(nn.Module):
    """The weights of one adapter set, trainable, usable as a one-slot `WeightSource`."""

    def __init__(
        self,
        config: AdapterConfig,
        dims: LMDims,
        tensors: dict[str, torch.Tensor] | None = None,
        *,
        copy: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self.dims = dims
        shapes = tensor_shapes(config, dims)
        self.params = nn.ParameterDict()
        for name, shape in shapes.items():
            value = tensors[name] if tensors is not None else _initial(name, shape, config)
            value = value.detach()
            self.params[_key(name)] = nn.Parameter(value.clone() if copy else value)
        self.dropout = nn.Dropout(config.connector_dropout)
        self._by_module = self._index_modules()

    @classmethod
    def adopt(
        cls, config: AdapterConfig, dims: LMDims, tensors: dict[str, torch.Tensor]
    ) -> AdapterSet:
        """A set that owns `tensors` without copying them: for tensors nothing else holds
        (freshly read from a file). Shapes are the caller's to check (`check_tensors`)."""
        return cls(config, dims, tensors, copy=False)

    @classmethod
    def initialise(cls, config: AdapterConfig, dims: LMDims, seed: int = 0) -> AdapterSet:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(config, dims)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Name -> tensor in the on-disk layout (detached)."""
        return {name.replace("__", "."): p.detach() for name, p in self.params.items()}

    def _param(self, name: str) -> nn.Parameter:
        return self.params[_key(name)]

    def _index_modules(self) -> dict[tuple[int, str], tuple[str, slice | None]]:
        """(layer, LM module) -> (target prefix, slice of lora_B/bias columns or None)."""
        index: dict[tuple[int, str], tuple[str, slice | None]] = {}
        inter = self.dims.out_features["gate_proj"]
        for layer in range(self.config.num_layers):
            for target in self.config.targets:
                prefix = f"lm.layers.{layer}.{target}"
                if target == FUSED_GATE_UP:
                    index[(layer, "gate_proj")] = (prefix, slice(0, inter))
                    index[(layer, "up_proj")] = (prefix, slice(inter, 2 * inter))
                else:
                    index[(layer, target)] = (prefix, None)
        return index

    # --- WeightSource -------------------------------------------------------------------
    def stacked(self, layer: int, module: str) -> StackedWeights | None:
        return self.module_weights(layer, module, scaled=True)

    def module_source(self, layer: int, module: str) -> tuple[str, slice | None] | None:
        """Where `module`'s weights live in `tensors()`: the target's name prefix and, for
        the fused gate/up target, this module's columns of lora_B; None if not targeted."""
        return self._by_module.get((layer, module))

    def module_weights(self, layer: int, module: str, scaled: bool) -> StackedWeights | None:
        """One module's weights as [1, NUM_CONTEXTS, ...]; LoRA B times the LoRA scaling if
        `scaled`, else as stored (the bank folds the scaling into its copy instead)."""
        entry = self._by_module.get((layer, module))
        if entry is None:
            return None
        prefix, cols = entry

        def full(t: torch.Tensor) -> torch.Tensor:
            # [C, ...] -> [1, NUM_CONTEXTS, ...]: an agnostic set shares one set across contexts.
            return t.expand(NUM_CONTEXTS, *t.shape[1:]).unsqueeze(0)

        method = self.config.method
        if method == "lora":
            b: torch.Tensor = self._param(f"{prefix}.lora_B")
            if cols is not None:
                b = b[..., cols]
            if scaled:
                b = b * self.config.scaling
            return StackedWeights(lora_A=full(self._param(f"{prefix}.lora_A")), lora_B=full(b))
        if method == "bitfit":
            return StackedWeights(bias=full(self._param(f"{prefix}.bias")))
        return StackedWeights(
            ia3=full(self._param(f"{prefix}.ia3")), ia3_on_input=module in IA3_INPUT_SIDE
        )

    def lora_rank(self, slots: torch.Tensor | Sequence[int]) -> int:
        return self.config.rank if self.config.method == "lora" else 0

    def context_specific(self, slots: torch.Tensor | Sequence[int]) -> bool:
        return not self.config.agnostic

    def connect(self, features: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Vision features [B, n, d_vis] -> LM embeddings [B, n, d_model] (dropout first)."""
        x = self.dropout(features)
        if self.config.connector.kind == "linear":
            return nn.functional.linear(
                x, self._param("connector.weight"), self._param("connector.bias")
            )
        h = nn.functional.linear(
            x, self._param("connector.fc1.weight"), self._param("connector.fc1.bias")
        )
        h = nn.functional.gelu(h)
        return nn.functional.linear(
            h, self._param("connector.fc2.weight"), self._param("connector.fc2.bias")
        )


def _initial(name: str, shape: tuple[int, ...], config: AdapterConfig) -> torch.Tensor:
    """The paper leaves init open; ours (recorded in AdapterConfig.init): LoRA A
    Kaiming-uniform, B zero (the set starts as the identity), IA3 one, BitFit zero, the
    connector as torch.nn.Linear initialises it."""
    if name.endswith(".lora_A"):
        a = torch.empty(shape)
        for c in range(shape[0]):
            # Kaiming-uniform over (r, d_in) as nn.Linear(d_in, r) would, stored transposed.
            w = torch.empty(shape[2], shape[1])
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            a[c] = w.t()
        return a
    if name.endswith((".lora_B", ".bias")) and name.startswith("lm."):
        return torch.zeros(shape)
    if name.endswith(".ia3"):
        return torch.ones(shape)
    if name.endswith("weight"):
        linear = nn.Linear(shape[1], shape[0])
        return linear.weight.detach().clone()
    fan_in = _connector_fan_in(name, config.connector)
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound)


def _connector_fan_in(name: str, conn: ConnectorSpec) -> int:
    if name == "connector.fc2.bias":
        return conn.hidden_features
    return conn.in_features
