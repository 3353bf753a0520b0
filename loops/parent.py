"""Proud parent referral: a parent gets a progress card of their child, with a share/referral link.

When: weekly (the `parent_cards` job, Mondays 16:00 UTC, re-scheduling itself), and on milestones —
a `streak_updated` reaching 7, 30 or 100 days, or a `quiz_result` at least 15 points above the
child's average of the previous 30 days. Parents are users with role `parent`; children name them in
their profile's `parent_id`. The card is computed from the child's events of the last 7 days
(sessions, minutes, average score, quizzes, current streak) and pushed as `parent_card` on the
parent's `user:{id}` through the orchestrator (proud_parent cooldown 12 h). The share link (source
`proud_parent`, to `/invite/parent`, valid 30 days) carries nothing about the child: the card stays
in the parent's own view. A family that signs up through it gives both sides a free session
(`parent_referral`, paid by attribution).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from metrics.attribution import create_link
from store import Event, LoopItem, LoopJob, Streak, User
from store.privacy import ANONYMOUS_NAME, Viewer

from .engine import Effects, Loop, LoopServices

ACTIVITY = ("session_completed", "practice_completed", "quiz_result", "diagnostic_completed")
WEEKLY_KIND = "parent_cards"


def next_weekly(after: datetime) -> datetime:
    """The next Monday 16:00 UTC strictly after `after`."""
    monday = (after - timedelta(days=after.weekday())).replace(hour=16, minute=0, second=0, microsecond=0)
    return monday if monday > after else monday + timedelta(days=7)


class ProudParent(Loop):
    name = "proud_parent"

    def __init__(self, services: LoopServices) -> None:
        super().__init__(services)
        self.on_events = {"streak_updated": self.on_streak, "quiz_result": self.on_quiz}
        self.jobs = {WEEKLY_KIND: self.weekly}

    async def setup(self, session: AsyncSession) -> None:
        at = next_weekly(self.now())
        await self.schedule(session, WEEKLY_KIND, at, {}, f"{WEEKLY_KIND}:{at.date().isoformat()}")

    async def weekly(self, session: AsyncSession, job: LoopJob, fx: Effects) -> None:
        children = (
            await session.execute(
                select(User.id, User.parent_id).where(User.parent_id.is_not(None), User.opted_out.is_(False))
            )
        ).all()
        for child, parent in children:
            if parent:
                await self.card(session, child, parent, "weekly", fx)
        at = next_weekly(job.run_at)
        await self.schedule(session, WEEKLY_KIND, at, {}, f"{WEEKLY_KIND}:{at.date().isoformat()}")

    async def on_streak(self, session: AsyncSession, event: dict[str, Any], fx: Effects) -> None:
        days = event["props"].get("days")
        if days in self.config.parent_streak_milestones:
            await self._milestone(session, event["user_id"], f"streak_{days}", fx)

    async def on_quiz(self, session: AsyncSession, event: dict[str, Any], fx: Effects) -> None:
        at, score = datetime.fromisoformat(event["ts"]), event["props"].get("score")
        if not isinstance(score, (int, float)):
            return
        before = await session.scalar(
            select(func.avg(Event.props["score"].as_float())).where(
                Event.user_id == event["user_id"],
                Event.type == "quiz_result",
                Event.ts >= at - timedelta(days=30),
                Event.ts < at,
            )
        )
        if before is not None and score - float(before) >= self.config.parent_score_jump:
            await self._milestone(session, event["user_id"], "score_jump", fx)

    async def _milestone(self, session: AsyncSession, child: str, why: str, fx: Effects) -> None:
        profile = await session.get(User, child)
        if profile is not None and profile.parent_id and not profile.opted_out:
            await self.card(session, child, profile.parent_id, why, fx)

    async def progress(self, session: AsyncSession, child: str) -> dict[str, Any]:
        since = self.now() - timedelta(days=7)
        score = Event.props["score"].as_float()
        minutes = Event.props["minutes"].as_float()
        sessions, total_minutes, average, quizzes = (
            await session.execute(
                select(
                    func.count().filter(Event.type == "session_completed"),
                    func.coalesce(func.sum(minutes).filter(Event.type == "session_completed"), 0),
                    func.avg(score),
                    func.count().filter(Event.type == "quiz_result"),
                ).where(Event.user_id == child, Event.type.in_(ACTIVITY), Event.ts >= since)
            )
        ).one()
        streak = await session.get(Streak, child)
        return {
            "sessions": int(sessions),
            "minutes": round(float(total_minutes)),
            "average_score": round(float(average), 1) if average is not None else None,
            "quizzes": int(quizzes),
            "streak_days": streak.days if streak is not None else 0,
        }

    async def card(self, session: AsyncSession, child: str, parent: str, why: str, fx: Effects) -> None:
        verdict = await self.decide(session, "parent_card", sender=None, recipient=parent)
        if not verdict.allowed:
            return
        now = self.now()
        link = await create_link(
            session,
            self.services.signer,
            referrer=parent,
            source=self.name,
            target="/invite/parent",
            now=now,
            ttl=self.config.parent_share_days * 86400,
        )
        item = LoopItem(
            id=self.new_id("pc"),
            loop=self.name,
            owner_id=parent,
            other_id=child,
            state="shared",
            data={"why": why, "link_nonce": link.nonce},
            created_at=now,
            updated_at=now,
            expires_at=link.expires_at,
        )
        session.add(item)
        progress = await self.progress(session, child)
        state = await self.state(session, child)
        name = self.named(state, Viewer(parent))  # the parent named in the profile sees the name
        public = self.named(state)  # as anyone sees the child: a minor is never named
        fx.to_user(
            parent,
            "parent_card",
            {
                "card_id": item.id,
                "child": "your child" if name == ANONYMOUS_NAME else name,
                "why": why,
                "progress": progress,
                "share": {
                    "token": link.token,
                    "url": f"/r/{link.token}",
                    "expires_at": link.expires_at.isoformat(),
                },
                # Copy may be written by an outside provider: only a name anyone may see goes there.
                "text": await self.text(
                    "parent_card",
                    name="Your child" if public == ANONYMOUS_NAME else public,
                    sessions=progress["sessions"],
                ),
            },
        )
