"""Buddy challenge: after a practice session, challenge a friend (or an outside contact through a
signed link) to the same 5-question deck.

States: `pending` → `accepted` → `completed`, or `pending`/`accepted` → `expired` (48 h after it was
made) and `pending` → `declined`. Nobody challenges themselves. The challenger may submit their score
as soon as the challenge exists; the friend after accepting. When both scores are in, the higher
score wins; **equal scores are a draw** (no winner). Rewards through the ledger, once each: a streak
shield to both players (`challenge_completed`), 50 XP to the winner (`challenge_won`), 25 XP each on
a draw (`challenge_tied`). Progress and the result are pushed on `challenge:{id}` and to both
players' `user:{id}`; the players appear as the privacy rule shows them (a minor by a handle of
this challenge's own). An outside challenge is taken with its whole signed link, by someone who
passes the compliance gate (a minor needs a parent's consent).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from store import LoopItem, LoopJob, LoopMember
from store.privacy import OUTSIDER, Viewer

from .engine import ActionError, Effects, Loop, LoopServices, hours

SUBJECT_MAX = 64


def _subject(params: dict[str, Any]) -> str:
    subject = params.get("subject")
    if not isinstance(subject, str) or not 1 <= len(subject) <= SUBJECT_MAX:
        raise ActionError("invalid", "subject must be a string of 1-64 characters")
    return subject


class BuddyChallenge(Loop):
    name = "buddy_challenge"

    def __init__(self, services: LoopServices) -> None:
        super().__init__(services)
        self.on_events = {"practice_completed": self.on_practice}
        self.jobs = {"challenge_expire": self.expire}
        self.actions = {
            "challenge": self.challenge,
            "accept_challenge": self.accept,
            "decline_challenge": self.decline,
            "submit_challenge": self.submit,
        }

    async def on_practice(self, session: AsyncSession, event: dict[str, Any], fx: Effects) -> None:
        """Suggest a challenge on the deck just practised (a prompt, paced by the orchestrator)."""
        user, props = event["user_id"], event["props"]
        verdict = await self.decide(session, "challenge_prompt", sender=None, recipient=user)
        if verdict.allowed:
            fx.to_user(
                user,
                "loop_prompt",
                {
                    "loop": self.name,
                    "action": "challenge",
                    "subject": props.get("subject"),
                    "deck_id": props.get("deck_id"),
                    "text": await self.text("challenge_prompt", subject=props.get("subject")),
                },
            )

    async def challenge(
        self, session: AsyncSession, actor: dict[str, Any], params: dict[str, Any], fx: Effects
    ) -> dict[str, Any]:
        me, now = str(actor["sub"]), self.now()
        subject = _subject(params)
        friend = params.get("friend_id")
        outside = params.get("outside") is True
        if (friend is None) == (not outside):
            raise ActionError("invalid", "give either friend_id or outside: true")
        if friend is not None and (not isinstance(friend, str) or not friend):
            raise ActionError("invalid", "friend_id must be a user id")
        if friend == me:
            raise ActionError("self_challenge", "you cannot challenge yourself")
        verdict = await self.decide(
            session, "challenge_invite", sender=me, recipient=friend, outside=outside, actor=actor
        )
        if not verdict.allowed:
            return {"refused": verdict.reason}
        # An experiment on this loop may set `challenge_ttl_hours` and `challenge_questions`.
        variant = await self.variant(session, me, fx)
        ttl_hours = int(variant.get("challenge_ttl_hours", self.config.challenge_ttl_hours))
        questions = int(variant.get("challenge_questions", self.config.challenge_questions))
        item = LoopItem(
            id=self.new_id("ch"),
            loop=self.name,
            owner_id=me,
            other_id=friend,
            subject=subject,
            state="pending",
            data={"deck_id": params.get("deck_id"), "questions": questions},
            created_at=now,
            updated_at=now,
            expires_at=now + hours(ttl_hours),
        )
        session.add(item)
        await self.member(session, item.id, me, "owner", now)
        reply: dict[str, Any] = {"challenge_id": item.id, "topic": f"challenge:{item.id}"}
        if outside:
            reply.update(
                await self.share_item(session, fx, item, me, f"/challenge/{item.id}", ttl_hours * 3600)
            )
        else:
            assert friend is not None
            await self.member(session, item.id, friend, "invited", now)
            fx.to_user(
                friend,
                "challenge_invite",
                {
                    "challenge_id": item.id,
                    "from": self.named(await self.state(session, me, actor)),
                    "subject": subject,
                    "questions": questions,
                    "expires_at": item.expires_at.isoformat() if item.expires_at else None,
                    "text": await self.text("challenge_invite", subject=subject),
                },
            )
        assert item.expires_at is not None
        await self.schedule(
            session, "challenge_expire", item.expires_at, {"id": item.id}, f"challenge:{item.id}"
        )
        return reply

    async def accept(
        self, session: AsyncSession, actor: dict[str, Any], params: dict[str, Any], fx: Effects
    ) -> dict[str, Any]:
        me, now = str(actor["sub"]), self.now()
        item = await self.item(session, params.get("challenge_id"), self.name)
        outside = item.other_id is None  # whoever holds its link may take it, once
        if outside:
            await self.by_link(session, item, params.get("token"), "challenge")
            if me == item.owner_id:
                raise ActionError("self_challenge", "you cannot challenge yourself")
        elif item.other_id != me:
            raise ActionError("forbidden", "this challenge is not yours to accept")
        if item.state != "pending" or (item.expires_at is not None and now >= item.expires_at):
            raise ActionError("not_pending", f"this challenge is {item.state}")
        if outside:
            refused = await self.gate(
                session, actor, "challenge_link_accept", "accept a challenge from outside"
            )
            if refused is not None:
                return refused
            item.other_id = me
            await self.member(session, item.id, me, "invited", now)
        self.move(item, "accepted", now)
        await self.decide(session, "challenge_accepted", sender=me, recipient=item.owner_id, update=True)
        mine = await self.state(session, me, actor)
        payload = {"challenge_id": item.id, "state": "accepted"}
        fx.push(f"challenge:{item.id}", "challenge_update", {**payload, "by": self.named(mine)})
        fx.to_user(
            item.owner_id, "challenge_update", {**payload, "by": self.named(mine, Viewer(item.owner_id))}
        )
        return {"challenge_id": item.id, "state": item.state, "topic": f"challenge:{item.id}"}

    async def decline(
        self, session: AsyncSession, actor: dict[str, Any], params: dict[str, Any], fx: Effects
    ) -> dict[str, Any]:
        me, now = str(actor["sub"]), self.now()
        item = await self.item(session, params.get("challenge_id"), self.name)
        if item.other_id != me:
            raise ActionError("forbidden", "this challenge is not yours to decline")
        if item.state != "pending":
            raise ActionError("not_pending", f"this challenge is {item.state}")
        self.move(item, "declined", now)
        fx.to_user(item.owner_id, "challenge_update", {"challenge_id": item.id, "state": "declined"})
        return {"challenge_id": item.id, "state": item.state}

    async def submit(
        self, session: AsyncSession, actor: dict[str, Any], params: dict[str, Any], fx: Effects
    ) -> dict[str, Any]:
        me, now = str(actor["sub"]), self.now()
        item = await self.item(session, params.get("challenge_id"), self.name)
        score = params.get("score")
        questions = int(item.data.get("questions", self.config.challenge_questions))
        if not isinstance(score, int) or isinstance(score, bool) or not 0 <= score <= questions:
            raise ActionError("invalid", f"score must be the number of correct answers, 0-{questions}")
        if me not in (item.owner_id, item.other_id):
            raise ActionError("forbidden", "you are not in this challenge")
        allowed = ("pending", "accepted") if me == item.owner_id else ("accepted",)
        if item.state not in allowed or (item.expires_at is not None and now >= item.expires_at):
            raise ActionError("not_open", f"this challenge is {item.state}")
        row = await session.get(LoopMember, (item.id, me))
        if row is None or row.score is not None:
            raise ActionError("already_submitted", "your score is already in")
        row.score, row.updated_at = float(score), now
        room = f"challenge:{item.id}"
        submitted = self.shown(await self.state(session, me, actor), OUTSIDER, room)
        fx.push(room, "challenge_update", {"challenge_id": item.id, "submitted": submitted})
        scores = await self._scores(session, item)
        if item.state == "accepted" and len(scores) == 2 and all(v is not None for v in scores.values()):
            await self._complete(session, item, scores, fx)
        return {"challenge_id": item.id, "state": item.state}

    @staticmethod
    async def _scores(session: AsyncSession, item: LoopItem) -> dict[str, float | None]:
        rows = await session.scalars(select(LoopMember).where(LoopMember.item_id == item.id))
        return {m.user_id: m.score for m in rows if m.user_id in (item.owner_id, item.other_id)}

    async def _complete(
        self, session: AsyncSession, item: LoopItem, scores: dict[str, float | None], fx: Effects
    ) -> None:
        now = self.now()
        assert item.other_id is not None
        a, b = item.owner_id, item.other_id
        sa, sb = scores[a] or 0.0, scores[b] or 0.0
        winner = a if sa > sb else b if sb > sa else None
        self.move(item, "completed", now, winner=winner, scores={a: sa, b: sb})
        for player in (a, b):
            await self.reward(session, fx, player, "challenge_completed", item.id, now)
            if winner is None:
                await self.reward(session, fx, player, "challenge_tied", item.id, now)
        if winner is not None:
            await self.reward(session, fx, winner, "challenge_won", item.id, now)
        room = f"challenge:{item.id}"
        states = await self.states(session, (a, b))

        def result(viewer: Viewer) -> dict[str, Any]:
            scores = []
            for player, score in ((a, sa), (b, sb)):
                shown = self.shown(states[player], viewer, room)
                if shown is not None:
                    scores.append({**shown, "score": score})
            return {"challenge_id": item.id, "state": "completed", "scores": scores, "draw": winner is None}

        fx.push(room, "challenge_result", result(OUTSIDER))
        for player in (a, b):
            outcome = "draw" if winner is None else "won" if winner == player else "lost"
            fx.to_user(player, "challenge_result", {**result(Viewer(player)), "outcome": outcome})

    async def expire(self, session: AsyncSession, job: LoopJob, fx: Effects) -> None:
        item = await session.get(LoopItem, job.payload["id"], with_for_update=True)
        if item is None or item.state not in ("pending", "accepted"):
            return  # finished in time (or declined): nothing to expire
        self.move(item, "expired", self.now())
        payload = {"challenge_id": item.id, "state": "expired"}
        fx.push(f"challenge:{item.id}", "challenge_update", payload)
        for player in filter(None, (item.owner_id, item.other_id)):
            fx.to_user(player, "challenge_update", payload)
