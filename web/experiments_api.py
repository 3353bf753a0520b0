"""Experiments over HTTP (SPEC §9b).

Admin: `POST /api/experiments` (create, as draft), `GET /api/experiments?status=&loop=` (list),
`GET /api/experiments/{key}`, `PATCH /api/experiments/{key}` (update), `POST …/{key}/start`,
`/pause`, `/stop`, `/winner {variant}`, `GET …/{key}/audit`, `GET …/{key}/results`.
Any user for themselves (or an admin for anyone): `GET …/{key}/assignment?user_id=U` →
`{"variant", "in_experiment"}` — reading an assignment records no exposure (the app, or a loop,
sends `experiment_exposure` when it shows the variant).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from metrics import experiments
from metrics.experiments import ExperimentError
from store import Experiment, ExperimentAudit

from .auth import claims_from_request, require_role
from .responses import ORJSONResponse, read_json

STATUS = {"invalid": 422, "not_found": 404, "conflict": 409, "illegal_transition": 409}


def _error(exc: ExperimentError) -> Response:
    body: dict[str, Any] = {"error": str(exc), "code": exc.code}
    if exc.fields:
        body["fields"] = exc.fields
    return ORJSONResponse(body, status_code=STATUS.get(exc.code, 400))


Change = Callable[[AsyncSession, str, datetime], Awaitable[Experiment]]


async def _write(request: Request, change: Change, status: int = 200) -> Response:
    """Run one audited change as the calling admin, answer with the experiment, tell the dashboards."""
    claims = require_role(request, "admin")
    try:
        async with request.app.state.database.session() as session, session.begin():
            exp = await change(session, str(claims["sub"]), request.app.state.clock.now())
            out = experiments.to_json(exp)
    except ExperimentError as exc:
        return _error(exc)
    await request.app.state.experiments_dashboard.changed([out["key"]])
    return ORJSONResponse(out, status_code=status)


async def create(request: Request) -> Response:
    require_role(request, "admin")
    body = await read_json(request, 64 * 1024)
    return await _write(request, lambda s, actor, now: experiments.create(s, body, actor, now), 201)


async def listing(request: Request) -> Response:
    require_role(request, "admin")
    status = request.query_params.get("status")
    if status is not None and status not in experiments.STATUSES:
        raise HTTPException(422, f"status must be one of {list(experiments.STATUSES)}")
    async with request.app.state.database.session() as session:
        rows = await experiments.listing(session, status, request.query_params.get("loop"))
        return ORJSONResponse({"experiments": [experiments.to_json(e) for e in rows]})


async def one(request: Request) -> Response:
    require_role(request, "admin")
    try:
        async with request.app.state.database.session() as session:
            return ORJSONResponse(
                experiments.to_json(await experiments.get(session, request.path_params["key"]))
            )
    except ExperimentError as exc:
        return _error(exc)


async def update(request: Request) -> Response:
    require_role(request, "admin")
    body = await read_json(request, 64 * 1024)
    key = request.path_params["key"]
    return await _write(request, lambda s, actor, now: experiments.update(s, key, body, actor, now))


async def transition(request: Request) -> Response:
    require_role(request, "admin")
    key, action = request.path_params["key"], request.path_params["action"]
    winner = None
    if action == "winner":
        body = await read_json(request, 4096)
        winner = body.get("variant") if isinstance(body, dict) else None
    elif action not in experiments.TRANSITIONS:
        raise HTTPException(404, "unknown action: use start, pause, stop or winner")
    return await _write(
        request, lambda s, actor, now: experiments.transition(s, key, action, actor, now, winner)
    )


async def audit(request: Request) -> Response:
    require_role(request, "admin")
    key = request.path_params["key"]
    async with request.app.state.database.session() as session:
        rows = await session.scalars(
            select(ExperimentAudit).where(ExperimentAudit.experiment_key == key).order_by(ExperimentAudit.id)
        )
        return ORJSONResponse(
            {
                "experiment": key,
                "audit": [
                    {"actor": r.actor, "action": r.action, "changes": r.changes, "at": r.at.isoformat()}
                    for r in rows
                ],
            }
        )


async def assignment(request: Request) -> Response:
    claims = claims_from_request(request)
    user_id = request.query_params.get("user_id") or str(claims["sub"])
    if user_id != str(claims["sub"]) and claims.get("role") != "admin":
        raise HTTPException(403, "you may read your own assignment only")
    try:
        async with request.app.state.database.session() as session:
            exp = await experiments.get(session, request.path_params["key"])
            found = await experiments.assignment(session, exp, user_id)
    except ExperimentError as exc:
        return _error(exc)
    return ORJSONResponse(found.public())


async def results(request: Request) -> Response:
    require_role(request, "admin")
    try:
        return ORJSONResponse(
            await request.app.state.experiments_dashboard.results(request.path_params["key"])
        )
    except ExperimentError as exc:
        return _error(exc)


routes = [
    Route("/api/experiments", create, methods=["POST"]),
    Route("/api/experiments", listing, methods=["GET"]),
    Route("/api/experiments/{key}", one, methods=["GET"]),
    Route("/api/experiments/{key}", update, methods=["PATCH"]),
    Route("/api/experiments/{key}/assignment", assignment, methods=["GET"]),
    Route("/api/experiments/{key}/results", results, methods=["GET"]),
    Route("/api/experiments/{key}/audit", audit, methods=["GET"]),
    Route("/api/experiments/{key}/{action}", transition, methods=["POST"]),
]
