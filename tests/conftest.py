"""Shared test set-up: offline, quiet, deterministic; the session-wide `smol` build."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from adapters.backbone import Backbone
    from adapters.backbone_build import BuildReport


# --- the `smol` backbone (real pretrained weights), built once per test session ----------
@pytest.fixture(scope="session")
def smol_build(tmp_path_factory: pytest.TempPathFactory) -> BuildReport:
    """`ctxpeft backbone build smol`'s work, into a fresh runtime folder (about a minute of
    CPU: de-quantizing the GGUF, converting the EfficientNet, saving 0.5 GB). Offline."""
    from tests.smol import require_smol

    require_smol()
    import torch

    from adapters.backbone_build import build_backbone
    from adapters.presets import get_preset

    runtime = tmp_path_factory.mktemp("smol-runtime")
    with torch.random.fork_rng():
        return build_backbone(get_preset("smol"), runtime, log=lambda _: None)


@pytest.fixture(scope="session")
def smol_backbone(smol_build: BuildReport) -> Backbone:
    """The built smol backbone, loaded from its folder. Shared by the session: tests may
    inject context layers (that changes nothing without routing) but never change weights."""
    from adapters.backbone import Backbone

    return Backbone.load(smol_build.folder)
