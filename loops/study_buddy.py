"""Study buddy nudge: a student who needs help gets up to 3 recommended study buddies, one tap to invite.

Who gets a nudge (per subject): an `exam_scheduled` event with the exam within 7 days, or a
`session_completed` that makes 3+ sessions with a score in the last 14 days averaging under 70 %.
Buddies: other users with scored sessions or quizzes in that subject in the last 14 days whose
average beats the student's — on the student's weak topics (under 70 %) when the events name
topics, else on the subject — best first; never the student, nobody who opted out, and no pair
nudged within 24 h. The student gets `nudge` (kind `study_buddy`) on `user:{id}`, its buddies as
the privacy rule shows them to the student in the nudge's room (`challenge:{id}`): a minor by a
handle of that room's own, which `invite_buddy` takes as `buddy_id`. `invite_buddy` sends the chosen
buddy a `nudge` (kind `buddy_invite`); `accept_nudge` opens the shared room, with presence, and tells
both. A nudge expires 1 h after it was made.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from store import Event, LoopItem, LoopJob
from store.privacy import Viewer

from .engine import ActionError, Effects, Loop, LoopServices

SCORED = ("session_completed", "quiz_result", "practice_completed", "diagnostic_completed")


class StudyBuddy(Loop):
    name = "study_buddy"

    def __init__(self, services: LoopServices) -> None:
        super().__init__(services)
        self.on_events = {"exam_scheduled": self.on_exam, "session_completed": self.on_session}
        self.jobs = {"nudge_expire": self.expire}
        self.actions = {"invite_buddy": self.invite, "accept_nudge": self.accept}

    async def on_exam(self, session: AsyncSession, event: dict[str, Any], fx: Effects) -> None:
        at = datetime.fromisoformat(event["ts"])
        try:
            exam = datetime.fromisoformat(str(event["props"]["exam_at"]).replace("Z", "+00:00"))
        except ValueError:
            return
        if exam.tzinfo is None or not at < exam <= at + timedelta(days=self.config.nudge_exam_days):
            return
        await self._nudge(session, event["user_id"], str(event["props"]["subject"]), "exam_soon", at, fx)

    async def on_session(self, session: AsyncSession, event: dict[str, Any], fx: Effects) -> None:
        user, subject = event["user_id"], event["props"].get("subject")
        at = datetime.fromisoformat(event["ts"])
        if not isinstance(subject, str) or not isinstance(event["props"].get("score"), (int, float)):
            return
        score = Event.props["score"].as_float()
        count, average = (
            await session.execute(
                select(func.count(), func.avg(score)).where(
                    Event.user_id == user,
                    Event.type == "session_completed",
                    Event.props["subject"].as_string() == subject,
                    Event.ts > at - timedelta(days=self.config.nudge_session_days),
                    Event.ts <= at,
                    score.is_not(None),
                )
            )
        ).one()
        if count >= self.config.nudge_sessions and float(average) < self.config.nudge_weak_score:
            await self._nudge(session, user, subject, "low_scores", at, fx)

    async def _averages(
        self, session: AsyncSession, subject: str, at: datetime, topics: list[str] | None
    ) -> dict[str, float]:
        score = Event.props["score"].as_float()
        query = (
            select(Event.user_id, func.avg(score))
            .where(
                Event.type.in_(SCORED),
                Event.props["subject"].as_string() == subject,
                Event.ts > at - timedelta(days=self.config.nudge_session_days),
                Event.ts <= at,
                score.is_not(None),
            )
            .group_by(Event.user_id)
        )
        if topics:
            query = query.where(Event.props["topic"].as_string().in_(topics))
        return {user: float(avg) for user, avg in (await session.execute(query)).all()}

    async def _weak_topics(self, session: AsyncSession, user: str, subject: str, at: datetime) -> list[str]:
        score, topic = Event.props["score"].as_float(), Event.props["topic"].as_string()
        rows = await session.execute(
            select(topic, func.avg(score))
            .where(
                Event.user_id == user,
                Event.type.in_(SCORED),
                Event.props["subject"].as_string() == subject,
                Event.ts > at - timedelta(days=self.config.nudge_session_days),
                topic.is_not(None),
                score.is_not(None),
            )
            .group_by(topic)
        )
        return sorted(t for t, avg in rows.all() if float(avg) < self.config.nudge_weak_score)

    async def _nudge(
        self, session: AsyncSession, user: str, subject: str, reason: str, at: datetime, fx: Effects
    ) -> None:
        recent = await session.scalar(
            select(func.count()).where(
                LoopItem.loop == self.name,
                LoopItem.owner_id == user,
                LoopItem.subject == subject,
                LoopItem.state.in_(("suggested", "invited")),
            )
        )
        if recent:
            return  # one open nudge per student and subject
        weak = await self._weak_topics(session, user, subject, at)
        averages = await self._averages(session, subject, at, weak or None)
        mine = averages.pop(user, 0.0)
        paired_recently = set(
            (
                await session.scalars(
                    select(LoopItem.other_id).where(
                        LoopItem.loop == self.name,
                        LoopItem.owner_id == user,
                        LoopItem.other_id.is_not(None),
                        LoopItem.created_at > at - timedelta(hours=self.config.nudge_pair_cooldown_hours),
                    )
                )
            ).all()
        )
        candidates = [uid for uid, avg in averages.items() if avg > mine and uid not in paired_recently]
        item_id = self.new_id("nd")
        states = await self.states(session, candidates)
        shown = {uid: self.shown(states[uid], Viewer(user), f"challenge:{item_id}") for uid in candidates}
        # Nobody the student may not see (an opted-out user) is recommended.
        seen = [(averages[uid], uid) for uid in candidates if shown[uid] is not None]
        buddies = sorted(seen)[::-1][: self.config.nudge_buddies]
        if not buddies:
            return
        verdict = await self.decide(session, "nudge", sender=None, recipient=user)
        if not verdict.allowed:
            return
        now = self.now()
        item = LoopItem(
            id=item_id,
            loop=self.name,
            owner_id=user,
            subject=subject,
            state="suggested",
            data={"reason": reason, "weak_topics": weak, "buddies": [uid for _, uid in buddies]},
            created_at=now,
            updated_at=now,
            expires_at=now + timedelta(minutes=self.config.nudge_ttl_minutes),
        )
        session.add(item)
        assert item.expires_at is not None
        await self.schedule(session, "nudge_expire", item.expires_at, {"id": item.id}, f"nudge:{item.id}")
        fx.to_user(
            user,
            "nudge",
            {
                "kind": "study_buddy",
                "nudge_id": item.id,
                "subject": subject,
                "reason": reason,
                "weak_topics": weak,
                "buddies": [shown[uid] for _, uid in buddies],
                "expires_at": item.expires_at.isoformat(),
                "text": await self.text("nudge", subject=subject),
            },
        )

    async def invite(
        self, session: AsyncSession, actor: dict[str, Any], params: dict[str, Any], fx: Effects
    ) -> dict[str, Any]:
        me, now = str(actor["sub"]), self.now()
        item = await self.item(session, params.get("nudge_id"), self.name)
        buddy = params.get("buddy_id")
        if item.owner_id != me:
            raise ActionError("forbidden", "this nudge is not yours")
        if item.state != "suggested" or (item.expires_at is not None and now >= item.expires_at):
            raise ActionError("not_open", f"this nudge is {item.state}")
        buddy = await self._buddy(session, item, actor, buddy)
        verdict = await self.decide(session, "buddy_invite", sender=me, recipient=buddy, actor=actor)
        if not verdict.allowed:
            return {"refused": verdict.reason}
        item.other_id = buddy
        self.move(item, "invited", now)
        await self.member(session, item.id, me, "owner", now)
        await self.member(session, item.id, buddy, "invited", now)
        # Copy that may go to a provider: as anyone may see the student.
        name = self.named(await self.state(session, me, actor))
        fx.to_user(
            buddy,
            "nudge",
            {
                "kind": "buddy_invite",
                "nudge_id": item.id,
                "from": name,
                "subject": item.subject,
                "expires_at": item.expires_at.isoformat() if item.expires_at else None,
                "text": await self.text("buddy_invite", name=name, subject=item.subject),
            },
        )
        return {"nudge_id": item.id, "state": item.state}

    async def _buddy(self, session: AsyncSession, item: LoopItem, actor: dict[str, Any], chosen: Any) -> str:
        """The recommended buddy the student chose, by the id or handle their nudge showed them."""
        states = await self.states(session, item.data.get("buddies", []))
        for uid, state in states.items():
            seen = self.show(state, Viewer(str(actor["sub"])), f"challenge:{item.id}")
            if seen is not None and isinstance(chosen, str) and seen.key == chosen:
                return uid
        raise ActionError("invalid", "buddy_id must be one of the recommended buddies")

    async def accept(
        self, session: AsyncSession, actor: dict[str, Any], params: dict[str, Any], fx: Effects
    ) -> dict[str, Any]:
        me, now = str(actor["sub"]), self.now()
        item = await self.item(session, params.get("nudge_id"), self.name)
        if item.other_id != me:
            raise ActionError("forbidden", "this invitation is not yours")
        if item.state != "invited" or (item.expires_at is not None and now >= item.expires_at):
            raise ActionError("not_open", f"this nudge is {item.state}")
        self.move(item, "accepted", now)
        await self.member(session, item.id, me, "joined", now)
        room = {
            "nudge_id": item.id,
            "state": "accepted",
            "room": f"challenge:{item.id}",
            "subject": item.subject,
        }
        for person in (item.owner_id, me):
            fx.to_user(person, "nudge_accepted", room)
        return room

    async def expire(self, session: AsyncSession, job: LoopJob, fx: Effects) -> None:
        item = await session.get(LoopItem, job.payload["id"], with_for_update=True)
        if item is None or item.state not in ("suggested", "invited"):
            return
        self.move(item, "expired", self.now())
        for person in filter(None, (item.owner_id, item.other_id)):
            fx.to_user(person, "nudge_expired", {"nudge_id": item.id})
