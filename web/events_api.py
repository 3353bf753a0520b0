"""HTTP API for events (SPEC §8), feeds (cursor pagination) and user profiles (SPEC §8a)."""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import select
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from channels.access import ROLES, is_admin
from channels.feed import feed_page, feed_refusal
from channels.presence import SUBJECT
from metrics import EventRejected, IngestUnavailable, validate_event
from metrics.events import ID_PATTERN
from store import AuditLog, Consumption, User, utcnow

from .auth import claims_from_request, require_role
from .responses import ORJSONResponse, once_more_if_raced, read_json, user_id_param

MAX_BATCH = 1000


async def post_events(request: Request) -> Response:
    claims = claims_from_request(request)
    body = await read_json(request, request.app.state.settings.max_body_bytes)
    items = body if isinstance(body, list) else [body]
    if not items:
        raise HTTPException(422, "the batch is empty")
    if len(items) > MAX_BATCH:
        raise HTTPException(413, f"at most {MAX_BATCH} events per request")
    now = utcnow()
    admin = is_admin(claims)
    events, errors = [], []
    for index, raw in enumerate(items):
        try:
            events.append(validate_event(raw, caller=str(claims["sub"]), is_admin=admin, now=now))
        except EventRejected as exc:
            errors.append({"index": index, "fields": exc.errors})
    if errors:
        # All or nothing: a client fixes its batch and sends it again (ids make the retry safe).
        return ORJSONResponse(
            {"error": "invalid events; none were accepted", "events": errors}, status_code=422
        )
    try:
        accepted = await request.app.state.ingest.ingest(
            events, actor_id=str(claims["sub"]), actor_claims=claims
        )
    except IngestUnavailable:
        return ORJSONResponse(
            {"error": "event store unavailable; nothing was accepted, retry"},
            status_code=503,
            headers={"retry-after": "2"},
        )
    return ORJSONResponse(
        {"accepted": [{"id": a.id, "duplicate": a.duplicate} for a in accepted]},
        status_code=202,
    )


def _feed_name(raw: str, claims: dict[str, Any]) -> str:
    refusal = feed_refusal(raw, claims)
    if refusal == "unauthorized":
        raise HTTPException(403, "a user feed is only for that user")
    if refusal is not None:
        raise HTTPException(404, "feeds are global, subject:{subject} or user:{id}")
    return raw


async def get_feed(request: Request) -> Response:
    claims = claims_from_request(request)
    feed = _feed_name(request.path_params["feed"], claims)
    try:
        limit = int(request.query_params.get("limit", "20"))
        before_raw = request.query_params.get("before")
        before = int(before_raw) if before_raw is not None else None
    except ValueError:
        raise HTTPException(422, "limit and before must be integers") from None
    if not 1 <= limit <= 100:
        raise HTTPException(422, "limit must be from 1 to 100")
    if before is not None and not 0 <= before < 1 << 63:
        raise HTTPException(422, "before must be an item offset (a whole number from 0)")
    async with request.app.state.database.session() as session:
        return ORJSONResponse(await feed_page(session, feed, before=before, limit=limit))


PROFILE_FIELDS = {
    "display_name": (str, type(None)),
    "role": (str,),
    "minor": (bool,),
    "parent_id": (str, type(None)),
    "timezone": (str, type(None)),
    "subjects": (list,),
}


def _known_zone(name: str) -> bool:
    if not 1 <= len(name) <= 64:
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


async def put_user(request: Request) -> Response:
    claims = require_role(request, "admin")
    user_id = user_id_param(request)
    body = await read_json(request, 64 * 1024)
    if not isinstance(body, dict):
        raise HTTPException(422, "body must be a JSON object")
    errors = {k: "unknown field" for k in body if k not in PROFILE_FIELDS}
    for name, types in PROFILE_FIELDS.items():
        if name in body and not isinstance(body[name], types):
            errors[name] = f"must be {' or '.join(t.__name__ for t in types)}"
    if isinstance(body.get("role"), str) and body["role"] not in ROLES:
        errors["role"] = f"must be one of {sorted(ROLES)}"
    if isinstance(body.get("display_name"), str) and not 1 <= len(body["display_name"]) <= 80:
        errors["display_name"] = "must be 1-80 characters"
    if isinstance(body.get("parent_id"), str) and not ID_PATTERN.match(body["parent_id"]):
        errors["parent_id"] = "must be a user id: 1-64 letters, digits or _.:-"
    if isinstance(body.get("timezone"), str) and not _known_zone(body["timezone"]):
        errors["timezone"] = "must be an IANA time zone name, e.g. Europe/London"
    if isinstance(body.get("subjects"), list) and not all(
        isinstance(s, str) and SUBJECT.match(s) for s in body["subjects"]
    ):
        errors["subjects"] = "must be a list of subject names"
    if errors:
        return ORJSONResponse({"error": "invalid profile", "fields": errors}, status_code=422)

    async def write() -> tuple[bool, bool]:
        """(created, whether a fact the privacy rule reads changed)."""
        async with request.app.state.database.session() as session, session.begin():
            user = await session.get(User, user_id)
            created = user is None
            if user is None:
                user = User(id=user_id, subjects=[])
                session.add(user)
            shown = created or any(
                k in body and body[k] != getattr(user, k) for k in ("display_name", "minor", "parent_id")
            )
            # Who the user's parent is (who may then act for them) and whether they are a minor: each
            # change is audited, [before, after]. A new profile has no parent and is not a minor.
            before = {"parent_id": user.parent_id, "minor": bool(user.minor)}
            changes = {k: [v, body[k]] for k, v in before.items() if k in body and body[k] != v}
            for name in PROFILE_FIELDS:
                if name in body:
                    setattr(user, name, body[name])
            if changes:
                session.add(
                    AuditLog(
                        actor=str(claims["sub"]),
                        action="profile_changed",
                        subject=user_id,
                        details={"by": "admin", "changes": changes},
                        at=request.app.state.clock.now(),
                    )
                )
        return created, shown

    created, shown = await once_more_if_raced(write)  # two first PUTs at once: the second one updates
    if shown:  # a time zone or a subject list changes nothing anyone sees of them
        await request.app.state.notices.changed(user_id)
    return ORJSONResponse({"id": user_id, "created": created}, status_code=201 if created else 200)


async def get_parked(request: Request) -> Response:
    """Events a consumer gave up on, with the error, for an operator to look at."""
    require_role(request, "admin")
    async with request.app.state.database.session() as session:
        rows = (
            await session.execute(
                select(Consumption)
                .where(Consumption.status == "parked")
                .order_by(Consumption.updated_at.desc())
                .limit(200)
            )
        ).scalars()
        return ORJSONResponse(
            {
                "parked": [
                    {
                        "consumer": r.consumer,
                        "event_id": r.event_id,
                        "attempts": r.attempts,
                        "error": r.error,
                        "at": r.updated_at.isoformat(),
                    }
                    for r in rows
                ]
            }
        )


routes = [
    Route("/api/events", post_events, methods=["POST"]),
    Route("/api/feeds/{feed:path}", get_feed),
    Route("/api/users/{user_id}", put_user, methods=["PUT"]),
    Route("/api/admin/parked", get_parked),
]
