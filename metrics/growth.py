"""Growth metrics (SPEC §9): the one place that computes K. Every number is an SQL aggregate.

For a window of `days` ending at `now`:
- invites_sent: `invite_sent` events; referrers: distinct users who sent one;
- clicks: distinct (link, visitor) pairs that clicked;
- signups: attributed conversions whose signup is in the window; activated: those that reached
  `first_value`;
- active_users, the base: distinct users with any event, less those whose `signup` is in the window;
- K = invites_sent / active_users x signups / invites_sent (0 when a denominator is 0). Per source,
  numerators are that source's and the base stays the same, so the sources' K add up to K.

Fraud (metrics.fraud): every number above counts all conversions (raw). The `*_filtered` values
(`k_factor_filtered`, `signups_filtered`, `activated_filtered`, `conversion_rate_filtered`,
`k_per_referrer_filtered`; per source, per day and per top referrer too) count only the `ok` ones;
`flagged` and `pending` count the held ones whose signup is in the window. They come from the same
grouped conversions query (conditional counts), so they cost nothing extra.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Select, and_, case, delete, distinct, func, insert, not_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from store import Click, Conversion, Event, Link, UserActivity

PERIODS = (7, 14, 30, 90)
COHORT_DAYS = 30


class Converted(NamedTuple):
    """Conversions of one (UTC day, source): all of them, and by fraud status."""

    day: str
    source: str
    signups: int
    activated: int
    ok: int  # status "ok": what the filtered numbers count
    ok_activated: int
    flagged: int
    pending: int


def _ok() -> Any:
    return Conversion.status == "ok"


def _sent(link: type[Link]) -> Any:
    """When an invite link went out: its first `invite_sent`, else its creation."""
    return func.coalesce(link.sent_at, link.created_at)


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


async def _scalar(session: AsyncSession, query: Select[Any]) -> int:
    return int(await session.scalar(query) or 0)


async def active_users(session: AsyncSession, start: datetime, end: datetime) -> int:
    """Distinct users with an event in [start, end), less those with a `signup` in it — counted from
    the `user_activity` rollup (each user's latest event and latest signup), not from the events.

    A user whose latest event falls in [start, end) is active, and signed up in the window iff their
    latest signup is at or after `start` (it cannot be after their latest event): an index-only range
    count. Only users with an event at or after `end` (none when `end` is now, bar clock skew) need a
    look at their events, through the (user_id, ts) index.
    """
    u = UserActivity

    def has_event(*where: Any) -> Any:
        return (
            select(Event.id)
            .where(Event.user_id == u.user_id, Event.ts >= start, Event.ts < end, *where)
            .exists()
        )

    settled = (
        select(func.count())
        .where(u.last_ts >= start, u.last_ts < end)
        .where(or_(u.last_signup_ts.is_(None), u.last_signup_ts < start))
        .scalar_subquery()
    )
    later = (
        select(func.count())
        .where(u.last_ts >= end, has_event(), not_(has_event(Event.type == "signup")))
        .scalar_subquery()
    )
    return await _scalar(session, select(settled + later))


async def rebuild_activity(session: AsyncSession, user_ids: Sequence[str] | None = None) -> None:
    """Recompute the `user_activity` rollup from the events (all users, or some after a deletion).
    The ingest keeps it up to date; this is for imports that bypass it and for repairs."""
    latest = select(
        Event.user_id,
        func.max(Event.ts),
        func.max(case((Event.type == "signup", Event.ts), else_=None)),
    ).group_by(Event.user_id)
    wipe = delete(UserActivity)
    if user_ids is not None:
        latest = latest.where(Event.user_id.in_(user_ids))
        wipe = wipe.where(UserActivity.user_id.in_(user_ids))
    await session.execute(wipe)
    await session.execute(insert(UserActivity).from_select(["user_id", "last_ts", "last_signup_ts"], latest))


async def _quantile_hours(session: AsyncSession, start: datetime, end: datetime, q: float) -> float | None:
    """The q-quantile of signup - invite (link made) time in hours, interpolated between the two
    nearest ranks like PostgreSQL's percentile_cont; the rows are picked by ORDER BY … OFFSET in SQL."""
    seconds = _seconds_between(session, _sent(Link), Conversion.signup_at)
    base = (
        select(seconds.label("s"))
        .join(Link, Link.nonce == Conversion.nonce)
        .where(Conversion.signup_at >= start, Conversion.signup_at < end)
    )
    n = await _scalar(session, select(func.count()).select_from(base.subquery()))
    if n == 0:
        return None
    position = q * (n - 1)
    low = int(position)
    values = [
        float(v) for v in (await session.execute(base.order_by(seconds).offset(low).limit(2))).scalars()
    ]
    high = values[1] if len(values) > 1 else values[0]
    return round((values[0] + (high - values[0]) * (position - low)) / 3600, 2)


def _seconds_between(session: AsyncSession, earlier: Any, later: Any) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", later - earlier)
    return (func.julianday(later) - func.julianday(earlier)) * 86400.0


def _day(session: AsyncSession, column: Any) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", column)


async def k_factor_report(session: AsyncSession, days: int, now: datetime) -> dict[str, Any]:
    start, end = now - timedelta(days=days), now
    in_window = and_(Event.ts >= start, Event.ts < end)
    # Invites and conversions come grouped by (UTC day, source) in one query each: the totals, the
    # per-source split and the timeline are sums over those few groups.
    invites = await _by_day_and_source(session, start, end)
    conversions = await _conversions_by_day_and_source(session, start, end)
    invites_sent = sum(n for _, _, n in invites)
    signups = sum(c.signups for c in conversions)
    activated = sum(c.activated for c in conversions)
    signups_ok = sum(c.ok for c in conversions)
    referrers = await _scalar(
        session, select(func.count(distinct(Event.user_id))).where(Event.type == "invite_sent", in_window)
    )
    clicks = await _scalar(
        session,
        select(func.count()).select_from(
            select(Click.nonce, Click.visitor)
            .where(Click.clicked_at >= start, Click.clicked_at < end)
            .distinct()
            .subquery()
        ),
    )
    base = await active_users(session, start, end)
    invites_per_user = ratio(invites_sent, base)
    conversion_rate = ratio(signups, invites_sent)
    conversion_rate_ok = ratio(signups_ok, invites_sent)

    invites_by_source: dict[str | None, int] = {}
    for _, name, n in invites:
        invites_by_source[name] = invites_by_source.get(name, 0) + n
    signups_by_source: dict[str | None, tuple[int, int]] = {}
    for c in conversions:
        n, ok = signups_by_source.get(c.source, (0, 0))
        signups_by_source[c.source] = (n + c.signups, ok + c.ok)
    by_source = []
    for name in sorted(set(invites_by_source) | set(signups_by_source), key=lambda s: (s is None, s or "")):
        sent, (won, won_ok) = invites_by_source.get(name, 0), signups_by_source.get(name, (0, 0))
        by_source.append(
            {
                "source": name or "unknown",
                "k_factor": ratio(sent, base) * ratio(won, sent),
                "invites_sent": sent,
                "signups": won,
                "conversion_rate": ratio(won, sent),
                "k_factor_filtered": ratio(sent, base) * ratio(won_ok, sent),
                "signups_filtered": won_ok,
            }
        )
    median, p90 = await _cycle_hours(session, start, end)
    return {
        "days": days,
        "k_factor": invites_per_user * conversion_rate,
        "invites_sent": invites_sent,
        "invites_per_user": invites_per_user,
        "conversion_rate": conversion_rate,
        "clicks": clicks,
        "signups": signups,
        "activated": activated,
        "referrers": referrers,
        "active_users": base,
        "k_per_referrer": ratio(signups, referrers),
        "by_source": by_source,
        "funnel": _funnel(invites_sent, clicks, signups, activated),
        "cohorts": await _cohorts(session, start, end),
        "timeline": await _timeline(session, start, end, invites, conversions),
        "top_referrers": await _top_referrers(session, start, end, in_window),
        "cycle_time": {"median_hours": median, "p90_hours": p90},
        "k_factor_filtered": invites_per_user * conversion_rate_ok,
        "signups_filtered": signups_ok,
        "activated_filtered": sum(c.ok_activated for c in conversions),
        "conversion_rate_filtered": conversion_rate_ok,
        "k_per_referrer_filtered": ratio(signups_ok, referrers),
        "flagged": sum(c.flagged for c in conversions),
        "pending": sum(c.pending for c in conversions),
    }


async def _by_day_and_source(
    session: AsyncSession, start: datetime, end: datetime
) -> list[tuple[str, str | None, int]]:
    day, source = _day(session, Event.ts), Event.props["source"].as_string()
    rows = await session.execute(
        select(day, source, func.count())
        .where(Event.type == "invite_sent", Event.ts >= start, Event.ts < end)
        .group_by(day, source)
    )
    return [(d, s, int(n)) for d, s, n in rows.all()]


async def _conversions_by_day_and_source(
    session: AsyncSession, start: datetime, end: datetime
) -> list[Converted]:
    day = _day(session, Conversion.signup_at)
    rows = await session.execute(
        select(
            day,
            Conversion.source,
            func.count(),
            func.count(Conversion.activated_at),
            func.count(case((_ok(), 1))),
            func.count(case((_ok(), Conversion.activated_at))),
            func.count(case((Conversion.status == "flagged", 1))),
            func.count(case((Conversion.status == "pending", 1))),
        )
        .where(Conversion.signup_at >= start, Conversion.signup_at < end)
        .group_by(day, Conversion.source)
    )
    return [Converted(d, s, *(int(v) for v in counts)) for d, s, *counts in rows.all()]


async def _cycle_hours(
    session: AsyncSession, start: datetime, end: datetime
) -> tuple[float | None, float | None]:
    """Median and p90 of signup - invite (link made) time in hours, interpolated between the two
    nearest ranks (PostgreSQL's percentile_cont; on SQLite the same by ORDER BY … OFFSET)."""
    if session.get_bind().dialect.name == "postgresql":
        seconds = func.extract("epoch", Conversion.signup_at - _sent(Link))
        row = (
            await session.execute(
                select(
                    func.percentile_cont(0.5).within_group(seconds),
                    func.percentile_cont(0.9).within_group(seconds),
                )
                .select_from(Conversion)
                .join(Link, Link.nonce == Conversion.nonce)
                .where(Conversion.signup_at >= start, Conversion.signup_at < end)
            )
        ).one()
        return tuple(None if v is None else round(float(v) / 3600, 2) for v in row)  # type: ignore[return-value]
    return (
        await _quantile_hours(session, start, end, 0.5),
        await _quantile_hours(session, start, end, 0.9),
    )


def _funnel(sent: int, clicked: int, signed_up: int, activated: int) -> list[dict[str, Any]]:
    stages = [("sent", sent), ("clicked", clicked), ("signed_up", signed_up), ("activated", activated)]
    return [
        {
            "stage": name,
            "count": count,
            "rate_from_previous": None if i == 0 else ratio(count, stages[i - 1][1]),
        }
        for i, (name, count) in enumerate(stages)
    ]


async def _timeline(
    session: AsyncSession,
    start: datetime,
    end: datetime,
    invites: list[tuple[str, str | None, int]],
    conversions: list[Converted],
) -> list[dict[str, Any]]:
    click_day = _day(session, Click.clicked_at)
    clicks: dict[str, int] = dict(
        (
            await session.execute(
                select(click_day, func.count())
                .where(Click.clicked_at >= start, Click.clicked_at < end, Click.unique_click.is_(True))
                .group_by(click_day)
            )
        ).all()
    )
    sent: dict[str, int] = {}
    for day_key, _, n in invites:
        sent[day_key] = sent.get(day_key, 0) + n
    signed: dict[str, tuple[int, int]] = {}
    for c in conversions:
        n, ok = signed.get(c.day, (0, 0))
        signed[c.day] = (n + c.signups, ok + c.ok)
    days = []
    day = start.date()
    while day <= (end - timedelta(microseconds=1)).date():
        key = day.isoformat()
        days.append(
            {
                "date": key,
                "invites_sent": sent.get(key, 0),
                "clicks": int(clicks.get(key, 0)),
                "signups": signed.get(key, (0, 0))[0],
                "signups_filtered": signed.get(key, (0, 0))[1],
            }
        )
        day += timedelta(days=1)
    return days


async def _top_referrers(
    session: AsyncSession, start: datetime, end: datetime, in_window: Any, limit: int = 10
) -> list[dict[str, Any]]:
    won = func.count().label("conversions")
    rows = (
        await session.execute(
            select(Conversion.referrer_id, won, func.count(case((_ok(), 1))))
            .where(Conversion.signup_at >= start, Conversion.signup_at < end)
            .group_by(Conversion.referrer_id)
            .order_by(won.desc(), Conversion.referrer_id)
            .limit(limit)
        )
    ).all()
    if not rows:
        return []
    sent = dict(
        (
            await session.execute(
                select(Event.user_id, func.count())
                .where(Event.type == "invite_sent", in_window, Event.user_id.in_([r[0] for r in rows]))
                .group_by(Event.user_id)
            )
        ).all()
    )
    return [
        {
            "user_id": user,
            "conversions": int(n),
            "invites_sent": int(sent.get(user, 0)),
            "conversion_rate": ratio(n, sent.get(user, 0)),
            "conversions_filtered": int(ok),
        }
        for user, n, ok in rows
    ]


async def _cohorts(session: AsyncSession, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Weekly signup cohorts in the window: K = conversions the cohort's members brought within 30 days
    of their own signup, per member."""
    signup = (
        select(Event.user_id.label("user_id"), func.min(Event.ts).label("signed_up"))
        .where(Event.type == "signup", Event.ts >= start, Event.ts < end)
        .group_by(Event.user_id)
        .subquery()
    )
    week = _week(session, signup.c.signed_up)
    sizes: dict[str, int] = dict((await session.execute(select(week, func.count()).group_by(week))).all())
    brought: dict[str, int] = dict(
        (
            await session.execute(
                select(week, func.count())
                .select_from(signup)
                .join(Conversion, Conversion.referrer_id == signup.c.user_id)
                .where(
                    Conversion.signup_at >= signup.c.signed_up,
                    _within_days(session, signup.c.signed_up, Conversion.signup_at, COHORT_DAYS),
                )
                .group_by(week)
            )
        ).all()
    )
    return [
        {
            "cohort": cohort,
            "size": int(size),
            "signups": int(brought.get(cohort, 0)),
            "k_factor": ratio(brought.get(cohort, 0), size),
        }
        for cohort, size in sorted(sizes.items())
    ]


def _week(session: AsyncSession, column: Any) -> Any:
    """The Monday (UTC) starting the column's ISO week, as YYYY-MM-DD."""
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(func.date_trunc("week", func.timezone("UTC", column)), "YYYY-MM-DD")
    return func.date(column, "weekday 0", "-6 days")


def _within_days(session: AsyncSession, earlier: Any, later: Any, days: int) -> Any:
    return _seconds_between(session, earlier, later) <= days * 86400


def band(k: float) -> str:
    """What to do with a loop, by its K: scale ≥ 1.2 (the program target), continue ≥ 1.0 (it
    sustains itself), optimise ≥ 0.8 (close), else deprioritise."""
    if k >= 1.2:
        return "scale"
    if k >= 1.0:
        return "continue"
    if k >= 0.8:
        return "optimise"
    return "deprioritise"


async def loop_efficiency(session: AsyncSession, days: int, now: datetime) -> list[dict[str, Any]]:
    """Per loop (source): K, conversion rate, conversions per referrer, mean cycle time, and a band (all
    conversions); K and signups also fraud-filtered (`ok` conversions only)."""
    start, end = now - timedelta(days=days), now
    base = await active_users(session, start, end)
    source = Event.props["source"].as_string()
    invites = {
        s: (int(n), int(r))
        for s, n, r in (
            await session.execute(
                select(source, func.count(), func.count(distinct(Event.user_id)))
                .where(Event.type == "invite_sent", Event.ts >= start, Event.ts < end)
                .group_by(source)
            )
        ).all()
    }
    hours = _seconds_between(session, _sent(Link), Conversion.signup_at) / 3600.0
    won = {
        s: (int(n), int(ok), float(h) if h is not None else None)
        for s, n, ok, h in (
            await session.execute(
                select(Conversion.source, func.count(), func.count(case((_ok(), 1))), func.avg(hours))
                .join(Link, Link.nonce == Conversion.nonce)
                .where(Conversion.signup_at >= start, Conversion.signup_at < end)
                .group_by(Conversion.source)
            )
        ).all()
    }
    loops = []
    for name in sorted(set(invites) | set(won), key=lambda s: s or ""):
        sent, referrers = invites.get(name, (0, 0))
        signups, signups_ok, mean_hours = won.get(name, (0, 0, None))
        k = ratio(sent, base) * ratio(signups, sent)
        loops.append(
            {
                "source": name or "unknown",
                "k_factor": k,
                "invites_sent": sent,
                "signups": signups,
                "conversion_rate": ratio(signups, sent),
                "conversions_per_referrer": ratio(signups, referrers),
                "mean_cycle_hours": round(mean_hours, 2) if mean_hours is not None else None,
                "recommendation": band(k),
                "k_factor_filtered": ratio(sent, base) * ratio(signups_ok, sent),
                "signups_filtered": signups_ok,
            }
        )
    return loops


# Every CSV the server writes goes through `to_csv`; the dashboards' exports (web/static/common.js)
# follow the same rule.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """`value` as a CSV cell a spreadsheet shows as it is: a string starting with = + - @, a tab or a
    carriage return (a formula to a spreadsheet) gets a leading apostrophe; numbers stay numbers and
    None is an empty cell."""
    if value is None:
        return ""
    if isinstance(value, int | float):  # bool too: True/False are no formula
        return value
    text = str(value)
    return f"'{text}" if text.startswith(FORMULA_START) else text


def to_csv(rows: Iterable[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerows([csv_cell(v) for v in row] for row in rows)
    return out.getvalue()


__all__ = [
    "FORMULA_START",
    "PERIODS",
    "active_users",
    "band",
    "csv_cell",
    "k_factor_report",
    "loop_efficiency",
    "ratio",
    "rebuild_activity",
    "to_csv",
]
