"""`RemoteEngine`: the engine port (`service.api.engine_port.EnginePort`) of the Ray Serve
ingress. The FastAPI app is the single-process one, unchanged; only its engine differs: each
caption row goes to an engine replica, routed by the tenant-qualified adapter id.

    engine = RemoteEngine(replicas, info, EngineConfig.from_settings(settings), store)
    submission = await engine.submit(CaptionRequest(decoder, ("news", "sports"), "acme"))
    results = await submission.results()     # one CaptionResult per adapter, in order

A request that names K adapters is K rows, each sent on its own to
`replicas.options(multiplexed_model_id="<owner>/<name>", stream=True).caption.remote(row)`:
Ray Serve routes it to a replica that already holds that adapter when one does (model
multiplexing), and the K answers are put back together in the order of the names. The owner
(the tenant's own adapter, else the public one) is looked up in the shared store here, so all
tenants' requests for one public adapter share its replicas. Each replica resolves the
version again at its own admission, exactly as the single-process engine does: what it serves
is the newest version on disk at that moment.

Admission keeps the single-process contract: names, max_new_tokens and the tenant's rows in
flight (`tenant_max_inflight`, 429) are checked here, for the whole service; then the image is
decoded, once, here (its 400/413/415 raise from `submit`), and its pixels are put in Ray's
object store once (`SharedImage`): the K rows carry one reference, so the image crosses to a
replica's node at most once and no replica decodes it again, as one process decodes once for
K adapters. Each replica then applies its own queue bound (503 queue_full) and reads the
pixels after its admission. The first event of every row is its replica's admission answer,
so admission errors (404, 422, 429, 503) still raise from `submit`, before a stream sends its
first byte. (One difference from one process: a request refused by a full replica queue was
decoded first; the replicas' queues are checked only once a row reaches them.)

Faults: a replica that dies (its process killed, its node gone) fails the rows it held with
503 `engine_fault` (Ray restarts it; the rows of other replicas are untouched); every wait is
bounded by the request's deadline (504), so no request hangs on a lost replica. A request
whose client leaves cancels its rows' Ray calls, which cancels them in the replicas' engines.

Listing, describe, upload and delete go to one replica (they need the backbone to validate an
upload); an upload is routed with the adapter's id, so the replica that validated it (and holds
it on its CPU tier) is the one that serves it first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from adapters.config import BackboneConfig
from adapters.data.samples import SceneSamples, samples_for
from adapters.format import AdapterFormatError
from service.admission import Admission
from service.engine.answers import gather_answers
from service.engine.engine import check_request
from service.engine.types import CaptionRequest, CaptionResult
from service.events import EngineEvents
from service.exceptions import (
    AdapterNotFound,
    DeadlineExceeded,
    EngineError,
    EngineFault,
    InvalidRequest,
    QueueFull,
)
from service.metrics import ServiceMetrics
from service.scaleout.messages import (
    Admitted,
    RemoteError,
    ReplicaInfo,
    RowCall,
    SharedImage,
    Token,
    adapter_id,
)
from service.settings import EngineConfig
from service.store import AdapterRef, AdapterStore, QuotaExceeded, StoreQuota
from service.tenancy import InvalidId, TenantPolicies, check_name, owners

# A row's answer may arrive this long after its deadline (the replica's own 504 travels back).
DEADLINE_GRACE_S = 5.0
# Listing, describe, upload and delete: the longest wait for the replica that does it.
MANAGE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class BackboneView:
    """What the routes show about the replicas' backbone (`/info`, build info)."""

    config: BackboneConfig
    device: str


class TokenDecoder:
    """Token ids to text with the replicas' tokenizer (as `ContextPEFTModel.decode`)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))


def replica_lost(exc: BaseException) -> EngineError:
    """The engine error for a Ray failure of one row: its replica died or was unreachable, or
    Ray refused the call (the router's queue bound)."""
    name = type(exc).__name__
    if name == "BackPressureError":
        return QueueFull("every engine replica is busy (max_queued_requests)", retry_after_s=1.0)
    return EngineFault(
        f"the engine replica serving this request stopped ({name}); Ray restarts it, retry",
        retry_after_s=1.0,
    )


def _raise_remote(value: Any) -> Any:
    if isinstance(value, RemoteError):
        if value.kind == "format":
            raise AdapterFormatError(value.message)
        if value.kind == "quota":
            raise QuotaExceeded(value.message)
        raise value.exception()
    return value


class RemoteRegistry:
    """The registry port over the replicas: the store is read here (the same folder every
    replica reads), listing and management run in a replica (blocking calls: the routes call
    them from a thread, never from the event loop)."""

    def __init__(self, replicas: Any, store: AdapterStore) -> None:
        self._replicas = replicas
        self.store = store

    def owner(self, tenant: str, name: str) -> str:
        """Whose adapter `name` is for `tenant`: its own, else the public one (the routing
        key's tenant). Raises AdapterNotFound."""
        try:
            check_name(name)
            for owner in owners(tenant):
                if self.store.versions(owner, name):
                    return owner
        except InvalidId as exc:
            raise AdapterNotFound(f"no adapter {name!r}: {exc}") from None
        raise AdapterNotFound(f"no adapter named {name!r} for tenant {tenant!r} (own or public)")

    def _call(self, method: str, *args: Any, model_id: str | None = None) -> Any:
        handle = (
            self._replicas
            if model_id is None
            else self._replicas.options(multiplexed_model_id=model_id)
        )
        try:
            value = getattr(handle, method).remote(*args).result(timeout_s=MANAGE_TIMEOUT_S)
        except Exception as exc:
            raise replica_lost(exc) from None
        return _raise_remote(value)

    def list_adapters(self, tenant: str) -> list[Any]:
        return list(self._call("list_adapters", tenant))

    def describe(self, tenant: str, name: str) -> Any:
        return self._call("describe", tenant, name)

    def add_version(
        self,
        tenant: str,
        name: str,
        config_bytes: bytes,
        weights_bytes: bytes,
        quota: StoreQuota | None = None,
    ) -> AdapterRef:
        ref: AdapterRef = self._call(
            "add_version",
            tenant,
            name,
            config_bytes,
            weights_bytes,
            quota,
            model_id=adapter_id(tenant, name),
        )
        return ref

    def delete(self, tenant: str, name: str) -> int:
        removed: int = self._call("delete", tenant, name)
        return removed


class RemoteSubmission:
    """An admitted request: one Ray stream per adapter, each past its replica's admission."""

    def __init__(
        self,
        admission: Admission,
        request: CaptionRequest,
        streams: list[Any],
        deadline: float,
        timeout_s: float,
    ) -> None:
        self._admission = admission
        self._request = request
        self._streams = streams
        self._deadline = deadline
        self._timeout_s = timeout_s
        self._released = False
        self.refs: tuple[AdapterRef, ...] = ()

    async def results(self) -> list[CaptionResult]:
        """The results in the order of the names, or the first error among them (its
        siblings' Ray calls are cancelled at once); the answers of a row may come back up to
        DEADLINE_GRACE_S after the deadline (the replica's own 504 travels back)."""
        rows = [asyncio.ensure_future(self._row(i, s)) for i, s in enumerate(self._streams)]
        try:
            results = await gather_answers(rows, self._deadline + DEADLINE_GRACE_S, self._timeout_s)
            self._admission.charge(self._request.tenant, sum(r.tokens for r in results))
            return results
        finally:
            for row in rows:
                if not row.done():
                    row.cancel()  # its siblings stop at once (their Ray calls are cancelled)
            self.cancel()

    async def _row(self, index: int, stream: Any) -> CaptionResult:
        on_token = self._request.on_token
        try:
            async for event in _events(stream):
                if isinstance(event, Token):
                    if on_token is not None:
                        on_token(index, event.token_id)
                elif isinstance(event, CaptionResult):
                    return event
                else:
                    _raise_remote(event)
        except (EngineError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise replica_lost(exc) from None
        raise EngineFault("the engine replica ended this row without an answer", retry_after_s=1.0)

    def cancel(self) -> None:
        """Cancel the rows' Ray calls (the replicas cancel them in their engines) and give
        the tenant's rows back. Idempotent."""
        if self._released:
            return
        self._released = True
        for stream in self._streams:
            stream.cancel()
        self._admission.finished(self._request.tenant, len(self._request.adapters))


async def _events(stream: Any) -> AsyncIterator[Any]:
    async for event in stream:
        yield event


def decode_once(image: Image.Image | Callable[[], Image.Image]) -> np.ndarray:
    """The request's image as RGB pixels [height, width, 3]: the decoder is called (its typed
    400/413/415 errors pass through unchanged); a decoded image is taken as it is."""
    if not callable(image) and not isinstance(image, Image.Image):
        # Only the decoder applies the service's image limits: raw bytes would bypass them.
        raise InvalidRequest("the Ray path takes a decoded image or an image decoder")
    decoded = image() if callable(image) else image
    return np.asarray(decoded if decoded.mode == "RGB" else decoded.convert("RGB"))


class RemoteEngine:
    """The HTTP app's engine at the Ray Serve ingress (see the module docstring). `put` puts
    a value in Ray's object store and returns its ObjectRef (`ray.put`, passed in by the
    ingress: this module does not import Ray)."""

    def __init__(
        self,
        replicas: Any,
        info: ReplicaInfo,
        config: EngineConfig,
        store: AdapterStore,
        metrics: ServiceMetrics | None = None,
        affinity: bool = True,
        *,
        put: Callable[[Any], Any],
        tenants: TenantPolicies | None = None,
    ) -> None:
        self.config = config
        self._put = put
        self.registry = RemoteRegistry(replicas, store)
        self.backbone = BackboneView(info.config, info.device)
        self.model = TokenDecoder(info.tokenizer)
        self.affinity = affinity
        self._replicas = replicas
        self.events = EngineEvents(metrics)
        # The tenant limit and the drain, counted for the whole service here; each replica
        # bounds its own queue.
        self._admission = Admission(config.tenant_max_inflight, events=self.events, tenants=tenants)
        self._closed = False
        self.stopped: str | None = None

    # --- lifecycle (the port) ---------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return not self._closed and not self._admission.draining

    @property
    def alive(self) -> bool:
        return True  # replicas are supervised by Ray (check_health); the ingress has no worker

    @property
    def inflight(self) -> int:
        return self._admission.inflight

    def begin_drain(self) -> None:
        self._admission.drain()

    def drain(self, timeout_s: float) -> bool:
        self.begin_drain()
        return self._admission.wait_idle(timeout_s)

    def close(self) -> None:
        self._closed = True
        self.begin_drain()

    # --- sample pictures (the port's `samples`, for GET /samples/random) ---------------
    @property
    def samples(self) -> SceneSamples | None:
        """The demo backbone's synthetic scenes at its image size; None on another backbone."""
        return samples_for(self.backbone.config)

    # --- captioning ---------------------------------------------------------------------
    async def submit(self, request: CaptionRequest) -> RemoteSubmission:
        """Admit a request: check it, reserve the tenant's rows, send one row per adapter and
        wait for every replica's admission. Raises the first admission error in the order of
        the names (the other rows are cancelled)."""
        max_new, timeout = check_request(request, self.config)
        deadline = time.monotonic() + timeout
        owners = await asyncio.to_thread(
            lambda: [self.registry.owner(request.tenant, n) for n in request.adapters]
        )
        self._admission.admit(request.tenant, len(request.adapters), request.priority)
        self._admission.dequeued(len(request.adapters))  # no queue here: the replicas' own
        streams: list[Any] = []
        submission = RemoteSubmission(self._admission, request, streams, deadline, timeout)
        # Which adapters the request resolved to, as far as the ingress knows (the owner; the
        # version is the replica's to choose): what the metrics may label.
        submission.refs = tuple(
            AdapterRef(owner, name, 0) for owner, name in zip(owners, request.adapters, strict=True)
        )
        try:
            # After admission, as in one process: a refused request never decodes its image.
            image = await asyncio.to_thread(self._share, request.image)
            self.events.image("decoded")
            self.events.image("shared")
            for owner, name in zip(owners, request.adapters, strict=True):
                call = RowCall(
                    request.tenant,
                    name,
                    image,
                    max_new,
                    timeout,
                    request.request_id,
                    stream_tokens=request.on_token is not None,
                    priority=request.priority,
                )
                options: dict[str, Any] = {"stream": True}
                if self.affinity:
                    options["multiplexed_model_id"] = adapter_id(owner, name)
                streams.append(self._replicas.options(**options).caption.remote(call))
            left = deadline + DEADLINE_GRACE_S - time.monotonic()
            firsts = await asyncio.wait_for(
                asyncio.gather(*(_first(s) for s in streams), return_exceptions=True),
                timeout=max(0.0, left),
            )
            for first in firsts:  # in the order of the names
                if isinstance(first, BaseException):
                    raise first
                _raise_remote(first)
        except TimeoutError:
            submission.cancel()
            raise DeadlineExceeded(
                f"no replica admitted the request within {timeout:g} s"
            ) from None
        except BaseException:
            submission.cancel()
            raise
        return submission

    def _share(self, image: Image.Image | Callable[[], Image.Image]) -> SharedImage:
        """Decode the request's image and put its pixels in the object store, once each (a
        worker thread: decoding takes the process-wide decode gate of the HTTP layer)."""
        pixels = decode_once(image)
        return SharedImage(self._put(pixels), pixels.shape[1], pixels.shape[0])


async def _first(stream: Any) -> Admitted | RemoteError:
    """The first event of a row: its replica's admission answer."""
    try:
        event = await stream.__anext__()
    except StopAsyncIteration:
        return RemoteError.of(EngineFault("the engine replica ended the row before admitting it"))
    except (EngineError, asyncio.CancelledError):
        raise
    except Exception as exc:
        return RemoteError.of(replica_lost(exc))
    if isinstance(event, Admitted | RemoteError):
        return event
    return RemoteError.of(EngineFault(f"unexpected first event {type(event).__name__}"))
