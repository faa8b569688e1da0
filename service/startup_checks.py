"""Start-up checks of `ctxpeft serve`: what would leave the service unable to do its job is
refused before it binds its port, with one line that names the problem and its fix; the
command then exits with status 2 (a configuration error: restarting will not help).

    check_files(settings)      # raises StartupError(one line)
    check_backbone(settings)   # the same, after the keys are loaded (it imports torch)

Checked, cheapest first:
- the keys file can be read by the user the service runs as;
- the runtime folder and the adapter store exist (or can be created) and that user can list
  and write them (uploads, temporary folders, the demo build);
- the backbone can be the store's: a preset made of inline configs would be built with
  random weights, which no stored adapter was trained on, so it must have been built and
  saved (`ctxpeft demo` for `demo`) under <runtime_dir>/backbones/; and when the store holds
  adapters, at least one must name the saved backbone's fingerprint.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from service.settings import Settings
from service.store import AdapterStore

if TYPE_CHECKING:
    from adapters.backbone_build import BackboneSource


class StartupError(Exception):
    """One line: what is wrong, where, and how to fix it."""


def whoami() -> str:
    """'uid 10001 (gid 10001)': who the checks ran as (containers often run another uid)."""
    return f"uid {os.getuid()} (gid {os.getgid()})"


def check_files(settings: Settings) -> None:
    """The keys file, the runtime folder and the store (fast: no heavy import)."""
    if settings.keys_file is not None:
        check_readable_file(settings.keys_file, "keys file", "CTXPEFT_KEYS_FILE")
    if settings.metrics_token_file is not None:
        check_readable_file(
            settings.metrics_token_file, "metrics token file", "CTXPEFT_METRICS_TOKEN_FILE"
        )
    check_writable_dir(settings.runtime_dir, "runtime folder", "CTXPEFT_RUNTIME_DIR")
    check_writable_dir(settings.resolved_store_dir(), "adapter store", "CTXPEFT_STORE_DIR")


def check_backbone(settings: Settings) -> None:
    """The backbone exists and can be the store's (imports torch)."""
    backbone = resolve_backbone(settings)
    if backbone.fingerprint is not None:
        check_store_matches(settings.resolved_store_dir(), backbone)


def check_readable_file(path: Path, what: str, env: str) -> None:
    try:
        with path.open("rb"):
            pass
    except PermissionError:
        raise StartupError(
            f"{what} {path} cannot be read by {whoami()}: permission denied. Fix: make it "
            f"readable by that user (on the host: chmod a+r, or chown {os.getuid()}, on the "
            f"file that is mounted there), or set {env} to a file it can read"
        ) from None
    except FileNotFoundError:
        raise StartupError(
            f"{what} {path} does not exist. Fix: mount or create it there, or set {env} to "
            "the path of an existing file"
        ) from None
    except OSError as exc:
        raise StartupError(
            f"{what} {path} cannot be read: {exc.strerror or exc}. Fix: set {env} to a "
            "readable file"
        ) from None


def check_writable_dir(path: Path, what: str, env: str) -> None:
    """The folder exists (created if missing), and the service's user can list it and
    create and remove a file in it (a real write: read-only mounts fail here too)."""
    fix = (
        f"Fix: give that user the folder (on the host: chown -R {os.getuid()}:{os.getgid()} "
        f"on the folder mounted there; with Docker a named volume is already right), or set "
        f"{env} to a folder it can write"
    )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with os.scandir(path):
            pass
        handle, probe = tempfile.mkstemp(prefix=".ctxpeft-write-check-", dir=path)
        os.close(handle)
        os.unlink(probe)
    except PermissionError:
        raise StartupError(
            f"{what} {path} is not writable by {whoami()}: permission denied. {fix}"
        ) from None
    except NotADirectoryError:
        raise StartupError(f"{what} {path} is not a folder. Fix: set {env} to a folder") from None
    except OSError as exc:
        raise StartupError(
            f"{what} {path} is not writable by {whoami()}: {exc.strerror or exc}. {fix}"
        ) from None


def resolve_backbone(settings: Settings) -> BackboneSource:
    """The backbone the engine will load (`adapters.backbone_build.resolve_backbone`, as
    `Engine.from_settings` resolves it), refusing one that would be built with random weights
    at every start. (Imports torch: the file and folder checks above come first, so that they
    fail within a second.)"""
    from adapters.backbone_build import BackboneNotFound
    from adapters.backbone_build import resolve_backbone as resolve

    try:
        return resolve(
            settings.backbone,
            settings.runtime_dir,
            spec_from=" (CTXPEFT_BACKBONE)",
            runtime_from="CTXPEFT_RUNTIME_DIR",
        )
    except BackboneNotFound as exc:
        raise StartupError(str(exc)) from None


def store_fingerprints(store_dir: Path) -> Counter[str]:
    """How many adapters (newest version of each) name each base fingerprint. A version whose
    config cannot be read is left out: the registry refuses it on its own when asked for."""
    from adapters.format import CONFIG_FILE

    counts: Counter[str] = Counter()
    store = AdapterStore(store_dir)
    for ref in store.all_latest():
        try:
            config = json.loads((store.path(ref) / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            continue
        fingerprint = config.get("base_fingerprint") if isinstance(config, dict) else None
        if isinstance(fingerprint, str):
            counts[fingerprint] += 1
    return counts


def check_store_matches(store_dir: Path, backbone: BackboneSource) -> None:
    """An empty store is fine (adapters come later); a store none of whose adapters was
    trained on this backbone means the wrong backbone or the wrong store."""
    counts = store_fingerprints(store_dir)
    if not counts or backbone.fingerprint in counts:
        return
    named = ", ".join(f"{fp} ({n})" for fp, n in counts.most_common(3))
    more = f" and {len(counts) - 3} more" if len(counts) > 3 else ""
    raise StartupError(
        f"none of the {sum(counts.values())} adapters in the store {store_dir} was trained on "
        f"backbone {backbone.source} (fingerprint {backbone.fingerprint}): they name {named}{more}. "
        "Fix: serve the backbone they were trained on (CTXPEFT_BACKBONE, CTXPEFT_RUNTIME_DIR), "
        "point CTXPEFT_STORE_DIR at this backbone's store, or train them again on this one "
        "(`ctxpeft demo --force` for the demo's)"
    )
