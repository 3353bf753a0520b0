"""The engine under benchmark: the product app plus an open `bench:*` channel, served as in production.

`create_app()` is a uvicorn factory. `python -m bench.engine_app --port P` serves it with
`web.cli.uvicorn_options`, the options of `viral-engine serve`; settings come from the environment
(SECRET_KEY, BROKER_URL=memory://).
"""

from __future__ import annotations

import argparse
from typing import Any

from starlette.applications import Starlette

from channels import build_router
from realtime import Channel, Router
from web.app import create_app as create_web_app
from web.cli import WS_IMPLEMENTATIONS, uvicorn_options
from web.config import Settings

from .common import raise_nofile_limit


class OpenChannel(Channel):
    """`bench:*`: any authenticated user may join (the socket already verified the token)."""

    __slots__ = ()

    async def join(self, params: dict[str, Any]) -> dict[str, Any]:
        return {}


def build_bench_router() -> Router:
    router = build_router()
    router.channel("bench:*", OpenChannel)
    return router


def create_app() -> Starlette:
    return create_web_app(Settings.from_env(), router=build_bench_router())


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve the engine for the broadcast benchmark.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--workers", type=int, default=1, help="processes (use a redis:// BROKER_URL)")
    # Levers compared in bench/README.md: uvicorn's other WebSocket implementations and event loops.
    parser.add_argument("--ws", default="fast", choices=sorted(WS_IMPLEMENTATIONS))
    parser.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    args = parser.parse_args(argv)
    raise_nofile_limit()
    # Exactly the uvicorn options of `viral-engine serve`.
    uvicorn.run(
        "bench.engine_app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        timeout_graceful_shutdown=10.0,
        log_level=args.log_level,
        access_log=False,
        **uvicorn_options(Settings.from_env(), ws=args.ws, loop=args.loop),
    )


if __name__ == "__main__":
    main()
