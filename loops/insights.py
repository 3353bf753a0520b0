"""Session intelligence: after each tutoring or practice session, insights and the next best action.

From the student's scored activity of the last 30 days (SQL aggregates per hour of day, per UTC day
and per topic):
- `best_hours`: the (up to 3) hours of day, UTC, with the best average score (2+ sessions each);
- `consistency`: active days in the last 14 / 14;
- `trend`: least-squares slope of the daily average score, points per day (`improving` > +0.5,
  `declining` < -0.5, else `steady`), with the number of days it rests on;
- `weak_topics` (average < 70) and `strong_topics` (average ≥ 85).
Next best actions — student-facing: a buddy for the weakest topic (`find_study_buddy`), a challenge
on the strongest (`challenge_friend`), `protect_streak` when the streak deadline is < 6 h away,
`start_rally` after a practice; tutor-facing: `review_topic` (weakest), `assign_practice` (a weak
topic, or the subject), `schedule_at_best_hour`, `plan_next_session`, and `celebrate_progress` when
improving. The student gets `insight` on `user:{id}`; the session's tutor (`props.tutor_id`) gets
`tutor_insight` on theirs, naming the student as the privacy rule shows them to that tutor (a minor
by a handle of the tutor's own; nothing for a student who opted out).
"""

from __future__ import annotations

import statistics
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from store import Event, Streak
from store.privacy import Viewer

from .engine import Effects, Loop, LoopServices

SCORED = ("session_completed", "practice_completed", "quiz_result", "diagnostic_completed")
WEAK, STRONG = 70.0, 85.0


def _hour(session: AsyncSession, column: Any) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("hour", func.timezone("UTC", column))
    return func.strftime("%H", column)


def _day(session: AsyncSession, column: Any) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", column)


def trend(daily: list[tuple[str, float]]) -> tuple[float, str]:
    """Slope of the daily average score against the day number; needs 3+ days."""
    if len(daily) < 3:
        return 0.0, "steady"
    start = datetime.fromisoformat(daily[0][0])
    x = [(datetime.fromisoformat(d) - start).days for d, _ in daily]
    slope = statistics.linear_regression(x, [v for _, v in daily]).slope
    label = "improving" if slope > 0.5 else "declining" if slope < -0.5 else "steady"
    return round(slope, 2), label


class SessionIntelligence(Loop):
    name = "session_intelligence"

    def __init__(self, services: LoopServices) -> None:
        super().__init__(services)
        self.on_events = {"session_completed": self.on_session, "practice_completed": self.on_session}

    async def insights(self, session: AsyncSession, user: str, at: datetime) -> dict[str, Any]:
        score = Event.props["score"].as_float()
        scored = (
            Event.user_id == user,
            Event.type.in_(SCORED),
            Event.ts > at - timedelta(days=30),
            Event.ts <= at,
            score.is_not(None),
        )
        hour = _hour(session, Event.ts)
        by_hour = (
            await session.execute(select(hour, func.avg(score), func.count()).where(*scored).group_by(hour))
        ).all()
        best_hours = [
            int(h) for h, avg, n in sorted(by_hour, key=lambda r: (-float(r[1]), int(r[0]))) if n >= 2
        ][:3]
        day = _day(session, Event.ts)
        daily = [
            (d, float(avg))
            for d, avg in (
                await session.execute(select(day, func.avg(score)).where(*scored).group_by(day).order_by(day))
            ).all()
        ]
        active_days = await session.scalar(
            select(func.count(func.distinct(day))).where(
                Event.user_id == user, Event.ts > at - timedelta(days=14), Event.ts <= at
            )
        )
        topic = Event.props["topic"].as_string()
        topics = {
            t: float(avg)
            for t, avg in (
                await session.execute(
                    select(topic, func.avg(score)).where(*scored, topic.is_not(None)).group_by(topic)
                )
            ).all()
        }
        slope, direction = trend(daily)
        return {
            "best_hours": best_hours,
            "consistency": round(int(active_days or 0) / 14, 2),
            "trend": {"slope": slope, "direction": direction, "days": len(daily)},
            "weak_topics": sorted((t for t, v in topics.items() if v < WEAK), key=lambda t: topics[t]),
            "strong_topics": sorted((t for t, v in topics.items() if v >= STRONG), key=lambda t: -topics[t]),
        }

    async def on_session(self, session: AsyncSession, event: dict[str, Any], fx: Effects) -> None:
        user, props = event["user_id"], event["props"]
        at = datetime.fromisoformat(event["ts"])
        found = await self.insights(session, user, at)
        subject = props.get("subject")
        student: list[dict[str, Any]] = []
        tutor: list[dict[str, Any]] = []
        if found["weak_topics"]:
            weakest = found["weak_topics"][0]
            student.append({"action": "find_study_buddy", "subject": subject, "topic": weakest})
            tutor.append({"action": "review_topic", "subject": subject, "topic": weakest})
        if found["strong_topics"]:
            student.append(
                {"action": "challenge_friend", "subject": subject, "topic": found["strong_topics"][0]}
            )
        streak = await session.get(Streak, user)
        if streak is not None and streak.days > 0 and streak.deadline_at - at < timedelta(hours=6):
            student.append({"action": "protect_streak", "days": streak.days})
        if event["type"] == "practice_completed" or props.get("quiz"):
            student.append({"action": "start_rally", "subject": subject})
        if not student:
            student.append({"action": "challenge_friend", "subject": subject, "topic": None})
        tutor.append(
            {"action": "assign_practice", "subject": subject, "topic": (found["weak_topics"] or [None])[0]}
        )
        if found["best_hours"]:
            tutor.append({"action": "schedule_at_best_hour", "hour_utc": found["best_hours"][0]})
        tutor.append({"action": "plan_next_session", "subject": subject, "consistency": found["consistency"]})
        if found["trend"]["direction"] == "improving":
            tutor.append({"action": "celebrate_progress", "slope": found["trend"]["slope"]})
        fx.to_user(user, "insight", {"subject": subject, **found, "next_actions": student})
        tutor_id = props.get("tutor_id")
        if isinstance(tutor_id, str) and tutor_id and tutor_id != user:
            student_shown = self.shown(await self.state(session, user), Viewer(tutor_id), f"user:{tutor_id}")
            if student_shown is not None:
                fx.to_user(
                    tutor_id,
                    "tutor_insight",
                    {"student": student_shown, "subject": subject, **found, "next_actions": tutor},
                )
