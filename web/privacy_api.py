"""COPPA/FERPA requests over HTTP (SPEC §8a): `GET /api/users/{id}/export`, `DELETE /api/users/{id}`.

Export: an admin, or the user themselves; a JSON download, recorded in `audit_log` (`user_exported`).
Delete: admins only; the rows go in one transaction (metrics/privacy.py has the rules per table), then
the user comes off every cached leaderboard (all subjects, windows and periods, and their label) and
live boards and the K-factor dashboard are told to refresh. 404 when we hold nothing about the user,
so a second delete is a 404 too.
"""

from __future__ import annotations

import re

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from channels.access import is_self_or_admin
from channels.leaderboard import CHANGES_TOPIC, Leaderboards
from metrics import privacy
from store import AuditLog

from .auth import claims_from_request, require_role
from .responses import ORJSONResponse, user_id_param

NOTHING_HELD = "we hold no data about this user"


async def export_user(request: Request) -> Response:
    claims = claims_from_request(request)
    user_id = user_id_param(request)
    if not is_self_or_admin(claims, user_id):
        raise HTTPException(403, "only the user themselves or an admin may export a user's data")
    now = request.app.state.clock.now()
    async with request.app.state.database.session() as session, session.begin():
        if not await privacy.holds_data(session, user_id):
            raise HTTPException(404, NOTHING_HELD)
        export = await privacy.export_user(session, user_id)
        counts = {table: len(rows) for table, rows in export["tables"].items()}
        session.add(
            AuditLog(
                actor=str(claims["sub"]), action="user_exported", subject=user_id, details=counts, at=now
            )
        )
    export["exported_at"] = now.isoformat()
    filename = f"user-{re.sub(r'[^A-Za-z0-9_.-]', '_', user_id)}-export.json"
    return ORJSONResponse(export, headers={"content-disposition": f'attachment; filename="{filename}"'})


async def _forget_cached(request: Request, user_id: str, subjects: list[str]) -> int:
    """Take the user off every cached board and tell live boards of `subjects` to refresh."""
    state = request.app.state
    leaderboards: Leaderboards = state.endpoint.context.leaderboards
    boards = await leaderboards.store.forget(user_id)
    for subject in subjects:
        await state.endpoint.hub.publish_raw(CHANGES_TOPIC, orjson.dumps({"subject": subject}))
    return boards


async def delete_user(request: Request) -> Response:
    claims = require_role(request, "admin")
    user_id = user_id_param(request)
    state = request.app.state
    async with state.database.session() as session, session.begin():
        report = None
        if await privacy.holds_data(session, user_id):
            report = await privacy.delete_user(
                session,
                user_id,
                actor=str(claims["sub"]),
                now=state.clock.now(),
                key=state.settings.secret_key,
            )
    # After the commit, and on a repeated request too: a cache write that failed the first time is
    # retried, and the cache cannot bring back what the database no longer holds.
    boards = await _forget_cached(request, user_id, report.leaderboard_subjects if report else [])
    if report is None:
        raise HTTPException(404, NOTHING_HELD)
    await state.k_factor.changed()  # conversions and referrers moved
    return ORJSONResponse({**report.as_dict(), "cached_boards_cleared": boards})


routes = [
    Route("/api/users/{user_id}/export", export_user, methods=["GET"]),
    Route("/api/users/{user_id}", delete_user, methods=["DELETE"]),
]
