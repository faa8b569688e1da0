"""Fault injection: an exception raised at one stage of the engine, under a mixed-tenant load,
fails only the requests it concerns. For every injection:
  - every admitted request gets exactly one answer (a result or one error; none hangs);
  - no row returns tokens other than its own adapter's (each result equals that adapter run
    alone on that image);
  - no slot pin, CPU-tier want or tenant in-flight count leaks;
  - the worker keeps serving (a fresh request afterwards gets its caption).
The stages that come before the engine's step loop (disk read, validation, CPU-tier insert,
slot copy) are covered with the adapter cache's own tests and by the last test here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.layers import ContextLinear
from adapters.routing import current_routing
from service.engine import CaptionRequest, CaptionResult, Engine, EngineConfig
from service.engine.rows import Row
from service.exceptions import DeadlineExceeded, EngineFault, EngineStopped
from service.registry import AdapterVersion
from service.store import AdapterStore
from tests.service.adapter_fixtures import noise_image, put, random_adapter, tiny_backbone
from tests.service.test_engine import references

TOKENS = 6
# (tenant, name, seed, method): two tenants; "bad" is the adapter the faults single out.
ADAPTERS = [
    ("acme", "a0", 0, "lora"),
    ("acme", "a1", 1, "ia3"),
    ("beta", "b0", 2, "bitfit"),
    ("beta", "bad", 3, "lora"),
]
POISON = 99  # the image the encoder fault singles out


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    store = AdapterStore(tmp_path / "store")
    for tenant, name, seed, method in ADAPTERS:
        put(store, tenant, name, random_adapter(tiny_backbone(), seed, method=method))
    return store


@pytest.fixture
def engine(store: AdapterStore) -> Iterator[Engine]:
    config = EngineConfig(
        default_max_new_tokens=TOKENS, max_batch_size=8, max_prefill_rows=4, device_slots=4
    )
    engine = Engine(tiny_backbone(), store, config)
    yield engine
    engine.close()


def reference(name: str, image: int) -> tuple[int, ...]:
    _, _, seed, method = next(a for a in ADAPTERS if a[1] == name)
    adapter = random_adapter(tiny_backbone(), seed, method=method)
    return references(adapter, [noise_image(image)], TOKENS)[0]


# The load: 16 requests over both tenants, single- and multi-adapter, some on the poison image.
LOAD: list[tuple[str, tuple[str, ...], int]] = [
    ("acme", ("a0",), 1),
    ("beta", ("bad",), 2),
    ("acme", ("a1",), 3),
    ("beta", ("b0",), 4),
    ("acme", ("a0", "a1"), 5),
    ("beta", ("b0", "bad"), 6),
    ("acme", ("a0",), POISON),
    ("beta", ("b0",), 7),
    ("acme", ("a1",), 8),
    ("beta", ("bad",), 9),
    ("acme", ("a0",), 10),
    ("beta", ("b0",), POISON),
    ("acme", ("a1", "a0"), 11),
    ("beta", ("b0",), 12),
    ("acme", ("a0",), 13),
    ("beta", ("bad", "b0"), 14),
]


def run_load(engine: Engine, timeout_s: float = 30.0) -> list[list[CaptionResult] | BaseException]:
    async def run() -> list[list[CaptionResult] | BaseException]:
        tasks = [
            engine.caption(CaptionRequest(noise_image(image), names, tenant, timeout_s=timeout_s))
            for tenant, names, image in LOAD
        ]
        # A safety net only: every request has its own deadline well inside it.
        return await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), timeout_s + 30
        )

    return asyncio.run(run())


def check_contained(
    engine: Engine,
    outcomes: list[list[CaptionResult] | BaseException],
    fails: Callable[[tuple[str, ...], int], bool],
    error: type[BaseException],
) -> None:
    """Requests singled out by `fails(names, image)` got `error`; every other request got
    exactly its adapters' own tokens; nothing leaked; the engine still serves."""
    assert len(outcomes) == len(LOAD)  # one answer each (gather would hang otherwise)
    for (_, names, image), outcome in zip(LOAD, outcomes, strict=True):
        if fails(names, image):
            assert isinstance(outcome, error), (names, image, outcome)
        else:
            assert isinstance(outcome, list), (names, image, outcome)
            assert [r.adapter for r in outcome] == list(names)
            assert [r.token_ids for r in outcome] == [reference(n, image) for n in names]
    assert_no_leaks(engine)
    result = asyncio.run(engine.caption(CaptionRequest(noise_image(20), ("a0",), "acme")))
    assert result[0].token_ids == reference("a0", 20)
    assert engine.ready and engine.alive


def assert_no_leaks(engine: Engine) -> None:
    # A row cancelled by a failed sibling leaves at the worker's next step: wait on the
    # admission's own condition (a safety net bounds it; it is not what is checked).
    assert engine.admission.wait_idle(60.0), "rows still in flight"
    cache = engine.cache
    assert engine.admission.inflight == 0 and engine.admission.waiting == 0
    assert [cache.pins(s) for s in range(engine.bank.num_slots)] == [0] * engine.bank.num_slots
    assert cache.wanted() == 0
    assert engine.stats().running == 0


def bad_slot(engine: Engine) -> int | None:
    version = engine.registry.resolve("beta", "bad")
    return engine.cache.slot_of(version)


def involves_bad(names: tuple[str, ...], image: int) -> bool:
    return "bad" in names


# --- the injections ------------------------------------------------------------------------------
def test_encoder_fault_fails_only_the_rows_of_that_image(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison = engine.backbone.preprocess([noise_image(POISON)])[0]
    encode = engine.backbone.encode_images

    def faulty(pixels: torch.Tensor) -> torch.Tensor:
        if any(torch.equal(p, poison.to(p.dtype)) for p in pixels):
            raise RuntimeError("injected encoder fault")
        return encode(pixels)

    monkeypatch.setattr(engine.backbone, "encode_images", faulty)
    outcomes = run_load(engine)
    check_contained(engine, outcomes, lambda names, image: image == POISON, EngineFault)
    assert engine.stats().faults["encode"] >= 1


def test_connector_fault_fails_only_that_adapters_rows(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect = engine.bank.connect

    def faulty(features: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        if bad_slot(engine) in slots.tolist():
            raise RuntimeError("injected connector fault")
        return connect(features, slots)

    monkeypatch.setattr(engine.bank, "connect", faulty)
    outcomes = run_load(engine)
    check_contained(engine, outcomes, involves_bad, EngineFault)
    assert engine.stats().faults["prefill"] >= 1


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_forward_fault_fails_only_that_adapters_rows(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    forward = ContextLinear.forward

    def faulty(self: ContextLinear, x: torch.Tensor) -> torch.Tensor:
        routing = current_routing()
        if (
            routing is not None
            and routing.source is engine.bank  # not the references computed by the test
            and (phase == "decode") == (x.shape[1] == 1)
            and bad_slot(engine) in routing.slots.tolist()
        ):
            raise RuntimeError(f"injected {phase} fault")
        return forward(self, x)

    monkeypatch.setattr(ContextLinear, "forward", faulty)
    outcomes = run_load(engine)
    check_contained(engine, outcomes, involves_bad, EngineFault)
    assert engine.stats().faults[phase] >= 1


def test_delivery_fault_ends_that_request_at_its_deadline_and_leaks_nothing(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    deliver = Row.deliver

    def faulty(self: Row, outcome: Any) -> None:
        if self.name == "bad" and isinstance(outcome, CaptionResult):
            raise RuntimeError("injected delivery fault")
        deliver(self, outcome)

    monkeypatch.setattr(Row, "deliver", faulty)
    outcomes = run_load(engine, timeout_s=5.0)
    check_contained(engine, outcomes, involves_bad, DeadlineExceeded)
    assert engine.stats().faults["deliver"] >= 1


def test_a_failing_queue_scan_is_contained_and_the_loop_goes_on(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete racing a directory scan once made the old worker thread die."""
    scans = 0
    failing = engine.cache.failing

    def flaky() -> set[Any]:
        nonlocal scans
        scans += 1
        if scans % 3 == 0:
            raise FileNotFoundError("injected: a folder vanished during a scan")
        return failing()

    monkeypatch.setattr(engine.cache, "failing", flaky)
    outcomes = run_load(engine)
    check_contained(engine, outcomes, lambda names, image: False, EngineFault)
    assert engine.stats().faults["loop"] >= 1


def test_a_stopped_worker_turns_readiness_off_and_fails_queued_rows_at_once(
    store: AdapterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the loop cannot contain ends the thread: then nobody waits for a deadline."""
    engine = Engine(
        tiny_backbone(), store, EngineConfig(default_max_new_tokens=TOKENS), start=False
    )
    try:

        def crash() -> None:
            raise SystemExit("injected: the worker thread ends")

        monkeypatch.setattr(engine.loop, "iterate", crash)

        async def run() -> tuple[BaseException, BaseException]:
            # submit() returns once the row is queued (admitted, image prepared).
            queued = await engine.submit(
                CaptionRequest(noise_image(1), ("a0",), "acme", timeout_s=600)
            )
            engine.start()
            first = await asyncio.gather(queued.results(), return_exceptions=True)
            with pytest.raises(EngineStopped) as later:
                await engine.caption(CaptionRequest(noise_image(2), ("a0",), "acme"))
            return first[0], later.value

        queued, later = asyncio.run(run())
        # EngineStopped, not DeadlineExceeded: it ended with the thread, not at its deadline.
        assert isinstance(queued, EngineStopped)
        assert "SystemExit" in str(later)
        assert not engine.alive and not engine.ready
        assert engine.admission.inflight == 0
    finally:
        engine.close()


def test_an_adapter_whose_slot_copy_fails_fails_alone(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    load = engine.bank.load
    bad: AdapterVersion = engine.registry.resolve("beta", "bad")

    def faulty(slot: int, adapter: Any) -> None:
        if adapter.config.rank == 4 and torch.equal(
            adapter.tensors()["connector.bias"],
            random_adapter(tiny_backbone(), 3).tensors()["connector.bias"],
        ):
            raise RuntimeError(f"injected slot copy fault for {bad.ref.label}")
        load(slot, adapter)

    monkeypatch.setattr(engine.bank, "load", faulty)
    outcomes = run_load(engine)
    check_contained(engine, outcomes, involves_bad, Exception)
