"""How a caller waits for a request's answers, whether its rows run in this process (the
engine's `Submission`) or in Ray replicas (`RemoteSubmission`), and how a request's tokens
reach it as they are made (the HTTP stream, and a replica streaming to the ingress).

    results = await gather_answers(waits, deadline, timeout_s)   # in the order of the names
    task = results_task(submission)     # results() as a task; cancelling it cancels the rows
    async for token in pump(task, queue, idle_s=15):             # TokenEvent, or None when idle
        ...                                                      # then task.result()
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from service.engine.types import CaptionResult
from service.exceptions import DeadlineExceeded


async def gather_answers(
    waits: Sequence[Awaitable[CaptionResult]], deadline: float, timeout_s: float
) -> list[CaptionResult]:
    """Every row's result, in the order of the names, or the first error among them in that
    order (raised as soon as any row fails), or DeadlineExceeded once `deadline` (monotonic)
    passes. Rows still pending when this returns or raises are the caller's to cancel."""
    futures = [asyncio.ensure_future(w) for w in waits]
    done, pending = await asyncio.wait(
        futures, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_EXCEPTION
    )
    for future in futures:  # the first error in the order of the names
        error = future.exception() if future in done else None
        if error is not None:
            raise error
    if pending:
        raise DeadlineExceeded(f"no answer within {timeout_s:g} s (request_timeout_s)")
    return [future.result() for future in futures]


@dataclass(frozen=True)
class TokenEvent:
    index: int  # the adapter's position in the request's list
    token_id: int


async def pump(
    task: asyncio.Future[Any], queue: asyncio.Queue[tuple[int, int]], idle_s: float | None = None
) -> AsyncIterator[TokenEvent | None]:
    """The tokens a request's `on_token` puts in `queue`, as they come (None after `idle_s`
    without one: a keep-alive's cue), until `task` (the request's results) is done; tokens
    queued before the result are all yielded first. Then read `task.result()`."""
    while True:
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait(
            {getter, task}, timeout=idle_s, return_when=asyncio.FIRST_COMPLETED
        )
        if getter in done:
            yield TokenEvent(*getter.result())
            continue
        getter.cancel()
        if not done:
            yield None
            continue
        while not queue.empty():  # tokens reach the queue before their result
            yield TokenEvent(*queue.get_nowait())
        return


class Cancellable(Protocol):
    """An admitted request, in this process or across replicas."""

    async def results(self) -> list[CaptionResult]: ...

    def cancel(self) -> None: ...


def results_task(submission: Cancellable) -> asyncio.Task[list[CaptionResult]]:
    """`submission.results()` as a task whose cancellation always cancels the request. The
    coroutine cancels its rows when a cancellation reaches it, but a task cancelled before its
    first step never runs its coroutine at all: its rows would stay queued, run for nobody and
    count against their adapter (a caller that leaves right after admission does that)."""
    task = asyncio.ensure_future(submission.results())

    def cancelled(done: asyncio.Task[list[CaptionResult]]) -> None:
        if done.cancelled():
            submission.cancel()

    task.add_done_callback(cancelled)
    return task
