"""The messages between the ingress and the engine replicas: plain dataclasses, picklable by
Ray, with no Ray import (the remote engine and its tests read them without Ray).

A caption row goes to a replica as a `RowCall`, which carries the request's image as a
`SharedImage`: a reference into Ray's object store, where the ingress put the decoded pixels
once for all the request's rows. The replica answers with a stream of events:
first `Admitted` (or `RemoteError`: the row was refused at admission), then `Token` per
generated token when the caller streams, then the `CaptionResult` (or `RemoteError`).
Errors travel as `RemoteError` rather than as raised exceptions: our exception classes take
keyword-only arguments that pickle would drop, and a typed envelope keeps the 4xx/5xx the
single-process service would give (status, type, message, Retry-After, param).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapters.config import BackboneConfig
from service import exceptions
from service.exceptions import EngineError, EngineFault


def adapter_id(tenant: str, name: str) -> str:
    """The multiplexed model id of an adapter: tenant-qualified (`acme/news`, `public/pub`),
    so two tenants' adapters of one name never share a routing key and every tenant's
    requests for one public adapter do."""
    return f"{tenant}/{name}"


@dataclass(frozen=True)
class SharedImage:
    """A request's image, decoded once by the ingress (with the service's image limits) and
    put once in Ray's object store: `ref` is the ObjectRef of its RGB pixels, a uint8 array
    [height, width, 3]. Every row of the request carries this same small reference, so the
    pixels cross to each replica (node) at most once and are never decoded again: a replica
    reads them (zero-copy on the ingress's node) after its engine admitted the row."""

    ref: Any = field(repr=False)  # ray.ObjectRef (no Ray import here)
    width: int
    height: int


@dataclass(frozen=True)
class RowCall:
    """One (request, adapter) row for a replica: it resolves `name` for `tenant` itself (the
    newest version at its admission, exactly as the single-process engine does)."""

    tenant: str
    name: str
    image: SharedImage
    max_new_tokens: int | None
    timeout_s: float | None
    request_id: str
    stream_tokens: bool = False


@dataclass(frozen=True)
class Admitted:
    """The row passed the replica's admission (tenant limit, queue, image decode)."""

    replica: str
    hit: bool  # the replica already held the adapter's weights (device slot or CPU tier)


@dataclass(frozen=True)
class Token:
    token_id: int


@dataclass(frozen=True)
class RemoteError:
    """An error of the replica, to be raised again by the ingress as the same answer."""

    kind: str  # "engine": an EngineError subclass by name; "api": an ApiError
    name: str
    message: str
    retry_after_s: float | None = None
    status: int = 500
    type: str = "internal"
    headers: dict[str, str] = field(default_factory=dict)
    param: str | None = None

    @classmethod
    def of(cls, exc: BaseException) -> RemoteError:
        from service.api.errors import ApiError  # the api layer is loaded by now

        if isinstance(exc, EngineError):
            return cls("engine", type(exc).__name__, exc.message, exc.retry_after_s)
        if isinstance(exc, ApiError):
            return cls(
                "api", "ApiError", exc.message, None, exc.status, exc.type, exc.headers, exc.param
            )
        return cls("engine", "EngineFault", f"the engine replica failed: {type(exc).__name__}")

    def exception(self) -> Exception:
        """The exception the ingress raises for this answer."""
        if self.kind == "api":
            from service.api.errors import ApiError

            return ApiError(
                self.status, self.type, self.message, headers=self.headers, param=self.param
            )
        cls: Any = getattr(exceptions, self.name, None)
        if not (isinstance(cls, type) and issubclass(cls, EngineError)):
            cls = EngineFault
        error: EngineError = cls(self.message, self.retry_after_s)
        return error


@dataclass(frozen=True)
class ReplicaInfo:
    """What the ingress learns from a replica at start-up: what its routes show about the
    backbone, and the tokenizer (streaming turns token ids into text at the ingress)."""

    config: BackboneConfig
    device: str
    tokenizer: Any = field(repr=False)


@dataclass(frozen=True)
class Resolved:
    """A replica's answer to `resolve` (tests, operations): which version it would serve
    now, or the name of the error (AdapterNotFound) it would answer."""

    replica: str
    tenant: str
    name: str
    version: int | None
    error: str | None = None
