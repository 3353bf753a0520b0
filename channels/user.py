"""`user:{id}`: a user's private notifications (nudges, invites, rewards), and `track` for their events.

Only that user or an admin may join.
"""

from __future__ import annotations

from typing import Any

from loops import ActionError
from metrics import EventRejected, IngestUnavailable, validate_event
from realtime import JoinError, ReplyError
from store import utcnow

from .access import is_admin, is_self_or_admin
from .context import ProductChannel


class UserChannel(ProductChannel):
    __slots__ = ()

    @property
    def user_id(self) -> str:
        return self.topic.removeprefix("user:")

    async def join(self, params: dict[str, Any]) -> dict[str, Any]:
        if not is_self_or_admin(self.claims, self.user_id):
            raise JoinError("unauthorized")
        return {}

    async def handle_in(self, event: str, payload: Any, ref: str | None) -> Any:
        if event != "track":
            if event in self.services.loops.action_names:
                return await self._act(event, payload)
            return await super().handle_in(event, payload, ref)
        # The same path as POST /api/events (SPEC §8): one event per message.
        try:
            item = validate_event(
                payload, caller=str(self.claims["sub"]), is_admin=is_admin(self.claims), now=utcnow()
            )
        except EventRejected as exc:
            raise ReplyError("invalid event", fields=exc.errors) from None
        try:
            (accepted,) = await self.services.ingest.ingest(
                [item], actor_id=str(self.claims["sub"]), actor_claims=self.claims
            )
        except IngestUnavailable:
            raise ReplyError("event store unavailable; retry", retry_after_ms=2000) from None
        return {"id": accepted.id, "duplicate": accepted.duplicate}

    async def _act(self, action: str, payload: Any) -> Any:
        """A loop action (README "Viral loops"), as the socket's user."""
        try:
            return await self.services.loops.act(self.claims, action, payload)
        except ActionError as exc:
            raise ReplyError(str(exc), **exc.as_dict()) from None
