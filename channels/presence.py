"""Presence channels (SPEC §7).

`presence:subject:{subject}` lists who is there with Phoenix `presence_state`/`presence_diff`;
`presence:global` is too large to list and gets throttled `presence_counts` instead. Joining
either counts the user as online.
"""

from __future__ import annotations

import re
from typing import Any

from realtime import JoinError, ReplyError
from store.privacy import ANONYMOUS_NAME, OUTSIDER, PrivacyState

from .context import ProductChannel

SUBJECT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
STATUSES = frozenset({"online", "in_session", "idle", "away"})


class _Tracked(ProductChannel):
    """Tracks this channel's user in the presence tracker from join to terminate."""

    __slots__ = ("_hidden", "_ref", "_state", "_status")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._ref: str | None = None
        self._status = "online"
        self._hidden = False
        self._state: PrivacyState | None = None

    async def load_privacy(self) -> PrivacyState:
        """This user's privacy state from the store, with what their token adds."""
        stored = await self.services.notices.directory.get(str(self.claims["sub"]))
        self._state = stored.with_claims(self.claims)
        return self._state

    def _identity(self) -> tuple[str, dict[str, Any], bool]:
        """(key, meta, listed) for this user on this topic, as other users may see them."""
        assert self._state is not None
        shown = self.services.privacy.show(self._state, OUTSIDER, self.topic)
        listed = shown is not None and not self._hidden
        if shown is None or shown.user_id is None:
            # No name, no id, no role: only what any student could be.
            key = self.services.privacy.handle(self.topic, self._state.uid)
            return key, {"name": ANONYMOUS_NAME, "status": self._status}, listed
        meta: dict[str, Any] = {"status": self._status, "role": self.claims.get("role"), "name": shown.name}
        return shown.user_id, meta, listed

    def _track(self) -> None:
        key, meta, listed = self._identity()
        self._ref = self.services.presence.track(
            self, self.topic, key, meta, uid=str(self.claims["sub"]), listed=listed
        )

    async def privacy_changed(self) -> None:
        """Re-render this user's presence from the store (their privacy state changed)."""
        if self._ref is None:
            return
        await self.load_privacy()
        # Its key may change (an id becomes a handle): leave and join again, one diff for viewers.
        self.services.presence.untrack(self)
        self._track()

    async def terminate(self, reason: str) -> None:
        self.services.presence.untrack(self)


class SubjectPresenceChannel(_Tracked):
    __slots__ = ()

    async def join(self, params: dict[str, Any]) -> dict[str, Any]:
        subject = self.topic.removeprefix("presence:subject:")
        if not SUBJECT.match(subject):
            raise JoinError("invalid subject: use 1-64 letters, digits, '-' or '_'")
        status = params.get("status", "online")
        if status not in STATUSES:
            raise JoinError(f"status must be one of {sorted(STATUSES)}")
        self._status = status
        self._hidden = bool(params.get("hidden", False))
        await self.load_privacy()
        return {}

    async def after_join(self) -> None:
        self._track()
        self.push("presence_state", self.services.presence.listing(self.topic))

    async def handle_in(self, event: str, payload: Any, ref: str | None) -> Any:
        if event != "presence_update":
            return await super().handle_in(event, payload, ref)
        if not isinstance(payload, dict):
            raise ReplyError('payload must be an object like {"status": "idle"} or {"hidden": true}')
        if "status" in payload:
            if payload["status"] not in STATUSES:
                raise ReplyError(f"status must be one of {sorted(STATUSES)}")
            self._status = payload["status"]
        if "hidden" in payload:
            if not isinstance(payload["hidden"], bool):
                raise ReplyError("hidden must be true or false")
            self._hidden = payload["hidden"]
        assert self._ref is not None
        _, meta, listed = self._identity()
        self._ref = self.services.presence.update(self, self._ref, meta, listed=listed)
        return {"phx_ref": self._ref}


class GlobalPresenceChannel(_Tracked):
    __slots__ = ()

    async def join(self, params: dict[str, Any]) -> dict[str, Any]:
        await self.load_privacy()
        return {}

    async def privacy_changed(self) -> None:
        return None  # counted, never listed: nothing to re-render

    async def after_join(self) -> None:
        # Counted, never listed: this topic only ever carries aggregate counts.
        self.services.presence.track(self, self.topic, "", {}, uid=str(self.claims["sub"]), listed=False)
        self.push("presence_counts", self.services.presence.counts())
