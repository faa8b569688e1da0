"""The external smoke set: real photographs (skimage.data, public domain / CC0) captioned over
HTTP on the `smol` backbone (real pretrained weights) and on the `demo` backbone.

Every photo must come back 200 with a non-empty caption. The adapters were trained on the
synthetic shapes tasks only, so the captions describe shapes and colours, not the photo (a cat
may come back as "red blue"): this checks that real images of any size and content go through
the whole service on both backbones, not that they are described well.

Slow: builds smol once per session (shared with tests/adapters/test_smol.py) and fits a smol
adapter briefly (connector + LoRA, a few dozen synthetic images) so the LM has image tokens it
has seen before.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from adapters.backbone import Backbone
from adapters.data.synthetic import SyntheticCaptions
from adapters.model import ContextPEFTModel
from adapters.training import TrainOptions, encode_source, train_adapter
from service.commands.common import write_adapter_version
from service.store import AdapterStore
from tests.e2e.conftest import (
    ACME_CAPTION,
    DemoBuild,
    Service,
    bearer,
    encode,
    image_file,
    running_demo,
    running_service,
)
from tests.smol import SMOKE_PHOTOS, require_smol, smoke_photos

pytestmark = pytest.mark.slow

# JPEG for the large photos (as a user would upload them), PNG for the rest.
_FORMATS = {"astronaut": "PNG", "chelsea": "JPEG", "coffee": "JPEG", "rocket": "JPEG"}


@pytest.fixture(scope="module")
def photos() -> dict[str, tuple[bytes, str]]:
    require_smol()  # scikit-image ships the photos
    out = {}
    for name, image in smoke_photos().items():
        fmt = _FORMATS.get(name, "PNG")
        out[name] = (encode(image, fmt), fmt)
    return out


@pytest.fixture(scope="module")
def smol_service(
    smol_backbone: Backbone, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    size = smol_backbone.config.image_size
    train = encode_source(smol_backbone, SyntheticCaptions("colors", "train", 32, 0, size))
    val = encode_source(smol_backbone, SyntheticCaptions("colors", "val", 8, 0, size))
    options = TrainOptions(epochs=1, batch_size=8, lr=3e-3, device="cpu", progress=False)
    result = train_adapter(ContextPEFTModel(smol_backbone), train, val, options)
    store_dir = tmp_path_factory.mktemp("smol-store") / "adapters-smol"
    write_adapter_version(AdapterStore(store_dir), "public", "colors", result.adapter)
    with running_service(
        store_dir, model=smol_backbone, backbone="smol", default_max_new_tokens=8
    ) as running:
        yield running


@pytest.fixture(scope="module")
def demo_service(
    reduced_demo: DemoBuild, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    with running_demo(reduced_demo, tmp_path_factory.mktemp("demo-smoke")) as running:
        yield running


def _caption_all(url: str, photos: dict[str, tuple[bytes, str]], adapter: str) -> dict[str, str]:
    captions = {}
    with httpx.Client(base_url=url, timeout=120) as client:
        for name, (data, fmt) in photos.items():
            mime = "image/jpeg" if fmt == "JPEG" else "image/png"
            response = client.post(
                "/caption",
                files=image_file(data, f"{name}.{fmt.lower()}", mime),
                data={"adapter": adapter},
                headers=bearer(ACME_CAPTION),  # tenant acme sees the public adapters
            )
            assert response.status_code == 200, (name, response.text)
            captions[name] = response.json()["caption"]
    return captions


def _check(captions: dict[str, str]) -> None:
    assert list(captions) == list(SMOKE_PHOTOS)
    empty = [name for name, text in captions.items() if not text.strip()]
    assert not empty, captions


def test_every_photo_is_captioned_on_smol(
    smol_service: Service, photos: dict[str, tuple[bytes, str]]
) -> None:
    _check(_caption_all(smol_service.url, photos, "colors"))


@pytest.mark.parametrize("adapter", ["colors", "count"])
def test_every_photo_is_captioned_on_demo(
    demo_service: Service, photos: dict[str, tuple[bytes, str]], adapter: str
) -> None:
    _check(_caption_all(demo_service.url, photos, adapter))


def test_smoke_photos_are_real_photographs_of_several_sizes(
    photos: dict[str, tuple[bytes, str]],
) -> None:
    sizes = {image.size for image in smoke_photos().values()}
    assert len(sizes) >= 3 and all(min(s) >= 200 for s in sizes), sizes
    assert all(len(data) > 20_000 for data, _ in photos.values())
