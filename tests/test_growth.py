"""The K-factor report (SPEC §9) on a crafted history with hand-computed values, on SQLite and PostgreSQL.

Window: the 7 days before NOW (Friday 2026-11-20 12:00 UTC).
- ann sends 2 study_buddy invites, bob 1 results_rally, dan (who signed up in the window) 1
  study_buddy; cat only studies; an invite 10 days ago is outside. invites_sent = 4, referrers =
  {ann, bob, dan} = 3; the base is {ann, bob, cat} = 3 (dan and the newbies signed up in the window).
- conversions in the window: newbie1 (ann, study_buddy, activated), newbie2 (bob, results_rally),
  newbie3 (dan, study_buddy); one 9 days ago is outside. signups = 3, activated = 1.
- K = 4/3 x 3/4 = 1.0; study_buddy K = 3/3 x 2/3 = 2/3, results_rally 1/3 x 1/1 = 1/3 (they add to 1).
- unique clicks: link A by v1 (twice) and v2 = 2; an old click is outside.
- cycle times 24 h, 36 h, 6 h: median 24 h, p90 24 + 0.8 x 12 = 33.6 h.
- cohort week of Monday 2026-11-16: dan, newbie1, newbie2, newbie3 (size 4); dan brought newbie3 → K 0.25.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from metrics.growth import active_users, band, k_factor_report, loop_efficiency, rebuild_activity
from store import Click, Conversion, Database, Event, Link

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture
async def db(database_url):
    database = Database(database_url)
    yield database
    await database.dispose()


def ev(eid: str, etype: str, user: str, at: datetime, **props) -> Event:
    return Event(
        id=eid, type=etype, user_id=user, ts=at, received_at=at, props=props, actor_id=user, published=True
    )


def link(nonce: str, referrer: str, source: str, created: datetime) -> Link:
    return Link(
        nonce=nonce,
        token=f"{nonce}.k.1.s",
        referrer_id=referrer,
        source=source,
        target="/",
        created_at=created,
        expires_at=created + 30 * DAY,
    )


def conv(
    user: str, referrer: str, nonce: str, source: str, signup: datetime, activated: datetime | None = None
) -> Conversion:
    return Conversion(
        user_id=user,
        referrer_id=referrer,
        nonce=nonce,
        source=source,
        model="last_touch",
        touched_at=signup - DAY,
        signup_at=signup,
        signup_event_id=f"su-{user}",
        activated_at=activated,
    )


@pytest.fixture
async def history(db):
    async with db.session() as session, session.begin():
        session.add_all(
            [
                ev("i1", "invite_sent", "ann", NOW - 2 * DAY, source="study_buddy"),
                ev("i2", "invite_sent", "ann", NOW - 2 * DAY, source="study_buddy"),
                ev("i3", "invite_sent", "bob", NOW - 3 * DAY, source="results_rally"),
                ev("i4", "invite_sent", "dan", NOW - DAY / 2, source="study_buddy"),
                ev("i0", "invite_sent", "old", NOW - 10 * DAY, source="study_buddy"),
                ev("a1", "session_started", "ann", NOW - DAY, subject="math"),
                ev("c1", "session_completed", "cat", NOW - DAY, subject="math", minutes=10),
                ev("su-dan", "signup", "dan", NOW - DAY),
                ev("su-newbie1", "signup", "newbie1", NOW - DAY),
                ev("su-newbie2", "signup", "newbie2", NOW - 2 * DAY),
                ev("su-newbie3", "signup", "newbie3", NOW - DAY / 4),
                link("LA", "ann", "study_buddy", NOW - 2 * DAY),
                link("LB", "bob", "results_rally", NOW - 3.5 * DAY),
                link("LD", "dan", "study_buddy", NOW - DAY / 2),
                link("LO", "old", "study_buddy", NOW - 12 * DAY),
                conv("newbie1", "ann", "LA", "study_buddy", NOW - DAY, activated=NOW - DAY / 2),
                conv("newbie2", "bob", "LB", "results_rally", NOW - 2 * DAY),
                conv("newbie3", "dan", "LD", "study_buddy", NOW - DAY / 4),
                conv("oldie", "old", "LO", "study_buddy", NOW - 9 * DAY),
                Click(nonce="LA", visitor="v1", unique_click=True, clicked_at=NOW - 2 * DAY),
                Click(nonce="LA", visitor="v1", unique_click=False, clicked_at=NOW - 1.9 * DAY),
                Click(nonce="LA", visitor="v2", unique_click=True, clicked_at=NOW - 1.5 * DAY),
                Click(nonce="LO", visitor="v3", unique_click=True, clicked_at=NOW - 11 * DAY),
            ]
        )
        await session.flush()
        await rebuild_activity(session)  # rows added here bypass the ingest that keeps it


async def report(db: Database, days: int = 7) -> dict:
    async with db.session() as session:
        return await k_factor_report(session, days, NOW)


async def test_headline_numbers(db, history):
    r = await report(db)
    assert (r["invites_sent"], r["referrers"], r["active_users"]) == (4, 3, 3)
    assert (r["clicks"], r["signups"], r["activated"]) == (2, 3, 1)
    assert r["invites_per_user"] == pytest.approx(4 / 3)
    assert r["conversion_rate"] == pytest.approx(3 / 4)
    assert r["k_factor"] == pytest.approx(1.0)
    assert r["k_per_referrer"] == pytest.approx(1.0)
    assert r["days"] == 7


async def test_sources_add_up_to_k(db, history):
    r = await report(db)
    by = {s["source"]: s for s in r["by_source"]}
    assert by["study_buddy"]["k_factor"] == pytest.approx(2 / 3)
    assert by["results_rally"]["k_factor"] == pytest.approx(1 / 3)
    assert (by["study_buddy"]["invites_sent"], by["study_buddy"]["signups"]) == (3, 2)
    assert by["study_buddy"]["conversion_rate"] == pytest.approx(2 / 3)
    assert sum(s["k_factor"] for s in r["by_source"]) == pytest.approx(r["k_factor"])


async def test_funnel_cycle_time_cohorts_and_referrers(db, history):
    r = await report(db)
    assert [(s["stage"], s["count"]) for s in r["funnel"]] == [
        ("sent", 4),
        ("clicked", 2),
        ("signed_up", 3),
        ("activated", 1),
    ]
    assert [s["rate_from_previous"] for s in r["funnel"]] == [None, 0.5, 1.5, pytest.approx(1 / 3)]
    assert r["cycle_time"] == {"median_hours": 24.0, "p90_hours": 33.6}
    assert r["cohorts"] == [{"cohort": "2026-11-16", "size": 4, "signups": 1, "k_factor": 0.25}]
    assert [(t["user_id"], t["conversions"], t["invites_sent"]) for t in r["top_referrers"]] == [
        ("ann", 1, 2),
        ("bob", 1, 1),
        ("dan", 1, 1),
    ]
    assert r["top_referrers"][0]["conversion_rate"] == 0.5


async def test_timeline_has_every_day_of_the_window(db, history):
    timeline = (await report(db))["timeline"]
    assert [d["date"] for d in timeline] == [f"2026-11-{d}" for d in range(13, 21)]
    by_day = {d["date"]: d for d in timeline}
    assert by_day["2026-11-18"]["invites_sent"] == 2 and by_day["2026-11-17"]["invites_sent"] == 1
    assert by_day["2026-11-20"]["invites_sent"] == 1 and by_day["2026-11-20"]["signups"] == 1
    assert by_day["2026-11-18"]["clicks"] == 1 and by_day["2026-11-19"]["clicks"] == 1  # unique clicks


async def test_an_empty_window_has_zeroes_not_errors(db):
    r = await report(db, days=30)
    assert r["k_factor"] == 0 and r["invites_per_user"] == 0 and r["conversion_rate"] == 0
    assert r["k_per_referrer"] == 0 and r["by_source"] == [] and r["cohorts"] == []
    assert r["cycle_time"] == {"median_hours": None, "p90_hours": None}
    assert len(r["timeline"]) == 31


async def test_the_window_is_half_open_from_its_start_to_now(db):
    async with db.session() as session, session.begin():
        session.add_all(
            [
                ev("before", "invite_sent", "ann", NOW - 7 * DAY - timedelta(seconds=1), source="direct"),
                ev("start", "invite_sent", "ann", NOW - 7 * DAY, source="direct"),
                ev("now", "invite_sent", "ann", NOW, source="direct"),
            ]
        )
        await session.flush()
        await rebuild_activity(session)
    assert (await report(db))["invites_sent"] == 1  # [now - 7 days, now)


@pytest.mark.parametrize(
    ("k", "advice"),
    [(1.5, "scale"), (1.2, "scale"), (1.0, "continue"), (0.8, "optimise"), (0.79, "deprioritise")],
)
def test_recommendation_bands(k, advice):
    assert band(k) == advice


async def test_loop_efficiency_per_source(db, history):
    async with db.session() as session:
        loops = {loop["source"]: loop for loop in await loop_efficiency(session, 7, NOW)}
    study, rally = loops["study_buddy"], loops["results_rally"]
    assert study["k_factor"] == pytest.approx(2 / 3) and study["recommendation"] == "deprioritise"
    assert study["conversions_per_referrer"] == pytest.approx(1.0)  # 2 signups, referrers ann and dan
    assert study["mean_cycle_hours"] == pytest.approx(15.0)  # (24 + 6) / 2
    assert rally["k_factor"] == pytest.approx(1 / 3) and rally["mean_cycle_hours"] == pytest.approx(36.0)


async def raw_active_users(db: Database, start: datetime, end: datetime) -> int:
    """SPEC §9's base straight from the events: the definition the rollup must agree with."""
    from sqlalchemy import distinct, func, select

    new_users = select(Event.user_id).where(Event.type == "signup", Event.ts >= start, Event.ts < end)
    async with db.session() as session:
        return int(
            await session.scalar(
                select(func.count(distinct(Event.user_id))).where(
                    Event.ts >= start, Event.ts < end, Event.user_id.not_in(new_users)
                )
            )
        )


async def test_active_users_from_the_rollup_match_the_events_for_any_window(db):
    """Users whose latest event or signup lies after the window's end are checked against their events:
    eve was active inside the window and again after it; fay only after it; gus signed up inside and
    again after (a re-sent signup): excluded; hal signed up before, was active inside, signed up after."""
    async with db.session() as session, session.begin():
        session.add_all(
            [
                ev("e1", "session_started", "eve", NOW - 3 * DAY),
                ev("e2", "session_started", "eve", NOW + DAY),
                ev("f1", "session_started", "fay", NOW + DAY),
                ev("g1", "signup", "gus", NOW - 2 * DAY),
                ev("g2", "signup", "gus", NOW + DAY),
                ev("h0", "signup", "hal", NOW - 20 * DAY),
                ev("h1", "session_started", "hal", NOW - DAY),
                ev("h2", "signup", "hal", NOW + 2 * DAY),
                ev("i1", "session_started", "ivy", NOW - 8 * DAY),
            ]
        )
        await session.flush()
        await rebuild_activity(session)
    for start, end in [(NOW - 7 * DAY, NOW), (NOW - 30 * DAY, NOW), (NOW - 7 * DAY, NOW + 3 * DAY)]:
        async with db.session() as session:
            assert await active_users(session, start, end) == await raw_active_users(db, start, end)
    async with db.session() as session:
        assert await active_users(session, NOW - 7 * DAY, NOW) == 2  # eve, hal


async def test_the_ingest_keeps_the_activity_rollup(db):
    from metrics import EventIn, EventIngest, MemoryEventStream
    from store import UserActivity

    ingest = EventIngest(db, MemoryEventStream())
    await ingest.ingest(
        [
            EventIn("x1", "session_started", "kim", NOW - DAY, {}),
            EventIn("x2", "signup", "lou", NOW - 2 * DAY, {}),
            EventIn("x3", "session_started", "lou", NOW - 3 * DAY, {}),
        ],
        actor_id="admin",
    )
    # An older event never moves the times back; a duplicate changes nothing.
    await ingest.ingest(
        [EventIn("x4", "session_started", "kim", NOW - 5 * DAY, {}), EventIn("x2", "signup", "lou", NOW, {})],
        actor_id="admin",
    )
    async with db.session() as session:
        rows = {
            r.user_id: (r.last_ts, r.last_signup_ts) for r in (await session.scalars(select(UserActivity)))
        }
        assert rows == {"kim": (NOW - DAY, None), "lou": (NOW - 2 * DAY, NOW - 2 * DAY)}
        assert await active_users(session, NOW - 7 * DAY, NOW) == await raw_active_users(
            db, NOW - 7 * DAY, NOW
        )
