"""Fraud signals on attribution (real SQLite and PostgreSQL): one crafted event sequence per signal, the
status and reasons it leaves, what is (not) paid, admin review, and the K-factor's raw vs filtered values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from servers import SECRET, make_token
from sqlalchemy import select

from metrics import ConsumerRunner, MemoryEventStream
from metrics.attribution import AttributionConsumer
from metrics.fraud import FraudRules, email_hash, ip_hashes, normalise_email, review
from metrics.growth import k_factor_report, loop_efficiency, rebuild_activity
from metrics.links import LinkSigner
from store import AuditLog, Click, Conversion, Database, Event, Link, Reward

KEY = "fraud-test-key-0123456789abcdef-0123456789"
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
MIN, HOUR, DAY = timedelta(minutes=1), timedelta(hours=1), timedelta(days=1)


def ip(host: str) -> str:
    hashes = ip_hashes(KEY, host)
    assert hashes is not None
    return hashes[0]


def net(host: str) -> str:
    hashes = ip_hashes(KEY, host)
    assert hashes is not None
    return hashes[1]


@pytest.fixture
async def db(database_url):
    database = Database(database_url)
    yield database
    await database.dispose()


async def make_link(db: Database, referrer: str, source: str = "study_buddy") -> str:
    created = NOW - 3 * DAY
    link = LinkSigner(KEY).issue(referrer, int(created.timestamp()), ttl=60 * 86400)
    async with db.session() as session, session.begin():
        session.add(
            Link(
                nonce=link.nonce,
                token=link.token,
                referrer_id=referrer,
                source=source,
                target="/",
                created_at=created,
                expires_at=created + 60 * DAY,
            )
        )
    return link.token


async def click(db: Database, token: str, visitor: str, at: datetime, host: str | None = None) -> None:
    hashes = ip_hashes(KEY, host) if host else None
    async with db.session() as session, session.begin():
        session.add(
            Click(
                nonce=token.split(".")[0],
                visitor=visitor,
                unique_click=True,
                clicked_at=at,
                ip_hash=hashes[0] if hashes else None,
                net_hash=hashes[1] if hashes else None,
            )
        )


async def signed_up(db: Database, user: str, at: datetime, **props) -> None:
    """A user's own `signup` event, as the ingest stored it (what self-referral compares with)."""
    async with db.session() as session, session.begin():
        session.add(
            Event(
                id=f"own-{user}",
                type="signup",
                user_id=user,
                ts=at,
                received_at=at,
                props=props,
                actor_id=user,
                published=True,
            )
        )


def event(eid: str, etype: str, user: str, at: datetime, **props) -> dict:
    return {"id": eid, "type": etype, "user_id": user, "ts": at.isoformat(), "props": props, "actor_id": user}


async def run(db: Database, events: list[dict], rules: FraudRules | None = None) -> dict[str, Conversion]:
    consumer = AttributionConsumer(LinkSigner(KEY), rules=rules)
    await ConsumerRunner(db, MemoryEventStream(), [consumer]).process_batch(consumer, events)
    async with db.session() as session:
        return {c.user_id: c for c in (await session.execute(select(Conversion))).scalars()}


async def rewards(db: Database) -> list[tuple[str, str, str]]:
    async with db.session() as session:
        rows = (await session.execute(select(Reward).order_by(Reward.id))).scalars().all()
    return [(r.user_id, r.reason, r.ref) for r in rows]


def outcome(c: Conversion) -> tuple[str, list[str]]:
    return c.status, c.fraud_reasons


# --- hashes ---


def test_ip_hashes_are_keyed_and_share_the_network_hash_within_a_24_or_48():
    a, b, other = (
        ip_hashes(KEY, "203.0.113.7"),
        ip_hashes(KEY, "203.0.113.200"),
        ip_hashes(KEY, "203.0.114.7"),
    )
    assert a and b and other and all(len(h) == 32 for h in a)
    assert a[0] != b[0] and a[1] == b[1] != other[1]
    assert ip_hashes(KEY, "::ffff:203.0.113.7") == a  # an IPv4-mapped address is the IPv4 one
    assert ip_hashes("another-secret-0123456789", "203.0.113.7") != a
    v6, same48 = ip_hashes(KEY, "2001:db8:1:2::1"), ip_hashes(KEY, "2001:0db8:0001:ffff::9")
    assert v6 and same48 and v6[0] != same48[0] and v6[1] == same48[1]
    assert ip_hashes(KEY, "testclient") is None


@pytest.mark.parametrize(
    ("address", "normal"),
    [
        ("  Maya.Lee+alt@GoogleMail.com ", "mayalee@gmail.com"),
        ("maya.lee@gmail.com", "mayalee@gmail.com"),
        ("Sam.Ng+school@Example.org", "sam.ng@example.org"),
        ("no-at-sign", "no-at-sign"),
    ],
)
def test_emails_are_normalised_before_hashing(address, normal):
    assert normalise_email(address) == normal
    assert email_hash(KEY, address) == email_hash(KEY, normal)


async def test_a_click_through_the_server_records_the_clients_ip_and_network_hashes(
    server_factory, server_database
):
    server = server_factory()
    async with httpx.AsyncClient(base_url=server.http) as http:
        made = await http.post(
            "/api/links",
            json={"source": "study_buddy"},
            headers={"authorization": f"Bearer {make_token('maya')}"},
        )
        assert (await http.get(f"/r/{made.json()['token']}")).status_code == 302
    database = Database(server_database)
    try:
        async with database.session() as session:
            hashes = (await session.execute(select(Click.ip_hash, Click.net_hash))).all()
    finally:
        await database.dispose()
    assert [tuple(h) for h in hashes] == [ip_hashes(SECRET, "127.0.0.1")]


# --- the signals ---


async def test_a_clean_conversion_is_ok_and_paid(db):
    await signed_up(
        db, "maya", NOW - 30 * DAY, visitor_id="vm", device_id="dev-m", ip_hash=ip("198.51.100.1")
    )
    token = await make_link(db, "maya")
    await click(db, token, "vn", NOW - HOUR, "203.0.113.9")
    conversions = await run(
        db,
        [
            event(
                "s",
                "signup",
                "newbie",
                NOW,
                referral_token=token,
                visitor_id="vn",
                device_id="dev-n",
                ip_hash=ip("203.0.113.9"),
                email_hash=email_hash(KEY, "newbie@example.org"),
            )
        ],
    )
    assert outcome(conversions["newbie"]) == ("ok", [])
    assert await rewards(db) == [("maya", "referral_signup", "newbie")]


@pytest.mark.parametrize(
    ("referrer_props", "newbie_props", "expected"),
    [
        ({"device_id": "tablet-1"}, {"device_id": "tablet-1"}, ("flagged", ["self_referral:device"])),
        ({"visitor_id": "v" * 32}, {"visitor_id": "v" * 32}, ("flagged", ["self_referral:visitor"])),
        (  # the "pattern": one mailbox under two spellings
            {"email_hash": email_hash(KEY, "maya.lee@gmail.com")},
            {"email_hash": email_hash(KEY, "MayaLee+second@googlemail.com")},
            ("flagged", ["self_referral:email"]),
        ),
        (  # one address only: a family or a school shares it, so it is held for review
            {"ip_hash": ip("198.51.100.1")},
            {"ip_hash": ip("198.51.100.1")},
            ("pending", ["self_referral:ip"]),
        ),
        ({"device_id": "tablet-1"}, {"device_id": "tablet-2"}, ("ok", [])),
    ],
)
async def test_self_referral_by_the_referrers_own_signup(db, referrer_props, newbie_props, expected):
    await signed_up(db, "maya", NOW - 30 * DAY, **referrer_props)
    token = await make_link(db, "maya")
    conversions = await run(db, [event("s", "signup", "alt", NOW, referral_token=token, **newbie_props)])
    assert outcome(conversions["alt"]) == expected
    assert await rewards(db) == ([("maya", "referral_signup", "alt")] if expected[0] == "ok" else [])


async def test_self_referral_by_the_referrers_clicks(db):
    """maya (browser vm) was referred by sam through a click at school and tried her own link from
    home. Her second account signs up from another browser at home (the touch shares the ip_hash with
    her click on this link), her third from another browser at school (shares it with her own touch
    on sam's link): both are held. A friend at another address converts cleanly."""
    sam = await make_link(db, "sam")
    await click(db, sam, "vm", NOW - 20 * DAY - HOUR, "192.0.2.50")
    await run(db, [event("sm", "signup", "maya", NOW - 20 * DAY, referral_token=sam, visitor_id="vm")])
    await signed_up(db, "maya", NOW - 20 * DAY, visitor_id="vm")
    token = await make_link(db, "maya")
    await click(db, token, "vm", NOW - 2 * HOUR, "198.51.100.1")
    await click(db, token, "v2", NOW - HOUR, "198.51.100.1")
    await click(db, token, "v3", NOW - HOUR, "192.0.2.50")
    await click(db, token, "v4", NOW - HOUR, "203.0.113.9")
    conversions = await run(
        db,
        [
            event("s2", "signup", "maya2", NOW, referral_token=token, visitor_id="v2"),
            event("s3", "signup", "maya3", NOW, referral_token=token, visitor_id="v3"),
            event("s4", "signup", "friend", NOW, referral_token=token, visitor_id="v4"),
        ],
    )
    assert outcome(conversions["maya"]) == ("ok", [])
    assert outcome(conversions["maya2"]) == ("pending", ["self_referral:ip"])
    assert outcome(conversions["maya3"]) == ("pending", ["self_referral:ip"])
    assert outcome(conversions["friend"]) == ("ok", [])
    assert [r for r in await rewards(db) if r[0] == "maya"] == [("maya", "referral_signup", "friend")]


@pytest.mark.parametrize(("clicks", "expected"), [(50, ("ok", [])), (51, ("flagged", ["click_flood:rate"]))])
async def test_click_flood_by_rate(db, clicks, expected):
    """More than 50 clicks on the link in the 10 minutes before the signup (each from its own address)."""
    token = await make_link(db, "maya")
    async with db.session() as session, session.begin():
        session.add_all(
            Click(
                nonce=token.split(".")[0],
                visitor=f"v{i}",
                unique_click=True,
                clicked_at=NOW - 9 * MIN + i * timedelta(seconds=5),
                ip_hash=ip(f"10.0.{i}.1"),
                net_hash=net(f"10.0.{i}.1"),
            )
            for i in range(clicks)
        )
    conversions = await run(db, [event("s", "signup", "newbie", NOW, referral_token=token)])
    assert outcome(conversions["newbie"]) == expected
    assert bool(await rewards(db)) is (expected[0] == "ok")


async def test_click_flood_from_one_address(db):
    """11 clicks on one link in 24 h from one address (10 visitors hourly, then the newbie)."""
    token = await make_link(db, "maya")
    for i in range(10):
        await click(db, token, f"bot{i}", NOW - 20 * HOUR + i * HOUR, "192.0.2.66")
    await click(db, token, "vn", NOW - MIN, "192.0.2.66")
    conversions = await run(db, [event("s", "signup", "newbie", NOW, referral_token=token, visitor_id="vn")])
    assert outcome(conversions["newbie"]) == ("flagged", ["click_flood:ip"])
    assert await rewards(db) == []


async def test_ip_range_signups_from_one_network(db):
    """Six referrers' links, six signups within 24 h, each touch from another address of
    203.0.113.0/24: the sixth is one more than 5 and is flagged. One from elsewhere stays ok, and one
    from the same network 20 h after the sixth, when only four of them are left in the window, too."""
    events = []
    for i in range(6):
        token = await make_link(db, f"ref{i}")
        at = NOW - 12 * HOUR + i * HOUR
        await click(db, token, f"v{i}", at - MIN, f"203.0.113.{10 + i}")
        events.append(event(f"s{i}", "signup", f"new{i}", at, referral_token=token, visitor_id=f"v{i}"))
    elsewhere = await make_link(db, "ref9")
    await click(db, elsewhere, "v9", NOW - MIN, "198.51.100.5")
    events.append(event("s9", "signup", "new9", NOW, referral_token=elsewhere, visitor_id="v9"))
    later = await make_link(db, "ref8")
    await click(db, later, "v8", NOW + 13 * HOUR - MIN, "203.0.113.99")
    events.append(event("s8", "signup", "new8", NOW + 13 * HOUR, referral_token=later, visitor_id="v8"))
    conversions = await run(db, events)
    statuses = {user: outcome(c) for user, c in conversions.items()}
    assert [statuses[f"new{i}"] for i in range(5)] == [("ok", [])] * 5
    assert statuses["new5"] == ("flagged", ["ip_range"])
    assert statuses["new9"] == ("ok", []) and statuses["new8"] == ("ok", [])
    paid = {ref for _, _, ref in await rewards(db)}
    assert "new5" not in paid and {"new0", "new4", "new8", "new9"} <= paid


async def test_conversion_burst_holds_the_sixth_in_an_hour_and_pays_nothing_for_it(db):
    token = await make_link(db, "maya")
    signups = [event(f"s{i}", "signup", f"n{i}", NOW + i * 10 * MIN, referral_token=token) for i in range(6)]
    firsts = [event(f"f{i}", "first_value", f"n{i}", NOW + 2 * HOUR + i * MIN) for i in (0, 5)]
    tomorrow = event("s7", "signup", "n7", NOW + DAY, referral_token=token)
    conversions = await run(db, [*signups, *firsts, tomorrow])
    assert [outcome(conversions[f"n{i}"]) for i in range(6)] == [("ok", [])] * 5 + [
        ("pending", ["conversion_burst"])
    ]
    assert outcome(conversions["n7"]) == ("ok", [])
    assert conversions["n5"].activated_at is not None  # activation is recorded, not paid
    paid = await rewards(db)
    assert ("maya", "referral_activated", "n0") in paid
    assert not [r for r in paid if r[2] == "n5"] and ("maya", "referral_signup", "n7") in paid


async def test_reward_farming_holds_conversions_past_the_cap(db):
    """With a cap of 2 paid referrals per 30 days, the third (a day apart each) is held."""
    token = await make_link(db, "maya")
    rules = FraudRules(farming_cap=2)
    conversions = await run(
        db,
        [event(f"s{i}", "signup", f"n{i}", NOW + i * DAY, referral_token=token) for i in range(3)],
        rules,
    )
    assert [outcome(conversions[f"n{i}"]) for i in range(3)] == [
        ("ok", []),
        ("ok", []),
        ("pending", ["reward_farming"]),
    ]
    assert await rewards(db) == [("maya", "referral_signup", "n0"), ("maya", "referral_signup", "n1")]
    assert FraudRules().farming_cap == 30 and FraudRules().farming_window == 30 * DAY


async def test_several_signals_flag_when_any_is_strong(db):
    await signed_up(db, "maya", NOW - 30 * DAY, device_id="tablet-1", ip_hash=ip("198.51.100.1"))
    token = await make_link(db, "maya")
    signup = event(
        "s", "signup", "alt", NOW, referral_token=token, device_id="tablet-1", ip_hash=ip("198.51.100.1")
    )
    conversions = await run(db, [signup])
    assert outcome(conversions["alt"]) == ("flagged", ["self_referral:device", "self_referral:ip"])


# --- review ---


async def test_review_approves_a_held_conversion_paying_once_or_rejects_it(db):
    await signed_up(db, "maya", NOW - 30 * DAY, ip_hash=ip("198.51.100.1"))
    token = await make_link(db, "maya", "proud_parent")
    shared = ip("198.51.100.1")
    await run(
        db,
        [
            event("s1", "signup", "cousin", NOW, referral_token=token, ip_hash=shared),
            event("f1", "first_value", "cousin", NOW + HOUR),
            event("s2", "signup", "alt", NOW + MIN, referral_token=token, ip_hash=shared),
        ],
    )
    assert await rewards(db) == []
    later = NOW + DAY
    async with db.session() as session, session.begin():
        approved = await review(session, "cousin", True, "ops", later)
        rejected = await review(session, "alt", False, "ops", later)
    assert (approved.status, approved.reasons, approved.referrer_id) == ("ok", ["self_referral:ip"], "maya")
    assert {(p.user_id, p.reason) for p in approved.paid} == {
        ("maya", "referral_signup"),
        ("maya", "parent_referral"),
        ("cousin", "parent_referral"),
        ("maya", "referral_activated"),
    }
    assert (rejected.status, rejected.paid) == ("flagged", [])
    async with db.session() as session, session.begin():
        again = await review(session, "cousin", True, "ops", later + HOUR)
    assert again.paid == []  # the ledger pays each once
    assert sorted(await rewards(db)) == sorted(
        [
            ("maya", "referral_signup", "cousin"),
            ("maya", "parent_referral", "cousin"),
            ("cousin", "parent_referral", "cousin"),
            ("maya", "referral_activated", "cousin"),
        ]
    )
    async with db.session() as session:
        audit = (await session.execute(select(AuditLog).order_by(AuditLog.id))).scalars().all()
        statuses = {c.user_id: c.status for c in (await session.execute(select(Conversion))).scalars()}
        with pytest.raises(LookupError):
            await review(session, "nobody", True, "ops", later)
    assert [(a.actor, a.action, a.subject, a.details["was"]) for a in audit] == [
        ("ops", "conversion_approved", "conversion:cousin", "pending"),
        ("ops", "conversion_rejected", "conversion:alt", "pending"),
        ("ops", "conversion_approved", "conversion:cousin", "ok"),
    ]
    assert statuses == {"cousin": "ok", "alt": "flagged"}


# --- the K-factor report: raw and filtered ---


async def test_the_k_factor_report_gives_raw_and_fraud_filtered_values(db):
    """ann and bob (the base: 2) send 2 invites each. Of four conversions in the window, n1 (ann,
    activated) and n4 (bob) are ok, n2 (ann, activated) flagged, n3 (bob) pending.
    Raw: K = 4/2 x 4/4 = 2.0; filtered: 4/2 x 2/4 = 1.0. Per source 1.0 raw, 0.5 filtered."""

    def conv(user: str, referrer: str, nonce: str, source: str, status: str, activated: bool) -> Conversion:
        return Conversion(
            user_id=user,
            referrer_id=referrer,
            nonce=nonce,
            source=source,
            model="last_touch",
            touched_at=NOW - 2 * DAY,
            signup_at=NOW - DAY,
            signup_event_id=f"su-{user}",
            activated_at=NOW - DAY / 2 if activated else None,
            status=status,
            fraud_reasons=[] if status == "ok" else ["self_referral:ip"],
        )

    def ev(eid: str, etype: str, user: str, at: datetime, **props) -> Event:
        return Event(id=eid, type=etype, user_id=user, ts=at, received_at=at, props=props, actor_id=user)

    async with db.session() as session, session.begin():
        session.add_all(
            [
                *(ev(f"ia{i}", "invite_sent", "ann", NOW - 2 * DAY, source="study_buddy") for i in range(2)),
                *(
                    ev(f"ib{i}", "invite_sent", "bob", NOW - 2 * DAY, source="results_rally")
                    for i in range(2)
                ),
                *(ev(f"su-n{i}", "signup", f"n{i}", NOW - DAY) for i in range(1, 5)),
                *(
                    Link(
                        nonce=nonce,
                        token=f"{nonce}.k.1.s",
                        referrer_id=referrer,
                        source=source,
                        target="/",
                        created_at=NOW - 3 * DAY,
                        expires_at=NOW + 27 * DAY,
                    )
                    for nonce, referrer, source in [
                        ("LA", "ann", "study_buddy"),
                        ("LB", "bob", "results_rally"),
                    ]
                ),
                conv("n1", "ann", "LA", "study_buddy", "ok", True),
                conv("n2", "ann", "LA", "study_buddy", "flagged", True),
                conv("n3", "bob", "LB", "results_rally", "pending", False),
                conv("n4", "bob", "LB", "results_rally", "ok", False),
            ]
        )
        await session.flush()
        await rebuild_activity(session)
    async with db.session() as session:
        r = await k_factor_report(session, 7, NOW)
        loops = {loop["source"]: loop for loop in await loop_efficiency(session, 7, NOW)}
    assert (r["active_users"], r["invites_sent"], r["referrers"]) == (2, 4, 2)
    assert (r["signups"], r["activated"], r["k_factor"], r["conversion_rate"]) == (4, 2, 2.0, 1.0)
    assert r["k_per_referrer"] == 2.0
    assert (r["signups_filtered"], r["activated_filtered"]) == (2, 1)
    assert (r["k_factor_filtered"], r["conversion_rate_filtered"], r["k_per_referrer_filtered"]) == (
        1.0,
        0.5,
        1.0,
    )
    assert (r["flagged"], r["pending"]) == (1, 1)
    assert [
        (s["source"], s["k_factor"], s["signups_filtered"], s["k_factor_filtered"]) for s in r["by_source"]
    ] == [
        ("results_rally", 1.0, 1, 0.5),
        ("study_buddy", 1.0, 1, 0.5),
    ]
    day = {d["date"]: d for d in r["timeline"]}["2026-11-19"]
    assert (day["signups"], day["signups_filtered"]) == (4, 2)
    assert [(t["user_id"], t["conversions"], t["conversions_filtered"]) for t in r["top_referrers"]] == [
        ("ann", 2, 1),
        ("bob", 2, 1),
    ]
    assert (loops["study_buddy"]["k_factor"], loops["study_buddy"]["k_factor_filtered"]) == (1.0, 0.5)
    assert loops["results_rally"]["signups_filtered"] == 1
