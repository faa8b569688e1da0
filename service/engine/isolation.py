"""Fault isolation: find which part of a batch an exception belongs to, so that only those
rows fail and the rest goes on. One helper for the step loop's three ladders:

    found = isolate([images], encode, levels=[singles])                   # the encoder
    found = isolate([rows], prefill, levels=[by_adapter, singles])        # a prefill
    found = isolate(by_adapter(positions), probe_step)                    # a decode step
    found.done, found.failed, found.raised

Each group is attempted; a group that raises is split by the next level (a level that does not
split it, e.g. `by_adapter` on one adapter's rows, is skipped) and each part attempted the same
way; a group that cannot be split any further fails its items with the exception it raised.
`done`: the groups that succeeded with their results; `failed`: the failed items with their
exception; `raised`: whether any attempt raised (the fault is counted once per stage).

`incident` turns a contained exception into the client's message: what failed and an incident
id, with the exception itself only in the log line of that id.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
Split = Callable[[Sequence[T]], list[list[T]]]


@dataclass
class Isolated(Generic[T, R]):
    done: list[tuple[list[T], R]] = field(default_factory=list)
    failed: list[tuple[T, Exception]] = field(default_factory=list)
    raised: bool = False


def isolate(
    groups: Sequence[Sequence[T]],
    attempt: Callable[[Sequence[T]], R],
    levels: Sequence[Split[T]] = (),
) -> Isolated[T, R]:
    found: Isolated[T, R] = Isolated()
    for group in groups:
        try:
            found.done.append((list(group), attempt(group)))
            continue
        except Exception as exc:
            error = exc
            found.raised = True
        rest = list(levels)
        while rest:
            parts = rest.pop(0)(group)
            if len(parts) > 1:
                deeper = isolate(parts, attempt, rest)
                found.done += deeper.done
                found.failed += deeper.failed
                break
        else:
            found.failed += [(item, error) for item in group]
    return found


def singles(items: Sequence[T]) -> list[list[T]]:
    return [[item] for item in items]


def grouped_by(key: Callable[[T], Hashable]) -> Callable[[Sequence[T]], list[list[T]]]:
    """A level that splits a group by `key` (first appearance order)."""

    def split(items: Sequence[T]) -> list[list[T]]:
        groups: dict[Hashable, list[T]] = {}
        for item in items:
            groups.setdefault(key(item), []).append(item)
        return list(groups.values())

    return split


def incident(exc: BaseException | None, what: str) -> str:
    """A client-safe message for an exception the engine contained: what failed and an
    incident id; the exception (whose text may hold paths, shapes or memory figures) goes to
    the log under that id."""
    ident = uuid.uuid4().hex[:12]
    log.error("%s failed (incident %s)", what, ident, exc_info=exc)
    return (
        f"{what} failed for this request (incident {ident}); other requests were not "
        "affected, retrying may help"
    )
