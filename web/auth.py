"""Token checks for the HTTP API (the same tokens as the socket, SPEC §5).

A request is authenticated by `Authorization: Bearer <token>`, or, without that header, by the dashboards'
session cookie `ve_admin` (set by `web/dashboards.py` after an admin logs in; HttpOnly, SameSite=Strict).
The cookie path only accepts requests that cannot be forged by another site:

- SameSite=Strict keeps the browser from attaching the cookie to any request started by another site;
- and, as defence in depth against CSRF, a non-GET/HEAD/OPTIONS request authenticated by the cookie is
  refused (403) when it carries an `Origin` header that is not the request's own origin (its host[:port],
  as in the `Host` header). Browsers send `Origin` on every cross-origin request and on same-origin
  POSTs; a request without one is not a cross-site form or fetch.

The bearer header always wins when present, so API clients are unaffected by a stray cookie.

Who may act for a user (see their data, delete it, opt them out or in, record consent) is `act_for`:
the user themself where the route allows it, the parent their profile names, or an admin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.requests import Request

from realtime import InvalidToken

SESSION_COOKIE = "ve_admin"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _strip_default_port(netloc: str, scheme: str) -> str:
    default = _DEFAULT_PORTS.get(scheme)
    if default and netloc.endswith(f":{default}"):
        return netloc[: -len(default) - 1]
    return netloc


def same_origin(request: Request) -> bool:
    """False when the request carries an `Origin` naming another host[:port] than the one it was sent to
    (or the opaque `null` origin); True when it names this one or has no `Origin` at all."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    parts = urlsplit(origin.strip())
    scheme = parts.scheme.lower()
    host = request.headers.get("host", "").strip().lower()
    if not scheme or not parts.netloc or not host:
        return False
    return _strip_default_port(parts.netloc.lower(), scheme) == _strip_default_port(host, scheme)


def verify(request: Request, token: str) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = request.app.state.verifier.verify(token.strip())
    except InvalidToken as exc:
        raise HTTPException(401, str(exc)) from None
    return claims


def claims_from_request(request: Request) -> dict[str, Any]:
    """The verified claims of the request's bearer token, else of its `ve_admin` cookie (see the module
    docstring for when the cookie is accepted). 401 without a valid token, 403 for a cookie-authenticated
    state-changing request from a foreign `Origin`."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return verify(request, token)
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'")
    if request.method not in SAFE_METHODS and not same_origin(request):
        raise HTTPException(403, "cross-origin request refused: its Origin is not this site's")
    return verify(request, cookie)


def require_role(request: Request, *roles: str) -> dict[str, Any]:
    claims = claims_from_request(request)
    if claims.get("role") not in roles:
        raise HTTPException(403, f"this endpoint needs the role {' or '.join(roles)}")
    return claims


@dataclass(frozen=True, slots=True)
class Acting:
    """Who acts for a user, and as what: `as_` is "self", "parent" (the parent named in the user's
    profile) or "admin"."""

    claims: dict[str, Any]
    as_: str

    @property
    def actor(self) -> str:
        return str(self.claims["sub"])


async def act_for(request: Request, user_id: str, *, self_ok: bool) -> Acting:
    """The caller, when they may act for `user_id`: an admin, the parent the store names as the user's
    `parent_id` (with a parent's token: what a token says about families counts for nothing), or, when
    `self_ok`, the user themself. 403 for anyone else."""
    claims = claims_from_request(request)
    me = str(claims["sub"])
    if claims.get("role") == "admin":
        return Acting(claims, "admin")
    if claims.get("role") == "parent" and me != user_id:
        state = request.app.state
        async with state.database.session() as session:
            child = await state.privacy.load_one(session, user_id)
        if child.parent_id == me:
            return Acting(claims, "parent")
    if self_ok and me == user_id:
        return Acting(claims, "self")
    who = "the user themselves, their parent" if self_ok else "their parent"
    raise HTTPException(403, f"only {who} or an admin may do this")
