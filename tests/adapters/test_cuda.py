"""On a CUDA device (skipped without one; `benchmarks/gpu_check.sh` runs them): the decode
state and the engine give the same tokens on the GPU as on the CPU in float32, rows joining
late match their run alone in bf16 and fp16, and a decode step synchronises with the host
only where the caller reads the tokens."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from adapters.adapter_set import AdapterSet
from adapters.decoding import DecodeState, generate
from adapters.model import ContextPEFTModel
from tests.adapters.test_decoding import LIMITS, ROWS, SLOTS, _bank, _drive, _features

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _on_cuda(model: ContextPEFTModel, dtype: torch.dtype) -> ContextPEFTModel:
    moved = copy.deepcopy(model)
    moved.backbone.lm.to(device="cuda", dtype=dtype)
    moved.backbone.vision.to(device="cuda", dtype=dtype)
    return moved


def test_float32_on_cuda_generates_the_cpu_tokens(
    model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]
) -> None:
    gpu = _on_cuda(model, torch.float32)
    bank_cpu = _bank(model, adapter_factory, torch.float32)
    bank_gpu = _bank(gpu, adapter_factory, torch.float32)
    features = _features(model, ROWS)
    with torch.no_grad():
        cpu = generate(model, features, bank_cpu, SLOTS, LIMITS)
        on_gpu = generate(gpu, features, bank_gpu, SLOTS, LIMITS)
    assert on_gpu == cpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rows_joining_late_match_their_run_alone(
    model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet], dtype: torch.dtype
) -> None:
    gpu = _on_cuda(model, dtype)
    bank = _bank(gpu, adapter_factory, dtype)
    features = _features(model, ROWS)
    with torch.no_grad():
        alone = [
            tuple(generate(gpu, features[i : i + 1], bank, SLOTS[i : i + 1], LIMITS[i])[0])
            for i in range(ROWS)
        ]
        joined, _ = _drive(gpu, bank, features, {0: [0, 1, 2, 3, 4], 3: [5, 6, 7, 8, 9]})
    assert [joined.get(i, ()) for i in range(ROWS)] == alone


def test_a_decode_step_does_not_synchronise_with_the_host(
    model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]
) -> None:
    gpu = _on_cuda(model, torch.float32)
    bank = _bank(gpu, adapter_factory, torch.float32)
    with torch.no_grad():
        state, _ = DecodeState.prefill(gpu, bank, _features(model, ROWS), SLOTS)
        state.step()  # the first step builds its routing (host facts read once)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
        try:
            for _ in range(3):
                state.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        state.next_ids.tolist()  # the caller's one read per step
