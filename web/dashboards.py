"""The admin dashboards in the browser: `/dashboard/k-factor`, `/dashboard/experiments` (and
`/dashboard/experiments/{key}`), `/dashboard/guardrails`, and their login page.

The pages are static shells (the frame `web/static/shell.html` around `web/static/pages/*.html`):
they carry no data. Their own JavaScript (no third-party code) asks `GET /dashboard/session` who is
signed in, then joins the `dashboard:*` topics over the
Phoenix V2 socket and renders the JSON of the join replies and of every `metrics_update` push; actions
(experiment lifecycle, unpause) go through the admin REST API. The script never sees a token: the
browser sends the session cookie with the API calls and the socket upgrade.

Signing in (issue 10's contract):

- `?token=JWT` on any dashboard URL: an admin's token gets `303` to the same URL without `token`, with
  `Set-Cookie: ve_admin=<JWT>; HttpOnly; SameSite=Strict; Path=/` (`Secure` on https), whose `Max-Age`
  is the token's remaining lifetime. A valid non-admin token gets the login page with 403, a forged or
  expired one the login page with 401: never the dashboard.
- `POST /dashboard/login` (the login form; `application/x-www-form-urlencoded` or JSON, fields `token`
  and `next`) answers the same way, redirecting to `next` (one of our own dashboard pages only).
- `POST /dashboard/logout` clears the cookie and redirects to the login page.
- A page asked for without a valid admin cookie redirects (303) to `/dashboard/login?next=<the page>`.

The cookie is checked by `web.auth.claims_from_request` (for the API) and by the socket endpoint
(`token_cookie`); both refuse cookie-authenticated requests from a foreign `Origin`, and so do the
login and logout POSTs here.

Every response here has a restrictive Content-Security-Policy (own origin only, no inline script or
style, no framing) and `nosniff`; static files are served from a fixed allow-list with their types.
"""

from __future__ import annotations

import html
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from metrics.events import EVENT_TYPES
from metrics.growth import PERIODS
from realtime import InvalidToken

from .auth import SESSION_COOKIE, claims_from_request, same_origin
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
        # Not "no-referrer": with it, browsers send `Origin: null` on the login form's POST, which the
        # Origin check refuses. "same-origin" still sends nothing to any other site.
        "referrer-policy": "same-origin",
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


# route name → (page body in static/pages/, title, the nav section it belongs to)
PAGES = {
    "kfactor": ("K-factor", "k-factor"),
    "experiments": ("Experiments", "experiments"),
    "experiment": ("Experiment", "experiments"),
    "guardrails": ("Guardrails", "guardrails"),
}


def render_page(name: str) -> bytes:
    """A dashboard page: the shared frame (static/shell.html: head, header, navigation, sign-in gate)
    around the page's own body (static/pages/NAME.html), with its title, script and current nav link."""
    title, section = PAGES[name]
    page = (STATIC / "shell.html").read_text().replace("{{title}}", title).replace("{{script}}", f"{name}.js")
    for nav in ("k-factor", "experiments", "guardrails"):
        page = page.replace("{{current:" + nav + "}}", ' aria-current="page"' if nav == section else "")
    return page.replace("{{main}}", (STATIC / "pages" / f"{name}.html").read_text()).encode()


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


REASONS = {
    "expired": "Your session has expired or was refused. Sign in again with an admin token.",
    "forbidden": "That sign-in is not an admin's. The dashboards are for admins only.",
    "signed_out": "You are signed out.",
}
DEFAULT_NEXT = "/dashboard/k-factor"
_NEXT_PATH = re.compile(r"^/dashboard(?:/[A-Za-z0-9._~%\-/]*)?$")
MAX_LOGIN_BODY = 16 * 1024


def _login_page(status: int = 200, error: str = "", next_url: str = DEFAULT_NEXT) -> Response:
    return _file(
        STATIC / "login.html",
        status,
        {
            "<!--error-->": html.escape(error),
            'data-error-status=""': f'data-error-status="{status}"',
            'value="{{next}}"': f'value="{html.escape(next_url, quote=True)}"',
        },
    )


def _without_token(path: str, query: list[tuple[str, str]]) -> str:
    kept = [(k, v) for k, v in query if k != "token"]
    return path + (f"?{urlencode(kept)}" if kept else "")


def _safe_next(value: str | None) -> str:
    """`value` if it is one of our own dashboard pages (never another site, the login or logout URL, or
    a static file), without any `token`; else the K-factor page."""
    if not value:
        return DEFAULT_NEXT
    parts = urlsplit(value)
    path = parts.path
    if (
        parts.scheme
        or parts.netloc
        or not _NEXT_PATH.match(path)
        or "//" in path
        or path.startswith(
            ("/dashboard/login", "/dashboard/logout", "/dashboard/static", "/dashboard/session")
        )
    ):
        return DEFAULT_NEXT
    return _without_token(path, parse_qsl(parts.query, keep_blank_values=True))


def _refusal(role: Any, next_url: str) -> Response:
    return _login_page(
        403,
        f"This token is a {role or 'user'}'s, and the dashboards are for admins only. "
        "Sign in with an admin token.",
        next_url,
    )


def _sign_in(request: Request, token: str, next_url: str) -> Response:
    """The answer to a sign-in with `token`: the cookie and a 303 to `next_url` for an admin, else the
    login page with 401 (invalid or expired) or 403 (not an admin)."""
    try:
        claims = request.app.state.verifier.verify(token.strip())
    except InvalidToken as exc:
        return _login_page(401, f"That token was refused: {exc}. Sign in with an admin token.", next_url)
    if claims.get("role") != "admin":
        return _refusal(claims.get("role"), next_url)
    response = RedirectResponse(next_url, status_code=303, headers=security_headers())
    max_age = max(0, int(claims["exp"]) - int(time.time()))
    response.set_cookie(
        SESSION_COOKIE,
        token.strip(),
        max_age=max_age,
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


def _to_login(next_url: str, reason: str | None = None, clear: bool = False) -> Response:
    query = {"next": next_url, **({"reason": reason} if reason else {})}
    response = RedirectResponse(
        f"/dashboard/login?{urlencode(query)}", status_code=303, headers=security_headers()
    )
    if clear:
        _clear_cookie(response)
    return response


def _clear_cookie(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")


def _cookie_claims(request: Request) -> tuple[str, dict[str, Any] | None]:
    """("admin", claims), ("none", None), ("expired", None) or ("forbidden", claims) for the cookie."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return "none", None
    try:
        claims: dict[str, Any] = request.app.state.verifier.verify(token)
    except InvalidToken:
        return "expired", None
    return ("admin" if claims.get("role") == "admin" else "forbidden"), claims


def _page(name: str) -> Any:
    body = render_page(name)  # once: the frame and the page are static files

    async def endpoint(request: Request) -> Response:
        here = _without_token(request.url.path, request.query_params.multi_items())
        token = request.query_params.get("token")
        if token is not None:
            return _sign_in(request, token, here)
        state, _ = _cookie_claims(request)
        if state != "admin":
            return _to_login(here, None if state == "none" else state, clear=state != "none")
        return Response(body, media_type=CONTENT_TYPES[".html"], headers=security_headers(cache=False))

    return endpoint


async def login(request: Request) -> Response:
    next_url = _safe_next(request.query_params.get("next"))
    token = request.query_params.get("token")
    if token is not None:
        return _sign_in(request, token, next_url)
    state, _ = _cookie_claims(request)
    if state == "admin":  # already signed in (e.g. the back button): straight on
        return RedirectResponse(next_url, status_code=303, headers=security_headers())
    reason = request.query_params.get("reason") or ""
    response = _login_page(200, REASONS.get(reason, ""), next_url)
    if state in ("expired", "forbidden"):
        _clear_cookie(response)
    return response


async def _login_fields(request: Request) -> dict[str, str]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_LOGIN_BODY:
            raise HTTPException(413, f"request body larger than {MAX_LOGIN_BODY} bytes")
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        try:
            data = orjson.loads(body or b"{}")
        except orjson.JSONDecodeError:
            data = {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


async def login_post(request: Request) -> Response:
    """The login form: `token` (and `next`) as a form or JSON; answers like `?token=` does."""
    fields = await _login_fields(request)
    next_url = _safe_next(fields.get("next") or request.query_params.get("next"))
    if not same_origin(request):
        return _login_page(403, "Sign-in refused: the form was not sent from this site.", next_url)
    token = (fields.get("token") or "").strip()
    if not token:
        return _login_page(401, "Enter a token.", next_url)
    return _sign_in(request, token, next_url)


async def logout(request: Request) -> Response:
    if not same_origin(request):
        return _login_page(403, "Sign-out refused: the request was not sent from this site.")
    response = RedirectResponse(
        "/dashboard/login?reason=signed_out", status_code=303, headers=security_headers()
    )
    _clear_cookie(response)
    return response


async def index(request: Request) -> Response:
    token = request.query_params.get("token")
    if token is not None:
        return _sign_in(request, token, DEFAULT_NEXT)
    return RedirectResponse(DEFAULT_NEXT, status_code=307, headers=security_headers())


async def static(request: Request) -> Response:
    path = _static_files().get(request.path_params["path"])
    if path is None:
        raise HTTPException(404, "no such file")
    return _file(path)


async def session(request: Request) -> Response:
    """Who is signed in (the session cookie, or a bearer token), for each page's start: 200 for an admin,
    403 with a readable reason for anyone else, 401 for a missing, forged or expired token."""
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
            # `serve --demo` marks its process: the pages then say the numbers come from simulated users.
            "demo": os.environ.get("VIRAL_ENGINE_DEMO") == "1",
        },
        headers=security_headers(),
    )


routes = [
    Route("/dashboard", index),
    Route("/dashboard/", index),
    Route("/dashboard/login", login, methods=["GET", "HEAD"]),
    Route("/dashboard/login", login_post, methods=["POST"]),
    Route("/dashboard/logout", logout, methods=["POST"]),
    Route("/dashboard/session", session),
    Route("/dashboard/k-factor", _page("kfactor")),
    Route("/dashboard/experiments", _page("experiments")),
    Route("/dashboard/experiments/{key}", _page("experiment")),
    Route("/dashboard/guardrails", _page("guardrails")),
    Route("/dashboard/static/{path:path}", static),
]
