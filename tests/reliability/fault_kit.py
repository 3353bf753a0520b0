"""Tools for the fault tests: a private Redis to kill and restart, a TCP proxy in front of PostgreSQL to
cut and restore, a fleet of lightweight Phoenix sockets that keep feed items by offset and reconnect
with `since`, an event pump that posts like a well-behaved client, and database read-outs.

Everything is real: redis-server and PostgreSQL processes, `viral-engine serve`/`worker` processes
(tests/servers.py), loopback TCP. Nothing here mocks the code under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import websockets
from servers import RedisServer, free_port, make_token
from sqlalchemy import func, select

from metrics.events import client_event_id
from store import Consumption, Database, Event, FeedItem, ScoreEntry

CONSUMERS = ("feed", "leaderboard", "attribution", "experiments", "loops")


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout: float, what: str, every: float = 0.1
) -> float:
    """Wait until `check()` (plain or async) is true; returns the seconds it took; fails with `what`."""
    start = time.monotonic()
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        await asyncio.sleep(every)


def admin_headers() -> dict[str, str]:
    return {"authorization": f"Bearer {make_token('ops', 'admin')}"}


# --- Redis ------------------------------------------------------------------------------------------


class PrivateRedis(RedisServer):
    """A redis-server of this test alone (no persistence: a restart comes back empty, the worst case)."""

    def kill(self) -> None:
        """SIGKILL: no goodbye to any client."""
        self.stop()

    def restart(self) -> None:
        """Start again on the same port, empty."""
        self.start()


# --- PostgreSQL behind a proxy ---------------------------------------------------------------------


class TcpProxy:
    """A loopback TCP proxy (its own thread and event loop) that a test can cut and restore.

    - `cut("refuse")`: the database host is down — open connections are reset, new ones refused.
    - `cut("blackhole")`: the network is partitioned — connections are accepted and open ones stay
      open, but no byte passes in either direction; on `restore()` they are dropped.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.mode = "open"
        self.accepted = 0
        self.refused = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._pipes: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._flowing = asyncio.Event()

    def _call(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    async def _listen(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "blackhole":
            pipe: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] = (writer, None)
            self._pipes.add(pipe)
            return  # held open, never answered
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pipe = (writer, up_writer)
        self._pipes.add(pipe)
        await asyncio.gather(
            self._copy(reader, up_writer, pipe), self._copy(up_reader, writer, pipe), return_exceptions=True
        )
        self._pipes.discard(pipe)

    async def _copy(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pipe: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None],
    ) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                if pipe not in self._pipes:
                    return
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()

    def cut(self, mode: str = "refuse") -> None:
        assert mode in ("refuse", "blackhole")
        self._call(self._cut(mode))

    async def _cut(self, mode: str) -> None:
        self.mode = mode
        if mode == "refuse":
            if self._server is not None:
                self._server.close()
                self._server = None
            self._drop_all()
        else:
            self._flowing.clear()

    def _drop_all(self) -> None:
        for client, upstream in list(self._pipes):
            client.transport.abort()
            if upstream is not None:
                upstream.transport.abort()
        self._pipes.clear()

    def restore(self) -> None:
        self._call(self._restore())

    async def _restore(self) -> None:
        if self.mode == "blackhole":
            self._drop_all()  # what was held during the partition is gone, as after a TCP timeout
        self.mode = "open"
        if self._server is None:
            await self._listen()
        self._flowing.set()

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            self._drop_all()

        with contextlib.suppress(Exception):
            self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def database_url(self, url: str) -> str:
        """`url` (postgresql+asyncpg://user@127.0.0.1:5432/db) pointed at this proxy."""
        head, tail = url.split("@", 1)
        database = tail.split("/", 1)[1]
        return f"{head}@127.0.0.1:{self.port}/{database}"


# --- Sockets ----------------------------------------------------------------------------------------


@dataclass
class FleetSocket:
    """One Phoenix client: its user, the servers it may use (it moves to the next when one dies), the
    feed items it holds by offset, and the pushes it saw."""

    user: str
    urls: list[str]
    topics: list[str]
    server: int = 0
    ws: Any = None
    items: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    epochs: dict[str, str] = field(default_factory=dict)
    joined_at: dict[str, int] = field(default_factory=dict)
    pushes: list[tuple[str, str, Any]] = field(default_factory=list)
    closes: int = 0
    reconnects: int = 0
    rejoined: int = 0  # reconnections completed (socket open and every topic joined again)
    recovered: dict[str, bool] = field(default_factory=dict)
    _ref: itertools.count = field(default_factory=lambda: itertools.count(1))  # type: ignore[type-arg]
    _replies: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    _reader: asyncio.Task[None] | None = None
    _closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"{self.urls[self.server]}&token={make_token(self.user, 'student')}"

    async def open(self) -> None:
        self.ws = await websockets.connect(self.url, ping_interval=None, open_timeout=60, close_timeout=2)
        self._closed.clear()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                _, ref, topic, event, payload = orjson.loads(raw)
                if event == "phx_reply" and ref in self._replies:
                    self._replies.pop(ref).set_result(payload)
                elif event == "new_activity" and topic.startswith("feed:"):
                    self.items.setdefault(topic, {})[payload["offset"]] = payload
                    if payload.get("epoch") and topic in self.epochs:
                        self.epochs[topic] = payload["epoch"]  # joined before the feed had an epoch
                else:
                    self.pushes.append((topic, event, payload))
        self.closes += 1
        for future in self._replies.values():
            if not future.done():
                future.set_exception(ConnectionError("socket closed"))
        self._replies.clear()
        self._closed.set()

    @property
    def is_open(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def request(self, topic: str, event: str, payload: Any, timeout: float = 30) -> dict[str, Any]:
        ref = str(next(self._ref))
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[ref] = future
        frame = [ref if event == "phx_join" else None, ref, topic, event, payload]
        await self.ws.send(orjson.dumps(frame).decode())
        return await asyncio.wait_for(future, timeout)

    def contiguous(self, topic: str) -> int:
        """The highest offset up to which this client holds every item since it first joined."""
        have = self.items.get(topic, {})
        offset = self.joined_at.get(topic, 0)
        while offset + 1 in have:
            offset += 1
        return offset

    async def join(self, topic: str) -> dict[str, Any]:
        """Join; a feed it was on before is resumed from its last contiguous offset with `since`."""
        params: dict[str, Any] = {}
        resuming = topic.startswith("feed:") and topic in self.epochs
        if resuming:
            params = {"since": self.contiguous(topic), "epoch": self.epochs[topic]}
        reply = await self.request(topic, "phx_join", params)
        assert reply["status"] == "ok", (self.user, topic, reply)
        response = reply["response"]
        if topic.startswith("feed:"):
            if not resuming:
                self.joined_at[topic] = response["offset"]
                self.epochs[topic] = response["epoch"]
            else:
                self.recovered[topic] = response["recovered"]
            for item in response["items"]:
                self.items.setdefault(topic, {})[item["offset"]] = item
            if response["epoch"]:
                self.epochs[topic] = response["epoch"]
        return response

    async def join_all(self) -> None:
        for topic in self.topics:
            await self.join(topic)

    async def reconnect(self) -> None:
        """What a Phoenix client does when its socket drops: connect again (to the next server when
        there are several behind the balancer) and rejoin, resuming feeds with `since`."""
        self.reconnects += 1
        for attempt in range(60):
            self.server = (self.server + 1) % len(self.urls) if attempt % 2 == 0 else self.server
            try:
                await self.open()
                await self.join_all()
                self.rejoined += 1
                return
            except (OSError, websockets.exceptions.WebSocketException, ConnectionError, TimeoutError):
                await asyncio.sleep(0.5)
        raise AssertionError(f"{self.user} could not reconnect")

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader


class Fleet:
    """Many FleetSockets in this one process, with a heartbeat for all (so no idle timeout fires) and,
    when asked, automatic reconnection."""

    def __init__(self, sockets: list[FleetSocket], *, reconnect: bool = False) -> None:
        self.sockets = sockets
        self.reconnect = reconnect
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def start(
        cls, sockets: list[FleetSocket], *, reconnect: bool = False, concurrency: int = 50
    ) -> Fleet:
        fleet = cls(sockets, reconnect=reconnect)
        gate = asyncio.Semaphore(concurrency)

        async def up(sock: FleetSocket) -> None:
            async with gate:
                await sock.open()
                await sock.join_all()

        await asyncio.gather(*(up(s) for s in sockets))
        fleet._tasks.append(asyncio.create_task(fleet._heartbeat()))
        if reconnect:
            fleet._tasks.extend(asyncio.create_task(fleet._watch(s)) for s in sockets)
        return fleet

    async def _heartbeat(self, every: float = 10.0) -> None:
        while True:
            await asyncio.sleep(every)
            for sock in self.sockets:
                if sock.is_open:
                    with contextlib.suppress(Exception):
                        await sock.ws.send('[null,"hb","phoenix","heartbeat",{}]')

    async def _watch(self, sock: FleetSocket) -> None:
        while True:
            await sock._closed.wait()
            await asyncio.sleep(0.2)
            await sock.reconnect()

    def open_count(self) -> int:
        return sum(1 for s in self.sockets if s.is_open)

    def closes(self) -> int:
        return sum(s.closes for s in self.sockets)

    def saw(self, topic_event: Callable[[FleetSocket], Iterable[tuple[str, str, Any]]], marker: str) -> int:
        return sum(1 for s in self.sockets if any(p == marker for p in topic_event(s)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        gate = asyncio.Semaphore(100)

        async def down(sock: FleetSocket) -> None:
            async with gate:
                await sock.close()

        await asyncio.gather(*(down(s) for s in self.sockets))


def got_marker(sock: FleetSocket, marker: str) -> bool:
    return any(isinstance(p, dict) and p.get("marker") == marker for _, _, p in sock.pushes)


# --- Events -----------------------------------------------------------------------------------------


def session_event(eid: str, user: str, subject: str, minutes: int = 25) -> dict[str, Any]:
    return {
        "id": eid,
        "type": "session_completed",
        "user_id": user,
        "props": {"subject": subject, "minutes": minutes},
    }


@dataclass
class PumpLog:
    accepted: set[str] = field(default_factory=set)  # ids some request answered 2xx for
    refused: int = 0  # requests answered 503 (nothing accepted)
    retry_after: set[str] = field(default_factory=set)  # Retry-After values seen with a 503
    failed: int = 0  # requests that got no answer (connection refused or reset: a process died)
    other: list[tuple[int, str]] = field(default_factory=list)  # any other status: a bug
    sent: int = 0


class EventPump:
    """Posts batches of events, like a client that retries what was not accepted (same ids, so a
    retry is safe), rotating over the given servers; stops when told, then drains its retries."""

    def __init__(
        self,
        servers: list[str],
        make_batch: Callable[[int], list[dict[str, Any]]],
        *,
        every: float = 0.1,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.servers = servers
        self.make_batch = make_batch
        self.every = every
        self.headers = headers or admin_headers()
        self.log = PumpLog()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._backlog: list[list[dict[str, Any]]] = []

    def start(self) -> EventPump:
        self._task = asyncio.create_task(self._run())
        return self

    async def _post(self, http: httpx.AsyncClient, index: int, batch: list[dict[str, Any]]) -> bool:
        url = self.servers[index % len(self.servers)] + "/api/events"
        self.log.sent += 1
        try:
            response = await http.post(url, json=batch, headers=self.headers)
        except httpx.HTTPError:
            self.log.failed += 1
            return False
        if response.status_code == 202:
            self.log.accepted.update(a["id"] for a in response.json()["accepted"])
            return True
        if response.status_code == 503:
            self.log.refused += 1
            self.log.retry_after.add(response.headers.get("retry-after", ""))
            return False
        self.log.other.append((response.status_code, response.text[:300]))
        return True

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            for n in itertools.count():
                if self._stop.is_set():
                    break
                batch = self.make_batch(n)
                if not await self._post(http, n, batch):
                    self._backlog.append(batch)
                await asyncio.sleep(self.every)
            for n, batch in enumerate(itertools.chain(self._backlog)):
                for attempt in range(120):
                    if await self._post(http, n + attempt, batch):
                        break
                    await asyncio.sleep(0.5)
                else:
                    raise AssertionError("a batch was never accepted")

    async def stop(self) -> PumpLog:
        """Stop making new batches; return once every refused batch was retried until accepted."""
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 180)
        return self.log


# --- The database, read back ------------------------------------------------------------------------


@dataclass
class Effects:
    events: set[str]
    consumptions: dict[tuple[str, str], int]  # (consumer, status) -> rows
    feed_items_per_event: dict[str, int]
    scores_per_event: dict[str, int]
    holes: dict[str, list[int]]  # feed -> offsets missing between 1 and its highest


async def read_effects(database_url: str) -> Effects:
    database = Database(database_url)
    try:
        async with database.session() as session:
            events = set((await session.execute(select(Event.id))).scalars())
            consumptions = {
                (c, s): n
                for c, s, n in (
                    await session.execute(
                        select(Consumption.consumer, Consumption.status, func.count()).group_by(
                            Consumption.consumer, Consumption.status
                        )
                    )
                ).all()
            }
            per_event = dict(
                (
                    await session.execute(select(FeedItem.event_id, func.count()).group_by(FeedItem.event_id))
                ).all()
            )
            scores = dict(
                (
                    await session.execute(
                        select(ScoreEntry.event_id, func.count()).group_by(ScoreEntry.event_id)
                    )
                ).all()
            )
            offsets: dict[str, list[int]] = {}
            for feed, offset in (await session.execute(select(FeedItem.feed, FeedItem.offset))).all():
                offsets.setdefault(feed, []).append(offset)
        holes = {
            feed: sorted(set(range(1, max(values) + 1)) - set(values))
            for feed, values in offsets.items()
            if len(values) != max(values)
        }
        return Effects(events, consumptions, per_event, scores, holes)
    finally:
        await database.dispose()


async def consumed_everything(database_url: str, expected_events: int) -> bool:
    database = Database(database_url)
    try:
        async with database.session() as session:
            done = await session.scalar(select(func.count()).select_from(Consumption))
        return int(done or 0) >= len(CONSUMERS) * expected_events
    finally:
        await database.dispose()


def assert_processed_exactly_once(
    effects: Effects, accepted_ids: set[str], feeds_per_event: int = 3, sender: str = "ops"
) -> None:
    """Every accepted event stored once and processed once by every consumer, with its effects once.
    `accepted_ids` are the ids the clients chose (as answered); they are stored scoped to `sender`."""
    accepted = {client_event_id(sender, i) for i in accepted_ids}
    assert effects.events == accepted, (
        f"stored but not accepted: {sorted(effects.events - accepted)[:5]}, "
        f"accepted but not stored: {sorted(accepted - effects.events)[:5]}"
    )
    assert effects.consumptions == {(c, "done"): len(accepted) for c in CONSUMERS}, effects.consumptions
    assert effects.feed_items_per_event == dict.fromkeys(accepted, feeds_per_event)
    assert effects.scores_per_event == dict.fromkeys(accepted, 1)
    assert effects.holes == {}, f"feeds with missing offsets: {effects.holes}"
