"""Attribution of signups to referrers (real SQLite and PostgreSQL): windows, touch models, refusals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from metrics import ConsumerRunner, MemoryEventStream
from metrics.attribution import AttributionConsumer
from metrics.links import LinkSigner
from store import Click, Conversion, Database, Link, Reward

KEY = "attribution-test-key-0123456789abcdef"
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


@pytest.fixture
async def db(database_url):
    database = Database(database_url)
    yield database
    await database.dispose()


async def make_link(
    db: Database, referrer: str, source: str = "study_buddy", created: datetime = NOW - timedelta(days=3)
) -> str:
    link = LinkSigner(KEY).issue(referrer, int(created.timestamp()), ttl=30 * 86400)
    async with db.session() as session, session.begin():
        session.add(
            Link(
                nonce=link.nonce,
                token=link.token,
                referrer_id=referrer,
                source=source,
                target="/",
                created_at=created,
                expires_at=created + timedelta(days=30),
            )
        )
    return link.token


async def click(db: Database, token: str, visitor: str, at: datetime) -> None:
    async with db.session() as session, session.begin():
        session.add(Click(nonce=token.split(".")[0], visitor=visitor, unique_click=True, clicked_at=at))


def event(eid: str, etype: str, user: str, at: datetime, **props) -> dict:
    return {"id": eid, "type": etype, "user_id": user, "ts": at.isoformat(), "props": props, "actor_id": user}


async def run(db: Database, events: list[dict], model: str = "last_touch") -> dict[str, Conversion]:
    consumer = AttributionConsumer(LinkSigner(KEY), model)
    runner = ConsumerRunner(db, MemoryEventStream(), [consumer])
    await runner.process_batch(consumer, events)
    async with db.session() as session:
        return {c.user_id: c for c in (await session.execute(select(Conversion))).scalars()}


async def test_a_signup_through_a_clicked_link_converts_for_its_referrer(db):
    token = await make_link(db, "maya", "buddy_challenge")
    await click(db, token, "v1", NOW - timedelta(days=2))
    conversions = await run(db, [event("s1", "signup", "newbie", NOW, referral_token=token, visitor_id="v1")])
    c = conversions["newbie"]
    assert (c.referrer_id, c.source, c.model) == ("maya", "buddy_challenge", "last_touch")
    assert c.touched_at == NOW - timedelta(days=2) and c.signup_at == NOW and c.activated_at is None


@pytest.mark.parametrize(("days_after_click", "converts"), [(6.9, True), (7.0, True), (7.1, False)])
async def test_the_attribution_window_is_seven_days(db, days_after_click, converts):
    token = await make_link(db, "maya", created=NOW - timedelta(days=20))
    await click(db, token, "v1", NOW - timedelta(days=days_after_click))
    conversions = await run(db, [event("s", "signup", "newbie", NOW, referral_token=token)])
    assert ("newbie" in conversions) is converts


async def test_a_link_passed_on_without_a_click_counts_from_its_creation(db):
    fresh = await make_link(db, "maya", created=NOW - timedelta(days=2))
    stale = await make_link(db, "sam", created=NOW - timedelta(days=10))
    conversions = await run(
        db,
        [
            event("a", "signup", "u1", NOW, referral_token=fresh),
            event("b", "signup", "u2", NOW, referral_token=stale),
        ],
    )
    assert set(conversions) == {"u1"}


async def test_nobody_refers_themselves_and_one_conversion_per_new_user(db):
    token = await make_link(db, "maya")
    other = await make_link(db, "sam")
    conversions = await run(
        db,
        [
            event("self", "signup", "maya", NOW, referral_token=token),
            event("s1", "signup", "newbie", NOW, referral_token=token),
            event("s2", "signup", "newbie", NOW + timedelta(minutes=1), referral_token=other),
        ],
    )
    assert set(conversions) == {"newbie"} and conversions["newbie"].referrer_id == "maya"


async def test_tampered_or_unknown_tokens_convert_nobody(db):
    token = await make_link(db, "maya")
    nonce, kid, exp, sig = token.split(".")
    stretched = f"{nonce}.{kid}.{int(exp) + 86400}.{sig}"
    forged = LinkSigner("another-key-0123456789-0123456789").issue("maya", int(NOW.timestamp())).token
    conversions = await run(
        db,
        [
            event("a", "signup", "u1", NOW, referral_token=stretched),
            event("b", "signup", "u2", NOW, referral_token=forged),
            event("c", "signup", "u3", NOW, referral_token="garbage"),
            event("d", "signup", "u4", NOW),
        ],
    )
    assert conversions == {}


@pytest.mark.parametrize(
    ("model", "credited", "source"),
    [("last_touch", "bob", "proud_parent"), ("first_touch", "ann", "results_rally")],
)
async def test_last_touch_credits_the_token_and_first_touch_the_earliest_click(db, model, credited, source):
    first = await make_link(db, "ann", "results_rally", created=NOW - timedelta(days=6))
    last = await make_link(db, "bob", "proud_parent", created=NOW - timedelta(days=6))
    await click(db, first, "v9", NOW - timedelta(days=5))
    await click(db, last, "v9", NOW - timedelta(days=1))
    signup = event("s", "signup", "newbie", NOW, referral_token=last, visitor_id="v9")
    conversion = (await run(db, [signup], model=model))["newbie"]
    assert (conversion.referrer_id, conversion.source, conversion.model) == (credited, source, model)


async def test_first_value_activates_once(db):
    token = await make_link(db, "maya")
    conversions = await run(
        db,
        [
            event("s", "signup", "newbie", NOW, referral_token=token),
            event("f1", "first_value", "newbie", NOW + timedelta(hours=2)),
            event("f2", "first_value", "newbie", NOW + timedelta(hours=5)),
            event("f3", "first_value", "stranger", NOW),
        ],
    )
    assert conversions["newbie"].activated_at == NOW + timedelta(hours=2)


async def rewards(db: Database) -> list[tuple[str, str, int, str, str]]:
    async with db.session() as session:
        rows = (await session.execute(select(Reward).order_by(Reward.id))).scalars().all()
    return [(r.user_id, r.kind, r.amount, r.reason, r.ref) for r in rows]


async def test_conversions_and_activations_pay_the_referrer_once(db):
    token = await make_link(db, "maya")
    batch = [
        event("s", "signup", "newbie", NOW, referral_token=token),
        event("f", "first_value", "newbie", NOW + timedelta(hours=1)),
    ]
    await run(db, batch)
    await run(db, [event("s2", "signup", "newbie", NOW, referral_token=token)])  # a second signup: nothing
    assert await rewards(db) == [
        ("maya", "xp", 100, "referral_signup", "newbie"),
        ("maya", "streak_shield", 1, "referral_activated", "newbie"),
    ]


async def test_daily_caps_hold(db):
    token = await make_link(db, "maya")
    signups = [  # 15 minutes apart: at most 5 in an hour, under the fraud signals' burst threshold
        event(f"s{i}", "signup", f"n{i}", NOW + timedelta(minutes=15 * i), referral_token=token)
        for i in range(7)
    ]
    firsts = [event(f"f{i}", "first_value", f"n{i}", NOW + timedelta(hours=2, minutes=i)) for i in range(7)]
    await run(db, signups + firsts)
    paid = await rewards(db)
    assert sum(a for _, kind, a, _, _ in paid if kind == "xp") == 500  # 5 of 7 signups paid
    assert sum(a for _, kind, a, _, _ in paid if kind == "streak_shield") == 3
    next_day = [event("s9", "signup", "n9", NOW + timedelta(days=1), referral_token=token)]
    await run(db, next_day)
    assert (await rewards(db))[-1] == ("maya", "xp", 100, "referral_signup", "n9")


async def test_an_invite_naming_its_link_dates_the_sending_and_cycle_time_runs_from_there(db):
    """Link made 3 days before NOW, sent 2 days before (and again later: the first sending counts);
    someone else's invite naming it, and a tampered token, change nothing. Signup at NOW: cycle 48 h."""
    from metrics.growth import k_factor_report

    token = await make_link(db, "maya")
    nonce = token.split(".")[0]
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    await run(
        db,
        [
            event(
                "i0", "invite_sent", "maya", NOW - timedelta(days=1), source="study_buddy", link_token=token
            ),
            event(
                "i1", "invite_sent", "maya", NOW - timedelta(days=2), source="study_buddy", link_token=token
            ),
            event("i2", "invite_sent", "eve", NOW - timedelta(days=2.5), source="direct", link_token=token),
            event(
                "i3", "invite_sent", "maya", NOW - timedelta(days=2.9), source="direct", link_token=tampered
            ),
            event("s", "signup", "newbie", NOW, referral_token=token),
        ],
    )
    async with db.session() as session:
        assert (await session.get(Link, nonce)).sent_at == NOW - timedelta(days=2)
        report = await k_factor_report(session, 7, NOW + timedelta(seconds=1))
    assert report["cycle_time"] == {"median_hours": 48.0, "p90_hours": 48.0}
