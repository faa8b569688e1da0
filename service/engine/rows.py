"""A row: one (request, adapter) pair as it travels from admission through the scheduler
into the running batch, and the one place that answers it. Internal to the engine.

Several rows of one request share one `PreparedImage`, so its features are computed once.
A row is answered exactly once: `claim()` takes the right (first caller wins: the worker with
a result, or the event loop with a deadline or a cancellation), `deliver()` resolves the
awaiting future on its own event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from service.adapter_cache import AdapterCache
from service.engine.types import CaptionResult
from service.registry import AdapterVersion


@dataclass(eq=False)
class PreparedImage:
    """An uploaded image after decoding and resizing (done in the preprocessing pool)."""

    pixels: torch.Tensor  # [3, S, S], preprocessed
    key: str  # content hash of the pixels
    features: torch.Tensor | None = None  # set by the first batch that encodes it
    error: str | None = None  # why the encoder failed on it, if it did (client-safe)


@dataclass(eq=False)
class Row:
    """Compared by identity. `key` (the resolved version) may change once: when that version
    was deleted before its weights were read, the engine re-resolves the name."""

    key: AdapterVersion
    tenant: str
    arrival: float
    deadline: float
    name: str
    image: PreparedImage
    max_new_tokens: int
    request_id: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[CaptionResult]
    index: int = 0  # position of this adapter in the request's list
    on_token: Callable[[int, int], None] | None = None  # CaptionRequest.on_token
    # Set by the worker while the row runs (worker thread only).
    slot: int | None = None  # its adapter's bank slot, pinned while the row runs
    token_ids: list[int] = field(default_factory=list)
    joined: float = 0.0  # time.monotonic() when it joined the running batch
    encode_s: float = 0.0  # the encoder time of the rows that joined with it
    first_token: float = 0.0  # time.monotonic() of its first generated token
    _wanting: bool = False  # holds a want on its version's CPU copy (see want / unwant)
    _flight_ended: bool = False  # its tenant's in-flight count was given back
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _done: bool = False

    def settled(self) -> bool:
        return self._done

    def end_flight(self) -> bool:
        """True the first time only: whoever gets True gives the tenant's count back."""
        with self._lock:
            if self._flight_ended:
                return False
            self._flight_ended = True
            return True

    def want(self, cache: AdapterCache[AdapterVersion]) -> None:
        """Tell the cache that this queued row needs its version (pins the CPU copy)."""
        with self._lock:
            if self._wanting:
                return
            self._wanting = True
        cache.want(self.key)

    def unwant(self, cache: AdapterCache[AdapterVersion]) -> None:
        """The row no longer needs the CPU copy (bound to a slot, dropped, failed). Safe to
        call more than once and from any path that ends the row's wait."""
        with self._lock:
            if not self._wanting:
                return
            self._wanting = False
        cache.unwant(self.key)

    def claim(self) -> bool:
        """Take the right to answer the row; False if it was answered already. Any thread."""
        with self._lock:
            if self._done:
                return False
            self._done = True
            return True

    def emit(self, token_ids: Sequence[int]) -> None:
        """Stream generated tokens to the caller's `on_token` (on its event loop, in order:
        call_soon_threadsafe is FIFO, so they arrive before a result delivered after them)."""
        if self.on_token is None:
            return
        try:
            for token in token_ids:
                self.loop.call_soon_threadsafe(self.on_token, self.index, token)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def deliver(
        self, outcome: CaptionResult | BaseException, before: Callable[[], None] | None = None
    ) -> None:
        """Resolve the awaiting future (after a successful `claim`), on its event loop.
        `before` runs there first, e.g. ending the row's flight: whoever awaits the answer
        then sees the tenant's in-flight count already lowered."""
        try:
            self.loop.call_soon_threadsafe(_resolve, self.future, outcome, before)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            if before is not None:
                before()


def _resolve(
    future: asyncio.Future[CaptionResult],
    outcome: CaptionResult | BaseException,
    before: Callable[[], None] | None,
) -> None:
    if before is not None:
        before()
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def retrieve_error(future: asyncio.Future[CaptionResult]) -> None:
    """Done-callback: mark a row's error as seen. caption() stops at a request's first error;
    without this asyncio would log its siblings' errors as never retrieved."""
    if not future.cancelled():
        future.exception()
