"""Who may change a user's privacy and data: the user, the parent their profile names, an admin.

A real server in the test's process (tests/loop_kit.py) on SQLite and PostgreSQL: opting out holds
even when another student posted events first with the ids the server used to choose; a child cannot
undo an opt-out their parent (or an admin) made; the parent the store names may export, delete, opt
out and record consent, nobody else may; every act is audited with who acted (`by`). Then two real
`serve` processes over Redis: a deletion on one closes the user's socket on the other, and their old
tokens stop working on both while a token issued afterwards works.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime
from typing import Any

import httpx
import pytest
import websockets
from loop_kit import loop_world
from servers import PhxClient, ServerProcess, make_token
from sqlalchemy import select
from websockets.exceptions import InvalidStatus

from store import AuditLog, User

LEO_NAME = "Leo Lionheart"


async def call(world: Any, method: str, path: str, user: str, role: str = "student", body: Any = None):
    return await world.http.request(method, path, json=body, headers=world.headers(user, role))


async def stored(world: Any, user_id: str) -> User | None:
    async with world.app.state.database.session() as session:
        return await session.get(User, user_id)


async def audit_of(world: Any, subject: str) -> list[tuple[str, str, str | None]]:
    """(actor, action, details.by) of every audit row about `subject`, oldest first."""
    async with world.app.state.database.session() as session:
        rows = (
            await session.scalars(select(AuditLog).where(AuditLog.subject == subject).order_by(AuditLog.id))
        ).all()
    return [(r.actor, r.action, (r.details or {}).get("by")) for r in rows]


async def global_texts(world: Any) -> list[str]:
    page = await call(world, "GET", "/api/feeds/global?limit=100", "maya")
    assert page.status_code == 200, page.text
    return [item["text"] for item in page.json()["items"]]


async def test_an_opt_out_holds_when_another_student_claimed_its_event_ids_first(database_url):
    async with loop_world(database_url) as world:
        await world.profile("leo", display_name=LEO_NAME)
        await world.profile("maya", display_name="Maya")
        watcher = await world.socket("maya")
        assert (await watcher.join("feed:global"))["status"] == "ok"
        await world.event("practice_completed", "leo", subject="algebra")
        assert any(LEO_NAME in t for t in await global_texts(world))  # shown by name until they opt out

        # The ids an opt-out of leo's was once stored under, for the next seconds of the server's clock.
        epoch = int(world.clock.now().timestamp())
        claims = [
            {"id": f"opt-out-leo-{epoch + i}", "type": "practice_completed", "user_id": "maya"}
            for i in range(10)
        ]
        for claim in claims:
            claim["props"] = {"subject": "algebra"}
        posted = await call(world, "POST", "/api/events", "maya", body=claims)
        assert posted.status_code == 202, posted.text

        answer = await call(world, "POST", "/api/users/leo/opt-out", "leo")
        assert answer.status_code == 200, answer.text
        row = await stored(world, "leo")  # stored before the answer
        assert row is not None and row.opted_out and row.opted_out_by == "self"

        # Their next session reaches no public feed under their name, pushed or paged.
        pushed_before = len(watcher.events("feed:global", "new_activity"))
        await world.event("session_completed", "leo", subject="algebra", minutes=25)
        await world.event("practice_completed", "maya", subject="algebra")
        await watcher.wait_for(lambda f: f[3] == "new_activity" and "Maya" in f[4].get("text", ""))
        late = watcher.events("feed:global", "new_activity")[pushed_before:]
        assert late and not [p for p in late if LEO_NAME in p["text"] or "leo" in str(p.get("data"))]
        texts = await global_texts(world)
        assert not [t for t in texts[-3:] if LEO_NAME in t]
        row = await stored(world, "leo")
        assert row is not None and row.opted_out
        assert answer.json() == {"user_id": "leo", "opted_out": True, "opted_out_by": "self"}
        assert await audit_of(world, "leo") == [("leo", "opted_out", "self")]


async def test_a_child_cannot_undo_the_opt_out_their_parent_or_an_admin_made(database_url):
    async with loop_world(database_url) as world:
        await world.profile("kid", minor=True, parent_id="mum")
        await world.profile("mum", role="parent")
        await world.profile("eve", role="parent")

        async def opt(direction: str, user: str, role: str = "student") -> httpx.Response:
            return await call(world, "POST", f"/api/users/kid/opt-{direction}", user, role)

        made = await opt("out", "mum", "parent")
        assert made.status_code == 200, made.text
        undo = await opt("in", "kid")
        assert undo.status_code == 403 and "their parent or an admin" in undo.json()["error"], undo.text
        assert made.json()["opted_out_by"] == "parent"
        again = await opt("out", "kid")  # the child's own opt-out does not take the parent's over
        assert again.status_code == 200 and again.json()["opted_out_by"] == "parent", again.text
        assert (await opt("in", "kid")).status_code == 403
        assert (await opt("in", "eve", "parent")).status_code == 403  # a parent, but not kid's
        row = await stored(world, "kid")
        assert row is not None and row.opted_out and row.opted_out_by == "parent"

        assert (await opt("in", "mum", "parent")).status_code == 200
        assert (await opt("in", "mum", "parent")).status_code == 409  # nothing left to lift
        assert (await opt("out", "kid")).json()["opted_out_by"] == "self"
        assert (await opt("in", "kid")).status_code == 200  # their own, they may lift

        assert (await opt("out", "ops", "admin")).json()["opted_out_by"] == "admin"
        assert (await opt("in", "kid")).status_code == 403
        assert (await opt("in", "mum", "parent")).status_code == 200
        row = await stored(world, "kid")
        assert row is not None and not row.opted_out and row.opted_out_by is None

        assert await audit_of(world, "kid") == [
            ("ops", "profile_changed", "admin"),
            ("mum", "opted_out", "parent"),
            ("kid", "opted_out", "self"),
            ("mum", "opted_in", "parent"),
            ("kid", "opted_out", "self"),
            ("kid", "opted_in", "self"),
            ("ops", "opted_out", "admin"),
            ("mum", "opted_in", "parent"),
        ]


async def test_the_parent_the_store_names_may_review_and_delete_their_childs_data(database_url):
    async with loop_world(database_url) as world:
        await world.profile("kid", minor=True, parent_id="mum", display_name="Kid")
        await world.profile("mum", role="parent")
        await world.profile("eve", role="parent")
        await world.profile("twin", parent_id="sis")  # named as a parent, but not one by role
        await world.event("practice_completed", "kid", subject="algebra")
        consent = {"method": "signed_form"}
        mum = {"user": "mum", "role": "parent"}

        export = await call(world, "GET", "/api/users/kid/export", **mum)
        assert export.status_code == 200, export.text
        tables = export.json()["tables"]
        assert tables["profile"][0]["id"] == "kid" and tables["events"]
        granted = await call(world, "POST", "/api/users/kid/consent", body=consent, **mum)
        assert granted.status_code == 200 and granted.json()["parent_id"] == "mum", granted.text
        other = await call(
            world, "POST", "/api/users/kid/consent", body={**consent, "parent_id": "eve"}, **mum
        )
        assert other.status_code == 422, other.text
        assert (await call(world, "DELETE", "/api/users/kid/consent", **mum)).status_code == 200
        assert (await call(world, "POST", "/api/users/kid/opt-out", **mum)).status_code == 200

        # Not theirs to act on: another parent, even one whose token claims the child; a parent named
        # in a profile whose token is not a parent's; the child, for what is a parent's to do.
        claims_kid = world.headers("eve", "parent", parent_of="kid", children=["kid"])
        for method, path, body in (
            ("GET", "/api/users/kid/export", None),
            ("DELETE", "/api/users/kid", None),
            ("POST", "/api/users/kid/opt-out", None),
            ("POST", "/api/users/kid/opt-in", None),
            ("POST", "/api/users/kid/consent", consent),
            ("DELETE", "/api/users/kid/consent", None),
        ):
            for headers in (world.headers("eve", "parent"), claims_kid):
                refused = await world.http.request(method, path, json=body, headers=headers)
                assert refused.status_code == 403, (method, path, refused.text)
                assert "their parent or an admin" in refused.json()["error"], refused.text
        assert (await call(world, "GET", "/api/users/twin/export", "sis")).status_code == 403
        assert (await call(world, "POST", "/api/users/kid/consent", "kid", body=consent)).status_code == 403
        assert (await call(world, "DELETE", "/api/users/kid", "kid")).status_code == 403
        assert (await call(world, "GET", "/api/users/kid/export", "kid")).status_code == 200  # their own
        assert await audit_of(world, "kid") == [
            ("ops", "profile_changed", "admin"),  # naming mum the parent
            ("mum", "user_exported", "parent"),
            ("mum", "consent_granted", "parent"),
            ("mum", "consent_revoked", "parent"),
            ("mum", "opted_out", "parent"),
            ("kid", "user_exported", "self"),
        ]

        kid_token = world.headers("kid")
        assert (await world.http.get("/api/feeds/user:kid", headers=kid_token)).status_code == 200
        deleted = await call(world, "DELETE", "/api/users/kid", **mum)
        assert deleted.status_code == 200, deleted.text
        assert await stored(world, "kid") is None
        async with world.app.state.database.session() as session:
            row = await session.scalar(select(AuditLog).where(AuditLog.action == "user_deleted"))
        assert row is not None and row.actor == "mum" and row.details["by"] == "parent"
        refused = await world.http.get("/api/feeds/user:kid", headers=kid_token)
        assert refused.status_code == 401 and "revoked" in refused.json()["error"], refused.text
        report = deleted.json()
        assert "cached_boards_cleared" not in report and report["deleted"]["users"] == 1
        assert datetime.fromisoformat(report["deleted_at"]).timestamp() <= time.time()
        # The child is gone, and with them the profile naming mum: she is nobody's parent now.
        assert (await call(world, "DELETE", "/api/users/kid", **mum)).status_code == 403
        assert (await call(world, "DELETE", "/api/users/kid", "ops", "admin")).status_code == 404


# Two real server processes over Redis, sharing one database.


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def refused_upgrade(server: ServerProcess, token: str) -> str:
    """The body of the refusal of a socket upgrade with `token` (it must be refused)."""
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(server.ws_url(token)):
            pass
    response = info.value.response
    assert response.status_code == 403
    return bytes(response.body).decode()


async def test_a_deleted_users_sockets_close_on_every_node_and_their_old_tokens_stop_working(
    server_factory, redis_url
):
    env = {"BROKER_URL": redis_url}
    a, b = server_factory(env), server_factory(env)
    admin = {"authorization": f"Bearer {make_token('ops', 'admin')}"}
    old = make_token("gone-kid", minor=True)
    async with httpx.AsyncClient(timeout=10) as http:
        made = await http.put(f"{a.http}/api/users/gone-kid", json={"display_name": "Gone"}, headers=admin)
        assert made.status_code == 201, made.text
        on_b = await PhxClient.connect(b.ws_url(old))
        on_a = await PhxClient.connect(a.ws_url(old))
        bystander = await PhxClient.connect(b.ws_url(make_token("stays")))
        try:
            for client, user in ((on_b, "gone-kid"), (on_a, "gone-kid"), (bystander, "stays")):
                assert (await client.join(f"user:{user}"))["status"] == "ok"
            for server in (a, b):
                own = await http.get(f"{server.http}/api/feeds/user:gone-kid", headers=bearer(old))
                assert own.status_code == 200, own.text

            deleted = await http.delete(f"{a.http}/api/users/gone-kid", headers=admin)
            assert deleted.status_code == 200, deleted.text

            # The socket on the other process is closed by the server, as a policy matter.
            async with asyncio.timeout(5):
                await on_b._reader
                await on_a._reader
            assert on_b.ws.close_code == 1008 and on_a.ws.close_code == 1008
            assert (await bystander.request("phoenix", "heartbeat", {}))["status"] == "ok"

            for server in (a, b):
                refused = await http.get(f"{server.http}/api/feeds/user:gone-kid", headers=bearer(old))
                assert refused.status_code == 401 and "revoked" in refused.json()["error"], refused.text
                assert "revoked" in await refused_upgrade(server, old)

            # The platform may give the id out again: a token issued after the deletion works.
            deleted_at = datetime.fromisoformat(deleted.json()["deleted_at"]).timestamp()
            while time.time() < deleted_at + 1.05:
                await asyncio.sleep(0.1)
            fresh = make_token("gone-kid")
            for server in (a, b):
                ok = await http.get(f"{server.http}/api/feeds/user:gone-kid", headers=bearer(fresh))
                assert ok.status_code == 200, ok.text
                client = await PhxClient.connect(server.ws_url(fresh))
                try:
                    assert (await client.join("user:gone-kid"))["status"] == "ok"
                finally:
                    await client.close()
        finally:
            for client in (on_a, on_b, bystander):
                with contextlib.suppress(Exception):
                    await client.close()
