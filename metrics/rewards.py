"""Rewards for referrals, as a ledger (SPEC §9's loops pay through here).

A referrer earns 100 XP when someone they invited signs up (`referral_signup`) and a streak shield
when that person reaches first value (`referral_activated`). Daily caps per user (UTC day): 500 XP
and 3 streak shields; what would go over a cap is not paid (the row is not written). Each
(user, kind, reason, conversion) is paid at most once — the ledger's unique key — so processing a
conversion again pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from store import Reward

DAILY_CAPS = {"xp": 500, "streak_shield": 3}
PAYOUTS = {"referral_signup": ("xp", 100), "referral_activated": ("streak_shield", 1)}


@dataclass(frozen=True, slots=True)
class Paid:
    user_id: str
    kind: str
    amount: int
    reason: str
    ref: str

    def push_payload(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "amount": self.amount,
            "reason": self.reason,
            "for": "a friend you invited" if self.reason == "referral_signup" else "a friend's first session",
        }


async def pay(
    session: AsyncSession, user_id: str, reason: str, ref: str, at: datetime
) -> Paid | None:
    """Record one reward in `session` unless already paid or over today's cap; returns what was paid."""
    kind, amount = PAYOUTS[reason]
    already = await session.scalar(
        select(Reward.id).where(
            Reward.user_id == user_id,
            Reward.kind == kind,
            Reward.reason == reason,
            Reward.ref == ref,
        )
    )
    if already is not None:
        return None
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    today = await session.scalar(
        select(func.coalesce(func.sum(Reward.amount), 0)).where(
            Reward.user_id == user_id,
            Reward.kind == kind,
            Reward.created_at >= day,
            Reward.created_at < day + timedelta(days=1),
        )
    )
    amount = min(amount, DAILY_CAPS[kind] - int(today or 0))
    if amount <= 0:
        return None
    session.add(
        Reward(
            user_id=user_id,
            kind=kind,
            amount=amount,
            reason=reason,
            ref=ref,
            created_at=at,
        )
    )
    await session.flush()
    return Paid(user_id, kind, amount, reason, ref)
