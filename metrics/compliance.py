"""The compliance gate: the one check every outbound social action passes (nudges, invites, share
links, rally and parent messages), and the record of every refusal.

Rules, in order (the first that applies refuses, with its stable `reason`):
- `sender_opted_out` / `recipient_opted_out`: users who opted out of social features send and
  receive nothing social;
- `minor_without_consent`: a user under 13 (`minor` in the store, or in the sender's own token)
  never sends an invite outside the platform (`outside=True`: share links, invites to contacts) nor
  takes one from outside without a recorded, unrevoked parental consent (`consents`);
- `sender_rate_limited`: more than `sender_per_day` social actions shown from one sender in 24 h;
- `recipient_rate_limited`: more than `recipient_per_day` shown to one recipient in 24 h;
- `quiet_hours`: the recipient's local time (profile `timezone`, UTC when unknown) is within quiet
  hours (21:00-07:00 by default) — for pushes to a person, not for links the sender shares.
The loops' orchestrator adds its caps and cooldowns on top (loops/orchestrator.py) and records the
decision; `check` records nothing itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from store import PromptDecision, User
from store.privacy import load_states


@dataclass(frozen=True, slots=True)
class SocialAction:
    loop: str
    action: str
    sender_id: str | None  # None: the system prompts the recipient itself
    recipient_id: str | None  # None: a link shared outside the platform
    outside: bool = False  # reaches (or comes from) someone outside the platform
    # The sender's own verified claims, when they act themselves: what a token adds to the store's
    # protection (PrivacyState.with_claims).
    sender_claims: Mapping[str, Any] | None = None

    def by(self, claims: Mapping[str, Any]) -> SocialAction:
        """This action as sent by the holder of `claims` (the sender)."""
        return replace(self, sender_id=str(claims["sub"]), sender_claims=claims)


# What a refusal tells the person who tried.
MESSAGES = {
    "sender_opted_out": "you opted out of social features",
    "recipient_opted_out": "they do not take part in social features",
    "minor_without_consent": "a parent or guardian has to give consent first",
    "sender_rate_limited": "you have sent enough invites for today",
    "recipient_rate_limited": "they have had enough invites for today",
    "quiet_hours": "it is quiet hours for them; try again later",
    "recipient_unavailable": "they cannot be invited right now",
}
# What the sender is told instead: whether another user opted out is theirs to keep, so it reads the
# same as their having had enough invites (the recorded decision keeps the real reason).
TOLD_TO_SENDER = {
    "recipient_opted_out": "recipient_unavailable",
    "recipient_rate_limited": "recipient_unavailable",
}


def told_to_sender(reason: str) -> str:
    return TOLD_TO_SENDER.get(reason, reason)


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    reason: str  # "ok" or the rule that refused

    @classmethod
    def ok(cls) -> Verdict:
        return cls(True, "ok")

    @property
    def message(self) -> str:
        return f"{MESSAGES.get(self.reason, 'not allowed now')} ({self.reason})"


@dataclass(frozen=True, slots=True)
class ComplianceRules:
    sender_per_day: int = 20
    recipient_per_day: int = 10
    quiet_start: time = time(21, 0)
    quiet_end: time = time(7, 0)


def in_quiet_hours(local: time, start: time, end: time) -> bool:
    if start <= end:
        return start <= local < end
    return local >= start or local < end


def local_time(now: datetime, zone: str | None) -> time:
    try:
        tz = ZoneInfo(zone) if zone else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        tz = ZoneInfo("UTC")
    return now.astimezone(tz).time()


async def has_consent(session: AsyncSession, user_id: str) -> bool:
    return (await load_states(session, [user_id]))[user_id].consent


async def check(
    session: AsyncSession, action: SocialAction, now: datetime, rules: ComplianceRules = ComplianceRules()
) -> Verdict:
    states = await load_states(session, [i for i in (action.sender_id, action.recipient_id) if i])
    sender = states.get(action.sender_id) if action.sender_id else None
    recipient = states.get(action.recipient_id) if action.recipient_id else None
    if sender is not None and action.sender_claims is not None:
        sender = sender.with_claims(action.sender_claims)
    if sender is not None and sender.opted_out:
        return Verdict(False, "sender_opted_out")
    if recipient is not None and recipient.opted_out:
        return Verdict(False, "recipient_opted_out")
    if action.outside and any(p is not None and p.minor and not p.consent for p in (sender, recipient)):
        return Verdict(False, "minor_without_consent")
    day_ago = now - timedelta(hours=24)
    if action.sender_id is not None:
        sent = await session.scalar(
            select(func.count()).where(
                PromptDecision.sender_id == action.sender_id,
                PromptDecision.shown.is_(True),
                PromptDecision.created_at > day_ago,
            )
        )
        if int(sent or 0) >= rules.sender_per_day:
            return Verdict(False, "sender_rate_limited")
    if action.recipient_id is not None:
        received = await session.scalar(
            select(func.count()).where(
                PromptDecision.user_id == action.recipient_id,
                PromptDecision.sender_id.is_not(None),
                PromptDecision.shown.is_(True),
                PromptDecision.created_at > day_ago,
            )
        )
        if action.sender_id is not None and int(received or 0) >= rules.recipient_per_day:
            return Verdict(False, "recipient_rate_limited")
        zone = await session.scalar(select(User.timezone).where(User.id == action.recipient_id))
        if in_quiet_hours(local_time(now, zone), rules.quiet_start, rules.quiet_end):
            return Verdict(False, "quiet_hours")
    return Verdict.ok()


__all__ = ["MESSAGES", "ComplianceRules", "SocialAction", "Verdict", "check", "has_consent", "in_quiet_hours"]
