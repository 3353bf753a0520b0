"""The orchestrator and the compliance gate (SQLite and PostgreSQL): every rule, every decision recorded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from loops import Orchestrator
from metrics.compliance import SocialAction
from store import Consent, Database, PromptDecision, User

NOON = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)  # a Friday, 12:00 UTC
H = timedelta(hours=1)


@pytest.fixture
async def db(database_url):
    database = Database(database_url)
    yield database
    await database.dispose()


async def users(db: Database, *rows: User) -> None:
    async with db.session() as session, session.begin():
        session.add_all(rows)


async def decide(db: Database, action: SocialAction, at: datetime, **kw) -> str:
    async with db.session() as session, session.begin():
        verdict = await Orchestrator().decide(session, action, at, **kw)
    return verdict.reason


def prompt(loop: str, to: str = "ann", sender: str | None = None, outside: bool = False) -> SocialAction:
    return SocialAction(loop, f"{loop}_prompt", sender, to, outside)


async def test_three_prompts_a_day_then_daily_cap_and_updates_do_not_count(db):
    loops = ["buddy_challenge", "results_rally", "proud_parent"]
    assert [await decide(db, prompt(loop), NOON + i * H) for i, loop in enumerate(loops)] == ["ok"] * 3
    assert await decide(db, prompt("streak_rescue"), NOON + 3 * H) == "daily_cap"
    assert await decide(db, prompt("streak_rescue"), NOON + 3 * H, update=True) == "ok"  # a follow-up
    assert await decide(db, prompt("streak_rescue"), NOON + 24 * H + 1 * H) == "ok"  # the first one aged out
    async with db.session() as session:
        rows = (await session.scalars(select(PromptDecision).order_by(PromptDecision.id))).all()
    assert [(r.loop, r.shown, r.reason) for r in rows] == [
        ("buddy_challenge", True, "ok"),
        ("results_rally", True, "ok"),
        ("proud_parent", True, "ok"),
        ("streak_rescue", False, "daily_cap"),
        ("streak_rescue", True, "update"),
        ("streak_rescue", True, "ok"),
    ]


@pytest.mark.parametrize(
    ("loop", "cooldown"),
    [("buddy_challenge", 4), ("results_rally", 6), ("proud_parent", 12), ("streak_rescue", 24)],
)
async def test_per_loop_cooldowns(db, loop, cooldown):
    start = NOON.replace(hour=8)  # every moment below is daytime in UTC
    assert await decide(db, prompt(loop), start) == "ok"
    assert await decide(db, prompt(loop), start + (cooldown - 0.1) * H) == "cooldown"
    assert await decide(db, prompt(loop), start + cooldown * H) == "ok"


async def test_opted_out_users_send_and_receive_nothing(db):
    await users(db, User(id="out", opted_out=True, subjects=[]), User(id="bob", subjects=[]))
    assert await decide(db, prompt("buddy_challenge", to="out", sender="bob"), NOON) == "recipient_opted_out"
    assert await decide(db, prompt("buddy_challenge", to="bob", sender="out"), NOON) == "sender_opted_out"
    assert await decide(db, prompt("streak_rescue", to="out"), NOON) == "recipient_opted_out"


async def test_minors_outside_the_platform_need_a_recorded_unrevoked_consent(db):
    await users(db, User(id="kid", minor=True, subjects=[]), User(id="adult", subjects=[]))
    share = SocialAction("buddy_challenge", "challenge_invite", "kid", None, outside=True)
    assert await decide(db, share, NOON) == "minor_without_consent"
    assert await decide(db, SocialAction("buddy_challenge", "x", "adult", None, outside=True), NOON) == "ok"
    assert (
        await decide(db, prompt("buddy_challenge", to="kid", sender="adult"), NOON) == "ok"
    )  # on the platform
    async with db.session() as session, session.begin():
        session.add(Consent(user_id="kid", parent_id="mum", method="signed_form", granted_at=NOON))
    assert await decide(db, share, NOON + H) == "ok"
    async with db.session() as session, session.begin():
        (await session.get(Consent, "kid")).revoked_at = NOON + 2 * H
    assert await decide(db, share, NOON + 3 * H) == "minor_without_consent"


async def test_quiet_hours_are_the_recipients_local_night(db):
    await users(
        db,
        User(id="tokyo", timezone="Asia/Tokyo", subjects=[]),
        User(id="nyc", timezone="America/New_York", subjects=[]),
    )
    # 12:00 UTC is 21:00 in Tokyo (quiet) and 07:00 in New York (awake).
    assert await decide(db, prompt("results_rally", to="tokyo"), NOON) == "quiet_hours"
    assert await decide(db, prompt("results_rally", to="nyc"), NOON) == "ok"
    assert (
        await decide(db, prompt("results_rally", to="nobody-known"), NOON.replace(hour=22)) == "quiet_hours"
    )


async def test_per_sender_and_per_recipient_rate_limits(db):
    # The gate's limits hold even where the loops' pacing does not (follow-ups of shown prompts).
    minute = timedelta(minutes=1)
    for i in range(10):  # 10 different senders reach ann: her limit
        ann = prompt(f"l{i}", to="ann", sender=f"s{i}")
        assert await decide(db, ann, NOON + i * minute, update=True) == "ok"
    over = prompt("l10", to="ann", sender="s10")
    assert await decide(db, over, NOON + H, update=True) == "recipient_rate_limited"
    for i in range(20):  # one sender, 20 recipients: the sender's limit
        assert await decide(db, prompt(f"m{i}", to=f"r{i}", sender="spammer"), NOON + i * minute) == "ok"
    assert await decide(db, prompt("m20", to="r20", sender="spammer"), NOON + H) == "sender_rate_limited"
