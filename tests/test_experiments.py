"""Experiments end to end (SPEC §9b): the management API and its audit, assignment (sticky, lifecycle),
exposures and conversions through the event pipeline, results over HTTP and pushed live on a real
socket, SRM on a skewed split, and a loop reading its variant. One real in-process server with a
hand-moved clock (tests/loop_kit.py)."""

from __future__ import annotations

from datetime import timedelta

from loop_kit import loop_world
from servers import is_event
from sqlalchemy import func, select

from metrics.assignment import assign
from store import ExperimentConversion, ExperimentExposure, LoopItem

H = timedelta(hours=1)
ADMIN = {"user": "ops", "role": "admin"}


def definition(key: str = "exp1", **extra) -> dict:
    return {
        "key": key,
        "name": "Shorter challenges",
        "hypothesis": "A 24 h challenge converts better than 48 h",
        "variants": [{"key": "control", "weight": 0.5}, {"key": "fast", "weight": 0.5, "config": {"x": 1}}],
        "target_metric": "first_value",
        "guardrail_metrics": ["opt_out"],
        **extra,
    }


async def call(world, method: str, path: str, json=None, user: str = "ops", role: str = "admin"):
    return await world.http.request(method, path, json=json, headers=world.headers(user, role))


async def test_lifecycle_is_audited_and_only_legal_transitions_pass(server_database):
    async with loop_world(server_database) as world:
        created = await call(world, "POST", "/api/experiments", definition())
        assert created.status_code == 201 and created.json()["status"] == "draft"
        assert (await call(world, "POST", "/api/experiments", definition())).status_code == 409
        student = await call(world, "POST", "/api/experiments", definition("x2"), user="s", role="student")
        assert student.status_code == 403
        bad = await call(world, "POST", "/api/experiments", {"key": "bad key!", "variants": [{"key": "a"}]})
        assert bad.status_code == 422 and {"key", "variants", "target_metric"} <= set(bad.json()["fields"])
        weights = await call(
            world,
            "POST",
            "/api/experiments",
            definition("w", variants=[{"key": "a", "weight": 0.7}, {"key": "b", "weight": 0.7}]),
        )
        assert weights.status_code == 422 and "add up to 1" in weights.json()["fields"]["variants"]

        draft = await call(world, "GET", "/api/experiments/exp1/assignment?user_id=u1")
        assert draft.json() == {"variant": None, "in_experiment": False}
        assert (await call(world, "POST", "/api/experiments/exp1/pause")).status_code == 409
        assert (await call(world, "POST", "/api/experiments/exp1/start")).json()["status"] == "running"
        renamed = await call(
            world,
            "PATCH",
            "/api/experiments/exp1",
            {"variants": [{"key": "control", "weight": 0.5}, {"key": "b", "weight": 0.5}]},
        )
        assert renamed.status_code == 409
        reweighted = await call(
            world,
            "PATCH",
            "/api/experiments/exp1",
            {"variants": [{"key": "control", "weight": 0.2}, {"key": "fast", "weight": 0.8}]},
        )
        assert reweighted.status_code == 200 and reweighted.json()["variants"][1]["weight"] == 0.8
        assert (await call(world, "POST", "/api/experiments/exp1/pause")).json()["status"] == "paused"
        paused = await call(world, "GET", "/api/experiments/exp1/assignment?user_id=u1")
        assert paused.json() == {"variant": "control", "in_experiment": False}
        assert (await call(world, "POST", "/api/experiments/exp1/start")).json()["status"] == "running"
        assert (
            await call(world, "POST", "/api/experiments/exp1/winner", {"variant": "nope"})
        ).status_code == 422
        won = await call(world, "POST", "/api/experiments/exp1/winner", {"variant": "fast"})
        assert won.json()["status"] == "stopped" and won.json()["winner"] == "fast"
        assert (await call(world, "POST", "/api/experiments/exp1/start")).status_code == 409
        after = await call(world, "GET", "/api/experiments/exp1/assignment?user_id=u1")
        assert after.json() == {"variant": "fast", "in_experiment": False}

        audit = (await call(world, "GET", "/api/experiments/exp1/audit")).json()["audit"]
        assert [a["action"] for a in audit] == ["create", "start", "update", "pause", "start", "winner"]
        assert all(a["actor"] == "ops" for a in audit)
        assert audit[2]["changes"]["variants"][1]["weight"] == 0.8
        listed = (await call(world, "GET", "/api/experiments?status=stopped")).json()["experiments"]
        assert [e["key"] for e in listed] == ["exp1"]
        others = await call(
            world, "GET", "/api/experiments/exp1/assignment?user_id=u2", user="u1", role="student"
        )
        assert others.status_code == 403


async def test_assignment_matches_the_hash_and_sticks_after_exposure(server_database):
    async with loop_world(server_database) as world:
        await call(world, "POST", "/api/experiments", definition())
        await call(world, "POST", "/api/experiments/exp1/start")
        users = [f"user-{i}" for i in range(40)]
        seen = {}
        for user in users:
            got = (await call(world, "GET", f"/api/experiments/exp1/assignment?user_id={user}")).json()
            expected = ["control", "fast"][assign(user, seed="exp1", weights=[0.5, 0.5])]
            assert got == {"variant": expected, "in_experiment": True}
            seen[user] = expected
        assert set(seen.values()) == {"control", "fast"}
        exposed = [u for u in users if seen[u] == "fast"][:3]
        for user in exposed:
            await world.event("experiment_exposure", user, experiment="exp1", variant="fast")
        # Everyone to control now: the exposed keep "fast", the others follow the new weights.
        await call(
            world,
            "PATCH",
            "/api/experiments/exp1",
            {"variants": [{"key": "control", "weight": 1.0}, {"key": "fast", "weight": 0.0}]},
        )
        for user in users:
            got = (await call(world, "GET", f"/api/experiments/exp1/assignment?user_id={user}")).json()
            assert got["variant"] == ("fast" if user in exposed else "control")


async def test_exposures_dedupe_and_conversions_count_after_exposure_within_the_window(server_database):
    async with loop_world(server_database) as world:
        await call(world, "POST", "/api/experiments", definition(window_days=7))
        await world.event(
            "experiment_exposure", "early", experiment="exp1", variant="fast"
        )  # not running yet
        await call(world, "POST", "/api/experiments/exp1/start")
        await world.event("first_value", "ann")  # before her exposure: does not count
        await world.event("experiment_exposure", "ann", experiment="exp1", variant="fast")
        await world.event(
            "experiment_exposure", "ann", experiment="exp1", variant="control"
        )  # later: ignored
        await world.event("experiment_exposure", "bob", experiment="exp1", variant="control")
        await world.event("experiment_exposure", "cat", experiment="exp1", variant="nope")  # unknown variant
        await world.advance(H)
        await world.event("first_value", "ann", value=3)
        await world.event("first_value", "ann", value=2)
        await world.event("opt_out", "bob")
        await world.advance(8 * 24 * H)
        await world.event("first_value", "bob")  # after the 7-day window
        async with world.app.state.database.session() as session:
            exposures = dict(
                (await session.execute(select(ExperimentExposure.user_id, ExperimentExposure.variant))).all()
            )
            conversions = [
                (c.user_id, c.metric, c.events, c.value)
                for c in await session.scalars(
                    select(ExperimentConversion).order_by(ExperimentConversion.user_id)
                )
            ]
        assert exposures == {"ann": "fast", "bob": "control"}
        assert conversions == [("ann", "first_value", 2, 5.0), ("bob", "opt_out", 1, 0.0)]
        results = (await call(world, "GET", "/api/experiments/exp1/results")).json()
        by = {v["key"]: v for v in results["variants"]}
        assert (by["control"]["exposures"], by["control"]["conversions"]) == (1, 0)
        assert (by["fast"]["exposures"], by["fast"]["conversions"]) == (1, 1)
        assert by["fast"]["rate"] == 1.0 and by["control"]["rate"] == 0.0
        assert "srm_p_value" in results and results["recommendation"]["action"] == "keep_running"


async def test_results_are_pushed_live_and_equal_the_endpoint(server_database):
    async with loop_world(server_database) as world:
        await call(world, "POST", "/api/experiments", definition())
        await call(world, "POST", "/api/experiments/exp1/start")
        admin = await world.socket("ops", "admin")
        joined = await admin.join("dashboard:experiment:exp1")
        assert joined["status"] == "ok" and joined["response"]["variants"][0]["exposures"] == 0
        listed = await admin.join("dashboard:experiments")
        assert [e["key"] for e in listed["response"]["experiments"]] == ["exp1"]
        student = await world.socket("sam")
        assert (await student.join("dashboard:experiment:exp1"))["status"] == "error"
        for i in range(6):
            variant = ["control", "fast"][assign(f"p{i}", seed="exp1", weights=[0.5, 0.5])]
            await world.event("experiment_exposure", f"p{i}", experiment="exp1", variant=variant)
        update = await admin.wait_for(
            lambda f: (
                f[2] == "dashboard:experiment:exp1"
                and f[3] == "metrics_update"
                and sum(v["exposures"] for v in f[4]["variants"]) == 6
            )
        )
        assert update[4] == (await call(world, "GET", "/api/experiments/exp1/results")).json()
        await call(world, "POST", "/api/experiments/exp1/pause")
        paused = await admin.wait_for(
            lambda f: (
                f[2] == "dashboard:experiments"
                and f[3] == "metrics_update"
                and f[4]["experiments"][0]["status"] == "paused"
            )
        )
        assert paused[4] == (await call(world, "GET", "/api/experiments")).json()


async def test_srm_is_flagged_on_a_skewed_split(server_database):
    async with loop_world(server_database) as world:
        await call(world, "POST", "/api/experiments", definition())
        await call(world, "POST", "/api/experiments/exp1/start")
        now = world.clock.now()
        async with world.app.state.database.session() as session, session.begin():
            session.add_all(
                ExperimentExposure(
                    experiment_key="exp1",
                    user_id=f"u{i}",
                    variant="control" if i < 5000 else "fast",
                    exposed_at=now,
                    event_id=f"e{i}",
                )
                for i in range(9600)
            )
        results = (await call(world, "GET", "/api/experiments/exp1/results")).json()
        assert results["srm"] is True and results["srm_p_value"] < 0.001
        assert results["recommendation"]["action"] == "check_setup"


async def test_a_loop_reads_its_variant_and_exposes_the_user_once(server_database):
    async with loop_world(server_database) as world:
        await call(
            world,
            "POST",
            "/api/experiments",
            definition(
                "challenge-ttl",
                loop="buddy_challenge",
                variants=[
                    {"key": "control", "weight": 0.0},
                    {
                        "key": "day",
                        "weight": 1.0,
                        "config": {"challenge_ttl_hours": 24, "challenge_questions": 3},
                    },
                ],
            ),
        )
        await call(world, "POST", "/api/experiments/challenge-ttl/start")
        leo = await world.socket("leo")
        first = await world.act("maya", "challenge", subject="algebra", friend_id="leo")
        assert first.status_code == 200, first.text
        invite = await leo.wait_for(is_event("user:leo", "challenge_invite"))
        assert invite[4]["questions"] == 3
        async with world.app.state.database.session() as session:
            item = await session.get(LoopItem, first.json()["challenge_id"])
            assert item.expires_at - item.created_at == 24 * H
        await world.advance(5 * H)
        assert (await world.act("maya", "challenge", subject="algebra", friend_id="leo")).status_code == 200
        await world.settle()
        for _ in range(100):
            async with world.app.state.database.session() as session:
                rows = (
                    await session.execute(
                        select(ExperimentExposure.variant, func.count()).group_by(ExperimentExposure.variant)
                    )
                ).all()
            if rows:
                break
            await world.settle()
        assert rows == [("day", 1)]
