"""What crosses the wire between the ingress and the engine replicas survives pickling with
everything the HTTP answer needs (no Ray needed)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from service.api.errors import to_api_error
from service.exceptions import (
    AdapterNotFound,
    EngineFault,
    ImageTooLarge,
    InvalidRequest,
    TenantLimit,
)
from service.images import image_decoder
from service.scaleout.messages import RemoteError, adapter_id
from service.scaleout.remote_engine import decode_once
from service.settings import Settings
from tests.e2e.conftest import noise_png


def roundtrip(exc: BaseException) -> Exception:
    return pickle.loads(pickle.dumps(RemoteError.of(exc))).exception()


def test_engine_errors_keep_their_class_message_and_retry_after() -> None:
    error = roundtrip(TenantLimit("tenant 'acme' has 32 rows in flight", retry_after_s=3.0))
    assert type(error) is TenantLimit
    api = to_api_error(error)
    assert (api.status, api.type, api.headers) == (429, "tenant_limit", {"Retry-After": "3"})
    assert api.message == "tenant 'acme' has 32 rows in flight"
    assert type(roundtrip(AdapterNotFound("no adapter"))) is AdapterNotFound


def test_image_errors_keep_their_class_message_and_param() -> None:
    """Image errors are the engine's own (below the API): they cross the wire typed, with
    the request field they name, and answer the same status."""
    error = roundtrip(ImageTooLarge("too many pixels", param="messages[0].content[1]"))
    assert type(error) is ImageTooLarge
    api = to_api_error(error)
    assert (api.status, api.type, api.message, api.param) == (
        413,
        "image_too_large",
        "too many pixels",
        "messages[0].content[1]",
    )


def test_anything_else_is_an_engine_fault_that_names_no_internals() -> None:
    error = roundtrip(KeyError("secret internals"))
    assert type(error) is EngineFault
    assert "secret" not in str(error) and "KeyError" in str(error)


def test_the_ingress_decodes_once_with_the_http_layers_limits() -> None:
    """What RemoteEngine puts in the object store for all the rows of a request: the pixels
    the HTTP layer's decoder gives, with its 413; raw bytes (no limits) are refused."""
    decoder = image_decoder(Settings(max_image_side=64), noise_png(5), param="image")
    pixels = decode_once(decoder)
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
    assert pixels.tobytes() == decoder().tobytes()
    with pytest.raises(ImageTooLarge) as too_large:
        decode_once(image_decoder(Settings(max_image_side=16), noise_png(5)))
    assert to_api_error(too_large.value).status == 413
    with pytest.raises(InvalidRequest, match="decoded image or an image decoder"):
        decode_once(noise_png(5))


def test_adapter_ids_are_tenant_qualified() -> None:
    assert adapter_id("public", "describe") == "public/describe"
    assert adapter_id("acme", "describe") != adapter_id("beta", "describe")
