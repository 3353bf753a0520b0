"""Every user's privacy state, read from the store, and the one rule that shows a user to a viewer.

The store is the only source of a user's privacy state: `users` (minor, opted out and by whom, parent,
display name) and `consents`. A token may only add protection (`PrivacyState.with_claims`); nothing a
client sends lowers what the store says. Every surface that shows user X to viewer Y calls
`PrivacyRules.show`, so the rule below is written once:

- a deleted user is shown to nobody (they have no rows left to show);
- the user themself, and the parent named in their profile, see their id and name;
- an admin sees their id, and their name unless they are a minor;
- anyone else sees nothing of a user who opted out; a minor (or a user the store knows nothing of)
  as "A student" with an opaque handle that differs per scope (a room, a topic) and cannot be read
  back; everyone else by id and display name.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import case, select
from sqlalchemy.ext.asyncio import AsyncSession

from .database import dialect_insert
from .models import Consent, Tombstone, User

ANONYMOUS_NAME = "A student"
# Who may have opted a user out; an opt-out made by a parent or an admin is lifted only by one of them.
OPT_OUT_MAKERS = ("self", "parent", "admin")


@dataclass(frozen=True, slots=True)
class PrivacyState:
    uid: str
    known: bool = False  # a profile exists (or the user's own token vouches for them)
    minor: bool = False
    opted_out: bool = False
    opted_out_by: str | None = None
    consent: bool = False  # verifiable parental consent, standing
    parent_id: str | None = None
    display_name: str | None = None
    role: str = "student"

    @property
    def anonymous(self) -> bool:
        """Shown to other users without id or name."""
        return self.minor or not self.known

    def with_claims(self, claims: Mapping[str, Any]) -> PrivacyState:
        """This state as seen on a connection carrying these verified claims: `minor: true` and
        `opted_out: true` add protection, and a token's `name` stands in for a missing display name;
        no claim removes protection the store holds."""
        name = claims.get("name")
        return replace(
            self,
            known=True,
            minor=self.minor or claims.get("minor") is True,
            opted_out=self.opted_out or claims.get("opted_out") is True,
            display_name=self.display_name or (name if isinstance(name, str) and name else None),
        )


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who is looking: a user (with their role), or nobody in particular (`uid` None: an outsider on a
    link's landing page, a file leaving the system)."""

    uid: str | None = None
    role: str | None = None

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> Viewer:
        role = claims.get("role")
        return cls(str(claims["sub"]), role if isinstance(role, str) else None)


OUTSIDER = Viewer()
ADMIN = Viewer(None, "admin")


@dataclass(frozen=True, slots=True)
class Shown:
    """A user as one viewer may see them: a name always; their id, or an opaque handle instead."""

    name: str
    user_id: str | None
    handle: str | None = None

    def as_dict(self) -> dict[str, str]:
        if self.user_id is not None:
            return {"user_id": self.user_id, "name": self.name}
        assert self.handle is not None
        return {"handle": self.handle, "name": self.name}

    @property
    def key(self) -> str:
        """What tells this user apart from others in the listing: their id, or their handle."""
        key = self.user_id if self.user_id is not None else self.handle
        assert key is not None
        return key


class PrivacyRules:
    """Loads privacy states and applies the rule above. `key` (derived from the app's secret) keys the
    handles and the tombstones, so neither can be turned back into an id."""

    def __init__(self, key: bytes | str) -> None:
        raw = key.encode() if isinstance(key, str) else key
        self._handle_key = hmac.new(raw, b"privacy-handle", hashlib.sha256).digest()
        self._tomb_key = hmac.new(raw, b"privacy-tombstone", hashlib.sha256).digest()

    def handle(self, scope: str, uid: str) -> str:
        """The opaque stand-in for `uid` within `scope`: stable (one user's tabs group under it), but
        different in every scope, so two rooms cannot be linked."""
        digest = hmac.new(self._handle_key, f"{scope}\x00{uid}".encode(), hashlib.sha256).hexdigest()
        return f"anon-{digest[:20]}"

    def tombstone_key(self, uid: str) -> str:
        return hmac.new(self._tomb_key, uid.encode(), hashlib.sha256).hexdigest()

    def show(self, state: PrivacyState, viewer: Viewer, scope: str) -> Shown | None:
        """How `viewer` may see the user in `scope` (a topic or room name), or None: not at all."""
        name = state.display_name or ANONYMOUS_NAME
        if viewer.uid is not None and (viewer.uid == state.uid or viewer.uid == state.parent_id):
            return Shown(name, state.uid)
        if viewer.role == "admin":
            return Shown(ANONYMOUS_NAME if state.minor else name, state.uid)
        if state.opted_out:
            return None
        if state.anonymous:
            return Shown(ANONYMOUS_NAME, None, self.handle(scope, state.uid))
        return Shown(name, state.uid)

    def show_as(self, state: PrivacyState, viewer: Viewer, scope: str) -> dict[str, str] | None:
        shown = self.show(state, viewer, scope)
        return shown.as_dict() if shown is not None else None

    @staticmethod
    async def load(session: AsyncSession, uids: Iterable[str]) -> dict[str, PrivacyState]:
        return await load_states(session, uids)

    async def load_one(self, session: AsyncSession, uid: str) -> PrivacyState:
        return (await self.load(session, [uid]))[uid]

    async def bury(self, session: AsyncSession, uid: str, at: datetime) -> None:
        """Record the deletion of `uid` (by key, not id) in the caller's transaction."""
        insert = dialect_insert(session.get_bind().dialect.name)
        await session.execute(
            insert(Tombstone)
            .values(key=self.tombstone_key(uid), deleted_at=at)
            .on_conflict_do_update(index_elements=["key"], set_={"deleted_at": at})
        )

    @staticmethod
    async def tombstones(session: AsyncSession) -> dict[str, datetime]:
        """Every deletion on record: tombstone key -> when."""
        rows = await session.execute(select(Tombstone.key, Tombstone.deleted_at))
        return {key: at for key, at in rows}


async def load_states(session: AsyncSession, uids: Iterable[str]) -> dict[str, PrivacyState]:
    """The privacy state of each user, from the store (users it knows nothing of: `known=False`, though
    a consent on record for them still counts)."""
    wanted = sorted(set(uids))
    states = {uid: PrivacyState(uid) for uid in wanted}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        consented = set(
            await session.scalars(
                select(Consent.user_id).where(Consent.user_id.in_(chunk), Consent.revoked_at.is_(None))
            )
        )
        for uid in consented:
            states[uid] = replace(states[uid], consent=True)
        for user in await session.scalars(select(User).where(User.id.in_(chunk))):
            states[user.id] = PrivacyState(
                uid=user.id,
                known=True,
                minor=bool(user.minor),
                opted_out=bool(user.opted_out),
                opted_out_by=user.opted_out_by if user.opted_out else None,
                consent=user.id in consented,
                parent_id=user.parent_id,
                display_name=user.display_name,
                role=user.role or "student",
            )
    return states


async def opt_out_user(session: AsyncSession, user_id: str, *, by: str, now: datetime) -> None:
    """Opt `user_id` out in the caller's transaction, recording who did (one of `OPT_OUT_MAKERS`). An
    opt-out a parent or an admin made keeps its maker: the user cannot turn it into their own."""
    assert by in OPT_OUT_MAKERS
    insert = dialect_insert(session.get_bind().dialect.name)
    stmt = insert(User).values(
        id=user_id, opted_out=True, opted_out_by=by, subjects=[], created_at=now, updated_at=now
    )
    keep = User.opted_out & User.opted_out_by.in_(("parent", "admin"))
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=["id"],
            set_={
                "opted_out": True,
                "opted_out_by": case((keep, User.opted_out_by), else_=stmt.excluded.opted_out_by),
                "updated_at": now,
            },
        )
    )


__all__ = [
    "ADMIN",
    "ANONYMOUS_NAME",
    "OPT_OUT_MAKERS",
    "OUTSIDER",
    "PrivacyRules",
    "PrivacyState",
    "Shown",
    "Viewer",
    "load_states",
    "opt_out_user",
]
