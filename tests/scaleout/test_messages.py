"""What crosses the wire between the ingress and the engine replicas survives pickling with
everything the HTTP answer needs (no Ray needed)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from service.api.captioning import image_decoder
from service.api.engine_errors import to_api_error
from service.api.errors import ApiError
from service.exceptions import AdapterNotFound, EngineFault, InvalidRequest, TenantLimit
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


def test_api_errors_keep_status_type_param_and_headers() -> None:
    error = roundtrip(
        ApiError(413, "image_too_large", "too many pixels", headers={"X-A": "1"}, param="image")
    )
    assert isinstance(error, ApiError)
    assert (error.status, error.type, error.message, error.param, error.headers) == (
        413,
        "image_too_large",
        "too many pixels",
        "image",
        {"X-A": "1"},
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
    with pytest.raises(ApiError) as too_large:
        decode_once(image_decoder(Settings(max_image_side=16), noise_png(5)))
    assert too_large.value.status == 413
    with pytest.raises(InvalidRequest, match="decoded image or an image decoder"):
        decode_once(noise_png(5))


def test_adapter_ids_are_tenant_qualified() -> None:
    assert adapter_id("public", "describe") == "public/describe"
    assert adapter_id("acme", "describe") != adapter_id("beta", "describe")
