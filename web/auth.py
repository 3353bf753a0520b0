"""Bearer-token checks for the HTTP API (the same tokens as the socket, SPEC §5)."""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request

from realtime import InvalidToken


def claims_from_request(request: Request) -> dict[str, Any]:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'")
    try:
        claims: dict[str, Any] = request.app.state.verifier.verify(token.strip())
    except InvalidToken as exc:
        raise HTTPException(401, str(exc)) from None
    return claims


def require_role(request: Request, *roles: str) -> dict[str, Any]:
    claims = claims_from_request(request)
    if claims.get("role") not in roles:
        raise HTTPException(403, f"this endpoint needs the role {' or '.join(roles)}")
    return claims
