"""Auth abuse, over a real server: forged, expired, `alg: none`, wrong-key and wrong-role tokens on every
HTTP route of the app and on the socket upgrade; joins to other users' and admin topics.

The routes are read from the Starlette app itself (`create_app().routes`), so a route added later is
tested here at once, and fails until it is given an access rule below. Every refusal is a 401 or 403
with a JSON `{"error": ...}` and nothing else: never data, never a 5xx, and the database unchanged.
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest
import websockets
from servers import PhxClient, ServerProcess, make_token
from websockets.exceptions import InvalidStatus

from channels import build_router

from .http_kit import (
    ADMIN,
    QUIET,
    app_routes,
    app_schema,
    bearer,
    fill,
    fingerprint,
    forged_tokens,
)

# Public on purpose, and why. Everything else needs a token (or, for the pages, the admin cookie).
PUBLIC = {
    ("GET", "/healthz"): "liveness probe for load balancers; answers {status: ok} and nothing else",
    ("GET", "/readyz"): "readiness probe; names the dependency that is down, holds no user data",
    ("GET", "/metrics"): "Prometheus scrape: process-wide counters only (keep it on a private network)",
    ("GET", "/openapi.json"): "the API's description; no data",
    (
        "GET",
        "/r/{token}",
    ): "invite links are followed by people without an account: the signed token is the credential",
    (
        "GET",
        "/socket/websocket",
    ): "tells a plain-HTTP caller how to connect; the upgrade itself checks the token",
    ("GET", "/dashboard/login"): "the login page",
    ("POST", "/dashboard/login"): "signing in is how a browser gets its session cookie",
    ("POST", "/dashboard/logout"): "only clears the caller's own cookie (same-origin checked)",
    ("GET", "/dashboard/static/{path:path}"): "the dashboards' own scripts and styles: a fixed list of files",
    ("GET", "/dashboard"): "redirects to a dashboard page (which checks the cookie)",
    ("GET", "/dashboard/"): "redirects to a dashboard page (which checks the cookie)",
}
# Static HTML shells that carry no data: without an admin session they redirect to the login page.
PAGES = {
    ("GET", "/dashboard/k-factor"),
    ("GET", "/dashboard/experiments"),
    ("GET", "/dashboard/experiments/{key}"),
    ("GET", "/dashboard/guardrails"),
}
# Open to every signed-in user; the value says how a wrong caller is refused (None: the route only
# ever acts as the caller, so there is no one else to be).
STUDENT = make_token("alice", "student")
ANY_USER: dict[tuple[str, str], tuple[str, dict[str, Any], Any, int, str] | None] = {
    # (token, path values, JSON body or query, status, what the error says)
    ("POST", "/api/events"): (
        STUDENT,
        {},
        {"type": "signup", "user_id": "bob", "props": {}},
        422,
        "may only be your own user id",
    ),
    ("GET", "/api/feeds/{feed:path}"): (STUDENT, {"feed": "user:bob"}, None, 403, "only for that user"),
    ("POST", "/api/links"): None,
    ("POST", "/api/loops/{action}"): None,
    ("GET", "/api/experiments/{key}/assignment"): (
        STUDENT,
        {"key": "exp1"},
        {"user_id": "bob"},
        403,
        "your own assignment",
    ),
    ("GET", "/api/users/{user_id}/export"): (
        STUDENT,
        {"user_id": "bob"},
        None,
        403,
        "themselves, their parent or an admin",
    ),
    ("DELETE", "/api/users/{user_id}"): (
        make_token("carol", "parent"),  # a parent only of a child whose profile names them
        {"user_id": "bob"},
        None,
        403,
        "their parent or an admin",
    ),
    ("POST", "/api/users/{user_id}/consent"): (
        make_token("carol", "parent"),
        {"user_id": "bob"},
        {"method": "signed_form"},
        403,
        "their parent or an admin",
    ),
    ("DELETE", "/api/users/{user_id}/consent"): (
        make_token("bob", "student"),  # consent is a parent's or an admin's act, not the child's
        {"user_id": "bob"},
        None,
        403,
        "their parent or an admin",
    ),
    ("POST", "/api/users/{user_id}/opt-out"): (
        STUDENT,
        {"user_id": "bob"},
        None,
        403,
        "their parent or an admin",
    ),
    ("POST", "/api/users/{user_id}/opt-in"): (
        STUDENT,
        {"user_id": "bob"},
        None,
        403,
        "their parent or an admin",
    ),
}
# Every other route is for admins.
WRONG_ROLES = {
    "student": make_token("alice", "student"),
    "parent": make_token("carol", "parent"),
    "tutor": make_token("tess", "tutor"),
    "no role claim": make_token("nobody", None),  # type: ignore[arg-type]
    "role 'Admin'": make_token("mallory", "Admin"),
    "role ['admin']": make_token("mallory", ["admin"]),  # type: ignore[arg-type]
}
SAMPLE = {
    "user_id": "bob",
    "key": "exp1",
    "feed": "global",
    "token": "not-a-link",
    "path": "common.js",
}
ACTIONS = {"/api/loops/{action}": "challenge", "/api/experiments/{key}/{action}": "start"}

ROUTES = sorted(app_routes())


def kind(route: tuple[str, str]) -> str:
    if route in PUBLIC:
        return "public"
    if route in PAGES:
        return "page"
    if route in ANY_USER:
        return "user"
    return "admin"


def url(route: tuple[str, str], **values: str) -> str:
    _, path = route
    return fill(path, {**SAMPLE, "action": ACTIONS.get(path, ""), **values})


def call(
    http: httpx.Client,
    route: tuple[str, str],
    *,
    token: str | None = None,
    cookie: str | None = None,
    values: dict[str, str] | None = None,
    data: Any = None,
) -> httpx.Response:
    method, _ = route
    headers = bearer(token) if token is not None else {}
    if cookie is not None:
        headers["cookie"] = f"ve_admin={cookie}"
    params, body = (data, None) if method == "GET" else (None, data if data is not None else {})
    return http.request(method, url(route, **(values or {})), headers=headers, params=params, json=body)


def refused(response: httpx.Response, statuses: tuple[int, ...] = (401, 403)) -> str | None:
    """Why `response` is not a clean refusal (one of `statuses`, JSON `{"error"}` and nothing else)."""
    if response.status_code not in statuses:
        return f"status {response.status_code}: {response.text[:200]}"
    if not response.headers.get("content-type", "").startswith("application/json"):
        return f"content-type {response.headers.get('content-type')}"
    body = response.json()
    if not isinstance(body.get("error"), str) or set(body) - {"error", "role"}:
        return f"body carries more than an error: {body}"
    if "set-cookie" in response.headers and "ve_admin=" in response.headers["set-cookie"]:
        if 've_admin=""' not in response.headers["set-cookie"]:
            return "a refusal set a session cookie"
    return None


@pytest.fixture(scope="module")
def http(api: ServerProcess) -> Any:
    with httpx.Client(base_url=api.http, timeout=30, follow_redirects=False) as client:
        yield client


def test_every_route_has_an_access_rule() -> None:
    """A route added to the app without a rule here fails this test (and the ones below)."""
    known = set(PUBLIC) | PAGES | set(ANY_USER)
    assert not known - set(ROUTES), f"rules for routes the app no longer has: {sorted(known - set(ROUTES))}"
    admin = [r for r in ROUTES if kind(r) == "admin"]
    # Everything left over is admin-only; the schema must say so too, so a new public or user route
    # cannot slip in here as "admin" without its tests failing below.
    schema = app_schema()["paths"]
    for method, path in ROUTES:
        op = schema[path.replace("{feed:path}", "{feed}").replace("{path:path}", "{path}")][method.lower()]
        if (method, path) in PUBLIC or (method, path) in PAGES:
            assert op.get("security") == [], f"{method} {path} is public here but not in the schema"
        else:
            assert op.get("security") != [], f"{method} {path} needs a token here but is public in the schema"
        if (method, path) in admin:
            assert op.get("x-roles") == "admin", f"{method} {path}: the schema says {op.get('x-roles')!r}"
    assert len(admin) >= 20


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r[0]} {r[1]}")
def test_without_a_token_a_route_refuses_or_is_public_on_purpose(http: httpx.Client, route) -> None:
    response = call(http, route)
    assert response.status_code < 500, response.text
    match kind(route):
        case "public":
            # 401 only from the login form posted without a token (it shows the form again).
            assert response.status_code in (200, 302, 303, 307, 400, 401, 404), response.text
        case "page":
            assert response.status_code == 303
            assert response.headers["location"].startswith("/dashboard/login?next=")
            assert "<" not in response.text  # a redirect, not the page
        case _:
            assert refused(response, (401,)) is None, refused(response, (401,))
            assert "bearer" in response.json()["error"].lower()


@pytest.mark.parametrize(
    "route", [r for r in ROUTES if kind(r) not in ("public",)], ids=lambda r: f"{r[0]} {r[1]}"
)
def test_forged_tokens_are_refused_on_every_route(http: httpx.Client, route) -> None:
    problems = []
    for name, (token, reason) in forged_tokens().items():
        if kind(route) == "page":
            # The pages take their session from the cookie: a forged one is cleared, never honoured.
            response = call(http, route, cookie=token)
            if response.status_code != 303 or "reason=expired" not in response.headers.get("location", ""):
                problems.append(f"{name} (cookie): {response.status_code} {response.headers.get('location')}")
            continue
        for how in ("bearer", "cookie"):
            response = call(http, route, **{"token" if how == "bearer" else "cookie": token})
            why = refused(response, (401,))
            if why is None and reason.lower() not in response.json()["error"].lower():
                why = f"the error says {response.json()['error']!r}, not {reason!r}"
            if why:
                problems.append(f"{name} ({how}): {why}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("route", [r for r in ROUTES if kind(r) == "admin"], ids=lambda r: f"{r[0]} {r[1]}")
def test_admin_routes_refuse_every_other_role(http: httpx.Client, route) -> None:
    problems = []
    for name, token in WRONG_ROLES.items():
        response = call(http, route, token=token)
        why = refused(response, (403,))
        if why is None and "admin" not in response.json()["error"]:
            why = f"unclear error {response.json()['error']!r}"
        if why:
            problems.append(f"{name}: {why}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "route", [r for r in ROUTES if kind(r) == "user" and ANY_USER[r]], ids=lambda r: f"{r[0]} {r[1]}"
)
def test_user_routes_refuse_the_wrong_user(http: httpx.Client, route) -> None:
    token, values, data, status, says = ANY_USER[route]  # type: ignore[misc]
    response = call(http, route, token=token, values=values, data=data)
    if status == 422:  # the event names its subject: refused with the per-field contract
        assert response.status_code == 422, response.text
        assert says in response.text
        assert "accepted" not in response.json()
    else:
        assert refused(response, (status,)) is None, refused(response, (status,))
        assert says in response.json()["error"]


def test_a_non_admin_on_a_dashboard_page_gets_the_login_page_not_the_dashboard(http: httpx.Client) -> None:
    for route in sorted(PAGES):
        with_cookie = call(http, route, cookie=make_token("alice", "student"))
        assert with_cookie.status_code == 303 and "reason=forbidden" in with_cookie.headers["location"]
        with_query = http.get(url(route), params={"token": make_token("alice", "student")})
        assert with_query.status_code == 403 and "admins only" in with_query.text
        assert "set-cookie" not in with_query.headers


async def test_refused_requests_change_nothing(api: ServerProcess, module_db: str) -> None:
    """Every state-changing route, called without a token, with each forgery and with each wrong role,
    leaves every table as it was."""
    before = await fingerprint(module_db)
    writes = [r for r in ROUTES if r[0] != "GET" and kind(r) not in ("public",)]
    tries = 0
    async with httpx.AsyncClient(base_url=api.http, timeout=30) as client:
        for route in writes:
            method, _ = route
            tokens = [None, *(t for t, _ in forged_tokens().values())]
            if kind(route) == "admin":
                tokens += list(WRONG_ROLES.values())
            for token in tokens:
                headers = bearer(token) if token else {}
                response = await client.request(method, url(route), headers=headers, json={})
                assert response.status_code in (401, 403), (route, response.text)
                tries += 1
            spec = ANY_USER.get(route)
            if spec is not None:
                token, values, data, status, _ = spec
                response = await client.request(
                    method, url(route, **values), headers=bearer(token), json=data
                )
                assert response.status_code == status, (route, response.text)
                tries += 1
    assert tries >= 250
    assert await fingerprint(module_db) == before


# The socket.


def _subprotocol(token: str) -> list[str]:
    encoded = base64.b64encode(token.encode()).decode().rstrip("=")
    return ["phoenix", f"base64url.bearer.phx.{encoded}"]


async def test_forged_tokens_get_403_with_a_json_reason_before_the_upgrade(server: ServerProcess) -> None:
    """In the query string, in phoenix.js's sub-protocol and in the dashboards' cookie alike."""
    tried = 0
    for transport in ("query", "subprotocol", "cookie"):
        for name, (token, reason) in forged_tokens().items():
            kwargs: dict[str, Any] = {}
            target = server.ws_url(token if transport == "query" else None)
            if transport == "subprotocol":
                kwargs["subprotocols"] = _subprotocol(token)
            elif transport == "cookie":
                kwargs["additional_headers"] = {"cookie": f"ve_admin={token}"}
            with pytest.raises(InvalidStatus) as info:
                async with websockets.connect(target, **kwargs):
                    pass
            response = info.value.response
            assert response.status_code == 403, (transport, name)
            assert response.headers.get("content-type") == "application/json", (transport, name)
            body = response.body.decode()
            assert reason.lower() in body.lower() and body.startswith('{"error":'), (transport, name, body)
            tried += 1
    assert tried == 3 * len(forged_tokens())
    # The server is unharmed: a good token still gets a socket.
    client = await PhxClient.connect(server.ws_url(make_token("alice")))
    try:
        assert (await client.join("user:alice"))["status"] == "ok"
    finally:
        await client.close()


def _admin_topics() -> list[str]:
    """Every dashboard topic the router serves (a new one is covered without editing this test)."""
    router = build_router()
    exact = [t for t in router._exact if t.startswith("dashboard:")]
    prefixes = [p + "exp1" for p, _ in router._prefixes if p.startswith("dashboard:")]
    return sorted(exact + prefixes)


async def test_other_users_topics_and_admin_topics_refuse_the_join_and_the_socket_stays_up(
    server: ServerProcess,
) -> None:
    topics = ["user:bob", "feed:user:bob", *_admin_topics()]
    assert {"dashboard:k_factor", "dashboard:experiments", "dashboard:guardrails"} <= set(topics)
    for role in ("student", "parent", "tutor"):
        await _refused_joins(server, role, topics)


async def _refused_joins(server: ServerProcess, role: str, topics: list[str]) -> None:
    client = await PhxClient.connect(server.ws_url(make_token("alice", role)))
    try:
        for topic in topics:
            reply = await client.join(topic)
            assert reply == {"status": "error", "response": {"reason": "unauthorized"}}, (topic, reply)
        # Still connected and serving: a heartbeat, and a join the user is entitled to.
        assert (await client.request("phoenix", "heartbeat", {}))["status"] == "ok"
        assert (await client.join("user:alice"))["status"] == "ok"
        # Nothing pushed to the refused topics reaches this socket.
        async with httpx.AsyncClient(base_url=server.http, headers=bearer(ADMIN)) as http:
            for topic, event in (("user:bob", "nudge"), ("user:alice", "marker")):
                sent = await http.post("/api/publish", json={"topic": topic, "event": event, "payload": {}})
                assert sent.status_code == 202
        await client.wait_for(lambda f: f[3] == "marker", timeout=10)
        assert not [f for f in client.frames if f[2] in topics and f[3] not in ("phx_reply",)]
    finally:
        await client.close()


async def test_an_admin_token_joins_the_admin_topics(server_factory) -> None:
    """The refusals above are about the role: the same joins work for an admin (so they can fail)."""
    server = server_factory(env=QUIET)
    client = await PhxClient.connect(server.ws_url(ADMIN))
    try:
        for topic in ["user:bob", "feed:user:bob", "dashboard:k_factor", "dashboard:guardrails"]:
            assert (await client.join(topic))["status"] == "ok", topic
    finally:
        await client.close()
