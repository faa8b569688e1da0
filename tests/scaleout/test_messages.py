"""What crosses the wire between the ingress and the engine replicas survives pickling with
everything the HTTP answer needs (no Ray needed)."""

from __future__ import annotations

import pickle

from service.api.errors import ApiError, to_api_error
from service.exceptions import AdapterNotFound, EngineFault, TenantLimit
from service.images import ImageDecoder, image_decoder
from service.scaleout.messages import RemoteError, adapter_id
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


def test_the_image_decoder_travels_and_decodes_the_same_image() -> None:
    decoder = image_decoder(Settings(max_image_side=64), noise_png(5), param="image")
    copy = pickle.loads(pickle.dumps(decoder))
    assert isinstance(copy, ImageDecoder) and "data" not in repr(copy)
    assert copy().tobytes() == decoder().tobytes()
    too_large = pickle.loads(pickle.dumps(image_decoder(Settings(max_image_side=16), noise_png(5))))
    try:
        too_large()
    except ApiError as exc:
        assert exc.status == 413
    else:
        raise AssertionError("a 32 px image passed a 16 px limit")


def test_adapter_ids_are_tenant_qualified() -> None:
    assert adapter_id("public", "describe") == "public/describe"
    assert adapter_id("acme", "describe") != adapter_id("beta", "describe")
