"""The event contract (SPEC §8): which events exist, what their props look like, who may send what.

Pure validation: input is whatever JSON a client sent, output is either clean `EventIn` values or
per-field errors a client developer can act on.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

# type -> props that must be present (name -> accepted Python types). Other props are kept as sent.
EVENT_TYPES: dict[str, dict[str, tuple[type, ...]]] = {
    "session_started": {"subject": (str,)},
    "session_completed": {"subject": (str,), "minutes": (int, float)},
    "practice_completed": {"subject": (str,)},
    "quiz_result": {"subject": (str,), "score": (int, float)},
    "diagnostic_completed": {"subject": (str,), "score": (int, float)},
    "exam_scheduled": {"subject": (str,), "exam_at": (str,)},
    "streak_updated": {"days": (int,)},
    "invite_sent": {"source": (str,)},
    "link_clicked": {},
    "signup": {},
    "first_value": {},
    "reaction": {},
    "opt_out": {},
    "complaint": {},  # a user reports a loop's message: props.loop, props.reason
    "experiment_exposure": {"experiment": (str,), "variant": (str,)},
}

ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
MAX_PROPS_BYTES = 4096
# Props are small records; deeper nesting is refused (the encoder would fail past 254 levels).
MAX_PROPS_DEPTH = 32
# Clients' clocks drift; their events may claim a time this far from ours. Admins may backfill any past time.
CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class EventIn:
    """An event to store. `id` is the stored key; `client_id`, when a client chose the id, is that id as
    the client sent it (and is told back)."""

    id: str
    type: str
    user_id: str
    ts: datetime
    props: dict[str, Any]
    client_id: str | None = None


def client_event_id(sender: str, client_id: str) -> str:
    """The stored id of an event whose id a client chose: scoped to the sender, so one sender's ids
    never collide with (or suppress) another's, and a retry by the same sender is still a duplicate.
    Ids the server makes never have this shape ("c-" and 40 hex digits), so no client can pre-claim one."""
    digest = hashlib.blake2b(f"{sender}\x00{client_id}".encode(), digest_size=20).hexdigest()
    return f"c-{digest}"


class EventRejected(Exception):
    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


def parse_ts(value: Any) -> datetime:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError("must be an ISO 8601 timestamp or epoch seconds") from None
        if parsed.tzinfo is None:
            raise ValueError("must carry a timezone (e.g. 2026-01-01T10:00:00Z)")
        return parsed.astimezone(UTC)
    raise ValueError("must be an ISO 8601 timestamp or epoch seconds")


def _nesting(value: Any) -> int:
    """How many objects and arrays deep `value` goes (iteratively: input may be nested thousands deep)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_PROPS_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def validate_event(raw: Any, *, caller: str, is_admin: bool, now: datetime) -> EventIn:
    """One event from the wire, checked against the contract and the caller's rights."""
    if not isinstance(raw, dict):
        raise EventRejected({"event": "must be a JSON object"})
    errors: dict[str, str] = {}
    unknown = sorted(set(raw) - {"id", "type", "user_id", "ts", "props"})
    if unknown:
        errors["event"] = f"unknown fields {unknown}"
    etype = raw.get("type")
    if not isinstance(etype, str) or etype not in EVENT_TYPES:
        errors["type"] = f"must be one of {sorted(EVENT_TYPES)}"
    user_id = raw.get("user_id")
    if not isinstance(user_id, str) or not ID_PATTERN.match(user_id):
        errors["user_id"] = "must be a string of 1-64 letters, digits or _.:-"
    elif user_id != caller and not is_admin:
        errors["user_id"] = "may only be your own user id (admins may send for anyone)"
    event_id = raw.get("id")
    if event_id is not None and (not isinstance(event_id, str) or not ID_PATTERN.match(event_id)):
        errors["id"] = "must be a string of 1-64 letters, digits or _.:- (it is the idempotency key)"
    ts = now
    if raw.get("ts") is not None:
        try:
            ts = parse_ts(raw["ts"])
        except (ValueError, OverflowError, OSError) as exc:
            errors["ts"] = str(exc)
        else:
            if ts > now + CLOCK_SKEW:
                errors["ts"] = "is in the future"
            elif ts < now - CLOCK_SKEW and not is_admin:
                errors["ts"] = "only admins may send events from the past (imports, backfills)"
    props = raw.get("props", {})
    if not isinstance(props, dict):
        errors["props"] = "must be a JSON object"
    elif isinstance(etype, str) and etype in EVENT_TYPES:
        for name, types in EVENT_TYPES[etype].items():
            value = props.get(name)
            if not isinstance(value, types) or isinstance(value, bool):
                kinds = " or ".join(
                    t.__name__.replace("str", "string").replace("int", "integer") for t in types
                )
                errors[f"props.{name}"] = f"is required for {etype} and must be a {kinds}"
    if errors:
        raise EventRejected(errors)
    import orjson

    if _nesting(props) > MAX_PROPS_DEPTH:
        raise EventRejected({"props": f"must nest objects and arrays at most {MAX_PROPS_DEPTH} levels deep"})
    try:
        encoded = orjson.dumps(props)
    except orjson.JSONEncodeError as exc:  # e.g. an integer beyond 64 bits from a JSON body
        raise EventRejected({"props": f"cannot be stored as JSON: {exc}"}) from None
    if len(encoded) > MAX_PROPS_BYTES:
        raise EventRejected({"props": f"must encode to at most {MAX_PROPS_BYTES} bytes"})
    assert isinstance(etype, str) and isinstance(user_id, str)
    if event_id is None:
        return EventIn(uuid.uuid4().hex, etype, user_id, ts, props)
    assert isinstance(event_id, str)
    return EventIn(client_event_id(caller, event_id), etype, user_id, ts, props, client_id=event_id)
