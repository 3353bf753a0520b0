"""Growth metrics (SPEC §9): the one place that computes K. Every number is an SQL aggregate.

For a window of `days` ending at `now`:
- invites_sent: `invite_sent` events; referrers: distinct users who sent one;
- clicks: distinct (link, visitor) pairs that clicked;
- signups: attributed conversions whose signup is in the window; activated: those that reached
  `first_value`;
- active_users, the base: distinct users with any event, less those whose `signup` is in the window;
- K = invites_sent / active_users x signups / invites_sent (0 when a denominator is 0). Per source,
  numerators are that source's and the base stays the same, so the sources' K add up to K.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, distinct, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from store import Click, Conversion, Event, Link

PERIODS = (7, 14, 30, 90)
COHORT_DAYS = 30


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


async def _scalar(session: AsyncSession, query: Select[Any]) -> int:
    return int(await session.scalar(query) or 0)


async def active_users(session: AsyncSession, start: datetime, end: datetime) -> int:
    new_users = select(Event.user_id).where(Event.type == "signup", Event.ts >= start, Event.ts < end)
    return await _scalar(
        session,
        select(func.count(distinct(Event.user_id))).where(
            Event.ts >= start, Event.ts < end, Event.user_id.not_in(new_users)
        ),
    )


async def _quantile_hours(session: AsyncSession, start: datetime, end: datetime, q: float) -> float | None:
    """The q-quantile of signup - invite (link made) time in hours, interpolated between the two
    nearest ranks like PostgreSQL's percentile_cont; the rows are picked by ORDER BY … OFFSET in SQL."""
    seconds = _seconds_between(session, Link.created_at, Conversion.signup_at)
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
    if session.bind.dialect.name == "postgresql":
        return func.extract("epoch", later - earlier)
    return (func.julianday(later) - func.julianday(earlier)) * 86400.0


def _day(session: AsyncSession, column: Any) -> Any:
    if session.bind.dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", column)


async def k_factor_report(session: AsyncSession, days: int, now: datetime) -> dict[str, Any]:
    start, end = now - timedelta(days=days), now
    in_window = and_(Event.ts >= start, Event.ts < end)
    source = Event.props["source"].as_string()
    invites_sent = await _scalar(session, select(func.count()).where(Event.type == "invite_sent", in_window))
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
    conv_window = and_(Conversion.signup_at >= start, Conversion.signup_at < end)
    signups = await _scalar(session, select(func.count()).where(conv_window))
    activated = await _scalar(
        session, select(func.count()).where(conv_window, Conversion.activated_at.is_not(None))
    )
    base = await active_users(session, start, end)
    invites_per_user = ratio(invites_sent, base)
    conversion_rate = ratio(signups, invites_sent)

    invites_by_source = dict(
        (
            await session.execute(
                select(source, func.count()).where(Event.type == "invite_sent", in_window).group_by(source)
            )
        ).all()
    )
    signups_by_source = dict(
        (
            await session.execute(
                select(Conversion.source, func.count()).where(conv_window).group_by(Conversion.source)
            )
        ).all()
    )
    by_source = []
    for name in sorted(set(invites_by_source) | set(signups_by_source), key=lambda s: (s is None, s or "")):
        sent, won = int(invites_by_source.get(name, 0)), int(signups_by_source.get(name, 0))
        by_source.append(
            {
                "source": name or "unknown",
                "k_factor": ratio(sent, base) * ratio(won, sent),
                "invites_sent": sent,
                "signups": won,
                "conversion_rate": ratio(won, sent),
            }
        )

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
        "timeline": await _timeline(session, start, end),
        "top_referrers": await _top_referrers(session, start, end, in_window),
        "cycle_time": {
            "median_hours": await _quantile_hours(session, start, end, 0.5),
            "p90_hours": await _quantile_hours(session, start, end, 0.9),
        },
    }


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


async def _timeline(session: AsyncSession, start: datetime, end: datetime) -> list[dict[str, Any]]:
    event_day = _day(session, Event.ts)
    invites = dict(
        (
            await session.execute(
                select(event_day, func.count())
                .where(Event.type == "invite_sent", Event.ts >= start, Event.ts < end)
                .group_by(event_day)
            )
        ).all()
    )
    click_day = _day(session, Click.clicked_at)
    clicks = dict(
        (
            await session.execute(
                select(click_day, func.count())
                .where(Click.clicked_at >= start, Click.clicked_at < end, Click.unique_click.is_(True))
                .group_by(click_day)
            )
        ).all()
    )
    signup_day = _day(session, Conversion.signup_at)
    signups = dict(
        (
            await session.execute(
                select(signup_day, func.count())
                .where(Conversion.signup_at >= start, Conversion.signup_at < end)
                .group_by(signup_day)
            )
        ).all()
    )
    days = []
    day = start.date()
    while day <= (end - timedelta(microseconds=1)).date():
        key = day.isoformat()
        days.append(
            {
                "date": key,
                "invites_sent": int(invites.get(key, 0)),
                "clicks": int(clicks.get(key, 0)),
                "signups": int(signups.get(key, 0)),
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
            select(Conversion.referrer_id, won)
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
        }
        for user, n in rows
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
    sizes = dict((await session.execute(select(week, func.count()).group_by(week))).all())
    brought = dict(
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
    if session.bind.dialect.name == "postgresql":
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
    """Per loop (source): K, conversion rate, conversions per referrer, median cycle time, and a band."""
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
    hours = _seconds_between(session, Link.created_at, Conversion.signup_at) / 3600.0
    won = {
        s: (int(n), float(h) if h is not None else None)
        for s, n, h in (
            await session.execute(
                select(Conversion.source, func.count(), func.avg(hours))
                .join(Link, Link.nonce == Conversion.nonce)
                .where(Conversion.signup_at >= start, Conversion.signup_at < end)
                .group_by(Conversion.source)
            )
        ).all()
    }
    loops = []
    for name in sorted(set(invites) | set(won), key=lambda s: s or ""):
        sent, referrers = invites.get(name, (0, 0))
        signups, mean_hours = won.get(name, (0, None))
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
            }
        )
    return loops


__all__ = ["PERIODS", "active_users", "band", "k_factor_report", "loop_efficiency", "ratio"]
