"""Request dependencies: the shared state, the caller's principal and the rights it needs.

Handlers declare `principal: CaptionPrincipal` or `ManagePrincipal`; authentication and
authorisation never happen inside handler bodies.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.engine_port import EnginePort
from service.api.errors import ApiError
from service.api.state import ServiceState
from service.auth import CAPTION, MANAGE, Principal, bearer_token


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
ManagePrincipal = Annotated[Principal, Depends(_requires(MANAGE))]
AnyPrincipal = Annotated[Principal, Depends(get_principal)]
