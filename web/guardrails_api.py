"""Guardrails and compliance over HTTP, and the guardrails' timed jobs.

Admin: `GET /api/guardrails` (the report `dashboard:guardrails` pushes), `POST /api/guardrails/check`
(evaluate now), `POST /api/guardrails/unpause {"scope": "loop:NAME" | "experiment:KEY"}`,
`GET /api/alerts?state=open|resolved`, `GET /api/guardrails/summary?format=json|csv|html` (the weekly
summary for the last 7 days).
Consent: `POST /api/users/{id}/consent {"method", "parent_id"?}` and `DELETE …/consent` — an admin,
or the parent named in the child's profile. Opt-out: `POST /api/users/{id}/opt-out` and `/opt-in` —
the user, that parent, or an admin; an opt-out a parent or an admin made is lifted only by one of
them. Each is stored and audited (with `by`: self, parent or admin) before the answer.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from loops.scheduler import schedule
from metrics import EventIn, IngestUnavailable, fraud, guardrails
from metrics.events import ID_PATTERN
from metrics.guardrails import GuardrailConfig, LogSender, Sender
from metrics.live import GuardrailsDashboard
from store import Alert, AuditLog, Consent, Database, LoopJob, User
from store.privacy import OPT_OUT_MAKERS, opt_out_user

from .auth import act_for, require_role
from .responses import ORJSONResponse, once_more_if_raced, read_json, user_id_param

log = logging.getLogger(__name__)
# Opt-outs the user cannot lift themself.
GUARDED_OPT_OUTS = tuple(m for m in OPT_OUT_MAKERS if m != "self")


class GuardrailJobs:
    """The scheduler jobs: `guardrails_check` every `every` seconds and `guardrails_weekly` on Mondays
    08:00 UTC; each schedules its next run (idempotent keys), so exactly one worker runs each."""

    def __init__(
        self,
        database: Database,
        dashboard: GuardrailsDashboard,
        config: GuardrailConfig,
        clock: Any,
        sender: Sender | None = None,
        every: float = 60.0,
    ) -> None:
        self.database = database
        self.dashboard = dashboard
        self.config = config
        self.clock = clock
        self.sender: Sender = sender or LogSender()
        self.every = timedelta(seconds=every)

    def register(self, scheduler: Any) -> None:
        scheduler.register("guardrails_check", self.check_job)
        scheduler.register("guardrails_weekly", self.weekly_job)

    async def setup(self, session: AsyncSession) -> None:
        now = self.clock.now()
        await self._next_check(session, now)
        await self._next_weekly(session, now)

    async def _next_check(self, session: AsyncSession, after: datetime) -> None:
        at = after + self.every
        await schedule(session, "guardrails_check", at, {}, f"guardrails_check:{at.isoformat()}")

    async def _next_weekly(self, session: AsyncSession, after: datetime) -> None:
        monday = (after - timedelta(days=after.weekday())).replace(hour=8, minute=0, second=0, microsecond=0)
        at = monday if monday > after else monday + timedelta(days=7)
        await schedule(session, "guardrails_weekly", at, {}, f"guardrails_weekly:{at.date().isoformat()}")

    async def check_job(self, session: AsyncSession, job: LoopJob) -> Any:
        now = self.clock.now()
        await self._next_check(session, max(job.run_at, now - self.every))
        # Finished jobs are kept a week for inspection, then dropped (a check a minute adds up).
        await session.execute(
            delete(LoopJob).where(LoopJob.status == "done", LoopJob.finished_at < now - timedelta(days=7))
        )
        return await self.check(session)

    async def check(self, session: AsyncSession) -> Any:
        """Evaluate in `session`; after the commit, send the new alerts' webhooks and tell the dashboards."""
        opened = await guardrails.evaluate(session, self.clock.now(), self.config)
        payloads = [guardrails.alert_json(a) for a in opened]

        async def after() -> None:
            for payload in payloads:
                status = await guardrails.deliver(self.config, {"type": "guardrail_alert", "alert": payload})
                async with self.database.session() as s, s.begin():
                    alert = await s.get(Alert, payload["id"])
                    if alert is not None:
                        alert.webhook_status = status
            await self.dashboard.changed()

        return after

    async def weekly_job(self, session: AsyncSession, job: LoopJob) -> Any:
        await self._next_weekly(session, job.run_at)
        summary = await guardrails.weekly_summary(session, self.clock.now(), self.config)

        async def after() -> None:
            await self.sender.send(
                f"Guardrails weekly summary, {summary['week_ending'][:10]}",
                guardrails.summary_html(summary),
                guardrails.summary_text(summary),
            )

        return after


def _jobs(request: Request) -> GuardrailJobs:
    jobs: GuardrailJobs = request.app.state.guardrail_jobs
    return jobs


async def get_report(request: Request) -> Response:
    require_role(request, "admin")
    return ORJSONResponse(await request.app.state.guardrails_dashboard.report())


async def check_now(request: Request) -> Response:
    require_role(request, "admin")
    jobs = _jobs(request)
    async with request.app.state.database.session() as session, session.begin():
        after = await jobs.check(session)
    await after()
    return ORJSONResponse(await request.app.state.guardrails_dashboard.report())


async def unpause(request: Request) -> Response:
    claims = require_role(request, "admin")
    body = await read_json(request, 4096)
    scope = body.get("scope") if isinstance(body, dict) else None
    if not isinstance(scope, str) or not scope.startswith(("loop:", "experiment:")):
        raise HTTPException(422, 'scope must be "loop:NAME" or "experiment:KEY"')
    async with request.app.state.database.session() as session, session.begin():
        done = await guardrails.unpause(session, scope, str(claims["sub"]), request.app.state.clock.now())
    if not done:
        raise HTTPException(409, f"{scope} is not paused")
    await request.app.state.guardrails_dashboard.changed()
    if scope.startswith("experiment:"):
        await request.app.state.experiments_dashboard.changed([scope.removeprefix("experiment:")])
    return ORJSONResponse({"scope": scope, "paused": False})


async def alerts(request: Request) -> Response:
    require_role(request, "admin")
    state = request.query_params.get("state")
    query = select(Alert).order_by(Alert.created_at.desc(), Alert.id.desc()).limit(500)
    if state is not None:
        if state not in ("open", "resolved"):
            raise HTTPException(422, "state must be open or resolved")
        query = query.where(Alert.state == state)
    async with request.app.state.database.session() as session:
        rows = (await session.scalars(query)).all()
    return ORJSONResponse({"alerts": [guardrails.alert_json(a) for a in rows]})


async def summary(request: Request) -> Response:
    require_role(request, "admin")
    jobs = _jobs(request)
    async with request.app.state.database.session() as session:
        data = await guardrails.weekly_summary(session, request.app.state.clock.now(), jobs.config)
    fmt = request.query_params.get("format", "json")
    if fmt == "csv":
        return Response(guardrails.summary_csv(data), media_type="text/csv")
    if fmt == "html":
        return Response(guardrails.summary_html(data), media_type="text/html")
    return ORJSONResponse(data)


# Consent and opt-out.


async def grant_consent(request: Request) -> Response:
    user_id = user_id_param(request)
    acting = await act_for(request, user_id, self_ok=False)
    body = await read_json(request, 4096)
    method = body.get("method") if isinstance(body, dict) else None
    if not isinstance(method, str) or not 1 <= len(method) <= 32:
        raise HTTPException(422, 'method must say how consent was verified, e.g. "signed_form", "card_check"')
    parent = body.get("parent_id", acting.actor if acting.as_ == "parent" else None)
    if not isinstance(parent, str) or not ID_PATTERN.match(parent):
        raise HTTPException(422, "parent_id is required: a user id of 1-64 letters, digits or _.:-")
    if acting.as_ == "parent" and parent != acting.actor:
        raise HTTPException(422, "a parent records their own consent: parent_id must be yours")
    now = request.app.state.clock.now()

    async def write() -> None:
        async with request.app.state.database.session() as session, session.begin():
            consent = await session.get(Consent, user_id)
            if consent is None:
                session.add(Consent(user_id=user_id, parent_id=parent, method=method, granted_at=now))
            else:
                consent.parent_id, consent.method, consent.granted_at, consent.revoked_at = (
                    parent,
                    method,
                    now,
                    None,
                )
            session.add(
                AuditLog(
                    actor=acting.actor,
                    action="consent_granted",
                    subject=user_id,
                    details={"by": acting.as_, "parent_id": parent, "method": method},
                    at=now,
                )
            )

    await once_more_if_raced(write)
    await request.app.state.notices.changed(user_id)
    return ORJSONResponse({"user_id": user_id, "consent": True, "parent_id": parent, "method": method})


async def revoke_consent(request: Request) -> Response:
    user_id = user_id_param(request)
    acting = await act_for(request, user_id, self_ok=False)
    now = request.app.state.clock.now()

    async with request.app.state.database.session() as session, session.begin():
        # One statement, so of two revocations at once (or one racing the user's deletion) exactly
        # the first one finds the consent standing.
        revoked = await session.execute(
            update(Consent)
            .where(Consent.user_id == user_id, Consent.revoked_at.is_(None))
            .values(revoked_at=now)
            .execution_options(synchronize_session=False)
        )
        if not getattr(revoked, "rowcount", 0):
            raise HTTPException(404, "no consent on record")
        session.add(
            AuditLog(
                actor=acting.actor,
                action="consent_revoked",
                subject=user_id,
                details={"by": acting.as_},
                at=now,
            )
        )
    await request.app.state.notices.changed(user_id)
    return ORJSONResponse({"user_id": user_id, "consent": False})


async def opt_out(request: Request) -> Response:
    """Stored and audited in one transaction before the answer; the `opt_out` event that follows (with
    a random id no one can claim first) is for the consumers that count opt-outs."""
    user_id = user_id_param(request)
    acting = await act_for(request, user_id, self_ok=True)
    state = request.app.state
    now = state.clock.now()
    async with state.database.session() as session, session.begin():
        await opt_out_user(session, user_id, by=acting.as_, now=now)
        by = await session.scalar(select(User.opted_out_by).where(User.id == user_id))
        session.add(
            AuditLog(
                actor=acting.actor, action="opted_out", subject=user_id, details={"by": acting.as_}, at=now
            )
        )
    event = EventIn(f"opt-out-{uuid.uuid4().hex}", "opt_out", user_id, now, {"via": "api", "by": acting.as_})
    try:
        # Ingest announces the change once it has stored the event.
        await state.ingest.ingest([event], actor_id=acting.actor)
    except IngestUnavailable as exc:
        log.warning("opt-out of a user stored, but its event was not (%s)", exc)
        await state.notices.changed(user_id)
    return ORJSONResponse({"user_id": user_id, "opted_out": True, "opted_out_by": by})


async def opt_in(request: Request) -> Response:
    """An opt-out a parent or an admin made is lifted only by a parent or an admin; the user may lift
    their own."""
    user_id = user_id_param(request)
    acting = await act_for(request, user_id, self_ok=True)
    now = request.app.state.clock.now()
    lifted_by_them = User.opted_out.is_(True)
    if acting.as_ == "self":
        lifted_by_them &= User.opted_out_by.is_(None) | User.opted_out_by.not_in(GUARDED_OPT_OUTS)

    async with request.app.state.database.session() as session, session.begin():
        # One statement, so an opt-out a parent makes meanwhile is never lifted by the child.
        opted_in = await session.execute(
            update(User)
            .where(User.id == user_id, lifted_by_them)
            .values(opted_out=False, opted_out_by=None, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if not getattr(opted_in, "rowcount", 0):
            by = await session.scalar(
                select(User.opted_out_by).where(User.id == user_id, User.opted_out.is_(True))
            )
            if by is None:
                raise HTTPException(409, "not opted out")
            maker = "their parent" if by == "parent" else "an admin"
            raise HTTPException(403, f"opted out by {maker}: only their parent or an admin may opt them in")
        session.add(
            AuditLog(
                actor=acting.actor, action="opted_in", subject=user_id, details={"by": acting.as_}, at=now
            )
        )
    await request.app.state.notices.changed(user_id)
    return ORJSONResponse({"user_id": user_id, "opted_out": False})


async def audit(request: Request) -> Response:
    require_role(request, "admin")
    subject = request.query_params.get("subject")
    query = select(AuditLog).order_by(AuditLog.id.desc()).limit(500)
    if subject:
        query = query.where(AuditLog.subject == subject)
    async with request.app.state.database.session() as session:
        rows = (await session.scalars(query)).all()
    return ORJSONResponse(
        {
            "audit": [
                {
                    "actor": r.actor,
                    "action": r.action,
                    "subject": r.subject,
                    "details": r.details,
                    "at": r.at.isoformat(),
                }
                for r in rows
            ]
        }
    )


async def review_conversion(request: Request) -> Response:
    """`POST /api/admin/conversions/{user_id}/review {"approve": bool}`: release a held conversion (its
    referral rewards are paid now, once) or reject it (flagged)."""
    claims = require_role(request, "admin")
    body = await read_json(request, 4096)
    approve = body.get("approve") if isinstance(body, dict) else None
    if not isinstance(approve, bool):
        raise HTTPException(422, 'body must be {"approve": true|false}')
    user_id = user_id_param(request)
    try:
        async with request.app.state.database.session() as session, session.begin():
            done = await fraud.review(
                session, user_id, approve, str(claims["sub"]), request.app.state.clock.now()
            )
    except LookupError:
        raise HTTPException(404, f"no conversion for {user_id}") from None
    hub = request.app.state.endpoint.hub
    for paid in done.paid:
        await hub.broadcast(f"user:{paid.user_id}", "reward", paid.push_payload())
    await request.app.state.k_factor.changed()
    await request.app.state.guardrails_dashboard.changed()
    return ORJSONResponse(
        {"user_id": done.user_id, "status": done.status, "reasons": done.reasons, "paid": len(done.paid)}
    )


routes = [
    Route("/api/admin/conversions/{user_id}/review", review_conversion, methods=["POST"]),
    Route("/api/guardrails", get_report, methods=["GET"]),
    Route("/api/guardrails/check", check_now, methods=["POST"]),
    Route("/api/guardrails/unpause", unpause, methods=["POST"]),
    Route("/api/guardrails/summary", summary, methods=["GET"]),
    Route("/api/alerts", alerts, methods=["GET"]),
    Route("/api/audit", audit, methods=["GET"]),
    Route("/api/users/{user_id}/consent", grant_consent, methods=["POST"]),
    Route("/api/users/{user_id}/consent", revoke_consent, methods=["DELETE"]),
    Route("/api/users/{user_id}/opt-out", opt_out, methods=["POST"]),
    Route("/api/users/{user_id}/opt-in", opt_in, methods=["POST"]),
]
