"""Tests for adapters.bank (AdapterBank): admission errors that name the setting to change,
neutral slots after clear(), reloading a slot, lazily allocated components, and one
connector per slot.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from adapters.adapter_set import AdapterSet
from adapters.bank import AdapterBank, BankError
from adapters.config import IMAGE, TEXT, ConnectorSpec
from adapters.model import ContextPEFTModel
from adapters.reference import GROUPINGS, Grouping
from adapters.routing import Routing
from tests.adapters.conftest import lm_forward


def _bank(
    model: ContextPEFTModel, slots: int = 3, max_rank: int = 8, **spec: object
) -> AdapterBank:
    backbone = model.backbone
    connector = ConnectorSpec(
        spec.get("kind", "linear"),  # type: ignore[arg-type]
        backbone.vision_dim,
        backbone.dims.hidden_size,
        int(spec.get("hidden", 0)),  # type: ignore[call-overload]
    )
    return AdapterBank(backbone.dims, connector, num_slots=slots, max_rank=max_rank)


def _run(
    model: ContextPEFTModel,
    source: AdapterBank | AdapterSet,
    slots: list[int],
    grouping: Grouping = "row",
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(len(slots), 7, model.backbone.dims.hidden_size, generator=gen)
    contexts = torch.tensor([[TEXT, IMAGE, IMAGE, IMAGE, TEXT, TEXT, TEXT]] * len(slots))
    with torch.no_grad():
        return lm_forward(model, grouping, x, Routing(source, torch.tensor(slots), contexts))


def test_rank_above_max_rank_is_rejected(
    model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]
) -> None:
    bank = _bank(model, max_rank=8)
    with pytest.raises(
        BankError,
        match=r"adapter rank 16 is greater than the bank's max_rank 8; raise max_rank \(CTXPEFT_MAX_RANK\)",
    ):
        bank.load(0, adapter_factory("lora", rank=16))
    assert bank.occupied == [False, False, False]
    bank.load(0, adapter_factory("lora", rank=8))  # exactly max_rank fits
    assert bank.occupied == [True, False, False]


def test_mismatched_sets_and_bad_slots_are_rejected(
    model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]
) -> None:
    bank = _bank(model, kind="mlp", hidden=24)
    with pytest.raises(BankError, match="does not match the backbone's"):
        bank.load(0, adapter_factory("bitfit"))
    with pytest.raises(BankError, match=r"slot 3 out of range 0\.\.2"):
        bank.clear(3)
    with pytest.raises(BankError, match=r"device_slots >= 1"):
        _bank(model, slots=0)


def test_empty_bank_is_the_base_model(model: ContextPEFTModel) -> None:
    bank = _bank(model)
    assert bank.stacked(0, "q_proj") is None
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 7, model.backbone.dims.hidden_size, generator=gen)
    with torch.no_grad():
        base = model.lm_forward(x, None)
    for grouping in GROUPINGS:
        assert torch.equal(_run(model, bank, [0, 1, 2], grouping), base)


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_clear_restores_neutral(
    model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet], grouping: Grouping
) -> None:
    bank = _bank(model)
    empty = _run(model, _bank(model), [0, 1, 2], grouping)
    bank.load(0, adapter_factory("lora", rank=8, seed=1))
    bank.load(1, adapter_factory("ia3", seed=2))
    bank.load(2, adapter_factory("bitfit", seed=3))
    loaded = _run(model, bank, [0, 1, 2], grouping)
    for row in range(3):
        assert float((loaded[row] - empty[row]).abs().max()) > 1e-3
    bank.clear(1)
    cleared = _run(model, bank, [0, 1, 2], grouping)
    assert bank.occupied == [True, False, True]
    assert float((cleared[1] - empty[1]).abs().max()) <= 1e-6
    assert torch.equal(cleared[0], loaded[0]) and torch.equal(cleared[2], loaded[2])
    weights = bank.stacked(0, "k_proj")
    assert weights is not None and weights.ia3 is not None
    assert torch.equal(weights.ia3[1], torch.ones_like(weights.ia3[1]))
    assert (
        bank.connect(torch.ones(1, 2, model.backbone.vision_dim), torch.tensor([1])).abs().max()
        == 0
    )


def test_reloading_a_slot_replaces_the_whole_set(
    model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]
) -> None:
    """A rank-2 set loaded over a rank-8 one leaves no trace of the columns it does not use;
    an IA3 set loaded over LoRA leaves no LoRA behind."""
    bank = _bank(model, slots=1)
    bank.load(0, adapter_factory("lora", rank=8, seed=1))
    small = adapter_factory("lora", rank=2, seed=2)
    bank.load(0, small)
    assert float((_run(model, bank, [0]) - _run(model, small, [0])).abs().max()) <= 1e-6
    ia3 = adapter_factory("ia3", seed=3)
    bank.load(0, ia3)
    assert float((_run(model, bank, [0]) - _run(model, ia3, [0])).abs().max()) <= 1e-6


def test_components_are_allocated_on_first_use(
    model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]
) -> None:
    bank = _bank(model, slots=4, max_rank=8)
    connector_bytes = bank.nbytes()
    assert connector_bytes == 4 * (32 * 16 + 32) * 4
    bank.load(0, adapter_factory("lora", rank=2, targets="attn"))
    weights = bank.stacked(1, "v_proj")
    assert weights is not None and weights.bias is None and weights.ia3 is None
    assert weights.lora_A is not None and weights.lora_A.shape == (4, 2, 32, 8)
    assert weights.lora_B is not None and weights.lora_B.shape == (4, 2, 8, 16)  # GQA: 2 x 8
    assert bank.stacked(1, "down_proj") is None
    # q, k, v, o of 2 layers: A [4, 2, 32, 8] + B [4, 2, 8, d_out], d_out = 32, 16, 16, 32.
    lora = sum(4 * 2 * (32 * 8 + 8 * d) for d in (32, 16, 16, 32)) * 2
    assert bank.nbytes() == connector_bytes + lora * 4
    bank.load(1, adapter_factory("ia3", targets="ffn"))
    down = bank.stacked(0, "down_proj")
    assert down is not None and down.ia3_on_input and down.ia3 is not None
    assert down.ia3.shape == (4, 2, 48)
    assert torch.equal(down.ia3[0], torch.ones(2, 48))  # the LoRA slot holds neutral IA3


@pytest.mark.parametrize(("kind", "hidden"), [("linear", 0), ("mlp", 24)])
def test_connector_per_slot(
    model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet], kind: str, hidden: int
) -> None:
    backbone = model.backbone
    bank = _bank(model, slots=3, kind=kind, hidden=hidden)
    sets = []
    for slot in range(3):
        adapter = adapter_factory("bitfit", seed=30 + slot)
        if kind == "mlp":
            config = adapter.config.__class__.from_dict(
                {
                    **adapter.config.to_dict(),
                    "connector": {
                        "kind": "mlp",
                        "in_features": backbone.vision_dim,
                        "out_features": backbone.dims.hidden_size,
                        "hidden_features": hidden,
                    },
                }
            )
            adapter = AdapterSet.initialise(config, backbone.dims, seed=30 + slot).eval()
        bank.load(slot, adapter)
        sets.append(adapter)
    features = torch.randn(5, 4, backbone.vision_dim, generator=torch.Generator().manual_seed(2))
    slots = torch.tensor([2, 0, 1, 1, 2])
    with torch.no_grad():
        mixed = bank.connect(features, slots)
        for row, slot in enumerate(slots.tolist()):
            alone = sets[slot].connect(features[row : row + 1])
            assert float((mixed[row : row + 1] - alone).abs().max()) <= 1e-6
    # One image through the three slots: three different embeddings.
    same = bank.connect(features[:1].expand(3, -1, -1), torch.tensor([0, 1, 2]))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert float((same[a] - same[b]).abs().max()) > 1e-3


def test_batches_multiply_only_the_ranks_they_use(
    model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]
) -> None:
    """A bank padded to max_rank 64 gives the outputs of a tight bank, and each batch's LoRA
    product is trimmed to the largest rank among its own slots."""
    sets = [
        adapter_factory("lora", rank=2, seed=1),
        adapter_factory("lora", rank=8, seed=2),
        adapter_factory("ia3", seed=3),
    ]
    wide, tight = _bank(model, max_rank=64), _bank(model, max_rank=8)
    for slot, adapter in enumerate(sets):
        wide.load(slot, adapter)
        tight.load(slot, adapter)
    assert wide.ranks == [2, 8, 0]
    contexts = torch.tensor([[TEXT, IMAGE, TEXT]] * 2)
    for slots, rank in (([0, 1], 8), ([0, 0], 2), ([2, 2], 0), ([2, 0], 2)):
        routing = Routing(wide, torch.tensor(slots), contexts[: len(slots)])
        assert routing.weights.rank() == rank
        gathered = routing.weights.rows(0, "q_proj")
        assert gathered is not None
        if rank:
            assert gathered.lora_A is not None and gathered.lora_A.shape == (2, 2, 32, rank)
        else:
            assert gathered.lora_A is None and gathered.lora_B is None
        for grouping in GROUPINGS:
            a, b = _run(model, wide, slots, grouping), _run(model, tight, slots, grouping)
            assert float((a - b).abs().max()) <= 1e-6
    wide.clear(1)
    assert wide.ranks == [2, 0, 0] and wide.lora_rank(torch.tensor([0, 1, 2])) == 2


def test_batches_of_agnostic_sets_skip_per_token_contexts(
    model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]
) -> None:
    """Agnostic sets hold one set of weights for every context, so a batch of them runs the
    one-context product even when its tokens mix image and text."""
    bank = _bank(model, slots=3)
    bank.load(0, adapter_factory("lora", rank=4, agnostic=True, seed=1))
    bank.load(1, adapter_factory("bitfit", agnostic=True, seed=2))
    bank.load(2, adapter_factory("lora", rank=4, seed=3))
    assert bank.specific == [False, False, True]
    contexts = torch.tensor([[TEXT, IMAGE, IMAGE, TEXT]] * 2)
    assert Routing(bank, torch.tensor([0, 1]), contexts).uniform_context() == 0
    assert Routing(bank, torch.tensor([0, 2]), contexts).uniform_context() is None
    assert Routing(bank, torch.tensor([0, 2]), contexts[:, :1]).uniform_context() == TEXT
    for slots in ([0, 1, 0], [1, 0, 2]):
        row, token = _run(model, bank, slots, "row"), _run(model, bank, slots, "token")
        assert float((row - token).abs().max()) <= 1e-5
    bank.clear(2)
    assert not bank.context_specific(torch.tensor([0, 1, 2]))


def _state(bank: AdapterBank) -> dict[str, torch.Tensor]:
    """Every tensor of the bank, by name (components not allocated are absent)."""
    state = {f"connector.{k}": t for k, t in bank._connector.items()}
    for (layer, name), store in bank._stores.items():
        for part in ("lora_A", "lora_B", "bias", "ia3"):
            t = getattr(store, part)
            if t is not None:
                state[f"{layer}.{name}.{part}"] = t
    return state


def test_any_sequence_of_loads_leaves_what_one_load_into_a_fresh_bank_leaves(
    model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]
) -> None:
    """A load resets only what the slot's previous set wrote: after any sequence of loads
    and clears, the bank holds exactly what loading the last sets into a fresh bank gives
    (bit for bit), and LoRA B is stored times the set's scaling."""
    sets = [
        adapter_factory("lora", rank=8, seed=1),
        adapter_factory("bitfit", seed=2),
        adapter_factory("lora", rank=3, alpha=12.0, agnostic=True, fuse_gate_up=False, seed=3),
        adapter_factory("ia3", seed=4),
        adapter_factory("lora", rank=2, targets="attn", seed=5),
    ]
    bank = _bank(model, slots=2, max_rank=8)
    history = [(0, 0), (1, 1), (0, 2), (0, 3), (1, 4), (1, None), (0, 4), (1, 0), (1, 2)]
    for step, (slot, index) in enumerate(history):
        if index is None:
            bank.clear(slot)
        else:
            bank.load(slot, sets[index])
        so_far = history[: step + 1]
        fresh = _bank(model, slots=2, max_rank=8)
        # Allocate the components the bank under test has allocated, then leave neutral.
        for i in sorted({i for _, i in so_far if i is not None}):
            fresh.load(0, sets[i])
        fresh.clear(0)
        for s, i in dict(so_far).items():
            if i is not None:
                fresh.load(s, sets[i])
        ours, theirs = _state(bank), _state(fresh)
        assert ours.keys() == theirs.keys()
        for name, tensor in ours.items():
            assert torch.equal(tensor, theirs[name]), (step, name)
        assert bank.ranks == fresh.ranks and bank.specific == fresh.specific
    # The last load into slot 1 is the agnostic rank-3 set, alpha 12: B is stored x 4,
    # in both context rows.
    stored = bank.stacked(1, "q_proj")
    assert stored is not None and stored.lora_B is not None
    b = sets[2].tensors()["lm.layers.1.q_proj.lora_B"][0]
    for context in (0, 1):
        assert torch.equal(stored.lora_B[1, context, :3], b * 4.0)
        assert float(stored.lora_B[1, context, 3:].abs().max()) == 0.0
