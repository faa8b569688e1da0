"""The engine's worker: a step loop over the running batch (iteration-level scheduling).

One iteration (`StepLoop.iterate`), top to bottom:
  1. queued rows past their deadline end; rows of a version that failed to load end, or move
     to the adapter's newest version when theirs was deleted before it was read;
  2. running rows answered elsewhere (cancelled) or past their deadline leave the batch;
  3. new rows join: chosen oldest first within the budgets, bound to device slots, encoded,
     prefilled together and merged after the running rows (service/engine/join.py);
  4. one decode step for every running row;
  5. one host synchronisation reads the new tokens: each row streams them, and rows that
     reached EOS, their limit or non-finite logits end.
Every row ends through the row ledger (`finish`), which releases what it held and answers it
once. With `scheduling="static"` step 3 runs only when the batch is empty (the baseline).

Overlap (`overlap`, on by default on CUDA): step 5 reads the tokens of the decode step before,
after step 4 has queued the next one, so the device computes step N + 1 while the host reads
step N's tokens, streams them and prepares step N + 2. The copies start as soon as the kernels
that compute the tokens are queued (`TokenRead`), so the read waits for those kernels only. A
row that ended at step N has run step N + 1 as well: that step's token is never read for it
(the same tokens as without overlap, one step of compute more per row that ends). If a decode
step raises, the tokens due are read first, so a row that had already ended is answered with
its caption, not with the step's fault.

Faults. An exception is attributed to the rows that caused it (service/engine/isolation.py):
a decode step that raises is retried adapter by adapter on copies of the state to find the
culprits, which end with 503 engine_fault, and the rest steps again (DecodeState.step is all
or nothing). An exception anywhere else in a step fails the rows that were joining, or, if the
running state itself cannot be trusted, that step's running rows; the loop goes on. If the
thread stops anyway, `on_stop` tells the engine, which turns readiness off and fails what is
queued at once. A fault's message names the stage and an incident id, never the exception.

Numeric containment. A row whose logits are not finite comes back as NON_FINITE from the one
host read; service/engine/numerics.py ends it alone (422) and quarantines a version that keeps
doing so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from adapters.decoding import NON_FINITE, accept
from service.adapter_cache import AdapterCache
from service.engine.batch import RunningBatch, TokenRead
from service.engine.isolation import grouped_by, incident, isolate
from service.engine.join import Joiner
from service.engine.ledger import RowLedger
from service.engine.numerics import NumericGuard
from service.engine.rows import Place, Row
from service.engine.types import CaptionResult, Timings
from service.events import EngineEvents
from service.exceptions import (
    AdapterLoadError,
    AdapterNotFound,
    DeadlineExceeded,
    EngineError,
    EngineFault,
)
from service.registry import AdapterRegistry, AdapterVersion, VersionGone
from service.settings import EngineConfig

log = logging.getLogger(__name__)


class StepLoop:
    """Owns the running batch; runs on the engine's worker thread only."""

    def __init__(
        self,
        joiner: Joiner,
        registry: AdapterRegistry,
        cache: AdapterCache[AdapterVersion],
        ledger: RowLedger,
        events: EngineEvents,
        config: EngineConfig,
    ) -> None:
        self.joiner = joiner
        self.registry = registry
        self.cache = cache
        self.ledger = ledger
        self.events = events
        self.config = config
        self.model = joiner.model
        self.eos = self.model.backbone.tokenizer.eos_token_id
        self.batch = RunningBatch()
        self.stopping = False
        self.steps = 0  # iterations run (the loop's clock for prefill_max_wait_steps)
        self.overlap = config.overlap == "on" or (
            config.overlap == "auto" and self.model.backbone.device.type == "cuda"
        )
        self._due = _Due([], None)  # the tokens the current step reads
        self._clock = time.perf_counter()  # when the compute being shared out began
        self.numerics = NumericGuard(ledger, registry, events, config.quarantine_after)

    # --- the thread ------------------------------------------------------------------------
    def run(self, on_stop: Callable[[BaseException | None], None]) -> None:
        """The worker thread's body: iterate until `stopping`. An exception in an iteration
        fails that iteration's rows and the loop goes on; whatever ends the thread otherwise
        is reported to `on_stop` (None for a normal stop)."""
        torch.set_grad_enabled(False)
        self.events.worker_up(True)
        reason: BaseException | None = None
        try:
            while not self.stopping:
                try:
                    self.iterate()
                except Exception as exc:
                    self.fail_running(self._fault("loop", exc, "the engine's step"))
        except BaseException as exc:  # nothing can be trusted any more: stop, say so loudly
            log.critical("the engine's worker stops", exc_info=True)
            reason = exc
        finally:
            self.events.worker_up(False)
            on_stop(None if self.stopping else (reason or RuntimeError("worker stopped")))

    def iterate(self) -> None:
        """One step: sweep the queue, leave, join, decode, advance."""
        self.steps += 1
        self._sweep_queue()
        self._leave()
        self._clock = time.perf_counter()
        joined, first = self._join()
        # The tokens this step reads: the new rows' first ones, and one decode step's: this
        # step's, or with overlap the previous step's (this step's are then read next time,
        # while the device computes the step after).
        self._due = _Due(joined, None if first is None else TokenRead(first))
        if self.overlap:
            self._due.decoded = self.batch.take_pending()
        tokens = self._decode() if self.batch.rows else None
        if tokens is not None:
            if self.overlap:
                self.batch.pending = TokenRead(tokens)
            else:
                self._due.decoded = TokenRead(tokens)
        self._settle()

    def _settle(self) -> None:
        """Read the tokens due (the host's one wait for the device in a step) and advance the
        rows with them; each row gets its share of the compute since the last settle."""
        due, self._due = self._due, _Due([], None)
        firsts = due.first.values() if due.first is not None else []
        nexts = due.decoded.values() if due.decoded is not None else []
        now = time.perf_counter()
        share, self._clock = (now - self._clock) / max(1, len(self.batch.rows)), now
        self._advance(due.joined, firsts, nexts, share)

    # --- 1. the queue ---------------------------------------------------------------------
    def _sweep_queue(self) -> None:
        try:
            self.ledger.sweep_expired()
            failing = self.cache.failing()  # usually empty: no scan of the queue
            for key in self.ledger.scheduler.waiting_keys() if failing else ():
                assert isinstance(key, AdapterVersion)
                error = self.cache.failure(key) if key in failing else None
                if error is not None:
                    self._failed_load(key, error)
        except Exception:  # e.g. a delete racing a directory scan; retried next step
            log.exception("sweeping the queue failed")
            self.events.fault("loop")

    def _failed_load(self, key: AdapterVersion, error: EngineError) -> None:
        """The queued rows of a version that failed to load: moved to the adapter's newest
        version when theirs was deleted before it was read, else ended with the error. Each
        row taken here is put back or finished, whatever the store raises meanwhile."""
        back: list[tuple[int, Row]] = []
        try:
            for seq, row in self.ledger.take_key(key):
                if not isinstance(error, VersionGone):
                    self.ledger.finish(row, error)
                elif self._re_resolve(row):
                    back.append((seq, row))
        finally:
            self.ledger.requeue(back)

    def _re_resolve(self, row: Row) -> bool:
        """Move a row to its adapter's newest version (True), or finish it: AdapterNotFound
        when the adapter is gone, AdapterLoadError when the store cannot be read now."""
        try:
            row.key = self.registry.resolve(row.tenant, row.name)
            return True
        except AdapterNotFound as exc:
            self.ledger.finish(row, exc)
        except Exception as exc:
            log.warning("re-resolving %r for tenant %r failed: %r", row.name, row.tenant, exc)
            self.ledger.finish(
                row,
                AdapterLoadError(
                    f"adapter {row.name!r} was replaced and its new version could not be read "
                    "now; retry",
                    retry_after_s=1.0,
                ),
            )
        return False

    # --- 2. leaving -----------------------------------------------------------------------
    def _leave(self) -> None:
        """Rows answered elsewhere or past their deadline leave before more compute."""
        now = time.monotonic()
        keep = []
        for pos, row in enumerate(self.batch.rows):
            if row.settled():
                self.ledger.finish(row)
            elif now >= row.deadline:
                self.ledger.finish(row, DeadlineExceeded("the request's deadline passed"))
            else:
                keep.append(pos)
        self.batch.keep(keep)

    # --- 3. joining -----------------------------------------------------------------------
    def _join(self) -> tuple[list[Row], torch.Tensor | None]:
        """New rows prefilled and merged; their first tokens (device). An unexpected
        exception fails the rows that were joining, never the running ones."""
        try:
            chosen = self.joiner.choose(self.batch.rows, self.steps)
        except Exception:  # nothing was taken from the queues
            log.exception("choosing rows to join failed")
            self.events.fault("loop")
            return [], None
        if not chosen:
            return [], None
        running = len(self.batch)
        try:
            groups = self.joiner.join(chosen)
            for rows, state, _ in groups:
                self.batch.merge(rows, state)
        except Exception as exc:
            error = self._fault("loop", exc, "joining the running batch")
            self.batch.keep(range(running))  # rows that joined this step leave too
            for _, row in chosen:
                if row.place is Place.WORKER:  # not those put back in line
                    self.ledger.finish(row, error)
            return [], None
        joined = [row for rows, _, _ in groups for row in rows]
        return joined, torch.cat([first for _, _, first in groups]) if groups else None

    # --- 4. the decode step ---------------------------------------------------------------
    def _decode(self) -> torch.Tensor | None:
        """One decode step of every running row; on failure the adapters whose rows fail
        alone (tried on copies of the state) end, and the rest steps again."""
        batch = self.batch
        state = batch.state
        assert state is not None
        self.events.step(len(batch), batch.adapters())
        try:
            return state.step()
        except Exception:
            log.exception("decode step of %d rows failed; isolating", len(batch))
            self.events.fault("decode")
        # The tokens due first: a row they end (EOS, its limit; with overlap, a row that ended
        # at the step before this one) ends as it would have, not with this step's fault.
        self._settle()
        left = batch.state
        if left is None:  # every row ended
            return None

        def adapter_of(pos: int) -> AdapterVersion:
            return batch.rows[pos].key

        by_adapter = grouped_by(adapter_of)(list(range(len(batch))))
        probed = isolate(by_adapter, lambda group: left.subset(group).step())
        culprits = {pos for pos, _ in probed.failed}
        # No culprit among the rows left: the step failed for a row that has ended since (or
        # once): it is tried again as it is.
        if len(culprits) < len(batch):
            for pos in culprits:
                self.ledger.finish(batch.rows[pos], EngineFault("decoding failed for this adapter"))
            if culprits:
                batch.keep([pos for pos in range(len(batch)) if pos not in culprits])
            try:
                return left.step()
            except Exception:
                log.exception("decode step failed again without the culprits")
        self.fail_running(EngineFault("a decode step failed and could not be attributed"))
        return None

    # --- 5. tokens and answers --------------------------------------------------------------
    def _advance(
        self,
        joined: list[Row],
        firsts: Sequence[int | None],
        nexts: Sequence[int | None],
        share: float,
    ) -> None:
        """Give each row its new tokens (first token of a row that just joined, then the
        decode step's: nexts[i] for the row at position i, None for none) and its `share` of
        the step's compute, stream them, finish the rows that ended, keep the others."""
        first_of = {id(row): first for row, first in zip(joined, firsts, strict=True)}
        now = time.monotonic()
        keep = []
        stops = (self.eos, NON_FINITE)
        steps = len(nexts)
        for pos, row in enumerate(self.batch.rows):
            row.compute_s += share
            token = nexts[pos] if pos < steps else None
            first = first_of.get(id(row)) if first_of else None
            if (
                first is None
                and token is not None
                and token not in stops
                and len(row.token_ids) + 1 < row.max_new_tokens
                and row.first_token
            ):
                # The common case, decided as `accept` would: one token kept, no ending.
                row.token_ids.append(token)
                row.emit((token,))
                keep.append(pos)
                continue
            tokens = [t for t in (first, token) if t is not None]
            new, ending = accept(tokens, len(row.token_ids), row.max_new_tokens, self.eos)
            row.token_ids += new
            if new:
                if row.first_token == 0.0:
                    row.first_token = now
                    self.events.first_token(now - row.arrival)
                row.emit(new)
            if ending == "non_finite":
                self.numerics.non_finite(row)
            elif ending is not None:
                self.numerics.finished(row)
                caption = self.model.decode(row.token_ids)
                self.ledger.finish(row, caption_result(row, caption, now, ending))
            else:
                keep.append(pos)
        self.batch.keep(keep)
        self.events.running(len(self.batch))

    # --- the end of everything running ------------------------------------------------------
    def _fault(self, stage: str, exc: BaseException, what: str) -> EngineFault:
        """Count an exception contained at `stage`; the error for its rows names the stage
        and an incident id (the log line has the traceback), never the exception."""
        self.events.fault(stage)
        return EngineFault(incident(exc, what))

    def fail_running(self, error: EngineError) -> None:
        """Fail every running row (the state cannot be trusted) and empty the batch."""
        for row in self.batch.clear():
            self.ledger.finish(row, error)
        self.events.running(0)

    def fail_all(self, error: EngineError) -> None:
        """Shutdown or a stopped worker: fail running rows and everything still queued."""
        self.fail_running(error)
        self.ledger.close(error)


@dataclass
class _Due:
    """What a step reads: the first tokens of the rows that joined (in `joined` order) and one
    decode step's tokens (per running row)."""

    joined: list[Row]
    first: TokenRead | None
    decoded: TokenRead | None = None


def caption_result(row: Row, caption: str, now: float, ending: str) -> CaptionResult:
    """The answer of a row that ended with `ending` (stop or length) at `now`."""
    features = row.image.features
    image_tokens = int(features.shape[0]) if features is not None else 0
    encode_ms = row.encode_s * 1000
    return CaptionResult(
        caption=caption,
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
        finish_reason="length" if ending == "length" else "stop",
        prompt_tokens=1 + image_tokens,
        image_tokens=image_tokens,
        image_cached=row.image_cached,
        compute_s=row.compute_s,
    )
