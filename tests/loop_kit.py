"""A real server in the test's process with a hand-moved clock, for the loop scenarios.

The app is the production one (`create_app`) served by uvicorn on a loopback port, with the memory
broker, so the consumers and the scheduler run inside it. Its loops and scheduler read a
`ManualClock`: a scenario posts events stamped with that clock (as an admin may, for the past), moves
it, and the scheduler — polling every 50 ms — runs whatever fell due. Clients are real sockets and
real HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import uvicorn
from servers import SECRET, PhxClient, free_port, make_token

from loops import ManualClock
from metrics.events import client_event_id
from web.app import create_app
from web.cli import uvicorn_options
from web.config import Settings

# Ten days ago at 10:00 UTC: far enough back that every event a scenario stamps is in the past (the
# API refuses future events), and inside daytime so quiet hours (21:00-07:00 UTC) do not interfere.
START = (datetime.now(UTC) - timedelta(days=10)).replace(hour=10, minute=0, second=0, microsecond=0)


class LoopWorld:
    def __init__(self, port: int, clock: ManualClock, app: Any) -> None:
        self.port = port
        self.clock = clock
        self.app = app
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10)
        self._clients: list[PhxClient] = []
        self._n = 0

    def headers(self, user: str, role: str = "student", **claims: Any) -> dict[str, str]:
        return {"authorization": f"Bearer {make_token(user, role, **claims)}"}

    async def socket(self, user: str, role: str = "student", **claims: Any) -> PhxClient:
        url = (
            f"ws://127.0.0.1:{self.port}/socket/websocket?vsn=2.0.0&token={make_token(user, role, **claims)}"
        )
        client = await PhxClient.connect(url)
        self._clients.append(client)
        reply = await client.join(f"user:{user}")
        assert reply["status"] == "ok", reply
        return client

    async def event(self, etype: str, user: str, **props: Any) -> None:
        """Post one event stamped with the world's clock and wait until every consumer has it."""
        self._n += 1
        event_id = f"ev{self._n}-{etype}-{user}"
        body = [
            {
                "id": event_id,
                "type": etype,
                "user_id": user,
                "ts": self.clock.now().isoformat(),
                "props": props,
            }
        ]
        response = await self.http.post("/api/events", json=body, headers=self.headers("ops", "admin"))
        assert response.status_code == 202, response.text
        await self.consumed(client_event_id("ops", event_id))

    async def consumed(self, event_id: str, timeout: float = 10.0) -> None:
        """Wait for the stored event `event_id` (a client's id is stored as `client_event_id`)."""
        from sqlalchemy import func, select

        from store import Consumption

        runner = self.app.state.runner
        names = [c.name for c in runner.consumers]
        async with asyncio.timeout(timeout):
            while True:
                async with self.app.state.database.session() as session:
                    done = await session.scalar(
                        select(func.count()).where(
                            Consumption.event_id == event_id, Consumption.consumer.in_(names)
                        )
                    )
                if done == len(names):
                    return
                await asyncio.sleep(0.02)

    async def act(self, user: str, action: str, role: str = "student", **params: Any) -> httpx.Response:
        return await self.http.post(f"/api/loops/{action}", json=params, headers=self.headers(user, role))

    async def profile(self, user: str, **fields: Any) -> None:
        body = {"role": "student", **fields}
        response = await self.http.put(f"/api/users/{user}", json=body, headers=self.headers("ops", "admin"))
        assert response.status_code in (200, 201), response.text

    async def advance(self, delta: timedelta) -> None:
        """Move the clock, then let the scheduler run whatever fell due."""
        self.clock.advance(delta)
        await self.settle()

    async def settle(self) -> None:
        scheduler = self.app.state.scheduler
        await asyncio.sleep(0.05)
        while await scheduler.run_due():
            pass

    async def close(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.close()
        await self.http.aclose()


@contextlib.asynccontextmanager
async def loop_world(database_url: str, **env: str) -> AsyncIterator[LoopWorld]:
    clock = ManualClock(START)
    settings = Settings.from_env(
        {
            "ENV": "test",
            "SECRET_KEY": SECRET,
            "DATABASE_URL": database_url,
            "BROKER_URL": "memory://",
            "SCHEDULER_POLL": "0.05",
            "EVENTS_MAINTENANCE_EVERY": "3600",
            **env,
        }
    )
    app = create_app(settings, clock=clock)
    port = free_port()
    options = {k: v for k, v in uvicorn_options(settings).items() if k not in ("loop", "backlog")}
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **options)
    )
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(15):
        while not server.started:
            if task.done():
                raise RuntimeError("the server did not start") from task.exception()
            await asyncio.sleep(0.02)
    world = LoopWorld(port, clock, app)
    try:
        yield world
    finally:
        await world.close()
        server.should_exit = True
        await asyncio.wait_for(task, 15)
