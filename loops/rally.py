"""Results rally: after a diagnostic or quiz, a student starts a 7-day mini-leaderboard in the subject
and invites peers; it is re-ranked live on `rally:{id}` as their results come in.

`start_rally` needs a `quiz_result` or `diagnostic_completed` of the starter's in that subject; it
makes an invite link (source `results_rally`, to `/rally/{id}`, announced as `invite_sent`).
`invite_to_rally` pushes `rally_invite` to peers (through the orchestrator); `join_rally` (an invited
peer, or anyone holding the rally's whole signed link who passes the compliance gate) needs a
completed diagnostic in the subject. A starter the gate does not let share outside the platform (a
minor without a parent's consent) gets no link. A member's standing is their best
`quiz_result`/`diagnostic_completed` score in the subject since the rally began; ranks: score
descending, then who got it first. Each new result of a member pushes `rally_update` `{rally_id,
subject, ends_at, standings: [{rank, user_id | handle, name, score}]}` (members as the privacy rule
shows them to anyone in `rally:{id}`: a minor by a handle of this rally's own, an opted-out member
not at all); at the end, `rally_ended` with the final standings.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from store import Event, LoopItem, LoopJob, LoopMember
from store.privacy import OUTSIDER, Viewer

from .challenge import _subject
from .engine import ActionError, Effects, Loop, LoopServices

RESULTS = ("quiz_result", "diagnostic_completed")
MAX_INVITES = 20


class ResultsRally(Loop):
    name = "results_rally"

    def __init__(self, services: LoopServices) -> None:
        super().__init__(services)
        self.on_events = {etype: self.on_result for etype in RESULTS}
        self.jobs = {"rally_end": self.end}
        self.actions = {"start_rally": self.start, "invite_to_rally": self.invite, "join_rally": self.join}

    @staticmethod
    async def _best(
        session: AsyncSession,
        user: str,
        subject: str,
        since: datetime | None,
        types: tuple[str, ...] = RESULTS,
    ) -> float | None:
        query = select(func.max(Event.props["score"].as_float())).where(
            Event.user_id == user, Event.type.in_(types), Event.props["subject"].as_string() == subject
        )
        if since is not None:
            query = query.where(Event.ts >= since)
        best = await session.scalar(query)
        return float(best) if best is not None else None

    async def standings(self, session: AsyncSession, item: LoopItem, viewer: Viewer) -> list[dict[str, Any]]:
        """The standings as `viewer` sees them: ranked among the members they may see."""
        rows = (
            await session.scalars(
                select(LoopMember)
                .where(LoopMember.item_id == item.id, LoopMember.role.in_(("owner", "joined")))
                .order_by(LoopMember.score.desc().nulls_last(), LoopMember.updated_at, LoopMember.user_id)
            )
        ).all()
        states = await self.states(session, [m.user_id for m in rows])
        standings: list[dict[str, Any]] = []
        for m in rows:
            shown = self.shown(states[m.user_id], viewer, f"rally:{item.id}")
            if shown is not None:
                standings.append({"rank": len(standings) + 1, **shown, "score": m.score})
        return standings

    async def _update(
        self, session: AsyncSession, item: LoopItem, fx: Effects, event: str = "rally_update"
    ) -> None:
        # The room's every member reads this push: as anyone may see them.
        public = await self.standings(session, item, OUTSIDER)
        fx.push(
            f"rally:{item.id}",
            event,
            {
                "rally_id": item.id,
                "subject": item.subject,
                "ends_at": item.expires_at.isoformat() if item.expires_at else None,
                "standings": public,
            },
        )

    async def start(
        self, session: AsyncSession, actor: dict[str, Any], params: dict[str, Any], fx: Effects
    ) -> dict[str, Any]:
        me, now = str(actor["sub"]), self.now()
        subject = _subject(params)
        best = await self._best(session, me, subject, None)
        if best is None:
            raise ActionError("no_result", f"finish a quiz or diagnostic in {subject} first")
        item = LoopItem(
            id=self.new_id("ra"),
            loop=self.name,
            owner_id=me,
            subject=subject,
            state="open",
            data={},
            created_at=now,
            updated_at=now,
            expires_at=now + timedelta(days=self.config.rally_days),
        )
        session.add(item)
        owner = await self.member(session, item.id, me, "owner", now)
        owner.score = best
        reply: dict[str, Any] = {"rally_id": item.id, "topic": f"rally:{item.id}"}
        # The link goes outside the platform: only for a starter the compliance gate lets share.
        sharing = await self.decide(
            session, "rally_link", sender=me, recipient=None, outside=True, actor=actor
        )
        if sharing.allowed:
            reply.update(
                await self.share_item(
                    session, fx, item, me, f"/rally/{item.id}", self.config.rally_days * 86400
                )
            )
        else:
            reply["link_refused"] = sharing.reason
        assert item.expires_at is not None
        await self.schedule(session, "rally_end", item.expires_at, {"id": item.id}, f"rally:{item.id}")
        return reply

    async def invite(
        self, session: AsyncSession, actor: dict[str, Any], params: dict[str, Any], fx: Effects
    ) -> dict[str, Any]:
        me = str(actor["sub"])
        item = await self.item(session, params.get("rally_id"), self.name)
        peers = params.get("user_ids")
        if (
            not isinstance(peers, list)
            or not 1 <= len(peers) <= MAX_INVITES
            or not all(isinstance(p, str) and p for p in peers)
        ):
            raise ActionError("invalid", f"user_ids must list 1-{MAX_INVITES} user ids")
        mine = await session.get(LoopMember, (item.id, me))
        if mine is None or mine.role not in ("owner", "joined"):
            raise ActionError("forbidden", "only the rally's members invite to it")
        if item.state != "open":
            raise ActionError("not_open", f"this rally is {item.state}")
        # One payload for every peer, and copy that may go to a provider: as anyone may see the sender.
        name = self.named(await self.state(session, me, actor))
        fresh = [p for p in peers if p != me and await session.get(LoopMember, (item.id, p)) is None]
        sent = await self.invite_each(
            session,
            fx,
            item,
            actor=actor,
            recipients=fresh,
            action="rally_invite",
            event="rally_invite",
            payload={
                "rally_id": item.id,
                "from": name,
                "subject": item.subject,
                "ends_at": item.expires_at.isoformat() if item.expires_at else None,
                "text": await self.text("rally_invite", name=name, subject=item.subject),
            },
        )
        return {"rally_id": item.id, **sent}

    async def join(
        self, session: AsyncSession, actor: dict[str, Any], params: dict[str, Any], fx: Effects
    ) -> dict[str, Any]:
        me, now = str(actor["sub"]), self.now()
        item = await self.item(session, params.get("rally_id"), self.name)
        if item.state != "open" or (item.expires_at is not None and now >= item.expires_at):
            raise ActionError("not_open", f"this rally is {item.state}")
        row = await session.get(LoopMember, (item.id, me))
        viewer = Viewer.from_claims(actor)
        if row is None:
            if params.get("token") is None:
                raise ActionError("forbidden", "this rally needs an invitation or its link")
            await self.by_link(session, item, params.get("token"), "rally")
        if row is not None and row.role in ("owner", "joined"):
            return {
                "rally_id": item.id,
                "topic": f"rally:{item.id}",
                "standings": await self.standings(session, item, viewer),
            }
        assert item.subject is not None
        if await self._best(session, me, item.subject, None, ("diagnostic_completed",)) is None:
            raise ActionError("no_diagnostic", f"complete the {item.subject} diagnostic to join")
        if row is None:
            refused = await self.gate(session, actor, "rally_link_join", "join a rally through a link")
            if refused is not None:
                return refused
        row = row or await self.member(session, item.id, me, "joined", now)
        row.role, row.joined_at, row.updated_at = "joined", now, now
        row.score = await self._best(session, me, item.subject, item.created_at)
        await session.flush()
        await self._update(session, item, fx)
        return {
            "rally_id": item.id,
            "topic": f"rally:{item.id}",
            "standings": await self.standings(session, item, viewer),
        }

    async def on_result(self, session: AsyncSession, event: dict[str, Any], fx: Effects) -> None:
        user, subject = event["user_id"], event["props"].get("subject")
        score, at = event["props"].get("score"), datetime.fromisoformat(event["ts"])
        if not isinstance(score, (int, float)):
            return
        rows = (
            await session.execute(
                select(LoopItem, LoopMember)
                .join(LoopMember, LoopMember.item_id == LoopItem.id)
                .where(
                    LoopItem.loop == self.name,
                    LoopItem.state == "open",
                    LoopItem.subject == subject,
                    LoopItem.created_at <= at,
                    LoopMember.user_id == user,
                    LoopMember.role.in_(("owner", "joined")),
                )
            )
        ).all()
        for item, member in rows:
            if item.expires_at is not None and at >= item.expires_at:
                continue
            if member.score is None or float(score) > member.score:
                member.score, member.updated_at = float(score), at
                await session.flush()
                await self._update(session, item, fx)

    async def end(self, session: AsyncSession, job: LoopJob, fx: Effects) -> None:
        item = await session.get(LoopItem, job.payload["id"], with_for_update=True)
        if item is None or item.state != "open":
            return
        self.move(item, "ended", self.now())
        await self._update(session, item, fx, "rally_ended")
