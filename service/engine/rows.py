"""A row: one (request, adapter) pair as it travels from admission through the queue into the
running batch until its one answer. Its life is the ledger's (`service.engine.ledger`): this
module holds the row's data and the two ways it reaches its caller (tokens, the answer).

Several rows of one request share one `PreparedImage`, so its features are computed once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from service.engine.types import CaptionResult
from service.registry import AdapterVersion
from service.scheduler import Priority


@dataclass(eq=False)
class PreparedImage:
    """An uploaded image after decoding and resizing (done in the preprocessing pool)."""

    pixels: torch.Tensor  # [3, S, S], preprocessed
    key: str  # content hash of the pixels
    features: torch.Tensor | None = None  # set by the first batch that encodes it
    error: str | None = None  # why the encoder failed on it, if it did (client-safe)


class Place(enum.Enum):
    """Who holds a row: the scheduler's queue, the worker (choosing, joining, running), or
    nobody any more (ended). Only the ledger moves a row between places."""

    QUEUE = "queue"
    WORKER = "worker"
    GONE = "gone"


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
    priority: Priority = "interactive"  # CaptionRequest.priority
    # Set by the worker while the row runs (worker thread only).
    slot: int | None = None  # its adapter's bank slot, pinned while the row runs
    token_ids: list[int] = field(default_factory=list)
    joined: float = 0.0  # time.monotonic() when it joined the running batch
    encode_s: float = 0.0  # the encoder time of the rows that joined with it
    first_token: float = 0.0  # time.monotonic() of its first generated token
    image_cached: bool = False  # its image's features were there when it joined
    compute_s: float = 0.0  # its share of the compute of every step it was in
    # The ledger's (under `lock`): where the row is, whether it was answered, what it holds.
    place: Place = Place.QUEUE
    answered: bool = False
    wanting: bool = False  # holds a want on its version's CPU copy
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def settled(self) -> bool:
        """Answered already (by the worker, or by its caller: cancelled, deadline)."""
        return self.answered

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

    def deliver(self, outcome: CaptionResult | BaseException) -> None:
        """Resolve the awaiting future with `outcome`, on its event loop (the ledger calls
        this once per row)."""
        # A closed event loop (RuntimeError) means nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_resolve, self.future, outcome)


def _resolve(future: asyncio.Future[CaptionResult], outcome: CaptionResult | BaseException) -> None:
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
