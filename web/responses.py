"""JSON in and out of the HTTP API: orjson responses, and the edge checks every request body, path and
query passes before a handler sees it (size, content type, JSON syntax, nesting, NUL characters,
integer range, user ids), each refused with a 4xx and a message a client developer can act on; and
the one retry a write gets when it raced another request on the same row."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

import orjson
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from metrics.events import ID_PATTERN

log = logging.getLogger(__name__)
T = TypeVar("T")

# Deeper than any body this API defines (the deepest, an event's props, needs a handful of levels); it
# also keeps every stored JSON value far below orjson's own limit when it is written back out.
MAX_JSON_DEPTH = 32
INT64 = (-(1 << 63), (1 << 63) - 1)


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _json_content_type(value: str | None) -> bool:
    """No declared type (curl without -H, scripts) or a JSON one: `application/json`, `…+json`."""
    if value is None or not value.strip():
        return True
    kind = value.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def check_json_value(value: Any) -> str | None:
    """Why a parsed body may not go further, or None: nesting deeper than MAX_JSON_DEPTH, a NUL
    character in a string or key (PostgreSQL cannot store one), or an integer outside 64 bits."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
            if isinstance(item, dict):
                for key, child in item.items():
                    if "\x00" in key:
                        return "strings may not contain the NUL character (\\u0000)"
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            if "\x00" in item:
                return "strings may not contain the NUL character (\\u0000)"
        elif isinstance(item, int) and not isinstance(item, bool) and not INT64[0] <= item <= INT64[1]:
            return "integers must fit in 64 bits"
    return None


async def read_json(request: Request, max_bytes: int) -> Any:
    declared_type = request.headers.get("content-type")
    if not _json_content_type(declared_type):
        raise HTTPException(
            415, f"send the body as JSON ('Content-Type: application/json'), not {declared_type!r}"
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"request body larger than {max_bytes} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise HTTPException(413, f"request body larger than {max_bytes} bytes")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPException(400, f"body is not valid JSON: {exc}") from None
    problem = check_json_value(value)
    if problem is not None:
        raise HTTPException(422, f"body refused: {problem}")
    return value


def user_id_param(request: Request, name: str = "user_id") -> str:
    """A user id from the path, held to the id contract of events (SPEC §8)."""
    value = str(request.path_params[name])
    if not ID_PATTERN.match(value):
        raise HTTPException(422, "the user id in the path must be 1-64 letters, digits or _.:-")
    return value


class RefuseNulInUrl:
    """400 for an HTTP request whose path or query string encodes a NUL character (`%00`): no route
    needs one, and PostgreSQL cannot compare or store text that holds one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (
            b"\x00" in unquote_to_bytes(scope.get("raw_path") or scope["path"].encode())
            or b"\x00" in unquote_to_bytes(scope.get("query_string", b""))
        ):
            body = orjson.dumps({"error": "the URL may not contain a NUL character (%00)"})
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


async def once_more_if_raced(write: Callable[[], Awaitable[T]]) -> T:
    """Run a read-then-write transaction, and once more if another request created or deleted the same
    row between its read and its write (a duplicate key, or an update that matched no row): the second
    run reads the row as the other request left it. A second clash, or any other error, is raised."""
    try:
        return await write()
    except (IntegrityError, StaleDataError) as exc:
        log.info(
            "a write raced another request on the same row (%s); running it once more", type(exc).__name__
        )
        return await write()
