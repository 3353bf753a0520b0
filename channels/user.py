"""`user:{id}`: a user's private notifications (nudges, invites, rewards).

Only that user or an admin may join.
"""

from __future__ import annotations

from typing import Any

from realtime import Channel, JoinError

from .access import is_self_or_admin


class UserChannel(Channel):
    __slots__ = ()

    @property
    def user_id(self) -> str:
        return self.topic.removeprefix("user:")

    async def join(self, params: dict[str, Any]) -> dict[str, Any]:
        if not is_self_or_admin(self.claims, self.user_id):
            raise JoinError("unauthorized")
        return {}
