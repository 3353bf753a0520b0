"""The loops end to end: one real server (in process, hand-moved clock), events over HTTP, pushes over
real sockets, the scheduler firing expiries and deadlines as the clock moves (tests/loop_kit.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from loop_kit import loop_world
from servers import is_event
from sqlalchemy import select

from store import Conversion, Event, PromptDecision, Reward

H = timedelta(hours=1)


async def rewards(world, user: str) -> list[tuple[str, int, str]]:
    async with world.app.state.database.session() as session:
        rows = await session.scalars(select(Reward).where(Reward.user_id == user).order_by(Reward.id))
        return [(r.kind, r.amount, r.reason) for r in rows]


async def test_buddy_challenge_from_practice_to_result_rewards_and_expiry(server_database):
    async with loop_world(server_database) as world:
        await world.profile("maya", display_name="Maya")
        await world.profile("leo", display_name="Leo")
        maya, leo = await world.socket("maya"), await world.socket("leo")

        await world.event("practice_completed", "maya", subject="algebra", deck_id="deck-7", score=80)
        prompt = await maya.wait_for(is_event("user:maya", "loop_prompt"))
        assert prompt[4]["action"] == "challenge" and prompt[4]["deck_id"] == "deck-7" and prompt[4]["text"]

        refused = await maya.request("user:maya", "challenge", {"subject": "algebra", "friend_id": "maya"})
        assert refused["status"] == "error" and refused["response"]["code"] == "self_challenge"

        reply = await maya.request("user:maya", "challenge", {"subject": "algebra", "friend_id": "leo"})
        assert reply["status"] == "ok", reply
        cid = reply["response"]["challenge_id"]
        invite = await leo.wait_for(is_event("user:leo", "challenge_invite"))
        assert (
            invite[4]["challenge_id"] == cid and invite[4]["from"] == "Maya" and invite[4]["questions"] == 5
        )

        response = await world.act("leo", "accept_challenge", challenge_id=cid)
        assert response.status_code == 200 and response.json()["state"] == "accepted"
        assert (await maya.join(f"challenge:{cid}"))["response"]["state"] == "accepted"
        assert (await leo.join(f"challenge:{cid}"))["status"] == "ok"
        stranger = await world.socket("eve")
        assert (await stranger.join(f"challenge:{cid}"))["status"] == "error"

        assert (await world.act("maya", "submit_challenge", challenge_id=cid, score=4)).status_code == 200
        again = await world.act("maya", "submit_challenge", challenge_id=cid, score=5)
        assert again.status_code == 422 and again.json()["code"] == "already_submitted"
        assert (await world.act("leo", "submit_challenge", challenge_id=cid, score=3)).status_code == 200

        result = await maya.wait_for(is_event(f"challenge:{cid}", "challenge_result"))
        assert [s["score"] for s in result[4]["scores"]] == [4.0, 3.0] and result[4]["draw"] is False
        assert (await maya.wait_for(is_event("user:maya", "challenge_result")))[4]["outcome"] == "won"
        assert (await leo.wait_for(is_event("user:leo", "challenge_result")))[4]["outcome"] == "lost"
        assert await rewards(world, "maya") == [
            ("streak_shield", 1, "challenge_completed"),
            ("xp", 50, "challenge_won"),
        ]
        assert await rewards(world, "leo") == [("streak_shield", 1, "challenge_completed")]
        await leo.wait_for(lambda f: f[2] == "user:leo" and f[3] == "reward")

        # Leo was invited to a challenge less than 4 h ago: the orchestrator's cooldown holds a new one.
        held = await world.act("maya", "challenge", subject="algebra", friend_id="leo")
        assert held.status_code == 403 and "cooldown" in held.json()["error"]
        # Later, a second challenge nobody answers expires 48 h after it was made, told to both.
        await world.advance(5 * H)
        second = await world.act("maya", "challenge", subject="algebra", friend_id="leo")
        assert second.status_code == 200, second.text
        second = second.json()["challenge_id"]
        await world.advance(47 * H)
        assert not [p for p in maya.events("user:maya", "challenge_update") if p["challenge_id"] == second]
        await world.advance(2 * H)
        expired = await leo.wait_for(
            lambda f: f[3] == "challenge_update" and f[4].get("challenge_id") == second and f[2] == "user:leo"
        )
        assert expired[4]["state"] == "expired"
        late = await world.act("leo", "accept_challenge", challenge_id=second)
        assert late.status_code == 422 and late.json()["code"] == "not_pending"


async def test_an_outside_challenge_goes_out_as_a_signed_link_and_converts(server_database):
    async with loop_world(server_database) as world:
        response = await world.act("maya", "challenge", subject="algebra", outside=True)
        assert response.status_code == 200, response.text
        challenge = response.json()
        token = challenge["token"]
        async with world.app.state.database.session() as session:
            invite = await session.scalar(select(Event).where(Event.type == "invite_sent"))
        assert invite.user_id == "maya" and invite.props == {"source": "buddy_challenge", "link_token": token}

        click = await world.http.get(f"/r/{token}", follow_redirects=False)
        assert click.status_code in (302, 303, 307) and click.headers["location"].endswith(
            f"/challenge/{challenge['challenge_id']}"
        )
        await world.advance(H)
        await world.event("signup", "newbie", referral_token=token)
        async with world.app.state.database.session() as session:
            conversion = await session.get(Conversion, "newbie")
        assert conversion.referrer_id == "maya" and conversion.source == "buddy_challenge"
        # The newcomer takes the challenge with its link; nobody else can, and maya cannot take her own.
        assert (
            await world.act("maya", "accept_challenge", challenge_id=challenge["challenge_id"], token=token)
        ).json()["code"] == "self_challenge"
        assert (
            await world.act("newbie", "accept_challenge", challenge_id=challenge["challenge_id"])
        ).status_code == 403
        taken = await world.act(
            "newbie", "accept_challenge", challenge_id=challenge["challenge_id"], token=token
        )
        assert taken.status_code == 200 and taken.json()["state"] == "accepted"


@pytest.mark.parametrize("minor_consent", [False, True])
async def test_a_minor_shares_outside_only_with_parental_consent(server_database, minor_consent):
    from store import Consent

    async with loop_world(server_database) as world:
        await world.profile("kid", minor=True)
        if minor_consent:
            async with world.app.state.database.session() as session, session.begin():
                session.add(
                    Consent(
                        user_id="kid", parent_id="mum", method="signed_form", granted_at=world.clock.now()
                    )
                )
        response = await world.act("kid", "challenge", subject="algebra", outside=True)
        if minor_consent:
            assert response.status_code == 200
        else:
            assert response.status_code == 403 and "minor_without_consent" in response.json()["error"]
            async with world.app.state.database.session() as session:
                decision = await session.scalar(select(PromptDecision))
            assert (decision.user_id, decision.shown, decision.reason) == (
                "kid",
                False,
                "minor_without_consent",
            )


async def test_streak_rescue_escalates_saves_with_a_friend_and_breaks_without(server_database):
    async with loop_world(server_database) as world:
        await world.profile("maya", display_name="Maya")
        maya, leo, bob = await world.socket("maya"), await world.socket("leo"), await world.socket("bob")
        for user in ("maya", "bob"):  # day 1, 10:00
            await world.event("session_completed", user, subject="algebra", minutes=20, score=70)
        await world.advance(23 * H)  # day 2, 09:00: a second day for both
        for user in ("maya", "bob"):
            await world.event("session_completed", user, subject="algebra", minutes=20, score=75)
        await world.advance(11 * H)  # day 2, 20:00: maya again (same day: still 2 days, deadline moves)
        await world.event("session_completed", "maya", subject="algebra", minutes=20, score=75)
        # bob does nothing more: his streak resets at its deadline (day 3, 09:00).
        await world.advance(17 * H)  # day 3, 13:00
        broken = await bob.wait_for(is_event("user:bob", "streak_broken"))
        assert broken[4]["previous_days"] == 2
        # maya's deadline is day 3, 20:00: medium 6 h before, high 3 h before (outside the quiet
        # hours, 21:00-07:00 in the recipient's time zone, UTC here).
        assert not maya.events("user:maya", "rescue_request")
        await world.advance(1.5 * H)
        first = await maya.wait_for(is_event("user:maya", "rescue_request"))
        assert first[4]["urgency"] == "medium" and first[4]["days"] == 2 and first[4]["text"]
        await world.advance(3 * H)
        await maya.wait_for(lambda f: f[3] == "rescue_request" and f[4]["urgency"] == "high")

        reply = await maya.request("user:maya", "request_rescue", {"friend_ids": ["leo"]})
        assert reply["status"] == "ok", reply
        rescue = reply["response"]["rescue_id"]
        assert (await leo.wait_for(is_event("user:leo", "rescue_invite")))[4]["from"] == "Maya"
        assert (await world.act("leo", "join_rescue", rescue_id=rescue)).status_code == 200
        assert (await world.act("eve", "join_rescue", rescue_id=rescue)).status_code == 403

        await world.event(
            "session_completed", "maya", subject="algebra", minutes=15, score=80, rescue_id=rescue
        )
        await maya.wait_for(is_event("user:maya", "rescue_saved"))
        await leo.wait_for(is_event("user:leo", "rescue_saved"))
        assert await rewards(world, "maya") == [("streak_shield", 1, "rescue_saved")]
        assert await rewards(world, "leo") == [("streak_shield", 1, "rescue_saved")]
        await world.advance(4 * H)  # past the old deadline: the saved streak lives on
        assert not maya.events("user:maya", "streak_broken")


async def test_study_buddy_nudge_invite_accept_and_no_renudge_of_the_pair(server_database):
    async with loop_world(server_database) as world:
        await world.profile("ana", display_name="Ana")
        await world.profile("ben", display_name="Ben")
        await world.profile("cat", display_name="Cat")
        ana, ben = await world.socket("ana"), await world.socket("ben")
        # Stronger peers on the topic ana is weak in; one opted out; one weaker.
        await world.event("quiz_result", "ben", subject="algebra", topic="fractions", score=95)
        await world.event("quiz_result", "cat", subject="algebra", topic="fractions", score=85)
        await world.event("quiz_result", "dan", subject="algebra", topic="fractions", score=99)
        await world.event("opt_out", "dan")
        await world.event("quiz_result", "eve", subject="algebra", topic="fractions", score=40)
        for score in (60, 55):
            await world.event(
                "session_completed", "ana", subject="algebra", topic="fractions", minutes=20, score=score
            )
        assert not ana.events("user:ana", "nudge")
        await world.event(
            "session_completed", "ana", subject="algebra", topic="fractions", minutes=20, score=65
        )
        nudge = (await ana.wait_for(is_event("user:ana", "nudge")))[4]
        assert nudge["kind"] == "study_buddy" and nudge["weak_topics"] == ["fractions"]
        assert [b["user_id"] for b in nudge["buddies"]] == ["ben", "cat"]

        wrong = await world.act("ana", "invite_buddy", nudge_id=nudge["nudge_id"], buddy_id="eve")
        assert wrong.status_code == 422
        assert (
            await world.act("ana", "invite_buddy", nudge_id=nudge["nudge_id"], buddy_id="ben")
        ).status_code == 200
        invite = (await ben.wait_for(lambda f: f[3] == "nudge" and f[4]["kind"] == "buddy_invite"))[4]
        assert invite["from"] == "Ana" and invite["subject"] == "algebra"
        accepted = await world.act("ben", "accept_nudge", nudge_id=nudge["nudge_id"])
        assert accepted.status_code == 200 and accepted.json()["room"] == f"challenge:{nudge['nudge_id']}"
        await ana.wait_for(is_event("user:ana", "nudge_accepted"))
        assert (await ana.join(f"challenge:{nudge['nudge_id']}"))["status"] == "ok"
        state = await ana.wait_for(is_event(f"challenge:{nudge['nudge_id']}", "presence_state"))
        assert "ana" in state[4]

        # Two hours on, another low session: a new nudge, without ben (paired within 24 h).
        await world.advance(2 * H)
        await world.event(
            "session_completed", "ana", subject="algebra", topic="fractions", minutes=20, score=50
        )
        again = await ana.wait_for(lambda f: f[3] == "nudge" and f[4]["nudge_id"] != nudge["nudge_id"])
        assert [b["user_id"] for b in again[4]["buddies"]] == ["cat"]
        await world.advance(61 * timedelta(minutes=1))
        expired = await ana.wait_for(is_event("user:ana", "nudge_expired"))
        assert expired[4]["nudge_id"] == again[4]["nudge_id"]


async def test_results_rally_ranks_live_and_ends_after_seven_days(server_database):
    async with loop_world(server_database) as world:
        await world.profile("ana", display_name="Ana")
        await world.profile("ben", display_name="Ben")
        await world.profile("kid", minor=True, display_name="Kiddo")
        ana = await world.socket("ana")
        no_result = await world.act("ana", "start_rally", subject="physics")
        assert no_result.status_code == 422 and no_result.json()["code"] == "no_result"
        await world.event("quiz_result", "ana", subject="physics", score=70)
        started = await world.act("ana", "start_rally", subject="physics")
        assert started.status_code == 200, started.text
        rally = started.json()["rally_id"]
        assert (await ana.join(f"rally:{rally}"))["response"]["standings"][0]["name"] == "Ana"

        ben = await world.socket("ben")
        invited = await world.act("ana", "invite_to_rally", rally_id=rally, user_ids=["ben", "kid"])
        assert invited.json()["invited"] == ["ben", "kid"]
        await ben.wait_for(is_event("user:ben", "rally_invite"))
        needs = await world.act("ben", "join_rally", rally_id=rally)
        assert needs.status_code == 422 and needs.json()["code"] == "no_diagnostic"
        assert (await world.act("eve", "join_rally", rally_id=rally)).status_code == 403
        await world.event("diagnostic_completed", "ben", subject="physics", score=80)
        await world.event("diagnostic_completed", "kid", subject="physics", score=60)
        assert (await world.act("ben", "join_rally", rally_id=rally)).status_code == 200
        assert (await world.act("kid", "join_rally", rally_id=rally)).status_code == 200

        def names(frame):
            return [(s["name"], s["score"]) for s in frame[4]["standings"]]

        update = await ana.wait_for(lambda f: f[3] == "rally_update" and len(f[4]["standings"]) == 3)
        assert names(update) == [("Ben", 80.0), ("Ana", 70.0), ("A student", 60.0)]  # a minor is never named
        await world.advance(H)
        await world.event("quiz_result", "ana", subject="physics", score=90)
        reranked = await ana.wait_for(
            lambda f: f[3] == "rally_update" and f[4]["standings"][0]["name"] == "Ana"
        )
        assert names(reranked) == [("Ana", 90.0), ("Ben", 80.0), ("A student", 60.0)]
        await world.advance(7 * 24 * H)
        ended = await ana.wait_for(is_event(f"rally:{rally}", "rally_ended"))
        assert names(ended)[0] == ("Ana", 90.0)


async def test_proud_parent_cards_weekly_and_on_milestones_and_referral_rewards(server_database):
    async with loop_world(server_database) as world:
        await world.profile("mum", role="parent", display_name="Mum")
        await world.profile("kid", minor=True, display_name="Kiddo", parent_id="mum")
        mum = await world.socket("mum", "parent")
        await world.event("session_completed", "kid", subject="algebra", minutes=25, score=70)
        await world.event("quiz_result", "kid", subject="algebra", score=60)
        await world.event("streak_updated", "kid", days=7)
        card = (await mum.wait_for(is_event("user:mum", "parent_card")))[4]
        assert card["why"] == "streak_7" and card["child"] == "Kiddo"
        assert card["progress"] == {
            "sessions": 1,
            "minutes": 25,
            "average_score": 65.0,
            "quizzes": 1,
            "streak_days": 1,
        }
        assert "Kiddo" not in card["share"]["url"]
        # The weekly card comes on the next Monday 16:00 UTC (the proud_parent cooldown is 12 h).
        await world.advance(8 * 24 * H)
        weekly = await mum.wait_for(lambda f: f[3] == "parent_card" and f[4]["why"] == "weekly")
        # A family that signs up through the share link: a free session each.
        await world.event("signup", "newfam", referral_token=weekly[4]["share"]["token"])
        assert ("free_session", 1, "parent_referral") in await rewards(world, "mum")
        assert await rewards(world, "newfam") == [("free_session", 1, "parent_referral")]


async def test_session_intelligence_pushes_insights_to_student_and_tutor(server_database):
    async with loop_world(server_database) as world:
        await world.profile("sam", display_name="Sam")
        student, tutor = await world.socket("sam"), await world.socket("tess", "tutor")
        scores = [(50, "fractions"), (55, "fractions"), (90, "geometry"), (95, "geometry"), (70, "fractions")]
        for day, (score, topic) in enumerate(scores):
            await world.event("practice_completed", "sam", subject="math", topic=topic, score=score)
            if day < len(scores) - 1:
                await world.advance(24 * H)
        await world.event(
            "session_completed",
            "sam",
            subject="math",
            topic="fractions",
            minutes=30,
            score=75,
            tutor_id="tess",
        )
        insight = (await student.wait_for(lambda f: f[3] == "insight" and f[4]["trend"]["days"] == 5))[4]
        assert insight["weak_topics"] == ["fractions"] and insight["strong_topics"] == ["geometry"]
        assert insight["consistency"] == round(5 / 14, 2) and insight["best_hours"] == [10]
        assert insight["trend"]["direction"] == "improving"
        student_actions = {a["action"] for a in insight["next_actions"]}
        assert {"find_study_buddy", "challenge_friend"} <= student_actions
        for_tutor = (await tutor.wait_for(is_event("user:tess", "tutor_insight")))[4]
        assert for_tutor["student"] == {"user_id": "sam", "name": "Sam"}
        assert {"review_topic", "assign_practice", "schedule_at_best_hour"} <= {
            a["action"] for a in for_tutor["next_actions"]
        }
