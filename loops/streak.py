"""Streaks and the streak rescue.

A student's streak lives while they are active at least once every 24 h: each activity
(`session_completed`, `practice_completed`, `quiz_result`, `diagnostic_completed`) moves the
deadline to activity + 24 h and, on a new UTC day, adds a day; activity after the deadline starts
again at 1. Events older than the last counted activity do not move the streak.

At risk = at most 6 h left. The scheduler checks each deadline 6 h, 3 h and 1 h before it; if no
activity moved it, the student gets `rescue_request` on `user:{id}` with the urgency (medium ≤ 6 h,
high ≤ 3 h, critical ≤ 1 h) — the first through the orchestrator's pacing, the escalations as
updates of it. The student may ask up to 3 friends (`request_rescue`); each gets `rescue_invite`
and may `join_rescue`. A session of the student's with `props.rescue_id` and score ≥ 60 before the
deadline saves it: the activity keeps the streak and the student and every friend who joined get a
streak shield (`rescue_saved`). At the deadline an unsaved streak resets to 0 (`streak_broken`).
Streaks of fewer than 2 days are not worth a rescue prompt.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from store import LoopItem, LoopJob, LoopMember, Streak
from store.privacy import Viewer

from .engine import ActionError, Effects, Loop, LoopServices, hours

ACTIVITY = ("session_completed", "practice_completed", "quiz_result", "diagnostic_completed")
LEVELS = ((1, "critical"), (3, "high"), (6, "medium"))
MIN_DAYS = 2
MAX_FRIENDS = 3


def urgency(hours_left: float) -> str | None:
    for limit, level in LEVELS:
        if hours_left <= limit:
            return level
    return None


class StreakRescue(Loop):
    name = "streak_rescue"

    def __init__(self, services: LoopServices) -> None:
        super().__init__(services)
        self.on_events = {etype: self.on_activity for etype in ACTIVITY}
        self.jobs = {"rescue_check": self.check, "streak_deadline": self.deadline}
        self.actions = {"request_rescue": self.request, "join_rescue": self.join}

    async def on_activity(self, session: AsyncSession, event: dict[str, Any], fx: Effects) -> None:
        user, at = event["user_id"], datetime.fromisoformat(event["ts"])
        window = hours(self.config.streak_window_hours)
        streak = await session.get(Streak, user, with_for_update=True)
        if streak is None:
            streak = Streak(user_id=user, days=1, best=1, last_activity_at=at, deadline_at=at + window)
            session.add(streak)
        elif at <= streak.last_activity_at:
            return
        else:
            if at > streak.deadline_at or streak.days == 0:
                streak.days = 1
            elif at.date() > streak.last_activity_at.date():
                streak.days += 1
            streak.last_activity_at, streak.deadline_at = at, at + window
            streak.best = max(streak.best, streak.days)
        await session.flush()
        await self._rescued(session, event, streak, fx)
        deadline = streak.deadline_at
        key = f"{user}:{deadline.isoformat()}"
        for ahead, _ in LEVELS:
            await self.schedule(
                session,
                "rescue_check",
                deadline - hours(ahead),
                {"user": user, "deadline": deadline.isoformat()},
                f"rescue:{key}:{ahead}",
            )
        await self.schedule(
            session,
            "streak_deadline",
            deadline,
            {"user": user, "deadline": deadline.isoformat()},
            f"streak:{key}",
        )

    async def _rescued(
        self, session: AsyncSession, event: dict[str, Any], streak: Streak, fx: Effects
    ) -> None:
        rescue_id = event["props"].get("rescue_id")
        score = event["props"].get("score")
        if not isinstance(rescue_id, str) or not isinstance(score, (int, float)):
            return
        item = await session.get(LoopItem, rescue_id, with_for_update=True)
        if (
            item is None
            or item.loop != self.name
            or item.owner_id != event["user_id"]
            or item.state != "open"
        ):
            return
        at = datetime.fromisoformat(event["ts"])
        if score < self.config.rescue_pass_score or (item.expires_at is not None and at > item.expires_at):
            return
        self.move(item, "saved", at, score=score)
        helpers = (
            await session.scalars(
                select(LoopMember.user_id).where(LoopMember.item_id == item.id, LoopMember.role == "joined")
            )
        ).all()
        for person in (item.owner_id, *helpers):
            await self.reward(session, fx, person, "rescue_saved", item.id, at)
            fx.to_user(person, "rescue_saved", {"rescue_id": item.id, "days": streak.days})

    async def _current(self, session: AsyncSession, job: LoopJob) -> Streak | None:
        streak = await session.get(Streak, job.payload["user"], with_for_update=True)
        if streak is None or streak.deadline_at.isoformat() != job.payload["deadline"]:
            return None  # activity moved the deadline: this check is stale
        return streak

    async def check(self, session: AsyncSession, job: LoopJob, fx: Effects) -> None:
        streak = await self._current(session, job)
        if streak is None or streak.days < MIN_DAYS:
            return
        left = (streak.deadline_at - self.now()).total_seconds() / 3600
        level = urgency(left)
        if level is None or left <= 0:
            return
        first = level == "medium"
        verdict = await self.decide(
            session, "rescue_request", sender=None, recipient=streak.user_id, update=not first
        )
        if verdict.allowed:
            fx.to_user(
                streak.user_id,
                "rescue_request",
                {
                    "days": streak.days,
                    "deadline": streak.deadline_at.isoformat(),
                    "hours_left": round(left, 2),
                    "urgency": level,
                    "text": await self.text("rescue_request", days=streak.days, hours_left=round(left)),
                },
            )

    async def deadline(self, session: AsyncSession, job: LoopJob, fx: Effects) -> None:
        streak = await self._current(session, job)
        if streak is None or streak.days == 0:
            return
        previous, streak.days = streak.days, 0
        open_rescues = await session.scalars(
            select(LoopItem).where(
                LoopItem.loop == self.name, LoopItem.owner_id == streak.user_id, LoopItem.state == "open"
            )
        )
        for item in open_rescues:
            self.move(item, "failed", self.now())
        fx.to_user(streak.user_id, "streak_broken", {"previous_days": previous, "best": streak.best})

    async def request(
        self, session: AsyncSession, actor: dict[str, Any], params: dict[str, Any], fx: Effects
    ) -> dict[str, Any]:
        me, now = str(actor["sub"]), self.now()
        friends = params.get("friend_ids")
        if (
            not isinstance(friends, list)
            or not 1 <= len(friends) <= MAX_FRIENDS
            or not all(isinstance(f, str) and f for f in friends)
        ):
            raise ActionError("invalid", f"friend_ids must list 1-{MAX_FRIENDS} user ids")
        if me in friends:
            raise ActionError("invalid", "you cannot rescue your own streak with yourself")
        streak = await session.get(Streak, me)
        if (
            streak is None
            or streak.days == 0
            or not now < streak.deadline_at <= now + hours(self.config.rescue_at_risk_hours)
        ):
            raise ActionError("not_at_risk", "your streak is not at risk")
        item = LoopItem(
            id=self.new_id("rs"),
            loop=self.name,
            owner_id=me,
            state="open",
            data={"days": streak.days},
            created_at=now,
            updated_at=now,
            expires_at=streak.deadline_at,
        )
        session.add(item)
        await self.member(session, item.id, me, "owner", now)
        # One payload for every friend, and copy that may go to a provider: as anyone may see the sender.
        name = self.named(await self.state(session, me, actor))
        sent = await self.invite_each(
            session,
            fx,
            item,
            actor=actor,
            recipients=friends,
            action="rescue_invite",
            event="rescue_invite",
            payload={
                "rescue_id": item.id,
                "from": name,
                "days": streak.days,
                "deadline": streak.deadline_at.isoformat(),
                "text": await self.text("rescue_invite", name=name, days=streak.days),
            },
        )
        return {"rescue_id": item.id, **sent}

    async def join(
        self, session: AsyncSession, actor: dict[str, Any], params: dict[str, Any], fx: Effects
    ) -> dict[str, Any]:
        me, now = str(actor["sub"]), self.now()
        item = await self.item(session, params.get("rescue_id"), self.name)
        row = await session.get(LoopMember, (item.id, me))
        if row is None or row.role == "owner":
            raise ActionError("forbidden", "you were not invited to this rescue")
        if item.state != "open" or (item.expires_at is not None and now >= item.expires_at):
            raise ActionError("not_open", f"this rescue is {item.state}")
        row.role, row.joined_at, row.updated_at = "joined", now, now
        fx.to_user(
            item.owner_id,
            "rescue_update",
            {
                "rescue_id": item.id,
                "joined": self.named(await self.state(session, me, actor), Viewer(item.owner_id)),
            },
        )
        return {"rescue_id": item.id, "state": item.state}
