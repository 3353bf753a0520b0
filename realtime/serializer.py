"""The Phoenix Channels V2 JSON wire format: `[join_ref, ref, topic, event, payload]`.

Pure functions, no I/O. This is the one place that knows the shape of a frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

SUPPORTED_VSN = "2.0.0"

# Events the socket itself understands; everything else is routed to a channel.
PHX_JOIN = "phx_join"
PHX_LEAVE = "phx_leave"
PHX_REPLY = "phx_reply"
PHX_CLOSE = "phx_close"
PHX_ERROR = "phx_error"
HEARTBEAT = "heartbeat"
PHOENIX_TOPIC = "phoenix"


class ProtocolError(ValueError):
    """A frame that is not valid Phoenix V2 JSON; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Message:
    join_ref: str | None
    ref: str | None
    topic: str
    event: str
    payload: Any


def negotiate_vsn(vsn: str | None) -> str:
    """Return the serializer version to use for a `vsn` query value, or raise ProtocolError.

    A missing `vsn` means the current version: every client we know of sends it, and one
    that does not is not speaking the older V1 either.
    """
    if vsn is None or vsn == "":
        return SUPPORTED_VSN
    major = vsn.split(".", 1)[0]
    if major == "2":
        return SUPPORTED_VSN
    raise ProtocolError(
        f"unsupported protocol version vsn={vsn!r}: this server speaks vsn=2.0.0 (Phoenix V2 JSON)"
    )


def _ref(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    # phoenix.js always sends strings, but refs are opaque: accept integers as their string form.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ProtocolError(f"{name} must be a string or null, got {type(value).__name__}")


def decode(data: str | bytes) -> Message:
    """Decode one text frame into a Message, or raise ProtocolError with a clear reason."""
    try:
        decoded = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"frame is not valid JSON: {exc}") from None
    if not isinstance(decoded, list):
        raise ProtocolError(
            f"frame must be a JSON array [join_ref, ref, topic, event, payload], got {type(decoded).__name__}"
        )
    if len(decoded) != 5:
        raise ProtocolError(
            f"frame must have 5 elements [join_ref, ref, topic, event, payload], got {len(decoded)}"
        )
    join_ref_raw, ref_raw, topic, event, payload = decoded
    join_ref = _ref(join_ref_raw, "join_ref")
    ref = _ref(ref_raw, "ref")
    if not isinstance(topic, str) or not topic:
        raise ProtocolError("topic must be a non-empty string")
    if not isinstance(event, str) or not event:
        raise ProtocolError("event must be a non-empty string")
    return Message(join_ref, ref, topic, event, payload)


def encode(join_ref: str | None, ref: str | None, topic: str, event: str, payload: Any) -> bytes:
    """Encode one server→client message as UTF-8 JSON bytes."""
    return orjson.dumps([join_ref, ref, topic, event, payload])


def encode_reply(join_ref: str | None, ref: str | None, topic: str, status: str, response: Any) -> bytes:
    return orjson.dumps([join_ref, ref, topic, PHX_REPLY, {"status": status, "response": response}])


def encode_broadcast(topic: str, event: str, payload: Any) -> bytes:
    """A push to every subscriber of a topic: no refs, so the bytes are the same for all of them."""
    return orjson.dumps([None, None, topic, event, payload])
