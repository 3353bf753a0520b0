"""The dashboards' sign-in over plain HTTP (issue 10's contract), against the real app on a real port:
`?token=` → 303 to the clean URL with an HttpOnly, SameSite=Strict `ve_admin` cookie; non-admins get
403 and forged tokens 401 (the login page, never data); the login form and logout; the cookie alone
authenticates the API and the socket, but not from a foreign `Origin`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from loop_kit import LoopWorld, loop_world
from servers import PhxClient, make_token

pytestmark = pytest.mark.timeout(60)

EVIL = "https://evil.example"


@contextlib.asynccontextmanager
async def client(world: LoopWorld, cookie: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """A fresh client (its own cookie jar), not following redirects, optionally with the session cookie."""
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{world.port}", timeout=10, follow_redirects=False
    ) as http:
        if cookie is not None:
            http.cookies.set("ve_admin", cookie)
        yield http


def set_cookie(response: httpx.Response) -> dict[str, Any]:
    """The `ve_admin` Set-Cookie of a response: its value and attributes (names lower-cased)."""
    headers = [h for h in response.headers.get_list("set-cookie") if h.startswith("ve_admin=")]
    assert len(headers) == 1, response.headers
    first, *attrs = [part.strip() for part in headers[0].split(";")]
    out: dict[str, Any] = {"value": first.partition("=")[2].strip('"')}
    for attr in attrs:
        name, _, value = attr.partition("=")
        out[name.lower()] = value if value else True
    return out


def login_page(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert 'id="login-form"' in response.text and "data-metric" not in response.text
    for header in response.headers.get_list("set-cookie"):  # a refusal never signs anyone in
        assert not header.startswith("ve_admin=") or header.startswith(("ve_admin=;", 've_admin="";'))


async def test_token_in_the_url_sets_the_cookie_and_redirects_to_the_clean_url(server_database):
    async with loop_world(server_database) as world, client(world) as http:
        admin = make_token("ops", "admin")
        response = await http.get(f"/dashboard/k-factor?days=30&token={admin}")
        assert response.status_code == 303
        assert response.headers["location"] == "/dashboard/k-factor?days=30"
        assert response.headers["cache-control"] == "no-store"
        cookie = set_cookie(response)
        assert cookie["value"] == admin
        assert cookie["httponly"] is True and cookie["samesite"].lower() == "strict"
        assert cookie["path"] == "/" and "secure" not in cookie  # plain http here
        assert 3590 <= int(cookie["max-age"]) <= 3600

        # The cookie lives as long as the token does; on https (here via the local proxy's header) Secure.
        short = make_token("ops", "admin", ttl=120)
        response = await http.get(
            f"/dashboard/guardrails?token={short}", headers={"x-forwarded-proto": "https"}
        )
        assert response.status_code == 303 and response.headers["location"] == "/dashboard/guardrails"
        cookie = set_cookie(response)
        assert cookie["secure"] is True and 110 <= int(cookie["max-age"]) <= 120

        # Any dashboard URL: the experiment page, and /dashboard itself.
        response = await http.get(f"/dashboard/experiments/exp-1?token={admin}")
        assert (response.status_code, response.headers["location"]) == (303, "/dashboard/experiments/exp-1")
        response = await http.get(f"/dashboard?token={admin}")
        assert (response.status_code, response.headers["location"]) == (303, "/dashboard/k-factor")

    # With the cookie, the page and the session.
    async with loop_world(server_database) as world, client(world, admin) as http:
        page = await http.get("/dashboard/k-factor")
        assert page.status_code == 200 and 'id="main"' in page.text
        session = await http.get("/dashboard/session")
        assert session.status_code == 200 and session.json()["sub"] == "ops"
        # Signed in already: the login page sends the admin straight on.
        again = await http.get("/dashboard/login?next=/dashboard/guardrails")
        assert (again.status_code, again.headers["location"]) == (303, "/dashboard/guardrails")


async def test_non_admin_and_bad_tokens_get_the_login_page_never_data(server_database):
    async with loop_world(server_database) as world, client(world) as http:
        student = await http.get(f"/dashboard/k-factor?token={make_token('ann', 'student')}")
        login_page(student, 403)
        assert "admins only" in student.text and "student" in student.text
        assert "ve_admin" not in student.headers.get("set-cookie", "")
        assert 'value="/dashboard/k-factor"' in student.text  # the form comes back here
        login_page(await http.get("/dashboard/guardrails?token=forged.token.x"), 401)
        expired = await http.get(f"/dashboard/guardrails?token={make_token('ops', 'admin', ttl=-60)}")
        login_page(expired, 401)
        assert "expired" in expired.text

        # No cookie: off to the login page, remembering the page.
        bare = await http.get("/dashboard/experiments?x=1")
        assert bare.status_code == 303
        assert bare.headers["location"] == "/dashboard/login?next=%2Fdashboard%2Fexperiments%3Fx%3D1"
        login_page(await http.get(bare.headers["location"]), 200)

    # A stale cookie: the login page, saying why, and the cookie is cleared.
    async with loop_world(server_database) as world, client(world, "not.a.token") as http:
        stale = await http.get("/dashboard/guardrails")
        assert stale.status_code == 303 and "reason=expired" in stale.headers["location"]
        assert int(set_cookie(stale)["max-age"]) == 0
    async with loop_world(server_database) as world, client(world, make_token("ann", "student")) as http:
        student_cookie = await http.get("/dashboard/guardrails")
        assert student_cookie.status_code == 303 and "reason=forbidden" in student_cookie.headers["location"]
        assert (await http.get("/dashboard/session")).status_code == 403


async def test_the_login_form_and_logout(server_database):
    async with loop_world(server_database) as world, client(world) as http:
        admin = make_token("ops", "admin")
        origin = {"origin": f"http://127.0.0.1:{world.port}"}
        ok = await http.post(
            "/dashboard/login", data={"token": admin, "next": "/dashboard/guardrails"}, headers=origin
        )
        assert (ok.status_code, ok.headers["location"]) == (303, "/dashboard/guardrails")
        assert set_cookie(ok)["value"] == admin
        # JSON works the same way; `next` is only ever one of our pages.
        for bad_next in ("https://evil.example/", "//evil.example/x", "/dashboard/login", "/api/events"):
            answer = await http.post("/dashboard/login", json={"token": admin, "next": bad_next})
            assert (answer.status_code, answer.headers["location"]) == (303, "/dashboard/k-factor")
        login_page(await http.post("/dashboard/login", data={"token": make_token("ann", "student")}), 403)
        login_page(await http.post("/dashboard/login", json={"token": "forged.token.x"}), 401)
        login_page(await http.post("/dashboard/login", data={"token": ""}), 401)
        # A form posted from another site is refused.
        login_page(await http.post("/dashboard/login", data={"token": admin}, headers={"origin": EVIL}), 403)

    async with loop_world(server_database) as world, client(world, make_token("ops", "admin")) as http:
        origin = {"origin": f"http://127.0.0.1:{world.port}"}
        assert (await http.post("/dashboard/logout", headers={"origin": EVIL})).status_code == 403
        out = await http.post("/dashboard/logout", headers=origin)
        assert out.status_code == 303 and out.headers["location"].startswith("/dashboard/login")
        cleared = set_cookie(out)
        assert cleared["value"] == "" and int(cleared["max-age"]) == 0 and cleared["httponly"] is True
        assert (await http.get("/dashboard/logout")).status_code == 405


async def test_the_cookie_authenticates_the_api_but_not_from_a_foreign_origin(server_database):
    async with loop_world(server_database) as world, client(world, make_token("ops", "admin")) as http:
        own = {"origin": f"http://127.0.0.1:{world.port}"}
        report = await http.get("/api/metrics/k-factor?days=7")
        assert report.status_code == 200 and report.json()["days"] == 7

        def body(key: str) -> dict[str, Any]:
            return {
                "key": key,
                "name": key,
                "variants": [{"key": "control", "weight": 0.5}, {"key": "b", "weight": 0.5}],
                "target_metric": "first_value",
            }

        assert (await http.post("/api/experiments", json=body("same"), headers=own)).status_code == 201
        # The same POST from another site's page: refused before anything happens.
        refused = await http.post("/api/experiments", json=body("evil"), headers={"origin": EVIL})
        assert refused.status_code == 403 and "Origin" in refused.json()["error"]
        refused = await http.post("/api/experiments", json=body("evil"), headers={"origin": "null"})
        assert refused.status_code == 403
        listed = {e["key"] for e in (await http.get("/api/experiments")).json()["experiments"]}
        assert "same" in listed and "evil" not in listed
        # A bearer token is not a cookie: API clients are unaffected by Origin.
        bearer = {"origin": EVIL, **world.headers("ops", "admin")}
        assert (await http.post("/api/experiments", json=body("bearer"), headers=bearer)).status_code == 201

    async with loop_world(server_database) as world, client(world) as http:
        assert (await http.get("/api/metrics/k-factor?days=7")).status_code == 401


async def test_the_socket_accepts_the_cookie_only_from_its_own_origin(server_database):
    async with loop_world(server_database) as world:
        url = f"ws://127.0.0.1:{world.port}/socket/websocket?vsn=2.0.0"
        cookie = {"Cookie": f"ve_admin={make_token('ops', 'admin')}"}
        own = f"http://127.0.0.1:{world.port}"
        sock = await PhxClient.connect(url, additional_headers=cookie, origin=own)
        try:
            reply = await sock.join("dashboard:k_factor", {"days": 7})
            assert reply["status"] == "ok" and reply["response"]["days"] == 7, reply
        finally:
            await sock.close()

        # From another site's page: 403, no socket.
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(url, additional_headers=cookie, origin=EVIL)
        assert refused.value.response.status_code == 403

        # A student's cookie connects, but may not read the dashboards.
        student = {"Cookie": f"ve_admin={make_token('ann', 'student')}"}
        sock = await PhxClient.connect(url, additional_headers=student, origin=own)
        try:
            assert (await sock.join("dashboard:k_factor", {"days": 7}))["status"] == "error"
        finally:
            await sock.close()

        # No token anywhere: refused as before; a token in the URL still wins over any cookie.
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(url, origin=own)
        sock = await PhxClient.connect(
            f"{url}&token={make_token('ops', 'admin')}",
            additional_headers={"Cookie": "ve_admin=garbage"},
            origin=EVIL,
        )
        try:
            assert (await sock.join("dashboard:k_factor", {"days": 7}))["status"] == "ok"
        finally:
            await sock.close()


async def test_the_session_says_when_the_numbers_are_demo_data(server_database, monkeypatch):
    async with loop_world(server_database) as world:
        headers = world.headers("ops", "admin")
        assert (await world.http.get("/dashboard/session", headers=headers)).json()["demo"] is False
        monkeypatch.setenv("VIRAL_ENGINE_DEMO", "1")  # what `serve --demo` sets in its process
        assert (await world.http.get("/dashboard/session", headers=headers)).json()["demo"] is True
