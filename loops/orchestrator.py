"""The orchestrator: may this loop prompt be shown to this person now? One call per prompt, recorded.

Order: a loop paused by the guardrails or an admin refuses everything (`loop_paused`); then the
compliance gate (metrics.compliance: opt-out, minors and consent, rate limits,
quiet hours), then the loops' own pacing for the recipient:
- `daily_cap`: at most `daily_cap` (3) loop prompts per user per rolling 24 h;
- `cooldown`: per loop, no new prompt of that loop within its cooldown (buddy_challenge 4 h,
  results_rally 6 h, proud_parent 12 h, streak_rescue 24 h, study_buddy 1 h).
A follow-up of a prompt already shown (a rescue's rising urgency, a challenge's result, an accepted
invite) passes `update=True`: the gate still applies, pacing does not, and it does not count
against the cap. Every decision — shown, or suppressed and why — is a `prompt_decisions` row in the
caller's transaction (the guardrails dashboard reads them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from metrics.compliance import ComplianceRules, SocialAction, Verdict, check
from metrics.guardrails import loop_paused
from store import PromptDecision

UPDATE = "update"


def _default_cooldowns() -> dict[str, timedelta]:
    return {
        "buddy_challenge": timedelta(hours=4),
        "results_rally": timedelta(hours=6),
        "proud_parent": timedelta(hours=12),
        "streak_rescue": timedelta(hours=24),
        "study_buddy": timedelta(hours=1),
    }


@dataclass(frozen=True)
class PacingRules:
    daily_cap: int = 3
    cooldowns: dict[str, timedelta] = field(default_factory=_default_cooldowns)
    compliance: ComplianceRules = field(default_factory=ComplianceRules)


class Orchestrator:
    def __init__(self, rules: PacingRules | None = None) -> None:
        self.rules = rules or PacingRules()

    async def decide(
        self, session: AsyncSession, action: SocialAction, now: datetime, *, update: bool = False
    ) -> Verdict:
        if await loop_paused(session, action.loop):
            verdict = Verdict(False, "loop_paused")  # the guardrails (or an admin) switched it off
        else:
            verdict = await check(session, action, now, self.rules.compliance)
        if verdict.allowed and not update and action.recipient_id is not None:
            verdict = await self._pace(session, action, now)
        session.add(
            PromptDecision(
                user_id=action.recipient_id or action.sender_id or "",
                sender_id=action.sender_id,
                loop=action.loop,
                action=action.action,
                shown=verdict.allowed,
                reason=UPDATE if verdict.allowed and update else verdict.reason,
                created_at=now,
            )
        )
        await session.flush()
        return verdict

    async def _pace(self, session: AsyncSession, action: SocialAction, now: datetime) -> Verdict:
        recipient = action.recipient_id
        shown = (
            PromptDecision.user_id == recipient,
            PromptDecision.shown.is_(True),
            PromptDecision.reason != UPDATE,
        )
        recent = await session.scalar(
            select(func.count()).where(*shown, PromptDecision.created_at > now - timedelta(hours=24))
        )
        if int(recent or 0) >= self.rules.daily_cap:
            return Verdict(False, "daily_cap")
        cooldown = self.rules.cooldowns.get(action.loop)
        if cooldown is not None:
            last = await session.scalar(
                select(func.max(PromptDecision.created_at)).where(*shown, PromptDecision.loop == action.loop)
            )
            if last is not None and now - last < cooldown:
                return Verdict(False, "cooldown")
        return Verdict.ok()


__all__ = ["Orchestrator", "PacingRules"]
