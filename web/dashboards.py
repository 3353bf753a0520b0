"""The admin dashboards in the browser: `/dashboard/k-factor`, `/dashboard/experiments` (and
`/dashboard/experiments/{key}`), `/dashboard/guardrails`, and their login page.

The pages are static shells (`web/static/`): they carry no data. Their own JavaScript (no third-party
code) reads an admin token from `sessionStorage`, checks it with `GET /dashboard/session`, then joins
the `dashboard:*` topics over the Phoenix V2 socket and renders the JSON of the join replies and of
every `metrics_update` push; actions (experiment lifecycle, unpause) go through the admin REST API.
Without a token a page sends the browser to the login page before it asks for anything.

`?token=JWT` on any dashboard URL logs in: an invalid token gets the login page with 401, a valid
non-admin token the login page with 403 (never the dashboard); an admin token gets the page, whose
script moves the token into `sessionStorage` and drops it from the address bar. The server keeps no
session: every API call and the socket carry the token themselves.

Every response here has a restrictive Content-Security-Policy (own origin only, no inline script or
style, no framing) and `nosniff`; static files are served from a fixed allow-list with their types.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from metrics.events import EVENT_TYPES
from metrics.growth import PERIODS
from realtime import InvalidToken

from .auth import claims_from_request
from .responses import ORJSONResponse

STATIC = Path(__file__).resolve().parent / "static"
K_TARGET = 1.2  # the program's K-factor target (README: "scale" band)
LOOPS = ("study_buddy", "buddy_challenge", "results_rally", "proud_parent", "streak_rescue")

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".ico": "image/x-icon",
    ".png": "image/png",
}

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        "object-src 'none'",
    ]
)


def security_headers(cache: bool = False) -> dict[str, str]:
    return {
        "content-security-policy": CSP,
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "x-frame-options": "DENY",
        "cross-origin-opener-policy": "same-origin",
        "permissions-policy": "camera=(), microphone=(), geolocation=()",
        "cache-control": "no-cache" if cache else "no-store",
    }


def _static_files() -> dict[str, Path]:
    """The files a browser may ask for: every file under web/static with a known type, by name."""
    return {
        p.relative_to(STATIC).as_posix(): p
        for p in STATIC.rglob("*")
        if p.is_file() and p.suffix in CONTENT_TYPES
    }


def _file(path: Path, status: int = 200, replace: dict[str, str] | None = None) -> Response:
    body = path.read_bytes()
    for key, value in (replace or {}).items():
        body = body.replace(key.encode(), value.encode())
    return Response(
        body,
        status_code=status,
        media_type=CONTENT_TYPES[path.suffix],
        headers=security_headers(cache=path.suffix != ".html"),
    )


def _login_page(status: int = 200, error: str = "") -> Response:
    return _file(
        STATIC / "login.html",
        status,
        {"<!--error-->": html.escape(error), 'data-error-status=""': f'data-error-status="{status}"'},
    )


def _page(name: str) -> Any:
    async def endpoint(request: Request) -> Response:
        token = request.query_params.get("token")
        if token is not None:
            try:
                claims = request.app.state.verifier.verify(token)
            except InvalidToken as exc:
                return _login_page(401, f"That token was refused: {exc}. Sign in with an admin token.")
            if claims.get("role") != "admin":
                return _login_page(
                    403,
                    f"This token is a {claims.get('role') or 'user'}'s, and the dashboards are for admins "
                    "only. Sign in with an admin token.",
                )
        return _file(STATIC / name)

    return endpoint


async def login(request: Request) -> Response:
    return _login_page()


async def index(request: Request) -> Response:
    return RedirectResponse("/dashboard/k-factor", status_code=307, headers=security_headers())


async def static(request: Request) -> Response:
    path = _static_files().get(request.path_params["path"])
    if path is None:
        raise HTTPException(404, "no such file")
    return _file(path)


async def session(request: Request) -> Response:
    """Who the bearer token is, for the login form and each page's start: 200 for an admin, 403 with a
    readable reason for anyone else, 401 for a missing, forged or expired token."""
    claims = claims_from_request(request)
    if claims.get("role") != "admin":
        role = claims.get("role") or "user"
        return ORJSONResponse(
            {
                "error": f"this token is a {role}'s; the dashboards are for admins only",
                "role": claims.get("role"),
            },
            status_code=403,
            headers=security_headers(),
        )
    return ORJSONResponse(
        {
            "sub": claims["sub"],
            "role": "admin",
            "exp": claims.get("exp"),
            "periods": list(PERIODS),
            "k_target": K_TARGET,
            "event_types": sorted(EVENT_TYPES),
            "loops": list(LOOPS),
        },
        headers=security_headers(),
    )


routes = [
    Route("/dashboard", index),
    Route("/dashboard/", index),
    Route("/dashboard/login", login),
    Route("/dashboard/session", session),
    Route("/dashboard/k-factor", _page("kfactor.html")),
    Route("/dashboard/experiments", _page("experiments.html")),
    Route("/dashboard/experiments/{key}", _page("experiment.html")),
    Route("/dashboard/guardrails", _page("guardrails.html")),
    Route("/dashboard/static/{path:path}", static),
]
