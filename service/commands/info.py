"""`ctxpeft info`: versions, the device `auto` resolves to, and the backbone presets."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from adapters.backbone import resolve_device
    from adapters.presets import PRESETS
    from service import __version__

    info = {
        "ctxpeft": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device_auto": str(resolve_device("auto")),
        "presets": {
            name: {
                "vision": cfg.vision["model_type"] if isinstance(cfg.vision, dict) else cfg.vision,
                "lm_layers": cfg.lm["num_hidden_layers"] if isinstance(cfg.lm, dict) else None,
                "lm_hidden": cfg.lm["hidden_size"] if isinstance(cfg.lm, dict) else None,
                "image_size": cfg.image_size,
            }
            for name, cfg in PRESETS.items()
        },
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key}: {value}")
    return 0
