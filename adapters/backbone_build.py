"""Building a backbone once into the runtime folder: `ctxpeft backbone build NAME`.

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

BACKBONES_DIR = "backbones"
STAMP_FILE = "build_stamp.json"


def backbone_dir(runtime_dir: Path, name: str) -> Path:
    """Where a built backbone lives: <runtime>/backbones/<name>."""
    return Path(runtime_dir) / BACKBONES_DIR / name


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
