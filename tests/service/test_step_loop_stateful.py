"""A stateful differential test of the engine's step loop (Hypothesis RuleBasedStateMachine).

Random requests arrive on random adapters (LoRA, IA3 and BitFit, context-specific and
agnostic, two tenants and public ones, one or two adapters per request), join between steps,
leave at EOS or their limit, are cancelled, pass their deadline; some adapters are poisoned:
a BitFit bias of 3e38 whose activations overflow to infinity and NaN (the set of the issue-20
report), a weights file that fails to load, an exception raised in the prefill or in the
decode step of one adapter's rows, and an image whose encoding raises. The loop is driven one
iteration at a time from the test (no worker thread), so every interleaving Hypothesis finds
can be replayed.

The oracle shares no code with what is under test beyond the context layers: each row is
recomputed alone, without the KV cache, the bank, the decode state or the scheduler, as a
full forward of [BOS] + image + the tokens so far for every token, with the adapter set itself
as the weight source. Float32 sums in another order can flip an argmax whose two best logits
are nearly tied, so a row is compared token for token up to the first step where the oracle's
margin is under MARGIN (the rows' tokens after that are not judged; Hypothesis reports how
often that happens through `event`).

After every step:
  - each running row's tokens so far are the prefix of its solo run;
  - every row's future was resolved at most once (answered exactly once, checked at the end),
    and no tenant's in-flight count is below the rows it still has queued or running;
and after a drain to idle: every request has its one expected outcome (the captions of
healthy rows, AdapterNonFinite or AdapterQuarantined for the overflowing set, AdapterLoadError
for the unreadable one, EngineFault for the injected exceptions, Cancelled or
DeadlineExceeded where the test did that), and slot pins, CPU-tier wants, tenant counts,
queue lengths and KV rows are all back to zero.

Budget: `STATEFUL_EXAMPLES` (default 12) examples of up to `STATEFUL_STEPS` (default 40)
rules each in `make test` (seeded: derandomize); a longer run is
`CTXPEFT_STATEFUL_EXAMPLES=400 CTXPEFT_STATEFUL_STEPS=80 pytest tests/service/test_step_loop_stateful.py`
(docs/ARCHITECTURE.md records the last one).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from adapters.adapter_set import AdapterSet
from adapters.config import AGNOSTIC, TEXT, AdapterConfig
from adapters.format import WEIGHTS_FILE
from adapters.layers import ContextLinear
from adapters.model import ContextPEFTModel
from adapters.routing import Routing, current_routing
from service.engine import CaptionRequest, CaptionResult, Engine, EngineConfig
from service.engine import rows as rows_module
from service.engine.answers import results_task
from service.exceptions import (
    AdapterLoadError,
    AdapterNonFinite,
    AdapterQuarantined,
    Cancelled,
    DeadlineExceeded,
    EngineError,
    EngineFault,
    TenantLimit,
)
from service.registry import AdapterVersion
from service.store import AdapterStore
from service.tenancy import PUBLIC_TENANT
from tests.service.adapter_fixtures import adapter_config, noise_image, put, tiny_backbone

EXAMPLES = int(os.environ.get("CTXPEFT_STATEFUL_EXAMPLES", "12"))
STEPS = int(os.environ.get("CTXPEFT_STATEFUL_STEPS", "40"))
MAX_NEW = 6
MARGIN = 1e-3  # logits closer than this at a step: the oracle does not judge what follows
QUARANTINE_AFTER = 2
TENANT_LIMIT = 6
POISON_IMAGE = 99  # its encoding raises
IMAGES = (1, 2, 3, 4, POISON_IMAGE)
TENANTS = ("acme", "beta")


@dataclass(frozen=True)
class Spec:
    """One adapter of the store: who owns it, what it is, and how it is poisoned."""

    tenant: str
    name: str
    method: str
    agnostic: bool
    seed: int
    poison: str | None = None  # overflow | unreadable | prefill | decode


SPECS = (
    Spec("acme", "lora2", "lora", False, 1),
    Spec("acme", "lora4a", "lora", True, 2),
    Spec("acme", "ia3", "ia3", False, 3),
    Spec("beta", "ia3a", "ia3", True, 4),
    Spec("beta", "bitfit", "bitfit", False, 5),
    Spec(PUBLIC_TENANT, "bitfita", "bitfit", True, 6),
    Spec(PUBLIC_TENANT, "lora8", "lora", False, 7),
    Spec("beta", "overflow", "bitfit", False, 8, poison="overflow"),
    Spec("acme", "unreadable", "lora", False, 9, poison="unreadable"),
    Spec("beta", "prefillbomb", "ia3", False, 10, poison="prefill"),
    Spec("acme", "decodebomb", "lora", True, 11, poison="decode"),
)


def build(spec: Spec) -> AdapterSet:
    backbone = tiny_backbone()
    rank = 4 if spec.method == "lora" else 0  # BitFit and IA3 carry no rank
    config: AdapterConfig = adapter_config(backbone, rank, spec.method)
    if spec.agnostic:
        config = dataclasses.replace(config, contexts=AGNOSTIC)
    adapter = AdapterSet.initialise(config, backbone.dims, spec.seed)
    generator = torch.Generator().manual_seed(10_000 + spec.seed)
    with torch.no_grad():
        for name, param in adapter.params.items():
            if name.endswith(("lora_B", "bias", "ia3")) and name.startswith("lm"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
        if spec.poison == "overflow":  # finite, accepted by validation; inf/NaN at run time
            # Two 3e38s in one residual sum are infinite; the next layer's norm makes NaN,
            # which its keys and values (the KV cache) then hold.
            for layer in (0, 1):
                for module in ("o_proj", "down_proj"):
                    adapter.params[f"lm__layers__{layer}__{module}__bias"].fill_(3e38)
    adapter.eval()
    return adapter


# --- the oracle: each row alone, without the KV cache -----------------------------------------
@dataclass(frozen=True)
class Solo:
    tokens: tuple[int, ...]  # greedy tokens until EOS or MAX_NEW (EOS excluded)
    certain: int  # how many leading tokens the oracle vouches for (margins above MARGIN)
    non_finite: bool  # the logits were not finite before the row ended


_SOLO: dict[tuple[str, int], Solo] = {}


def solo(spec: Spec, image: int) -> Solo:
    key = (spec.name, image)
    if key not in _SOLO:
        _SOLO[key] = _recompute(spec, image)
    return _SOLO[key]


@torch.no_grad()
def _recompute(spec: Spec, image: int) -> Solo:
    backbone = tiny_backbone()
    model = ContextPEFTModel(backbone)
    adapter = build(spec)
    eos = backbone.tokenizer.eos_token_id
    features = backbone.encode_images(backbone.preprocess([noise_image(image)]))
    zero = torch.zeros(1, dtype=torch.long)
    prefix, prefix_contexts = model.prefix(adapter.connect(features, zero))
    tokens: list[int] = []
    certain = MAX_NEW
    for step in range(MAX_NEW):
        ids = torch.tensor([tokens], dtype=torch.long)
        inputs = torch.cat([prefix, model.embed_tokens(ids).to(prefix.dtype)], dim=1)
        contexts = torch.cat([prefix_contexts, torch.full_like(ids, TEXT)], dim=1)
        logits = model.lm_forward(inputs, Routing(adapter, zero, contexts))[0, -1]
        if not torch.isfinite(logits).all():
            return Solo(tuple(tokens), min(certain, step), non_finite=True)
        best = logits.topk(2).values
        if float(best[0] - best[1]) < MARGIN:
            certain = min(certain, step)
        token = int(logits.argmax())
        if token == eos:
            return Solo(tuple(tokens), min(certain, len(tokens) + 1), non_finite=False)
        tokens.append(token)
    # The limit ended it: the end is as certain as the tokens.
    return Solo(tuple(tokens), certain + 1 if certain == MAX_NEW else certain, non_finite=False)


# --- the store, shared by every example ----------------------------------------------------------
@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stateful") / "adapters"
    store = AdapterStore(root)
    for spec in SPECS:
        ref = put(store, spec.tenant, spec.name, build(spec))
        if spec.poison == "unreadable":  # a truncated weights file: the load fails, final
            weights = store.path(ref) / WEIGHTS_FILE
            weights.write_bytes(weights.read_bytes()[:100])
    return root


# --- the model of what must happen -----------------------------------------------------------------
@dataclass
class Request:
    specs: tuple[Spec, ...]
    image: int
    task: asyncio.Task[list[CaptionResult]]
    futures: tuple[asyncio.Future[CaptionResult], ...]
    tenant: str
    cancelled: bool = False
    expired: bool = False
    done: list[Any] = field(default_factory=list)


class StepLoopMachine(RuleBasedStateMachine):
    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.aloop = asyncio.new_event_loop()
        self.engine = Engine(
            tiny_backbone(),
            AdapterStore(STORE_ROOT[0]),
            EngineConfig(
                max_batch_size=5,
                max_prefill_rows=3,
                prefill_min_rows=2,
                prefill_max_wait_steps=1,
                device_slots=4,
                default_max_new_tokens=MAX_NEW,
                max_new_tokens_limit=MAX_NEW,
                tenant_max_inflight=TENANT_LIMIT,
                quarantine_after=QUARANTINE_AFTER,
                # Off: the probe would refuse the overflowing set at its first load, and the
                # point here is what the step loop does when such a set reaches it.
                adapter_probe=False,
                request_timeout_s=3600,
                overlap=OVERLAP[0],
            ),
            start=False,
        )
        self.all: list[Request] = []
        self.non_finite_rows: Counter[str] = Counter()
        self.steps = 0
        RESOLVED.clear()
        _install_faults(self.engine)

    # --- helpers ------------------------------------------------------------------------
    def run(self, coro: Any) -> Any:
        return self.aloop.run_until_complete(coro)

    def settle(self) -> None:
        for _ in range(6):
            self.run(asyncio.sleep(0))

    def open_requests(self) -> list[Request]:
        return [r for r in self.all if not r.task.done()]

    def wait_loaded(self, version: AdapterVersion) -> None:
        """The queued row's adapter load (on the loader thread) has ended, either way: the
        rules then do not depend on how fast that thread is."""
        cache = self.engine.cache
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if cache.is_ready(version) or cache.failure(version) is not None:
                return
            time.sleep(0.002)
        raise AssertionError(f"{version.ref.label} neither loaded nor failed in 30 s")

    # --- rules ----------------------------------------------------------------------------
    @rule(
        target=requests,
        specs=st.lists(st.sampled_from(SPECS), min_size=1, max_size=2, unique=True),
        image=st.sampled_from(IMAGES),
        tenant=st.sampled_from(TENANTS),
    )
    def arrive(self, specs: list[Spec], image: int, tenant: str) -> Any:
        # A tenant asks for its own adapters and the public ones.
        specs = [s for s in specs if s.tenant in (tenant, PUBLIC_TENANT)]
        if not specs:
            return None
        names = tuple(s.name for s in specs)
        request = CaptionRequest(noise_image(image), names, tenant)
        before = self.engine.admission.inflight_of(tenant)
        try:
            submission = self.run(self.engine.submit(request))
        except TenantLimit:
            assert before + len(names) > TENANT_LIMIT
            return None
        except AdapterQuarantined:
            overflowing = [s for s in specs if s.poison == "overflow"]
            assert overflowing and self.non_finite_rows[overflowing[0].name] >= QUARANTINE_AFTER
            return None
        # Admitted: the tenant is within its limit with these rows counted. (`before` may be
        # stale: rows of a request cancelled just before are released while `submit` awaits,
        # when the event loop runs their cancellation.)
        now = self.engine.admission.inflight_of(tenant)
        assert len(names) <= now <= TENANT_LIMIT, (before, now)
        for spec in specs:  # a quarantined version is refused at admission
            if spec.poison == "overflow":
                assert self.non_finite_rows[spec.name] < QUARANTINE_AFTER
        for row in submission.rows:
            self.wait_loaded(row.key)
        task = self.run(_started(submission))  # as the HTTP handler and the replica do
        record = Request(
            tuple(specs), image, task, tuple(r.future for r in submission.rows), tenant
        )
        self.all.append(record)
        return record

    @precondition(lambda self: self.engine.admission.inflight > 0)
    @rule(times=st.integers(1, 4))
    def step(self, times: int) -> None:
        for _ in range(times):
            self.engine.loop.iterate()
            self.steps += 1
            self.settle()
            self.check_running_rows()
            self.collect()

    @rule(request=requests)
    def cancel(self, request: Request | None) -> None:
        if request is None or request.task.done():
            return
        request.cancelled = True
        request.task.cancel()
        self.settle()

    @rule(request=requests)
    def expire(self, request: Request | None) -> None:
        """Its deadline passes now (time moved by editing the rows, not by waiting)."""
        if request is None or request.task.done():
            return
        request.expired = True
        for row in self.engine.loop.batch.rows + self.queued_rows():
            if row.future in request.futures:
                row.deadline = 0.0

    def queued_rows(self) -> list[Any]:
        scheduler = self.engine.scheduler
        with scheduler._cond:
            return [q.row for q in scheduler._line]

    # --- checks -------------------------------------------------------------------------------
    def check_running_rows(self) -> None:
        """Every running row's tokens so far are the prefix of its solo run."""
        by_future = {
            future: (request, index)
            for request in self.all
            for index, future in enumerate(request.futures)
        }
        for row in self.engine.loop.batch.rows:
            request, index = by_future[row.future]
            expected = solo(request.specs[index], request.image)
            seen = tuple(row.token_ids)
            n = min(len(seen), expected.certain)
            assert seen[:n] == expected.tokens[:n], (request.specs[index].name, seen, expected)
            if expected.non_finite:  # nothing after its logits stopped being finite
                assert len(seen) <= len(expected.tokens)

    def collect(self) -> None:
        """Judge every request that ended since the last call."""
        for request in self.all:
            if request.task.done() and not request.done:
                request.done.append(self.judge(request))

    def judge(self, request: Request) -> str:
        names = [s.name for s in request.specs]
        if request.task.cancelled():
            assert request.cancelled, names
            return "cancelled"
        error = request.task.exception()
        if error is None:
            results = request.task.result()
            assert [r.adapter for r in results] == names
            for spec, result in zip(request.specs, results, strict=True):
                expected = solo(spec, request.image)
                assert request.image != POISON_IMAGE, spec
                # A decode bomb never decodes a row whose first token is already EOS.
                assert spec.poison is None or (spec.poison == "decode" and not expected.tokens)
                assert not expected.non_finite
                n = min(expected.certain, len(expected.tokens))
                assert result.token_ids[:n] == expected.tokens[:n], (spec.name, result)
                if expected.certain > len(expected.tokens):  # judged to the end
                    assert result.token_ids == expected.tokens, (spec.name, result)
                    reason = "length" if len(expected.tokens) == MAX_NEW else "stop"
                    assert result.finish_reason == reason
                else:
                    event("a row's oracle margin fell under MARGIN")
            return "ok"
        assert isinstance(error, EngineError), repr(error)
        allowed: set[type[EngineError]] = set()
        if request.cancelled:
            allowed.add(Cancelled)
        if request.expired:
            allowed.add(DeadlineExceeded)
        if request.image == POISON_IMAGE:
            allowed.add(EngineFault)
        for spec in request.specs:
            if spec.poison == "overflow":
                allowed |= {AdapterNonFinite, AdapterQuarantined}
            elif spec.poison == "unreadable":
                allowed.add(AdapterLoadError)
            elif spec.poison in ("prefill", "decode"):
                allowed.add(EngineFault)
        assert type(error) in allowed, (names, request.image, repr(error))
        if isinstance(error, AdapterNonFinite):
            overflowing = next(s for s in request.specs if s.poison == "overflow")
            assert overflowing.name in error.message and "non-finite" in error.message
        for spec, future in zip(request.specs, request.futures, strict=True):
            ended = spec.poison == "overflow" and future.done() and not future.cancelled()
            if ended and isinstance(future.exception(), AdapterNonFinite):
                self.non_finite_rows[spec.name] += 1
        return type(error).__name__

    @invariant()
    def answered_at_most_once(self) -> None:
        assert max(RESOLVED.values(), default=0) <= 1

    @invariant()
    def tenant_counts_cover_their_rows(self) -> None:
        """A count below the rows still queued or running was given back twice."""
        live: Counter[str] = Counter(row.tenant for row in self.engine.loop.batch.rows)
        live.update(row.tenant for row in self.queued_rows())
        for tenant, rows in live.items():
            assert self.engine.admission.inflight_of(tenant) >= rows, (tenant, rows)

    def teardown(self) -> None:
        try:
            self.drain_to_idle()
        finally:
            self.engine.close()
            self.aloop.run_until_complete(self.aloop.shutdown_default_executor())
            self.aloop.close()
            STATS["examples"] += 1
            STATS["steps"] += self.steps
            STATS["requests"] += len(self.all)

    def drain_to_idle(self) -> None:
        for _ in range(500):
            if not self.open_requests() and self.engine.admission.inflight == 0:
                break
            self.engine.loop.iterate()
            self.steps += 1
            self.settle()
            self.check_running_rows()
            self.collect()
        self.collect()
        assert not self.open_requests(), "requests still open after 500 idle steps"
        assert all(request.done for request in self.all)
        for request in self.all:  # every row answered exactly once
            for future in request.futures:
                assert future.done() and RESOLVED[id(future)] <= 1
        engine = self.engine
        cache = engine.cache
        assert engine.admission.inflight == 0 and engine.admission.waiting == 0
        assert engine.scheduler.queued == 0
        assert [cache.pins(s) for s in range(engine.bank.num_slots)] == [0] * 4
        assert cache.wanted() == 0
        assert engine.loop.batch.rows == [] and engine.loop.batch.state is None


async def _started(submission: Any) -> asyncio.Task[list[CaptionResult]]:
    """The request's results task on the test's event loop (not run yet)."""
    return results_task(submission)


# --- fault injection ------------------------------------------------------------------------------
RESOLVED: Counter[int] = Counter()  # deliveries per row future
STATS: Counter[str] = Counter()
STORE_ROOT: list[Path] = []
OVERLAP: list[str] = ["off"]  # the engine's overlap setting for this run


def _install_faults(engine: Engine) -> None:
    """The injected exceptions: any forward of the bank that holds a bomb adapter's slot
    (prefill: several columns; decode: one); encoding the poison image is the `faults`
    fixture's (on the shared tiny backbone, restored when the test ends)."""
    assert engine.backbone is tiny_backbone()
    BOMBS[id(engine.bank)] = engine


BOMBS: dict[int, Engine] = {}


def _bomb_slots(engine: Engine, phase: str) -> set[int]:
    slots = set()
    for spec in SPECS:
        if spec.poison == phase:
            try:
                version: AdapterVersion = engine.registry.resolve(spec.tenant, spec.name)
            except EngineError:
                continue
            slot = engine.cache.slot_of(version)
            if slot is not None:
                slots.add(slot)
    return slots


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    forward = ContextLinear.forward

    def faulty(self: ContextLinear, x: torch.Tensor) -> torch.Tensor:
        routing = current_routing()
        engine = BOMBS.get(id(routing.source)) if routing is not None else None
        if engine is not None and routing is not None:
            phase = "decode" if x.shape[1] == 1 else "prefill"
            if _bomb_slots(engine, phase) & set(routing.slots.tolist()):
                raise RuntimeError(f"injected {phase} fault")
        return forward(self, x)

    resolve = rows_module._resolve

    def counted(future: Any, outcome: Any) -> None:
        RESOLVED[id(future)] += 1
        resolve(future, outcome)

    backbone = tiny_backbone()  # shared (cached): patched here, so that the patch is undone
    poison = backbone.preprocess([noise_image(POISON_IMAGE)])[0]
    encode = backbone.encode_images

    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        if any(torch.equal(p, poison.to(p.dtype)) for p in pixels):
            raise RuntimeError("injected: the encoder fails on this image")
        return encode(pixels)

    monkeypatch.setattr(ContextLinear, "forward", faulty)
    monkeypatch.setattr(rows_module, "_resolve", counted)
    monkeypatch.setattr(backbone, "encode_images", encode_images)
    yield
    BOMBS.clear()


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_the_step_loop_against_solo_runs(store_root: Path, faults: None, overlap: str) -> None:
    """With overlap on, a decode step runs before the previous one's tokens are read: rows
    that ended are in one more step, whose tokens nobody reads (and whose faults are theirs
    to ignore); every check above holds all the same."""
    STORE_ROOT[:] = [store_root]
    OVERLAP[:] = [overlap]
    STATS.clear()
    run_state_machine_as_test(
        StepLoopMachine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    print(f"stateful step loop: {dict(STATS)}")
    assert STATS["examples"] >= min(EXAMPLES, 5)
    assert STATS["steps"] > 0
