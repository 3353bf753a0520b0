"""The naive baseline for the broadcast benchmark: Starlette + uvicorn, a set of sockets per topic.

It speaks just enough Phoenix Channels V2 for the bench client (join, leave, heartbeat) and
serves `POST /api/publish` with the same body and admin bearer token as the engine. A broadcast
is what a straightforward implementation does: `json.dumps` and `await websocket.send_text(...)`
once per subscriber, through uvicorn's default WebSocket implementation.

Run: `SECRET_KEY=... python -m bench.naive_server --port P`.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .common import BENCH_SECRET, raise_nofile_limit

SECRET = os.environ.get("SECRET_KEY") or BENCH_SECRET

# topic -> the sockets joined to it
topics: dict[str, set[WebSocket]] = {}


def verify(token: str | None) -> dict[str, Any] | None:
    if not token:
        return None
    try:
        claims: dict[str, Any] = jwt.decode(token, SECRET, algorithms=["HS256"])
    except jwt.PyJWTError:
        return None
    return claims


def reply(join_ref: Any, ref: Any, topic: str, status: str, response: Any) -> str:
    return json.dumps([join_ref, ref, topic, "phx_reply", {"status": status, "response": response}])


async def socket_endpoint(websocket: WebSocket) -> None:
    if verify(websocket.query_params.get("token")) is None:
        await websocket.close(code=1008)  # before accept: the server answers 403
        return
    await websocket.accept()
    joined: set[str] = set()
    try:
        while True:
            join_ref, ref, topic, event, _payload = json.loads(await websocket.receive_text())
            if event == "phx_join":
                topics.setdefault(topic, set()).add(websocket)
                joined.add(topic)
                await websocket.send_text(reply(join_ref, ref, topic, "ok", {}))
            elif event == "phx_leave":
                topics.get(topic, set()).discard(websocket)
                joined.discard(topic)
                await websocket.send_text(reply(join_ref, ref, topic, "ok", {}))
            elif event == "heartbeat":
                await websocket.send_text(reply(join_ref, ref, topic, "ok", {}))
            else:
                await websocket.send_text(reply(join_ref, ref, topic, "error", {"reason": "unmatched topic"}))
    except WebSocketDisconnect:
        pass
    finally:
        for topic in joined:
            topics.get(topic, set()).discard(websocket)


async def publish(request: Request) -> Response:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    claims = verify(token) if scheme.lower() == "bearer" else None
    if claims is None:
        return JSONResponse({"error": "missing or invalid bearer token"}, status_code=401)
    if claims.get("role") != "admin":
        return JSONResponse({"error": "this endpoint needs the role admin"}, status_code=403)
    body = await request.json()
    topic, event, payload = body["topic"], body["event"], body.get("payload", {})
    reached = 0
    for websocket in list(topics.get(topic, ())):
        try:
            await websocket.send_text(json.dumps([None, None, topic, event, payload]))
            reached += 1
        except Exception:
            topics.get(topic, set()).discard(websocket)
    return JSONResponse({"topic": topic, "event": event, "local_subscribers": reached}, status_code=202)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[
        WebSocketRoute("/socket/websocket", socket_endpoint),
        Route("/api/publish", publish, methods=["POST"]),
        Route("/healthz", healthz),
    ]
)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve the naive baseline for the broadcast benchmark.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    # uvicorn's default WebSocket implementation ("auto"), on the engine's loop and HTTP parser. Deflate
    # and WebSocket pings are off, as in the engine: neither server pays for them, so the fan-out is compared.
    uvicorn.run(
        "bench.naive_server:app",
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        ws="auto",
        ws_per_message_deflate=False,
        ws_ping_interval=None,
        ws_ping_timeout=None,
        backlog=4096,
        log_level=args.log_level,
        access_log=False,
    )


if __name__ == "__main__":
    main()
