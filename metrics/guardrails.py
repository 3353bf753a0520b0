"""Guardrails: health metrics from the event flow, thresholds, alerts, automatic pauses, the weekly
summary — growth that never harms students.

Health, per loop (over the last `window` of prompt decisions and events, 24 h by default):
- `opt_out_rate`: recipients of the loop's shown prompts who opted out after their first one / recipients;
- `complaint_rate`: `complaint` events naming the loop (`props.loop`) / prompts shown;
- `invite_spam_rate`: social actions shown per sending user per day (mean over senders; `max_per_sender` too);
- `rejection_rate`: the share of the loop's decisions the compliance gate refused (pacing is not a
  rejection: a cooldown or a daily cap is the loop behaving);
- `delivery_failure_rate`: the loop's pushes the broker refused / pushes attempted (`delivery_*`
  counters kept by the loop engine of this process; see LoopEngine.stats).
Per running experiment and variant: `opt_out_rate` and `complaint_rate` of exposed users after
exposure, `sessions_per_user` and `session_minutes` (mean `minutes` of `session_completed`).
Globally: `sessions_per_user` and `session_minutes` now against the window before (a relative
`*_drop`), and the 7-day K-factor.

Thresholds (`THRESHOLDS`, overridable with `GUARDRAIL_THRESHOLDS`, a JSON list of `{metric, scope,
warn, critical, direction}`; scope `loop`, `experiment` or `global`): crossing `warn` opens a warn
alert; crossing `critical` opens a critical one and **pauses** the loop (`loop_controls`: the
orchestrator then refuses its prompts with `loop_paused`) or the experiment (status `paused`, audited
as actor `guardrails`). Only an admin unpauses. An open alert is not repeated while it stays crossed,
and resolves when its value is back inside. Each new alert is pushed on `dashboard:guardrails` and
POSTed to `GUARDRAIL_WEBHOOK_URL` (JSON, `X-Viral-Signature: sha256=<HMAC of timestamp.body>`,
`X-Viral-Timestamp`; 3 attempts with backoff). The K-factor alert fires when the 7-day K drops
below `k_factor` thresholds (alerts only; it pauses nothing).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import httpx
import orjson
from sqlalchemy import and_, distinct, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from store import (
    Alert,
    AuditLog,
    Conversion,
    Event,
    Experiment,
    ExperimentExposure,
    LoopControl,
    PromptDecision,
)

from . import experiments
from .growth import k_factor_report, ratio, to_csv

log = logging.getLogger(__name__)

LOOPS = ("study_buddy", "buddy_challenge", "results_rally", "proud_parent", "streak_rescue")
GATE_REASONS = (
    "sender_opted_out",
    "recipient_opted_out",
    "minor_without_consent",
    "sender_rate_limited",
    "recipient_rate_limited",
    "quiet_hours",
    "loop_paused",
)
ACTOR = "guardrails"


@dataclass(frozen=True, slots=True)
class Threshold:
    metric: str
    scope: str  # "loop" | "experiment" | "global"
    warn: float
    critical: float | None
    direction: str = "above"  # "above": alert when value >= threshold; "below": when value <= threshold

    def level(self, value: float | None) -> str | None:
        if value is None:
            return None

        def crossed(limit: float) -> bool:
            return value >= limit if self.direction == "above" else value <= limit

        if self.critical is not None and crossed(self.critical):
            return "critical"
        return "warn" if crossed(self.warn) else None


THRESHOLDS: tuple[Threshold, ...] = (
    Threshold("opt_out_rate", "loop", 0.02, 0.05),
    Threshold("complaint_rate", "loop", 0.01, 0.03),
    Threshold("invite_spam_rate", "loop", 10.0, 20.0),
    Threshold("rejection_rate", "loop", 0.30, None),
    Threshold("delivery_failure_rate", "loop", 0.05, 0.20),
    Threshold("opt_out_rate", "experiment", 0.02, 0.05),
    Threshold("complaint_rate", "experiment", 0.01, 0.03),
    Threshold("sessions_per_user_drop", "global", 0.10, None),
    Threshold("session_minutes_drop", "global", 0.10, None),
    Threshold("k_factor", "global", 1.0, 0.8, "below"),
)


def thresholds_from_json(value: str) -> tuple[Threshold, ...]:
    if not value.strip():
        return THRESHOLDS
    raw = orjson.loads(value)
    if not isinstance(raw, list):
        raise ValueError("must be a JSON list of {metric, scope, warn, critical?, direction?}")
    out = []
    for item in raw:
        if not isinstance(item, dict) or item.get("scope") not in ("loop", "experiment", "global"):
            raise ValueError("each threshold needs metric, scope (loop|experiment|global), warn")
        if item.get("direction", "above") not in ("above", "below"):
            raise ValueError("direction must be above or below")
        out.append(
            Threshold(
                str(item["metric"]),
                item["scope"],
                float(item["warn"]),
                None if item.get("critical") is None else float(item["critical"]),
                item.get("direction", "above"),
            )
        )
    return tuple(out)


class Sender(Protocol):
    async def send(self, subject: str, html_body: str, text_body: str) -> None: ...


class LogSender:
    """The default mail sender: the weekly summary goes to the log."""

    async def send(self, subject: str, html_body: str, text_body: str) -> None:
        log.info("weekly guardrails summary: %s\n%s", subject, text_body)


@dataclass
class GuardrailConfig:
    thresholds: tuple[Threshold, ...] = THRESHOLDS
    window: timedelta = timedelta(hours=24)
    webhook_url: str = ""
    webhook_secret: str = ""
    webhook_attempts: int = 3
    webhook_backoff: float = 0.5
    delivery: dict[str, tuple[int, int]] = field(default_factory=dict)  # loop -> (attempted, failed)


# Health.


async def loop_health(session: AsyncSession, loop: str, start: datetime, end: datetime) -> dict[str, Any]:
    d = PromptDecision
    in_window = and_(d.loop == loop, d.created_at >= start, d.created_at < end)
    total, shown, refused = (
        await session.execute(
            select(
                func.count(),
                func.count().filter(d.shown.is_(True)),
                func.count().filter(d.reason.in_(GATE_REASONS)),
            ).where(in_window)
        )
    ).one()
    first_prompt = (
        select(d.user_id.label("user_id"), func.min(d.created_at).label("at"))
        .where(in_window, d.shown.is_(True))
        .group_by(d.user_id)
        .subquery()
    )
    recipients = await session.scalar(select(func.count()).select_from(first_prompt)) or 0
    opted_out = (
        await session.scalar(
            select(func.count(distinct(Event.user_id)))
            .select_from(first_prompt)
            .join(Event, Event.user_id == first_prompt.c.user_id)
            .where(Event.type == "opt_out", Event.ts >= first_prompt.c.at, Event.ts < end)
        )
        or 0
    )
    complaints = (
        await session.scalar(
            select(func.count()).where(
                Event.type == "complaint",
                Event.props["loop"].as_string() == loop,
                Event.ts >= start,
                Event.ts < end,
            )
        )
        or 0
    )
    days = max((end - start).total_seconds() / 86400, 1e-9)
    per_sender = (
        select(func.count().label("n"))
        .where(in_window, d.shown.is_(True), d.sender_id.is_not(None))
        .group_by(d.sender_id)
        .subquery()
    )
    senders, social, most = (
        await session.execute(select(func.count(), func.sum(per_sender.c.n), func.max(per_sender.c.n)))
    ).one()
    return {
        "prompts": int(total),
        "shown": int(shown),
        "recipients": int(recipients),
        "opt_out_rate": ratio(opted_out, recipients),
        "complaint_rate": ratio(complaints, shown),
        "invite_spam_rate": ratio(float(social or 0) / days, senders),
        "max_per_sender": round(float(most or 0) / days, 2),
        "rejection_rate": ratio(refused, total),
    }


async def experiment_health(session: AsyncSession, exp: Experiment, end: datetime) -> dict[str, Any]:
    """Per variant: exposed users' opt-outs and complaints after exposure, and their sessions."""
    x = ExperimentExposure
    minutes = Event.props["minutes"].as_float()
    after = and_(Event.user_id == x.user_id, Event.ts >= x.exposed_at, Event.ts < end)
    rows = (
        await session.execute(
            select(
                x.variant,
                func.count(distinct(x.user_id)),
                func.count(distinct(Event.user_id)).filter(Event.type == "opt_out"),
                func.count(distinct(Event.user_id)).filter(Event.type == "complaint"),
                func.count(Event.id).filter(Event.type == "session_completed"),
                func.avg(minutes).filter(Event.type == "session_completed"),
            )
            .select_from(x)
            .outerjoin(Event, after)
            .where(x.experiment_key == exp.key)
            .group_by(x.variant)
        )
    ).all()
    variants = {
        v: {
            "exposed": int(n),
            "opt_out_rate": ratio(o, n),
            "complaint_rate": ratio(c, n),
            "sessions_per_user": ratio(s, n),
            "session_minutes": round(float(m), 2) if m is not None else None,
        }
        for v, n, o, c, s, m in rows
    }
    worst = {
        metric: max((float(v[metric] or 0.0) for v in variants.values()), default=0.0)
        for metric in ("opt_out_rate", "complaint_rate")
    }
    return {"variants": variants, **worst}


async def engagement(session: AsyncSession, start: datetime, end: datetime) -> dict[str, Any]:
    minutes = Event.props["minutes"].as_float()
    sessions, users, mean_minutes = (
        await session.execute(
            select(func.count(), func.count(distinct(Event.user_id)), func.avg(minutes)).where(
                Event.type == "session_completed", Event.ts >= start, Event.ts < end
            )
        )
    ).one()
    return {
        "sessions_per_user": ratio(sessions, users),
        "session_minutes": round(float(mean_minutes), 2) if mean_minutes is not None else None,
    }


def _drop(now: float | None, before: float | None) -> float | None:
    if now is None or not before:
        return None
    return max(0.0, (before - now) / before)


async def report(session: AsyncSession, now: datetime, config: GuardrailConfig) -> dict[str, Any]:
    """Everything `GET /api/guardrails` returns and `dashboard:guardrails` pushes."""
    start = now - config.window
    loops = {}
    for loop in LOOPS:
        health = await loop_health(session, loop, start, now)
        attempted, failed = config.delivery.get(loop, (0, 0))
        health["delivery_failure_rate"] = ratio(failed, attempted)
        loops[loop] = health
    running = (
        await session.scalars(select(Experiment).where(Experiment.status.in_(("running", "paused"))))
    ).all()
    experiments_health = {
        e.key: {"status": e.status, **await experiment_health(session, e, now)} for e in running
    }
    current = await engagement(session, start, now)
    previous = await engagement(session, start - config.window, start)
    k7 = await k_factor_report(session, 7, now)
    overall = {
        **current,
        "sessions_per_user_before": previous["sessions_per_user"],
        "session_minutes_before": previous["session_minutes"],
        "sessions_per_user_drop": _drop(current["sessions_per_user"], previous["sessions_per_user"]),
        "session_minutes_drop": _drop(current["session_minutes"], previous["session_minutes"]),
        "k_factor": k7["k_factor"] if k7["active_users"] else None,  # no base, no K to judge
    }
    refusals = dict(
        (
            await session.execute(
                select(PromptDecision.reason, func.count())
                .where(PromptDecision.shown.is_(False), PromptDecision.created_at >= start)
                .group_by(PromptDecision.reason)
            )
        ).all()
    )
    fraud = dict(
        (
            await session.execute(
                select(Conversion.status, func.count())
                .where(Conversion.status != "ok", Conversion.signup_at >= now - timedelta(days=30))
                .group_by(Conversion.status)
            )
        ).all()
    )
    alerts = (
        await session.scalars(
            select(Alert).where(Alert.state == "open").order_by(Alert.created_at.desc(), Alert.id)
        )
    ).all()
    paused_loops = (await session.scalars(select(LoopControl).where(LoopControl.paused.is_(True)))).all()
    return {
        "window_hours": config.window.total_seconds() / 3600,
        "loops": loops,
        "experiments": experiments_health,
        "global": overall,
        "thresholds": [asdict(t) for t in config.thresholds],
        "alerts": [alert_json(a) for a in alerts],
        "paused": {
            "loops": [
                {"loop": c.loop, "reason": c.reason, "by": c.paused_by, "at": c.changed_at.isoformat()}
                for c in paused_loops
            ],
            "experiments": [e.key for e in running if e.status == "paused"],
        },
        "refusals_by_reason": {str(k): int(v) for k, v in refusals.items()},
        "fraud": {"flagged": int(fraud.get("flagged", 0)), "pending": int(fraud.get("pending", 0))},
    }


def alert_json(a: Alert) -> dict[str, Any]:
    return {
        "id": a.id,
        "metric": a.metric,
        "scope": a.scope,
        "level": a.level,
        "value": a.value,
        "threshold": a.threshold,
        "state": a.state,
        "action": a.action,
        "webhook": a.webhook_status,
        "created_at": a.created_at.isoformat(),
        "resolved_at": a.resolved_at.isoformat() if a.resolved_at else None,
    }


# Evaluation.


def _values(found: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(scope kind, scope id, metrics) for every scope the report has."""
    out = [("loop", f"loop:{k}", v) for k, v in found["loops"].items()]
    out += [("experiment", f"experiment:{k}", v) for k, v in found["experiments"].items()]
    out.append(("global", "global", found["global"]))
    return out


async def evaluate(session: AsyncSession, now: datetime, config: GuardrailConfig) -> list[Alert]:
    """Compare the report with the thresholds: open new alerts, resolve cleared ones, pause on critical.
    Returns the alerts opened (for the webhook)."""
    found = await report(session, now, config)
    opened: list[Alert] = []
    open_alerts = {
        (a.metric, a.scope, a.level): a
        for a in await session.scalars(select(Alert).where(Alert.state == "open"))
    }
    for kind, scope, metrics in _values(found):
        for threshold in (t for t in config.thresholds if t.scope == kind and t.metric in metrics):
            value = metrics[threshold.metric]
            level = threshold.level(value)
            for existing_level in ("warn", "critical"):
                existing = open_alerts.get((threshold.metric, scope, existing_level))
                if existing is not None and existing_level != level:
                    existing.state, existing.resolved_at = "resolved", now
            if level is None or (threshold.metric, scope, level) in open_alerts:
                continue
            limit = threshold.critical if level == "critical" else threshold.warn
            alert = Alert(
                metric=threshold.metric,
                scope=scope,
                level=level,
                value=float(value),
                threshold=float(limit if limit is not None else threshold.warn),
                state="open",
                created_at=now,
            )
            if level == "critical":
                alert.action = await _pause(
                    session, scope, f"{threshold.metric} {value:.4g} crossed {limit}", now
                )
            session.add(alert)
            opened.append(alert)
    await session.flush()
    return opened


async def _pause(session: AsyncSession, scope: str, reason: str, now: datetime) -> str | None:
    kind, _, name = scope.partition(":")
    if kind == "loop":
        control = await session.get(LoopControl, name, with_for_update=True)
        if control is None:
            control = LoopControl(loop=name)
            session.add(control)
        if control.paused:
            return None
        control.paused, control.reason, control.paused_by, control.changed_at = True, reason, ACTOR, now
        session.add(
            AuditLog(actor=ACTOR, action="loop_paused", subject=scope, details={"reason": reason}, at=now)
        )
        return f"paused {scope}"
    if kind == "experiment":
        exp = await session.get(Experiment, name)
        if exp is None or exp.status != "running":
            return None
        await experiments.transition(session, name, "pause", ACTOR, now)
        return f"paused {scope}"
    return None


async def unpause(session: AsyncSession, scope: str, actor: str, now: datetime) -> bool:
    """An admin switches a paused loop or experiment back on (audited)."""
    kind, _, name = scope.partition(":")
    if kind == "loop":
        control = await session.get(LoopControl, name, with_for_update=True)
        if control is None or not control.paused:
            return False
        control.paused, control.reason, control.paused_by, control.changed_at = False, None, actor, now
    elif kind == "experiment":
        exp = await session.get(Experiment, name)
        if exp is None or exp.status != "paused":
            return False
        await experiments.transition(session, name, "start", actor, now)
    else:
        return False
    session.add(AuditLog(actor=actor, action="unpaused", subject=scope, details={}, at=now))
    return True


async def loop_paused(session: AsyncSession, loop: str) -> bool:
    control = await session.get(LoopControl, loop)
    return control is not None and control.paused


# Webhook.


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


async def deliver(config: GuardrailConfig, payload: dict[str, Any]) -> str:
    """POST one alert to the webhook, signed; retried with backoff. Returns delivered | failed | none."""
    if not config.webhook_url:
        return "none"
    body = orjson.dumps(payload)
    delay = config.webhook_backoff
    async with httpx.AsyncClient(timeout=5.0) as client:
        for attempt in range(1, config.webhook_attempts + 1):
            stamp = str(int(time.time()))
            headers = {
                "content-type": "application/json",
                "x-viral-timestamp": stamp,
                "x-viral-signature": sign(config.webhook_secret, stamp, body),
                "x-viral-attempt": str(attempt),
            }
            try:
                response = await client.post(config.webhook_url, content=body, headers=headers)
                if 200 <= response.status_code < 300:
                    return "delivered"
                log.warning("guardrail webhook answered %d (attempt %d)", response.status_code, attempt)
            except httpx.HTTPError as exc:
                log.warning("guardrail webhook failed (attempt %d): %s", attempt, exc)
            if attempt < config.webhook_attempts:
                await asyncio.sleep(delay)
                delay *= 2
    return "failed"


# The weekly summary.


async def weekly_summary(session: AsyncSession, now: datetime, config: GuardrailConfig) -> dict[str, Any]:
    weekly = GuardrailConfig(**{**config.__dict__, "window": timedelta(days=7)})
    found = await report(session, now, weekly)
    alerts = (await session.scalars(select(Alert).where(Alert.created_at >= now - timedelta(days=7)))).all()
    return {
        "week_ending": now.isoformat(),
        "loops": found["loops"],
        "global": found["global"],
        "alerts": [alert_json(a) for a in alerts],
        "refusals_by_reason": found["refusals_by_reason"],
        "fraud": found["fraud"],
        "paused": found["paused"],
    }


def summary_csv(summary: dict[str, Any]) -> str:
    rows: list[list[Any]] = [["scope", "metric", "value"]]
    for loop, metrics in summary["loops"].items():
        rows += [[f"loop:{loop}", metric, value] for metric, value in metrics.items()]
    rows += [["global", metric, value] for metric, value in summary["global"].items()]
    rows += [[], ["alert", "scope", "level", "value", "threshold", "state", "created_at"]]
    for a in summary["alerts"]:
        rows.append(
            [a["metric"], a["scope"], a["level"], a["value"], a["threshold"], a["state"], a["created_at"]]
        )
    return to_csv(rows)


def summary_html(summary: dict[str, Any]) -> str:
    esc = html.escape
    rows = "".join(
        f"<tr><th scope=row>{esc(loop)}</th>"
        + "".join(f"<td>{m[k]:.2%}</td>" for k in ("opt_out_rate", "complaint_rate", "rejection_rate"))
        + f"<td>{m['invite_spam_rate']:.1f}</td></tr>"
        for loop, m in summary["loops"].items()
    )
    alerts = (
        "".join(
            f"<li><strong>{esc(a['level'])}</strong> {esc(a['metric'])} on {esc(a['scope'])}: "
            f"{a['value']:.4g} (threshold {a['threshold']:.4g}), {esc(a['state'])}</li>"
            for a in summary["alerts"]
        )
        or "<li>No alerts this week.</li>"
    )
    return (
        "<!doctype html><html lang=en><meta charset=utf-8><title>Guardrails weekly summary</title>"
        "<body style='font-family:system-ui,sans-serif;color:#111;background:#fff'>"
        f"<h1>Guardrails, week ending {esc(summary['week_ending'][:10])}</h1>"
        "<table><caption>Health per loop</caption><thead><tr><th scope=col>Loop</th>"
        "<th scope=col>Opt-out</th><th scope=col>Complaints</th><th scope=col>Refused by the gate</th>"
        f"<th scope=col>Invites per sender per day</th></tr></thead><tbody>{rows}</tbody></table>"
        f"<h2>Alerts</h2><ul>{alerts}</ul>"
        f"<p>Fraud: {summary['fraud']['flagged']} flagged, "
        f"{summary['fraud']['pending']} pending conversions.</p>"
        "</body></html>"
    )


def summary_text(summary: dict[str, Any]) -> str:
    lines = [f"Guardrails, week ending {summary['week_ending'][:10]}"]
    for loop, m in summary["loops"].items():
        lines.append(
            f"- {loop}: opt-out {m['opt_out_rate']:.2%}, complaints {m['complaint_rate']:.2%}, "
            f"refused {m['rejection_rate']:.2%}, {m['invite_spam_rate']:.1f} invites/sender/day"
        )
    lines.append(f"Alerts: {len(summary['alerts'])}")
    return "\n".join(lines)


__all__: Sequence[str] = [
    "THRESHOLDS",
    "GuardrailConfig",
    "LogSender",
    "Sender",
    "Threshold",
    "deliver",
    "evaluate",
    "loop_paused",
    "report",
    "sign",
    "summary_csv",
    "summary_html",
    "summary_text",
    "thresholds_from_json",
    "unpause",
    "weekly_summary",
]
