"""Rewards, as a ledger: referrals and the loops pay through here.

Payouts (`PAYOUTS`, reason → kind and amount): a referrer earns 100 XP when someone they invited
signs up (`referral_signup`) and a streak shield when that person reaches first value
(`referral_activated`); a proud-parent referral gives a free session to both families
(`parent_referral`); a finished buddy challenge a shield to both players (`challenge_completed`),
50 XP to the winner (`challenge_won`) or 25 XP each on a draw (`challenge_tied`); a saved streak a
shield to the student and each friend who joined the rescue (`rescue_saved`). Daily caps per user
(UTC day): 500 XP, 3 streak shields, 2 free sessions; what would go over a cap is not paid (the
row is not written, or written with what is left). Each (user, kind, reason, ref) is paid at most
once — the ledger's unique key — so processing the same conversion or loop outcome again pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from store import Reward

DAILY_CAPS = {"xp": 500, "streak_shield": 3, "free_session": 2}
PAYOUTS = {
    "referral_signup": ("xp", 100),
    "referral_activated": ("streak_shield", 1),
    "parent_referral": ("free_session", 1),
    "challenge_completed": ("streak_shield", 1),
    "challenge_won": ("xp", 50),
    "challenge_tied": ("xp", 25),
    "rescue_saved": ("streak_shield", 1),
}
WHY = {
    "referral_signup": "a friend you invited",
    "referral_activated": "a friend's first session",
    "parent_referral": "a family you referred",
    "challenge_completed": "finishing a buddy challenge",
    "challenge_won": "winning a buddy challenge",
    "challenge_tied": "a drawn buddy challenge",
    "rescue_saved": "a rescued streak",
}


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
            "for": WHY.get(self.reason, self.reason),
        }


async def pay(session: AsyncSession, user_id: str, reason: str, ref: str, at: datetime) -> Paid | None:
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
