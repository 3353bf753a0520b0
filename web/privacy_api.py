"""A user's data rights over HTTP: `GET /api/users/{id}/export`, `DELETE /api/users/{id}`.

Export: the user themselves, the parent named in their profile, or an admin; a JSON download. Delete:
that parent or an admin; the rows go in one transaction with the user's tombstone (metrics/privacy.py
has the rules per table), then the change is announced: their sockets close on every node, their
tokens issued before the deletion stop working, and they come off cached and live boards. Both are
audited with who acted (`by`). 404 when we hold nothing about the user, so a second delete is a 404.
"""

from __future__ import annotations

import re

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from channels.feed import withdraw_public_items
from metrics import privacy
from store import AuditLog, Tombstone, utcnow

from .auth import act_for
from .responses import ORJSONResponse, user_id_param

NOTHING_HELD = "we hold no data about this user"


async def export_user(request: Request) -> Response:
    user_id = user_id_param(request)
    acting = await act_for(request, user_id, self_ok=True)
    now = request.app.state.clock.now()
    async with request.app.state.database.session() as session, session.begin():
        if not await privacy.holds_data(session, user_id):
            raise HTTPException(404, NOTHING_HELD)
        export = await privacy.export_user(session, user_id)
        counts = {table: len(rows) for table, rows in export["tables"].items()}
        session.add(
            AuditLog(
                actor=acting.actor,
                action="user_exported",
                subject=user_id,
                details={"by": acting.as_, **counts},
                at=now,
            )
        )
    export["exported_at"] = now.isoformat()
    filename = f"user-{re.sub(r'[^A-Za-z0-9_.-]', '_', user_id)}-export.json"
    return ORJSONResponse(export, headers={"content-disposition": f'attachment; filename="{filename}"'})


async def delete_user(request: Request) -> Response:
    user_id = user_id_param(request)
    acting = await act_for(request, user_id, self_ok=False)
    state = request.app.state
    # Tokens carry wall-clock issue times, so the tombstone does too (not the loops' clock).
    deleted_at = utcnow()
    async with state.database.session() as session, session.begin():
        if not await privacy.holds_data(session, user_id):
            buried = await session.get(Tombstone, state.privacy.tombstone_key(user_id))
            report = None
        else:
            withdrawn = await withdraw_public_items(session, state.privacy, user_id)
            report = await privacy.delete_user(
                session,
                user_id,
                actor=acting.actor,
                by=acting.as_,
                now=state.clock.now(),
                key=state.settings.secret_key,
            )
            await state.privacy.bury(session, user_id, deleted_at)
    if report is None:
        # A repeated request announces the deletion again: a node that missed it the first time
        # (or a board cache that could not be written) catches up.
        if buried is not None:
            await state.notices.changed(user_id, deleted_at=buried.deleted_at)
        raise HTTPException(404, NOTHING_HELD)
    await withdrawn.tell(state.endpoint.hub)
    await state.notices.changed(user_id, deleted_at=deleted_at)
    await state.k_factor.changed()  # conversions and referrers moved
    return ORJSONResponse({**report.as_dict(), "deleted_at": deleted_at.isoformat()})


routes = [
    Route("/api/users/{user_id}/export", export_user, methods=["GET"]),
    Route("/api/users/{user_id}", delete_user, methods=["DELETE"]),
]
