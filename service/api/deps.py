"""Request dependencies: the shared state, the caller's principal and the rights it needs.

Handlers declare `principal: CaptionPrincipal` or `ManagePrincipal`; authentication and
authorisation never happen inside handler bodies.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.engine_port import EnginePort
from service.api.errors import ApiError
from service.api.state import ServiceState
from service.auth import CAPTION, MANAGE, Principal, bearer_token
from service.scheduler import Priority


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


State = Annotated[ServiceState, Depends(get_state)]


def get_engine(state: State) -> EnginePort:
    if state.engine is None or not state.ready:
        raise ApiError(503, "unavailable", state.not_ready_reason(), headers={"Retry-After": "5"})
    return state.engine


ReadyEngine = Annotated[EnginePort, Depends(get_engine)]


# Declared as a security scheme so that /docs has an "Authorize" button and clients see
# `Authorization: Bearer <key>` on every operation; the header itself is read below, so that
# a malformed value is told apart from a missing one.
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="APIKey",
    description="An API key: `Authorization: Bearer <key>`. Not needed when the service "
    "runs without keys.",
)


def get_principal(
    state: State,
    request: Request,
    _scheme: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    authorization = request.headers.get("authorization")
    principal = state.keys.authenticate(bearer_token(authorization))
    if principal is None:
        state.metrics.reject("unauthorized")
        message = "missing API key" if authorization is None else "invalid API key"
        raise ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})
    return principal


def _requires(right: str) -> object:
    def check(state: State, principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if not principal.can(right):
            state.metrics.reject("forbidden")
            raise ApiError(403, "forbidden", f"this API key lacks the {right!r} right")
        return principal

    return check


CaptionPrincipal = Annotated[Principal, Depends(_requires(CAPTION))]


def get_priority(
    principal: CaptionPrincipal,
    x_priority: Annotated[
        Priority | None,
        Header(
            alias="X-Priority",
            description="The request's class: `interactive` (the default of most keys) runs "
            "first; `batch` fills the capacity interactive requests leave (and is refused "
            "first, 429 batch_shed, under overload). Default: the key's `priority`.",
        ),
    ] = None,
) -> Priority:
    return x_priority or principal.priority


RequestPriority = Annotated[Priority, Depends(get_priority)]
ManagePrincipal = Annotated[Principal, Depends(_requires(MANAGE))]
AnyPrincipal = Annotated[Principal, Depends(get_principal)]


def only_query(*names: str, prefix: str | None = None, repeatable: tuple[str, ...] = ()) -> Any:
    """A dependency refusing query parameters the operation does not take, and any given
    more than once unless it is a list (`repeatable`); 400 naming it: a misspelt `limit` must
    not silently list everything, and `purpose=a&purpose=b` is not a value the schema allows."""

    def check(request: Request) -> None:
        seen: set[str] = set()
        for key, _ in request.query_params.multi_items():
            if key not in names and not (prefix and key.startswith(prefix)):
                takes = ", ".join(names) if names else "none"
                raise ApiError(
                    400,
                    "invalid_request",
                    f"unknown query parameter {key!r} (this operation takes: {takes})",
                    param=key,
                )
            if key in seen and key not in repeatable:
                raise ApiError(
                    400, "invalid_request", f"query parameter {key!r} given twice", param=key
                )
            seen.add(key)

    return Depends(check)
