"""The published contract is exact: the OpenAPI document FastAPI derives from the routes'
signatures, narrowed to what this server accepts, so that a request valid under the schema is
one the server takes (schemathesis checks it: tests/e2e/test_schemathesis.py).

    install_contract(app, settings)     # app.openapi() then returns the narrowed document

FastAPI describes every optional form field as `string or null` and every body as what the
Pydantic models parse; the handlers then refuse more (a name must be a valid adapter name, a
form field cannot carry null, one adapter field at a time, max_new_tokens within the limit,
one user message with one image). What a schema can say is said here, per service (its limit,
whether it has a default adapter):

- POST /caption: `image` at least one byte; `adapter` a name, `adapters` comma-separated
  names (no null: an absent field is the default); `max_new_tokens` 1 to the limit; one of
  `adapter`/`adapters` required when the service has no default adapter, never both.
- POST /adapters/{name}/versions: both files at least one byte.
- POST /v1/files: `purpose` is `fine-tune`; the file at least one byte.
- Every optional header (X-Priority): its values, no null (an absent header is the default).
- POST /v1/chat/completions: one message, role `user`, whose content is one `image_url` part
  with a base64 `data:` URL (the server also takes empty text parts beside it, which the
  schema leaves out rather than say "exactly one image among the parts"); `n` 1; token limits
  1 to the limit, at most one of the two names.

What no schema can say stays a documented answer, not a contract failure: that the bytes are
an image (400 invalid_image, 413, 415), that the adapter files are a valid adapter (422
invalid_adapter), that a named adapter exists (404), that a training file parses and a job's
model and files exist (400, as OpenAI answers), that a usage window ends after it starts (400).
tests/e2e/schemathesis.toml lists these per operation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from service.api.fine_tuning_schemas import ACCEPTED_PURPOSE
from service.settings import Settings
from service.tenancy import NAME_PATTERN

_NAME = NAME_PATTERN.pattern.removeprefix("^").removesuffix("$")
_NAMES = f"^{_NAME}(,{_NAME})*$"
# A base64 data: URL (what the server decodes; whether the bytes are an image is its check).
_DATA_URL = (
    r"^data:image/[a-z0-9.+-]+;base64,([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
)

Schema = dict[str, Any]


def install_contract(app: FastAPI, settings: Settings) -> None:
    """Replace `app.openapi` with one that narrows FastAPI's document (built once, cached)."""
    derive: Callable[[], Schema] = app.openapi

    def openapi() -> Schema:
        if app.openapi_schema is None:
            app.openapi_schema = narrow(derive(), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def narrow(document: Schema, settings: Settings) -> Schema:
    """The document with the request bodies narrowed to what the server accepts."""
    document = copy.deepcopy(document)
    schemas: dict[str, Schema] = document["components"]["schemas"]
    limit = {"type": "integer", "minimum": 1, "maximum": settings.max_new_tokens_limit}
    caption = _body(document, schemas, "/caption")
    if caption is not None:
        props = caption["properties"]
        props["image"]["minLength"] = 1
        props["adapter"] = _only(
            props["adapter"], {"type": "string", "pattern": NAME_PATTERN.pattern}
        )
        props["adapters"] = _only(props["adapters"], {"type": "string", "pattern": _NAMES})
        props["max_new_tokens"] = _only(props["max_new_tokens"], limit)
        both = {"required": ["adapter", "adapters"]}
        if settings.default_adapter is None:
            caption["oneOf"] = [{"required": ["adapter"]}, {"required": ["adapters"]}]
        else:
            caption["not"] = both
    upload = _body(document, schemas, "/adapters/{name}/versions")
    if upload is not None:
        for field in ("config", "weights"):
            upload["properties"][field]["minLength"] = 1
    chat = _body(document, schemas, "/v1/chat/completions")
    if chat is not None:
        _narrow_chat(chat, schemas, limit)
    files = _body(document, schemas, "/v1/files")
    if files is not None:
        props = files["properties"]
        purpose = {"type": "string", "enum": [ACCEPTED_PURPOSE]}  # what the route checks
        props["purpose"] = _only(props["purpose"], purpose)
        props["file"]["minLength"] = 1
    _headers_without_null(document)
    return document


def _headers_without_null(document: Schema) -> None:
    """A header carries a string or is absent: `X or null` becomes `X` on every operation."""
    for operations in document["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                schema = parameter.get("schema", {})
                if parameter.get("in") != "header" or "anyOf" not in schema:
                    continue
                kept = [s for s in schema["anyOf"] if s.get("type") != "null"]
                if len(kept) == 1:
                    parameter["schema"] = _only(schema, kept[0])


def _body(document: Schema, schemas: dict[str, Schema], path: str) -> Schema | None:
    """The component schema of a POST body (None when the app has no such route)."""
    operation = document["paths"].get(path, {}).get("post")
    if operation is None:
        return None
    (media,) = operation["requestBody"]["content"].values()
    name = media["schema"]["$ref"].rsplit("/", 1)[-1]
    schema: Schema = schemas[name]
    return schema


def _only(prop: Schema, schema: Schema) -> Schema:
    """`schema` with the property's documentation (title, description, examples) kept."""
    kept = {k: v for k, v in prop.items() if k in ("title", "description", "examples", "default")}
    return {**schema, **kept}


def _narrow_chat(chat: Schema, schemas: dict[str, Schema], limit: Schema) -> None:
    props = chat["properties"]
    schemas["ImageURL"]["properties"]["url"]["pattern"] = _DATA_URL
    schemas["ImagePart"] = {
        "type": "object",
        "title": "ImagePart",
        "description": "The image, as a base64 data: URL.",
        "properties": {
            "type": {"type": "string", "enum": ["image_url"]},
            "image_url": {"$ref": "#/components/schemas/ImageURL"},
        },
        "required": ["type", "image_url"],
        "additionalProperties": False,
    }
    message = schemas["ChatMessage"]
    message["properties"]["role"] = _only(message["properties"]["role"], {"enum": ["user"]})
    message["properties"]["content"] = _only(
        message["properties"]["content"],
        {
            "type": "array",
            "items": {"$ref": "#/components/schemas/ImagePart"},
            "minItems": 1,
            "maxItems": 1,
        },
    )
    message["required"] = ["role", "content"]
    schemas.pop("ContentPart", None)  # the lenient shape the models parse; not promised
    props["messages"] = {**props["messages"], "minItems": 1, "maxItems": 1}
    props["n"] = _only(props["n"], {"type": "integer", "enum": [1]})
    for name in ("max_tokens", "max_completion_tokens"):
        props[name] = _only(props[name], limit)
    chat["not"] = {"required": ["max_tokens", "max_completion_tokens"]}
