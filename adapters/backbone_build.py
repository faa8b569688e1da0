"""Building a backbone once into the runtime folder: `ctxpeft backbone build NAME`, and
which backbone a name means (`resolve_backbone`: `ctxpeft serve`, the engine and the commands).

    <runtime>/backbones/<name>/     backbone.json + vision/ lm/ tokenizer/ (Hugging Face folders)
                                    build_stamp.json (what it was built from)

Sources are whatever `BackboneConfig` names: a preset's `package:` weights (the `smol`
preset: de-quantized, converted, saved as ordinary folders), hub ids, local folders, or inline
configs (random init, seeded). The build is cached and idempotent: the stamp records a key of
the config and of the exact source packages (name, version, weights file size), and a second
build with the same key does nothing. It is written into a temporary folder and renamed into
place, so an interrupted build never leaves a folder that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters import packaged
from adapters.backbone import BACKBONE_FILE, Backbone
from adapters.config import BackboneConfig
from adapters.presets import PRESETS

BACKBONES_DIR = "backbones"
STAMP_FILE = "build_stamp.json"


def backbone_dir(runtime_dir: Path, name: str) -> Path:
    """Where a built backbone lives: <runtime>/backbones/<name>."""
    return Path(runtime_dir) / BACKBONES_DIR / name


class BackboneNotFound(ValueError):
    """A backbone name that names nothing loadable, or only random weights; says how to fix."""


@dataclass(frozen=True)
class BackboneSource:
    """What `Backbone.load(source)` loads for a name, and the fingerprint its saved folder
    recorded (None: not known before loading, i.e. not a saved folder)."""

    source: str
    fingerprint: str | None


def resolve_backbone(
    spec: str, runtime_dir: Path, *, spec_from: str = "", runtime_from: str = "--runtime-dir"
) -> BackboneSource:
    """The backbone `spec` names, first match: a saved backbone folder, a backbone config
    JSON, a backbone built under <runtime_dir>/backbones/ (`ctxpeft demo`, `ctxpeft backbone
    build`), a preset made of pretrained sources. A preset of inline configs that is not built
    is refused: built at each start it would get random weights, which no adapter was trained
    on. Messages name where the values came from: `spec_from` after the name (e.g.
    " (CTXPEFT_BACKBONE)"), `runtime_from` for the runtime folder (e.g. "CTXPEFT_RUNTIME_DIR").
    """
    path = Path(spec)
    if path.is_dir() and (path / BACKBONE_FILE).is_file():
        return _saved(path)
    if path.is_file() and path.suffix == ".json":
        return BackboneSource(str(path), None)
    built = backbone_dir(runtime_dir, spec)
    if "/" not in spec and (built / BACKBONE_FILE).is_file():
        return _saved(built)
    preset = PRESETS.get(spec)
    if preset is None:
        raise BackboneNotFound(
            f"backbone {spec!r}{spec_from} is neither a preset ({', '.join(PRESETS)}), a saved "
            f"backbone folder (with {BACKBONE_FILE}), a backbone built under "
            f"{Path(runtime_dir) / BACKBONES_DIR} nor a backbone config JSON"
        )
    if isinstance(preset.vision, dict) or isinstance(preset.lm, dict):
        how = (
            "run `ctxpeft demo` to build it (with the same runtime folder)"
            if spec == "demo"
            else f"run `ctxpeft backbone build {spec}` to build it"
        )
        raise BackboneNotFound(
            f"backbone {spec!r} is not built: {built / BACKBONE_FILE} does not exist "
            f"({runtime_from}={runtime_dir}). Built now it would get random weights, on which no "
            f"stored adapter was trained. Fix: {how}, or point {runtime_from} at the folder it "
            "was built in"
        )
    return BackboneSource(spec, None)  # pretrained sources: the same weights every time


def _saved(folder: Path) -> BackboneSource:
    try:
        recorded = json.loads((folder / BACKBONE_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError) as exc:
        raise BackboneNotFound(
            f"backbone file {folder / BACKBONE_FILE} cannot be read: {exc}. Fix: rebuild it "
            "(`ctxpeft demo --force` for the demo) or name another backbone"
        ) from None
    return BackboneSource(str(folder), recorded if isinstance(recorded, str) else None)


def build_key(config: BackboneConfig, seed: int = 0) -> str:
    """What a build depends on: the config, the seed (random-init parts) and the exact
    packaged weights (distribution version and file size)."""
    sources: dict[str, Any] = {}
    for spec in (config.vision, config.lm, config.tokenizer):
        if packaged.is_packaged(spec):
            assert isinstance(spec, str)
            path = packaged.weights_file(spec)
            sources[spec] = [packaged.package_version(spec), path.name, path.stat().st_size]
    data = {"config": config.to_dict(), "seed": seed, "sources": sources}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def is_current(config: BackboneConfig, folder: Path, seed: int = 0) -> bool:
    stamp = folder / STAMP_FILE
    if not (folder / BACKBONE_FILE).is_file() or not stamp.is_file():
        return False
    try:
        data = json.loads(stamp.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and data.get("key") == build_key(config, seed)


@dataclass(frozen=True)
class BuildReport:
    folder: Path
    built: bool  # False: the folder was already current, nothing was done
    fingerprint: str
    seconds: float


def save_built(backbone: Backbone, folder: Path, stamp_file: str, stamp: dict[str, Any]) -> None:
    """Save a built backbone with its stamp into `folder`, atomically: into a temporary
    sibling, then renamed over any earlier build (a reader sees the old build or the new one,
    never half of one)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex}"
    try:
        backbone.save(tmp)
        (tmp / stamp_file).write_text(json.dumps(stamp, indent=2) + "\n")
        if folder.exists():
            # os.rename cannot replace a non-empty folder: move the old build aside first.
            old = folder.parent / f".tmp-old-{folder.name}-{uuid.uuid4().hex}"
            os.rename(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_backbone(
    config: BackboneConfig,
    runtime_dir: Path,
    force: bool = False,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> BuildReport:
    """Build `config` into <runtime>/backbones/<config.name> unless it is already current."""
    started = time.perf_counter()
    folder = backbone_dir(runtime_dir, config.name)
    if not force and is_current(config, folder, seed):
        fingerprint = json.loads((folder / BACKBONE_FILE).read_text()).get("fingerprint", "")
        return BuildReport(folder, False, str(fingerprint), time.perf_counter() - started)
    key = build_key(config, seed)  # before the work: fails fast when a package is missing
    log(f"building the {config.name!r} backbone into {folder}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = Backbone.build(config)
    fingerprint = backbone.fingerprint()
    stamp = {"key": key, "fingerprint": fingerprint, "built_from": config.to_dict()}
    save_built(backbone, folder, STAMP_FILE, stamp)
    return BuildReport(folder, True, fingerprint, time.perf_counter() - started)
