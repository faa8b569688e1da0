"""One writer racing others for a tenant's quota, in its own process (test_store.py):

    python -m tests.service.quota_writer <store> <tenant> <name> <max_bytes> <go-file>

Prints `ready`, waits until <go-file> exists (the test starts every writer, reads each one's
`ready`, then releases them at once), then writes one version of <tenant>/<name> (PAYLOAD_BYTES) under `StoreQuota(max_bytes=...)`,
slowly (the writing takes a moment, as an upload's validation does; a version's bytes count
only once it is renamed into place, so unlocked writers would all pass the check), and prints
`accepted` or `refused`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from service.store import AdapterStore, QuotaExceeded, StoreQuota

PAYLOAD_BYTES = 1000
WRITE_S = 0.3  # how long one write holds the tenant's lock: widens a race, asserts nothing
GO_WAIT_S = 120.0  # a safety net: the test creates the go file once every writer started


def slow_write(folder: Path) -> None:
    (folder / "adapter.safetensors").write_bytes(b"w" * PAYLOAD_BYTES)
    time.sleep(WRITE_S)


def write(store: AdapterStore, tenant: str, name: str, max_bytes: int) -> str:
    """One version within the bytes quota: "accepted" or "refused"."""
    quota = StoreQuota(max_bytes=max_bytes)
    try:
        store.write_version(tenant, name, slow_write, quota, new_bytes=PAYLOAD_BYTES)
    except QuotaExceeded:
        return "refused"
    return "accepted"


def main(root: str, tenant: str, name: str, max_bytes: str, go: str) -> None:
    store = AdapterStore(Path(root))
    print("ready", flush=True)
    deadline = time.monotonic() + GO_WAIT_S
    while not Path(go).exists():
        if time.monotonic() > deadline:
            raise SystemExit("never released")
        time.sleep(0.005)
    print(write(store, tenant, name, int(max_bytes)), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
