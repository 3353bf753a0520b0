"""A fake OpenAI-compatible chat completions server on 127.0.0.1, for the copy router's tests.

Real HTTP (uvicorn in a background thread, on a free loopback port). Each request to
`POST /v1/chat/completions` takes the next step of `script` (then `default`): "ok" answers `content`
with `usage`, "empty" answers an empty content, "garbage" a body that is not JSON, "slow" answers
after `delay` seconds, an integer answers that HTTP status. Every request's JSON body is recorded
(with its `authorization` header added under that key).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import deque
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

Step = str | int


class FakeOpenAI:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[dict[str, Any]] = []
        self.script: deque[Step] = deque()
        self.default: Step = "ok"
        self.content = "Maya is working on algebra right now: come and join her!"
        self.usage = {"prompt_tokens": 120, "completion_tokens": 30}
        self.delay = 1.0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        app = Starlette(routes=[Route("/v1/chat/completions", self._completions, methods=["POST"])])
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="asyncio",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._requests)

    def behave(self, *steps: Step, then: Step = "ok") -> None:
        """The next requests get `steps` in order, every later one `then`."""
        with self._lock:
            self.script = deque(steps)
            self.default = then

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self.script.clear()
            self.default = "ok"
        self.content = "Maya is working on algebra right now: come and join her!"
        self.usage = {"prompt_tokens": 120, "completion_tokens": 30}

    def start(self) -> FakeOpenAI:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake OpenAI server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._sock.close()

    async def _completions(self, request: Request) -> Response:
        body = await request.json()
        with self._lock:
            self._requests.append({**body, "authorization": request.headers.get("authorization")})
            step = self.script.popleft() if self.script else self.default
        if isinstance(step, int):
            return JSONResponse({"error": {"message": f"fake status {step}"}}, status_code=step)
        if step == "garbage":
            return PlainTextResponse("this is not json")
        if step == "slow":
            await asyncio.sleep(self.delay)
        content = "" if step == "empty" else self.content
        return JSONResponse(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {**self.usage, "total_tokens": sum(self.usage.values())},
            }
        )
