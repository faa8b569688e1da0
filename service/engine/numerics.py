"""Numeric containment (worker thread): a row whose logits were not finite ends alone with
AdapterNonFinite (422) naming its adapter version; a version whose rows do so
`quarantine_after` times with no finished caption in between is quarantined by the registry
(refused until a new version replaces it) and counted.

    guard.non_finite(row)   # the row's step gave NON_FINITE: finish it, count, maybe quarantine
    guard.finished(row)     # the row finished a caption: its version's streak ends
"""

from __future__ import annotations

import logging

from service.engine.ledger import RowLedger
from service.engine.rows import Row
from service.events import EngineEvents
from service.exceptions import AdapterNonFinite
from service.registry import AdapterRegistry, AdapterVersion

log = logging.getLogger(__name__)


class NumericGuard:
    def __init__(
        self,
        ledger: RowLedger,
        registry: AdapterRegistry,
        events: EngineEvents,
        quarantine_after: int,
    ) -> None:
        self.ledger = ledger
        self.registry = registry
        self.events = events
        self.quarantine_after = quarantine_after
        # Rows per version that ended non-finite since its last finished caption.
        self._streaks: dict[AdapterVersion, int] = {}

    def finished(self, row: Row) -> None:
        self._streaks.pop(row.key, None)

    def non_finite(self, row: Row) -> None:
        label = row.key.ref.label
        self.events.non_finite()
        self.ledger.finish(
            row,
            AdapterNonFinite(
                f"adapter {label} produced non-finite values (NaN or infinity) for this "
                "request; the request was stopped (other requests are not affected)"
            ),
        )
        count = self._streaks.get(row.key, 0) + 1
        self._streaks[row.key] = count
        if count >= self.quarantine_after:
            del self._streaks[row.key]
            log.warning("adapter %s quarantined after %d non-finite rows", label, count)
            self.registry.quarantine(
                row.key, f"it produced non-finite values (NaN or infinity) {count} times in a row"
            )
            self.events.quarantined()
