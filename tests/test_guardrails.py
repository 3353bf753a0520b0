"""Guardrails end to end on a real in-process server with a hand-moved clock (tests/loop_kit.py):
thresholds crossed → alert, signed webhook to a local receiver, automatic pause of the loop or the
experiment (unpaused only by an admin), the push on `dashboard:guardrails`, consent and opt-out with
their audit, and the weekly summary through a pluggable sender."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from datetime import timedelta

import uvicorn
from loop_kit import loop_world
from servers import free_port, is_event
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

H = timedelta(hours=1)
SECRET = "webhook-test-secret"


class Receiver:
    """A local webhook endpoint: answers 500 to the first `fail_first` posts, then 204."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.port = free_port()

    async def handle(self, request: Request) -> Response:
        self.posts.append((dict(request.headers), await request.body()))
        return Response(status_code=500 if len(self.posts) <= self.fail_first else 204)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@contextlib.asynccontextmanager
async def receiver(fail_first: int = 0) -> AsyncIterator[Receiver]:
    r = Receiver(fail_first)
    app = Starlette(routes=[Route("/hook", r.handle, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=r.port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield r
    finally:
        server.should_exit = True
        await task


def env(url: str = "", **extra) -> dict[str, str]:
    thresholds = [
        {"metric": "opt_out_rate", "scope": "loop", "warn": 0.2, "critical": 0.4},
        {"metric": "opt_out_rate", "scope": "experiment", "warn": 0.2, "critical": 0.4},
        {"metric": "k_factor", "scope": "global", "warn": 1.0, "critical": 0.5, "direction": "below"},
    ]
    return {
        "GUARDRAIL_THRESHOLDS": json.dumps(thresholds),
        "GUARDRAIL_WEBHOOK_URL": url,
        "GUARDRAIL_WEBHOOK_SECRET": SECRET,
        "GUARDRAILS_EVERY": "3600",
        **extra,
    }


async def call(world, method: str, path: str, json_body=None, user: str = "ops", role: str = "admin"):
    return await world.http.request(method, path, json=json_body, headers=world.headers(user, role))


async def test_a_critical_opt_out_rate_alerts_signs_a_webhook_and_pauses_the_loop(server_database):
    async with receiver(fail_first=1) as hook, loop_world(server_database, **env(hook.url)) as world:
        admin = await world.socket("ops", "admin")
        joined = await admin.join("dashboard:guardrails")
        assert joined["status"] == "ok" and joined["response"]["alerts"] == []
        for user in ("ann", "bob"):  # both get the buddy-challenge prompt after practising
            await world.event("practice_completed", user, subject="algebra", score=80)
        await world.advance(H)
        await world.event("opt_out", "bob")  # half the recipients opt out: 0.5 ≥ 0.4, critical
        await world.advance(timedelta(minutes=1))

        report = (await call(world, "POST", "/api/guardrails/check")).json()
        loop = report["loops"]["buddy_challenge"]
        assert (loop["recipients"], loop["opt_out_rate"]) == (2, 0.5)
        alert = next(a for a in report["alerts"] if a["metric"] == "opt_out_rate")
        assert (alert["scope"], alert["level"], alert["action"]) == (
            "loop:buddy_challenge",
            "critical",
            "paused loop:buddy_challenge",
        )
        assert report["paused"]["loops"][0]["loop"] == "buddy_challenge"
        # K went below the critical line too (invites 0): an alert that pauses nothing.
        assert any(a["metric"] == "k_factor" and a["action"] is None for a in report["alerts"])

        # The webhook: one failure, then delivered on the retry; the signature checks out.
        async with asyncio.timeout(10):
            while len(hook.posts) < 3:  # two alerts, one of them retried once
                await asyncio.sleep(0.05)
        headers, body = hook.posts[-1]
        expected = (
            "sha256="
            + hmac.new(
                SECRET.encode(), headers["x-viral-timestamp"].encode() + b"." + body, hashlib.sha256
            ).hexdigest()
        )
        assert headers["x-viral-signature"] == expected
        assert json.loads(body)["type"] == "guardrail_alert"
        pushed = await admin.wait_for(
            lambda f: (
                f[2] == "dashboard:guardrails"
                and f[3] == "metrics_update"
                and any(a["metric"] == "opt_out_rate" for a in f[4]["alerts"])
            )
        )
        assert {a["metric"] for a in pushed[4]["alerts"]} == {"opt_out_rate", "k_factor"}
        assert pushed[4] == (await call(world, "GET", "/api/guardrails")).json()  # the endpoint's JSON

        # Paused: the loop sends nothing, its actions are refused, until an admin unpauses it.
        refused = await world.act("ann", "challenge", subject="algebra", friend_id="cat")
        assert refused.status_code == 403 and "loop_paused" in refused.json()["error"]
        assert (
            await call(
                world,
                "POST",
                "/api/guardrails/unpause",
                {"scope": "loop:buddy_challenge"},
                user="ann",
                role="student",
            )
        ).status_code == 403
        assert (
            await call(world, "POST", "/api/guardrails/unpause", {"scope": "loop:buddy_challenge"})
        ).status_code == 200
        assert (await world.act("ann", "challenge", subject="algebra", friend_id="cat")).status_code == 200
        # Re-checking does not repeat an alert that is still open, nor re-pause what an admin reopened.
        again = (await call(world, "POST", "/api/guardrails/check")).json()
        assert len([a for a in again["alerts"] if a["metric"] == "opt_out_rate"]) == 1
        audit = (await call(world, "GET", "/api/audit?subject=loop:buddy_challenge")).json()["audit"]
        assert [(a["actor"], a["action"]) for a in audit] == [
            ("ops", "unpaused"),
            ("guardrails", "loop_paused"),
        ]
        alerts = (await call(world, "GET", "/api/alerts?state=open")).json()["alerts"]
        assert {a["webhook"] for a in alerts} == {"delivered"}


async def test_a_guardrail_harm_in_an_experiment_pauses_the_experiment(server_database):
    async with loop_world(server_database, **env()) as world:
        body = {
            "key": "nudge-copy",
            "variants": [{"key": "control", "weight": 0.5}, {"key": "bold", "weight": 0.5}],
            "target_metric": "first_value",
        }
        assert (await call(world, "POST", "/api/experiments", body)).status_code == 201
        await call(world, "POST", "/api/experiments/nudge-copy/start")
        for user, variant in (("u1", "control"), ("u2", "bold"), ("u3", "bold")):
            await world.event("experiment_exposure", user, experiment="nudge-copy", variant=variant)
        await world.advance(H)
        await world.event("opt_out", "u2")
        await world.advance(timedelta(minutes=1))
        report = (await call(world, "POST", "/api/guardrails/check")).json()
        assert report["experiments"]["nudge-copy"]["variants"]["bold"]["opt_out_rate"] == 0.5
        assert (await call(world, "GET", "/api/experiments/nudge-copy")).json()["status"] == "paused"
        audit = (await call(world, "GET", "/api/experiments/nudge-copy/audit")).json()["audit"]
        assert audit[-1]["actor"] == "guardrails" and audit[-1]["action"] == "pause"
        assert (
            await call(world, "POST", "/api/guardrails/unpause", {"scope": "experiment:nudge-copy"})
        ).status_code == 200
        assert (await call(world, "GET", "/api/experiments/nudge-copy")).json()["status"] == "running"


async def test_consent_flow_with_audit(server_database):
    async with loop_world(server_database, **env()) as world:
        await world.profile("kid", minor=True, parent_id="mum")
        await world.profile("mum", role="parent")
        share = await world.act("kid", "challenge", subject="algebra", outside=True)
        assert share.status_code == 403 and "minor_without_consent" in share.json()["error"]
        stranger = await call(
            world, "POST", "/api/users/kid/consent", {"method": "signed_form"}, user="eve", role="parent"
        )
        assert stranger.status_code == 403
        granted = await call(
            world, "POST", "/api/users/kid/consent", {"method": "signed_form"}, user="mum", role="parent"
        )
        assert granted.status_code == 200 and granted.json()["parent_id"] == "mum"
        assert (await world.act("kid", "challenge", subject="algebra", outside=True)).status_code == 200
        assert (
            await call(world, "DELETE", "/api/users/kid/consent", user="mum", role="parent")
        ).status_code == 200
        await world.advance(5 * H)
        again = await world.act("kid", "challenge", subject="algebra", outside=True)
        assert again.status_code == 403 and "minor_without_consent" in again.json()["error"]
        audit = (await call(world, "GET", "/api/audit?subject=kid")).json()["audit"]
        assert [(a["actor"], a["action"], a["details"]["by"]) for a in audit] == [
            ("mum", "consent_revoked", "parent"),
            ("mum", "consent_granted", "parent"),
            ("ops", "profile_changed", "admin"),  # the profile naming mum as the parent
        ]
        assert audit[-1]["details"]["changes"] == {"parent_id": [None, "mum"], "minor": [False, True]}
        report = (await call(world, "GET", "/api/guardrails")).json()
        assert report["refusals_by_reason"]["minor_without_consent"] == 2


async def test_opt_out_and_opt_in_over_the_api(server_database):
    async with loop_world(server_database, **env()) as world:
        leo = await world.socket("leo")
        assert (
            await call(world, "POST", "/api/users/leo/opt-out", user="maya", role="student")
        ).status_code == 403
        assert (
            await call(world, "POST", "/api/users/leo/opt-out", user="leo", role="student")
        ).status_code == 200
        await asyncio.sleep(0.3)  # the opt_out event reaches the consumers
        refused = await world.act("maya", "challenge", subject="algebra", friend_id="leo")
        # The sender is not told that leo opted out: it reads like any other unavailability.
        assert refused.status_code == 403 and refused.json()["refused"] == "recipient_unavailable"
        assert "opted" not in refused.text
        assert not leo.events("user:leo", "challenge_invite")
        assert (
            await call(world, "POST", "/api/users/leo/opt-in", user="leo", role="student")
        ).status_code == 200
        await world.advance(5 * H)
        assert (await world.act("maya", "challenge", subject="algebra", friend_id="leo")).status_code == 200
        await leo.wait_for(is_event("user:leo", "challenge_invite"))
        audit = (await call(world, "GET", "/api/audit?subject=leo")).json()["audit"]
        assert [(a["action"], a["details"]["by"]) for a in audit] == [
            ("opted_in", "self"),
            ("opted_out", "self"),
        ]


class Outbox:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []

    async def send(self, subject: str, html_body: str, text_body: str) -> None:
        self.sent.append((subject, html_body, text_body))


async def test_the_weekly_summary_is_rendered_and_sent_on_monday(server_database):
    async with loop_world(server_database, **env()) as world:
        outbox = Outbox()
        world.app.state.guardrail_jobs.sender = outbox
        await world.event("practice_completed", "ann", subject="algebra", score=80)
        await world.advance(timedelta(minutes=1))
        as_json = (await call(world, "GET", "/api/guardrails/summary")).json()
        assert as_json["loops"]["buddy_challenge"]["shown"] == 1
        csv_text = (await call(world, "GET", "/api/guardrails/summary?format=csv")).text
        assert csv_text.startswith("scope,metric,value") and "loop:buddy_challenge,shown,1" in csv_text
        page = (await call(world, "GET", "/api/guardrails/summary?format=html")).text
        assert "<table>" in page and "<caption>Health per loop</caption>" in page
        await world.advance(8 * 24 * H)  # past the next Monday 08:00 UTC
        async with asyncio.timeout(10):
            while not outbox.sent:
                await world.settle()
        subject, html_body, text_body = outbox.sent[0]
        assert (
            subject.startswith("Guardrails weekly summary")
            and "<h1>" in html_body
            and "buddy_challenge" in text_body
        )


async def test_an_admin_releases_a_held_conversion_and_the_referrer_is_paid_once(server_database):
    from store import Conversion, Reward

    async with loop_world(server_database, **env()) as world:
        maya = await world.socket("maya")
        now = world.clock.now()
        async with world.app.state.database.session() as session, session.begin():
            session.add(
                Conversion(
                    user_id="newbie",
                    referrer_id="maya",
                    nonce="n1",
                    source="direct",
                    model="last_touch",
                    touched_at=now,
                    signup_at=now,
                    signup_event_id="su-newbie",
                    status="pending",
                    fraud_reasons=["conversion_burst"],
                )
            )
        path = "/api/admin/conversions/newbie/review"
        assert (
            await call(world, "POST", path, {"approve": True}, user="maya", role="student")
        ).status_code == 403
        assert (await call(world, "POST", path, {"approve": "yes"})).status_code == 422
        assert (
            await call(world, "POST", "/api/admin/conversions/nobody/review", {"approve": True})
        ).status_code == 404
        released = await call(world, "POST", path, {"approve": True})
        assert (
            released.status_code == 200 and released.json()["status"] == "ok" and released.json()["paid"] == 1
        )
        assert (await call(world, "POST", path, {"approve": True})).json()["paid"] == 0  # once
        reward = await maya.wait_for(is_event("user:maya", "reward"))
        assert (reward[4]["kind"], reward[4]["amount"]) == ("xp", 100)
        async with world.app.state.database.session() as session:
            assert len((await session.scalars(Reward.__table__.select())).all()) == 1
