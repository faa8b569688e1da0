"""The serving engine: admission on the asyncio side, a step loop (continuous batching with
adapter mixing) on one worker thread that owns the model and the device.

    engine.py         Engine: builds the pieces, caption(), drain/close, stats (the front end)
    loop.py           StepLoop: the worker's iterations (join, prefill, decode, answer) and
                      fault containment
    rows.py           Row: one (request, adapter) pair from admission to its one answer
    counters.py       EngineCounters: the one counting system behind stats() and Prometheus
    encoder_cache.py  vision-encoder outputs by image content, scoped per tenant
    types.py          CaptionRequest, CaptionResult, Timings, EngineStats
The batching state of the running rows (KV cache, routing) is `adapters.decoding.DecodeState`;
queues and admission control are `service.scheduler`; the knobs are
`service.settings.EngineConfig`.
"""

from service.engine.engine import Engine, Submission
from service.engine.types import CaptionRequest, CaptionResult, EngineStats, FinishReason, Timings
from service.settings import EngineConfig

__all__ = [
    "CaptionRequest",
    "CaptionResult",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "FinishReason",
    "Submission",
    "Timings",
]
