"""Loop rooms: `challenge:{id}` (buddy challenges and accepted study-buddy nudges) and `rally:{id}`.

Only the item's participants (and admins) may join. The join reply is the item's current state
(rallies: the standings, as the privacy rule shows each member to the joiner in this room); the
loops push progress and results here (loops/). Joining also tracks the user in the room's presence,
with the same rule as subject presence, so a minor's handle is the same in both.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from realtime import JoinError
from store import LoopItem, LoopMember
from store.privacy import Viewer

from .access import is_admin
from .presence import _Tracked

ROOM_LOOPS = {"challenge": ("buddy_challenge", "study_buddy"), "rally": ("results_rally",)}


class LoopRoomChannel(_Tracked):
    __slots__ = ()

    async def join(self, params: dict[str, Any]) -> dict[str, Any]:
        kind, _, item_id = self.topic.partition(":")
        me = str(self.claims["sub"])
        async with self.services.database.session() as session:
            item = await session.get(LoopItem, item_id) if 0 < len(item_id) <= 32 else None
            if item is None or item.loop not in ROOM_LOOPS.get(kind, ()):
                raise JoinError("not found")
            members = (await session.scalars(select(LoopMember).where(LoopMember.item_id == item.id))).all()
        if not is_admin(self.claims) and me not in {m.user_id for m in members}:
            raise JoinError("unauthorized")
        reply: dict[str, Any] = {
            "id": item.id,
            "loop": item.loop,
            "state": item.state,
            "subject": item.subject,
            "expires_at": item.expires_at.isoformat() if item.expires_at else None,
        }
        if item.loop == "results_rally":
            viewer = Viewer.from_claims(self.claims)
            reply["standings"] = await self.services.loops.rally_standings(item.id, viewer)
        await self.load_privacy()
        return reply

    async def after_join(self) -> None:
        self._track()
        self.push("presence_state", self.services.presence.listing(self.topic))
