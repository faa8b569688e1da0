"""The engine's worker: a step loop over the running batch (iteration-level scheduling).

One iteration (`StepLoop.iterate`):
  1. running rows that ended elsewhere (cancelled, deadline passed) leave the batch;
  2. new rows are chosen oldest first within the budgets (room in the batch, at most
     `max_prefill_rows` per step, device slots) and bound to bank slots, pinned while they run;
  3. their images go through the vision encoder (cache first), the new rows are prefilled
     together and merged into the running batch;
  4. one decode step for every running row;
  5. one host synchronisation reads the new tokens: each row streams its tokens, and rows that
     reached EOS or their token limit are answered and leave, releasing their slot pin and
     their tenant's in-flight count at once.
With `scheduling="static"` step 2 runs only when the batch is empty: a batch runs to its end
before the next one starts (the measured baseline).

Fault containment. An exception is attributed to the rows that caused it, fails only those,
and the loop goes on: an encoder failure is retried image by image, a prefill or decode failure
adapter by adapter (then row by row), and the rows of the culprits fail with EngineFault (503)
while the others carry on; only when a retry on the rest fails again are all rows of that
stage failed. A decode step that raises leaves the KV cache as it was (DecodeState.step is all
or nothing). An exception anywhere else in an iteration fails that iteration's running rows and
the loop continues. If the thread stops anyway, `on_stop` tells the engine, which turns
readiness and liveness off and fails everything queued at once. A fault's message to the
client names the stage and an incident id, never the exception itself (its text may carry
paths, shapes or memory figures): the log line with that id has the traceback.

Numeric containment. A row whose logits are not finite comes back as NON_FINITE from the
step's one host read; that row alone ends with AdapterNonFinite (422) naming its adapter
version, and a version whose rows do so `quarantine_after` times in a row (no finished
caption in between) is quarantined by the registry: refused until a new version replaces it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import torch

from adapters.bank import AdapterBank
from adapters.decoding import NON_FINITE, DecodeState
from adapters.model import ContextPEFTModel
from service.engine.counters import EngineCounters
from service.engine.encoder_cache import EncoderCache
from service.engine.rows import PreparedImage, Row
from service.engine.types import CaptionResult, Timings
from service.exceptions import (
    AdapterLoadError,
    AdapterNonFinite,
    AdapterNotFound,
    DeadlineExceeded,
    EngineError,
    EngineFault,
)
from service.registry import AdapterRegistry, AdapterVersion, VersionGone
from service.scheduler import Scheduler, SlotBudget
from service.settings import EngineConfig

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.05  # how long an idle worker waits for rows before checking for shutdown


class StepLoop:
    """Owns the running batch; runs on the engine's worker thread only."""

    def __init__(
        self,
        model: ContextPEFTModel,
        bank: AdapterBank,
        registry: AdapterRegistry,
        scheduler: Scheduler[Row],
        encoder_cache: EncoderCache,
        counters: EngineCounters,
        config: EngineConfig,
    ) -> None:
        self.model = model
        self.bank = bank
        self.registry = registry
        self.scheduler = scheduler
        self.encoder_cache = encoder_cache
        self.counters = counters
        self.config = config
        self.eos = model.backbone.tokenizer.eos_token_id
        self.rows: list[Row] = []  # the running rows, in the order of `state`'s rows
        self.state: DecodeState | None = None
        self.stopping = False
        self.steps = 0  # iterations run (the loop's clock for prefill_max_wait_steps)
        self._held_since: int | None = None  # step since which ready rows wait to join
        # Rows per version that ended non-finite since its last finished caption.
        self._non_finite: dict[AdapterVersion, int] = {}

    # --- the thread ------------------------------------------------------------------------
    def run(self, on_stop: Callable[[BaseException | None], None]) -> None:
        """The worker thread's body: iterate until `stopping`. An exception in an iteration
        fails that iteration's rows and the loop goes on; whatever ends the thread otherwise
        is reported to `on_stop` (None for a normal stop)."""
        torch.set_grad_enabled(False)
        self.counters.worker_up(True)
        reason: BaseException | None = None
        try:
            while not self.stopping:
                try:
                    self.iterate()
                except Exception as exc:
                    self._fail_running(self._fault("loop", exc, "the engine's step"))
        except BaseException as exc:  # nothing can be trusted any more: stop, say so loudly
            log.critical("the engine's worker stops", exc_info=True)
            reason = exc
        finally:
            self.counters.worker_up(False)
            on_stop(None if self.stopping else (reason or RuntimeError("worker stopped")))

    def iterate(self) -> None:
        """One step: leave, join, prefill, decode, answer."""
        self.steps += 1
        try:
            self._sweep_failed_loads()
        except Exception:  # e.g. a delete racing a directory scan; retried next step
            log.exception("sweeping failed adapter loads failed")
            self.counters.fault("loop")
        self._leave_ended()
        joined, first = self._join()
        tokens = self._decode() if self.rows else None
        # The one host synchronisation of the step: the new rows' first tokens and every
        # running row's next token, read together.
        parts = [t for t in (first, tokens) if t is not None]
        ids = torch.cat(parts).tolist() if parts else []
        split = 0 if first is None else first.shape[0]
        self._advance(joined, ids[:split], ids[split:])

    # --- 1. leaving ---------------------------------------------------------------------------
    def _leave_ended(self) -> None:
        """Rows answered elsewhere (cancelled, deadline seen by the caller) or whose deadline
        passed leave before any more compute is spent on them."""
        now = time.monotonic()
        keep = []
        for pos, row in enumerate(self.rows):
            if row.settled():
                self._end(row)
            elif now >= row.deadline:
                self._drop(row, "deadline", DeadlineExceeded("the request's deadline passed"))
            else:
                keep.append(pos)
        self._keep(keep)

    # --- 2. joining ---------------------------------------------------------------------------
    def _join(self) -> tuple[list[Row], torch.Tensor | None]:
        """Choose, bind, encode and prefill new rows; merge them into the running batch.
        Returns the rows that joined and their first tokens (on the device). An unexpected
        exception here fails the rows that were joining, never the running ones."""
        try:
            chosen = self._choose()
        except Exception:  # nothing was taken from the queues
            log.exception("choosing rows to join failed")
            self.counters.fault("loop")
            return [], None
        if not chosen:
            return [], None
        joining = [row for _, row in chosen]
        running = len(self.rows)  # joining rows are merged after the running ones
        requeued: set[int] = set()  # rows `_bind` put back in line: theirs to answer later
        try:
            return self._admit(chosen, requeued)
        except Exception as exc:
            error = self._fault("loop", exc, "joining the running batch")
            # Rows that did join this step leave too: every joining row fails, none is lost.
            self._keep(range(running))
            for row in joining:
                if id(row) in requeued:  # back in the queue: not this step's to answer
                    continue
                row.unwant(self.registry.cache)
                self._fail_row(row, error)
            return [], None

    def _admit(
        self, chosen: list[tuple[int, Row]], requeued: set[int]
    ) -> tuple[list[Row], torch.Tensor | None]:
        rows = self._bind(chosen, requeued)
        rows = self._encode(rows)
        if not rows:
            return [], None
        started = time.monotonic()
        groups = self._prefill(rows)
        if not groups:
            return [], None
        joined: list[Row] = []
        firsts: list[torch.Tensor] = []
        for group_rows, state, first in groups:
            if self.state is None:
                self.state = state
            else:
                self.state.merge(state)
            self.rows.extend(group_rows)
            joined.extend(group_rows)
            firsts.append(first)
        self.counters.joined(
            len(joined), len({r.key for r in joined}), [started - r.arrival for r in joined]
        )
        return joined, torch.cat(firsts)

    def _choose(self) -> list[tuple[int, Row]]:
        cfg = self.config
        static = cfg.scheduling == "static"
        if static and self.rows:
            return []
        room = cfg.max_batch_size - len(self.rows)
        if not static:
            room = min(room, cfg.max_prefill_rows)
        cache = self.registry.cache
        if self.rows and not static and not self._prefill_due(room):
            return []
        pinned, free = cache.placement()
        budget = SlotBudget(free, cfg.max_adapters_per_batch, pinned)
        timeout = 0.0 if self.rows else _IDLE_WAIT_S
        chosen = self.scheduler.next_rows(cache.is_ready, budget, room, timeout, fill=static)
        now = time.monotonic()
        for _, row in chosen:
            row.joined = now
        return chosen

    def _prefill_due(self, room: int) -> bool:
        """While rows run, ready rows join in groups: once `prefill_min_rows` of them (or as
        many as there is room for) are ready, or the first of them has waited
        `prefill_max_wait_steps` steps. A prefill costs a fixed part per call: fewer, larger
        ones keep the decode steps of the running rows cheaper."""
        cfg = self.config
        ready = self.scheduler.ready_rows(self.registry.cache.is_ready) if room > 0 else 0
        if ready == 0:
            self._held_since = None
            return False
        if self._held_since is None:
            self._held_since = self.steps
        waited = self.steps - self._held_since
        if ready >= min(cfg.prefill_min_rows, room) or waited >= cfg.prefill_max_wait_steps:
            self._held_since = None
            return True
        return False

    def _bind(self, chosen: list[tuple[int, Row]], requeued: set[int]) -> list[Row]:
        """Pin a bank slot for each row's adapter version. Rows answered meanwhile end here;
        a version that cannot be bound fails its rows only; rows whose CPU copy was evicted
        since the readiness check go back in line (their ids are added to `requeued`)."""
        cache = self.registry.cache
        live: list[tuple[int, Row]] = []
        for seq, row in chosen:
            if row.settled():
                row.unwant(cache)
                self._end_flight(row)
            else:
                live.append((seq, row))
        if not live:
            return []
        slots, failed, missing = cache.bind(row.key for _, row in live)
        back = [(seq, row) for seq, row in live if row.key in missing]
        self.scheduler.requeue(back)
        requeued.update(id(row) for _, row in back)
        bound = []
        for _, row in live:
            if row.key in failed:
                row.unwant(cache)
                self.counters.fault("bind")
                self.answer(row, failed[row.key])
            elif row.key in slots:
                row.unwant(cache)
                row.slot = slots[row.key]
                bound.append(row)
        return bound

    def _encode(self, rows: list[Row]) -> list[Row]:
        """Vision features for each row's image (an image shared by rows is encoded once, a
        cached one not at all). If the encoder raises, images are retried one by one and the
        rows of an image that fails alone fail."""
        images = {id(r.image): r.image for r in rows if r.image.features is None}
        started = time.monotonic()
        todo = list(images.values())
        if todo:
            try:
                self._encode_images(todo)
            except Exception:
                log.exception("vision encoder failed on %d images; retrying one by one", len(todo))
                self.counters.fault("encode")
                for image in todo:
                    try:
                        self._encode_images([image])
                    except Exception as exc:
                        image.error = incident(exc, "the vision encoder")
        if len(rows) > len(todo):
            self.encoder_cache.count_hits(len(rows) - len(todo))
        seconds = time.monotonic() - started
        kept = []
        for row in rows:
            if row.image.features is None:
                self._fail_row(row, EngineFault(row.image.error or "the vision encoder failed"))
            else:
                row.encode_s = seconds
                kept.append(row)
        return kept

    def _encode_images(self, images: list[PreparedImage]) -> None:
        found = self.encoder_cache.encode(
            [i.key for i in images], [i.pixels for i in images], self.model.backbone.encode_images
        )
        for image, feature in zip(images, found, strict=True):
            image.features = feature

    def _prefill(self, rows: list[Row]) -> list[tuple[list[Row], DecodeState, torch.Tensor]]:
        """Prefill the joining rows together; on failure adapter by adapter, then row by row,
        failing the rows that fail alone."""
        try:
            return [(rows, *self._prefill_rows(rows))]
        except Exception:
            log.exception("prefill of %d rows failed; retrying by adapter", len(rows))
            self.counters.fault("prefill")
        done: list[tuple[list[Row], DecodeState, torch.Tensor]] = []
        for group in _by_adapter(rows):
            units = [group] if len(group) == 1 else [group, *([row] for row in group)]
            for unit in units:
                try:
                    done.append((unit, *self._prefill_rows(unit)))
                except Exception as exc:
                    if len(unit) == 1:
                        self._fail_row(unit[0], EngineFault(incident(exc, "the prefill")))
                    continue  # the whole group failed: try its rows one by one
                if unit is group:
                    break
        return done

    def _prefill_rows(self, rows: list[Row]) -> tuple[DecodeState, torch.Tensor]:
        features = torch.stack([r.image.features for r in rows if r.image.features is not None])
        slots = [r.slot for r in rows if r.slot is not None]
        return DecodeState.prefill(self.model, self.bank, features, slots)

    # --- 4. the decode step -------------------------------------------------------------------
    def _decode(self) -> torch.Tensor | None:
        """One decode step of every running row; on failure, find the adapters whose rows fail
        alone, fail them, and step the rest (all rows fail if that fails too)."""
        assert self.state is not None
        self.counters.step(len(self.rows), len({r.key for r in self.rows}))
        try:
            return self.state.step()
        except Exception:
            log.exception("decode step of %d rows failed; isolating", len(self.rows))
            self.counters.fault("decode")
        culprits: list[int] = []
        for positions in _by_adapter_positions(self.rows):
            try:
                self.state.subset(positions).step()
            except Exception:
                culprits.extend(positions)
        if culprits and len(culprits) < len(self.rows):
            for pos in culprits:
                self._fail_row(self.rows[pos], EngineFault("decoding failed for this adapter"))
            self._keep([p for p in range(len(self.rows)) if p not in set(culprits)])
            try:
                return self.state.step()
            except Exception:
                log.exception("decode step failed again without the culprits")
        self._fail_running(EngineFault("a decode step failed and could not be attributed"))
        return None

    # --- 5. tokens and answers ------------------------------------------------------------------
    def _advance(self, joined: list[Row], firsts: list[int], nexts: list[int]) -> None:
        """Give each row its new tokens (first token of a row that just joined, then the
        decode step's), stream them, answer the rows that ended, keep the others."""
        first_of = {id(row): token for row, token in zip(joined, firsts, strict=True)}
        now = time.monotonic()
        keep = []
        for pos, row in enumerate(self.rows):
            tokens = [first_of[id(row)]] if id(row) in first_of else []
            if pos < len(nexts):
                tokens.append(nexts[pos])
            new: list[int] = []
            ended = poisoned = False
            for token in tokens:
                if token == NON_FINITE:
                    ended = poisoned = True
                    break
                if token == self.eos or len(row.token_ids) >= row.max_new_tokens:
                    ended = True
                    break
                row.token_ids.append(token)
                new.append(token)
            ended = ended or len(row.token_ids) >= row.max_new_tokens
            if new:
                if row.first_token == 0.0:
                    row.first_token = now
                    self.counters.first_token(now - row.arrival)
                row.emit(new)
            if poisoned:
                self._non_finite_row(row)
            elif ended:
                self._non_finite.pop(row.key, None)
                self.answer(row, self._result(row, now))
            else:
                keep.append(pos)
        self._keep(keep)
        self.counters.running(len(self.rows))

    def _result(self, row: Row, now: float) -> CaptionResult:
        features = row.image.features
        prompt = 1 + (int(features.shape[0]) if features is not None else 0)
        encode_ms = row.encode_s * 1000
        return CaptionResult(
            caption=self.model.decode(row.token_ids),
            token_ids=tuple(row.token_ids),
            adapter=row.name,
            ref=row.key.ref,
            timings=Timings(
                queue_ms=(row.joined - row.arrival) * 1000,
                encode_ms=encode_ms,
                generate_ms=max(0.0, (now - row.joined) * 1000 - encode_ms),
                total_ms=(now - row.arrival) * 1000,
                first_token_ms=(row.first_token - row.arrival) * 1000 if row.first_token else 0.0,
            ),
            request_id=row.request_id,
            finish_reason="length" if len(row.token_ids) >= row.max_new_tokens else "stop",
            prompt_tokens=prompt,
        )

    def _non_finite_row(self, row: Row) -> None:
        """The row's logits were not finite: it alone ends (422), counted; its version is
        quarantined once it did so `quarantine_after` times without a finished caption."""
        label = row.key.ref.label
        self.counters.non_finite()
        self.answer(
            row,
            AdapterNonFinite(
                f"adapter {label} produced non-finite values (NaN or infinity) for this "
                "request; the request was stopped (other requests are not affected)"
            ),
        )
        count = self._non_finite.get(row.key, 0) + 1
        self._non_finite[row.key] = count
        if count >= self.config.quarantine_after:
            del self._non_finite[row.key]
            log.warning("adapter %s quarantined after %d non-finite rows", label, count)
            self.registry.quarantine(
                row.key, f"it produced non-finite values (NaN or infinity) {count} times in a row"
            )
            self.counters.quarantined()

    def _fault(self, stage: str, exc: BaseException, what: str) -> EngineFault:
        """Count and log an exception contained at `stage`; the error for its rows names the
        stage and an incident id (the log line has the traceback), never the exception."""
        self.counters.fault(stage)
        return EngineFault(incident(exc, what))

    # --- answering and ending rows ----------------------------------------------------------------
    def answer(self, row: Row, outcome: CaptionResult | BaseException) -> None:
        """Answer a row taken out of the queue, count it, release its slot pin and end its
        flight. A row answered meanwhile (deadline, cancel) only ends. Never raises: a
        delivery that fails is logged and counted (the caller's deadline answers it)."""
        try:
            if not row.claim():
                self._end(row)
                return
            if isinstance(outcome, CaptionResult):
                self.counters.completed(row.name, row.key.ref, outcome.tokens)
                self.scheduler.record_row(time.monotonic() - row.joined)
            else:
                self.counters.failed()
            self._release_slot(row)
            row.deliver(outcome, before=lambda: self._end_flight(row))
        except Exception:
            log.exception("answering a row failed")
            self.counters.fault("deliver")
            self._end(row)

    def _fail_row(self, row: Row, error: EngineError) -> None:
        self.answer(row, error)

    def _drop(self, row: Row, reason: str, error: EngineError) -> None:
        """A running row that must stop (deadline): answered with `error`, counted as
        dropped for `reason`."""
        if row.claim():
            self.counters.dropped(reason)
            self._release_slot(row)
            row.deliver(error, before=lambda: self._end_flight(row))
        else:
            self._end(row)

    def _end(self, row: Row) -> None:
        """A row answered elsewhere leaves: release its slot pin and end its flight."""
        self._release_slot(row)
        self._end_flight(row)

    def _end_flight(self, row: Row) -> None:
        if row.end_flight():  # once, whichever path ends the row first
            self.scheduler.finished(row.tenant)

    def _release_slot(self, row: Row) -> None:
        if row.slot is not None:
            self.registry.cache.release({row.key: row.slot}, [row.key])
            row.slot = None

    def _keep(self, positions: Sequence[int]) -> None:
        """Keep only the running rows at `positions`; the others have been answered. The
        rows may be reordered (the decode state fills holes with its last rows)."""
        if len(positions) == len(self.rows):
            return
        if not positions or self.state is None:
            self.rows, self.state = [], None
            return
        self.rows = [self.rows[i] for i in self.state.keep(positions)]

    def _fail_running(self, error: EngineError) -> None:
        """Fail every running row (the state cannot be trusted) and empty the batch."""
        rows, self.rows, self.state = self.rows, [], None
        for row in rows:
            self.answer(row, error)
        self.counters.running(0)

    def fail_all(self, error: EngineError) -> None:
        """Shutdown or a stopped worker: fail running rows and everything still queued."""
        self._fail_running(error)
        for _, row in self.scheduler.close():
            row.unwant(self.registry.cache)
            self.answer(row, error)

    # --- loads that failed -----------------------------------------------------------------------
    def _sweep_failed_loads(self) -> None:
        """Rows whose adapter version failed to load: re-resolve those whose version was
        deleted before it was read; fail the others with the load error. Every row taken out
        of the queue here is put back or answered, whatever the store raises meanwhile."""
        cache = self.registry.cache
        for key in self.scheduler.waiting_keys():
            assert isinstance(key, AdapterVersion)
            error = cache.failure(key)
            if error is None:
                continue
            back: list[tuple[int, Row]] = []
            try:
                for seq, row in self.scheduler.take(key):
                    row.unwant(cache)
                    if not isinstance(error, VersionGone):
                        self.answer(row, error)
                    elif self._re_resolve(row):
                        back.append((seq, row))
            finally:
                self.scheduler.requeue(back)

    def _re_resolve(self, row: Row) -> bool:
        """Move a row whose version was deleted to the adapter's newest version (True), or
        answer it (False): AdapterNotFound when the adapter is gone, AdapterLoadError when the
        store cannot be read now (a permission error, a folder changing under the scan)."""
        try:
            row.key = self.registry.resolve(row.tenant, row.name)
            row.want(self.registry.cache)
            return True
        except AdapterNotFound as exc:
            self.answer(row, exc)
        except Exception as exc:
            log.warning("re-resolving %r for tenant %r failed: %r", row.name, row.tenant, exc)
            self.answer(
                row,
                AdapterLoadError(
                    f"adapter {row.name!r} was replaced and its new version could not be read "
                    "now; retry",
                    retry_after_s=1.0,
                ),
            )
        return False


def incident(exc: BaseException | None, what: str) -> str:
    """A client-safe message for an exception contained by the engine: what failed and an
    incident id; the exception (whose text may hold paths, shapes or memory figures) goes to
    the log under that id."""
    ident = uuid.uuid4().hex[:12]
    log.error("%s failed (incident %s)", what, ident, exc_info=exc)
    return (
        f"{what} failed for this request (incident {ident}); other requests were not "
        "affected, retrying may help"
    )


def _by_adapter(rows: Iterable[Row]) -> list[list[Row]]:
    groups: dict[AdapterVersion, list[Row]] = defaultdict(list)
    for row in rows:
        groups[row.key].append(row)
    return list(groups.values())


def _by_adapter_positions(rows: Sequence[Row]) -> list[list[int]]:
    groups: dict[AdapterVersion, list[int]] = defaultdict(list)
    for pos, row in enumerate(rows):
        groups[row.key].append(pos)
    return list(groups.values())
