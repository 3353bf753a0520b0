"""One client process of the load tester (`viral-engine loadtest`, bench/loadtest.py): real WebSockets.

The driver starts `python -m bench.loadtest_worker` a few times (`--procs`, 2 by default) and talks
to each over its stdin/stdout, one JSON object per line: the first line is the configuration (the
share of sockets, the target, the source addresses, the topics, the signing key), then commands
(`connect`, `mark`, `run`, `drain`, `report`, `close`); the worker answers each and writes a
`progress` line twice a second.

The client is built to stay out of the way of the server it measures:

- a uvloop event loop and one `asyncio.Protocol` object per socket (`Conn`, `__slots__`, a dozen
  fields), no task, no timer and no queue per socket: the opening handshake is written by hand
  (`GET … Upgrade: websocket`, the `Sec-WebSocket-Accept` checked), client frames are masked with
  `websockets.speedups.apply_mask` (C), server frames are parsed in `data_received` (several frames
  in one read, a frame split over any number of reads, 16- and 64-bit lengths, fragmented messages,
  ping → pong, the closing handshake);
- heartbeats from one timer per process, which walks a 1/`heartbeat`-th slice of the sockets
  every second; join, leave and heartbeat replies are recognised by the shape of their `ref`, so a
  socket keeps no table of requests in flight;
- latency histograms with fixed bins (10 µs below 1 ms, 100 µs below 100 ms, 10 ms below 10 s)
  that the driver merges by adding counts;
- the worker reads its own CPU time (`resource.getrusage`) and event-loop lag for every phase,
  and the driver reports both and warns above 80 % of a core.

How "the client is not the bottleneck" was checked (2-core machine, with other test suites running
on it, load average 4-5: the absolute numbers are noisy, the proportions are what matters):

1. In isolation: `python -m bench.loadtest_worker --bench-parser` feeds the frame path (header
   parse, JSON decode, sequence and latency bookkeeping) 200,000 recorded broadcast frames, in reads
   of 8 frames and in 1,000-byte reads that split frames: 610,000-730,000 frames/s on one core
   (1.4-1.6 µs per frame).
2. Against `viral-engine serve`, end to end (kernel receive and event-loop wake-ups included): each
   worker measures its own CPU per phase and divides by the frames it read. Broadcast, 5,000
   subscribers at 10 publishes/s (50,000 frames/s in all): each of the 2 workers used 16-17 % of a
   core, 6.6 µs of CPU per frame, while the server used 30 %; back to back (84,000 frames/s, the
   machine at 2.0 cores busy) 24-28 % each. So one worker process reads ~150,000 frames/s with a
   core to itself: a worker taking 50,000 frames/s stays near a third of a core, and the summary
   warns when any worker passes 80 %.
3. Holding sockets: 50,000 idle sockets in 3 workers (16,667 each) cost each worker 1 % of a core
   (heartbeats every 30 s) and ~18-21 % while connecting at ~1,800 sockets/s; the client's own
   memory is ~1.7 KB per socket (VmRSS after joining minus before, reported per worker).
   One process could hold 25,000+ sockets, but not here: the hard RLIMIT_NOFILE is 20,000 and the
   container lacks CAP_SYS_RESOURCE to raise it, so the driver splits N over more workers
   (ceil(N / (hard limit - 512))) and says so.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import errno
import gc
import hashlib
import os
import random
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
from websockets.speedups import apply_mask

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TICK_EVENT = "loadtest_tick"
HEARTBEAT = b'[null,"h","phoenix","heartbeat",{}]'

# Connection states.
CONNECTING, HANDSHAKE, OPEN, CLOSING, CLOSED = range(5)

_loads = orjson.loads
_dumps = orjson.dumps
_now_ns = time.monotonic_ns
_randbytes = random.randbytes


# Latency histograms: fixed bins, so workers' histograms merge by adding counts.

_BIN_COUNT = 2081  # 100 bins of 10 µs, 990 of 100 µs, 990 of 10 ms, one overflow (≥ 10 s)


def bin_index(us: int) -> int:
    if us < 1_000:
        return us // 10 if us >= 0 else 0
    if us < 100_000:
        return 100 + (us - 1_000) // 100
    if us < 10_000_000:
        return 1_090 + (us - 100_000) // 10_000
    return 2_080


def bin_bounds(index: int) -> tuple[float, float]:
    """(low, high) of a bin in ms; the overflow bin's high is infinity."""
    if index < 100:
        return index * 0.01, (index + 1) * 0.01
    if index < 1_090:
        low = 1_000 + (index - 100) * 100
        return low / 1000, (low + 100) / 1000
    if index < 2_080:
        low = 100_000 + (index - 1_090) * 10_000
        return low / 1000, (low + 10_000) / 1000
    return 10_000.0, float("inf")


class Hist:
    """Latency samples in µs: counts per bin, and the exact count, sum, min and max."""

    __slots__ = ("bins", "count", "max", "min", "total")

    def __init__(self) -> None:
        self.bins = [0] * _BIN_COUNT
        self.count = 0
        self.total = 0
        self.max = 0
        self.min = 0

    def record(self, us: int) -> None:
        if us < 1_000:
            self.bins[us // 10 if us >= 0 else 0] += 1
        else:
            self.bins[bin_index(us)] += 1
        if self.count == 0 or us < self.min:
            self.min = us
        if us > self.max:
            self.max = us
        self.count += 1
        self.total += us

    def export(self) -> dict[str, Any]:
        return {
            "bins": [[i, c] for i, c in enumerate(self.bins) if c],
            "count": self.count,
            "sum_us": self.total,
            "min_us": self.min,
            "max_us": self.max,
        }


def merge_hist_exports(exports: list[dict[str, Any]]) -> dict[str, Any]:
    bins: dict[int, int] = {}
    for e in exports:
        for i, c in e["bins"]:
            bins[i] = bins.get(i, 0) + c
    counted = [e for e in exports if e["count"]]
    return {
        "bins": sorted([i, c] for i, c in bins.items()),
        "count": sum(e["count"] for e in exports),
        "sum_us": sum(e["sum_us"] for e in exports),
        "min_us": min((e["min_us"] for e in counted), default=0),
        "max_us": max((e["max_us"] for e in counted), default=0),
    }


def hist_summary(export: dict[str, Any]) -> dict[str, Any]:
    """count, mean, p50/p95/p99/p999 (bin midpoints, ms) and the exact min/max of a merged histogram."""
    count = export["count"]
    out: dict[str, Any] = {"count": count}
    if not count:
        return {**out, "mean": None, "p50": None, "p95": None, "p99": None, "p999": None, "max": None}
    for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99), ("p999", 0.999)):
        rank = q * count
        seen = 0
        value = None
        for index, c in export["bins"]:
            seen += c
            if seen >= rank:
                low, high = bin_bounds(index)
                value = low if high == float("inf") else round((low + high) / 2, 3)
                break
        out[name] = value
    out["mean"] = round(export["sum_us"] / count / 1000, 3)
    out["min"] = export["min_us"] / 1000
    out["max"] = export["max_us"] / 1000
    return out


# Room layout: which room (group of 10-50 users) each socket index belongs to. Every process computes
# the same layout from the same seed.


def room_starts(n: int, low: int, high: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    starts = []
    i = 0
    while i < n:
        starts.append(i)
        i += rng.randint(low, high)
    return starts


def room_of(starts: list[int], index: int) -> int:
    return bisect.bisect_right(starts, index) - 1


def expand(template: str, user: str, room: int) -> str:
    return template.replace("{user}", user).replace("{room}", str(room))


def client_frame(text: bytes) -> bytes:
    """A masked text frame (RFC 6455 §5.3: every client frame is masked)."""
    n = len(text)
    mask = _randbytes(4)
    if n < 126:
        head = bytes((0x81, 0x80 | n))
    elif n < 65536:
        head = b"\x81\xfe" + n.to_bytes(2, "big")
    else:
        head = b"\x81\xff" + n.to_bytes(8, "big")
    return head + mask + apply_mask(text, mask)


def client_close_frame(code: int = 1000) -> bytes:
    mask = _randbytes(4)
    return b"\x88\x82" + mask + apply_mask(code.to_bytes(2, "big"), mask)


class Conn(asyncio.Protocol):
    """One client WebSocket: the HTTP upgrade, then Phoenix V2 frames. Everything else is the worker's."""

    __slots__ = (
        "buf",
        "frag",
        "hb_t",
        "idx",
        "last_seq",
        "need",
        "ok",
        "pending",
        "refused",
        "req",
        "room",
        "state",
        "t0",
        "topics",
        "tr",
        "uid",
        "w",
        "waiter",
    )

    def __init__(self, worker: Worker, idx: int, uid: str, room: int, topics: tuple[str, ...]) -> None:
        self.w = worker
        self.idx = idx
        self.uid = uid
        self.room = room
        self.topics = topics
        self.tr: Any = None
        self.state = CONNECTING
        self.buf: bytes | bytearray | None = None
        self.need = 0
        self.frag: bytearray | None = None
        self.last_seq = 0
        self.t0 = 0  # when the request in flight (upgrade, joins, leaves or an event) was sent
        self.hb_t = 0  # when the heartbeat in flight was sent
        self.pending = 0  # replies still awaited for the joins or leaves in flight
        self.ok = False  # joined every topic
        self.refused = False  # a join was refused
        self.req: bytes | None = None  # the upgrade request (with the token), until it is written
        self.waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        self.tr = transport
        self.state = HANDSHAKE
        self.t0 = _now_ns()
        assert self.req is not None
        transport.write(self.req)
        self.req = None

    def connection_lost(self, exc: Exception | None) -> None:
        w = self.w
        if self.state == OPEN or self.state == CLOSING:
            w.open -= 1
        if self.state != CLOSED:
            # The TCP connection ended without a close frame from the server.
            w.count_close(1006, self.state == CLOSING)
            if self.state == HANDSHAKE:
                w.error("closed_during_upgrade")
        self.state = CLOSED
        self.tr = None
        self.buf = self.frag = None
        self._wake(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        now = _now_ns()
        buf = self.buf
        if buf is not None:
            buf += data  # a bytearray: amortised appends for frames split over many reads
            if len(buf) < self.need:
                return
            data = buf  # type: ignore[assignment]
            self.buf = None
        if self.state == HANDSHAKE:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = bytearray(data)
                self.need = 0
                return
            if not self._upgraded(bytes(data[:end]), now):
                return
            data = data[end + 4 :]
        w = self.w
        w.bytes_in += len(data)
        pos = 0
        n = len(data)
        self.need = 0
        while n - pos >= 2:
            b0 = data[pos]
            length = data[pos + 1] & 0x7F
            head = pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                head = pos + 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = pos + 10
            if data[pos + 1] & 0x80:
                w.error("protocol:masked_server_frame")
                self.state = CLOSED
                self.abort()
                return
            stop = head + length
            if stop > n:
                self.need = stop - pos  # parse again once the whole frame is buffered
                break
            payload = data[head:stop]
            pos = stop
            if b0 == 0x81:  # the common case: a whole text frame
                w.on_message(self, payload, now)
            else:
                self._frame(b0, payload, now)
            if self.state == CLOSED:
                return
        if pos < n:
            self.buf = bytearray(data[pos:])

    def eof_received(self) -> bool | None:
        return None  # close the transport

    # Frames other than whole text frames.

    def _frame(self, b0: int, payload: bytes | bytearray, now: int) -> None:
        opcode = b0 & 0x0F
        fin = b0 & 0x80
        w = self.w
        if opcode == 0x8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            initiated = self.state == CLOSING
            w.count_close(code, initiated)
            if self.state == OPEN:
                w.open -= 1
                # Echo the close (RFC 6455 §5.5.1), then hang up.
                self.tr.write(client_close_frame(code if len(payload) >= 2 else 1000))
            elif self.state == CLOSING:
                w.open -= 1
            self.state = CLOSED
            self.tr.close()
            self._wake(ConnectionError(f"closed by the server ({code})"))
        elif opcode == 0x9:
            mask = _randbytes(4)
            self.tr.write(bytes((0x8A, 0x80 | len(payload))) + mask + apply_mask(bytes(payload), mask))
        elif opcode == 0xA:
            pass
        elif opcode == 0x0:
            if self.frag is None:
                w.error("protocol:unexpected_continuation")
                return
            self.frag += payload
            if fin:
                message, self.frag = self.frag, None
                w.on_message(self, message, now)
        elif opcode in (0x1, 0x2):
            if opcode == 0x2:
                w.error("protocol:binary_frame")
            if fin:
                w.on_message(self, payload, now)
            else:
                self.frag = bytearray(payload)
        else:
            w.error(f"protocol:opcode_{opcode}")

    def _upgraded(self, head: bytes, now: int) -> bool:
        w = self.w
        status = head[9:12]
        if not head.startswith(b"HTTP/1.1 101"):
            w.error(f"upgrade:http_{status.decode(errors='replace')}")
            self.state = CLOSED
            self.abort()
            return False
        lower = head.lower()
        at = lower.find(b"\r\nsec-websocket-accept:")
        accept = head[at + 23 :].split(b"\r\n", 1)[0].strip() if at >= 0 else b""
        if accept != w.expected_accept:
            w.error("upgrade:bad_accept")
            self.state = CLOSED
            self.abort()
            return False
        self.state = OPEN
        w.open += 1
        w.connect_hist.record((now - self.t0) // 1000)
        w.on_open(self, now)
        return True

    # Actions.

    def send(self, text: bytes) -> None:
        self.tr.write(client_frame(text))

    def join_all(self, now: int) -> None:
        self.t0 = now
        self.pending = len(self.topics)
        params = self.w.join_params
        for i, topic in enumerate(self.topics):
            ref = f"j{i}"
            self.send(_dumps([ref, ref, topic, "phx_join", params]))

    def leave_all(self) -> None:
        self.t0 = _now_ns()
        self.pending = len(self.topics)
        for i, topic in enumerate(self.topics):
            self.send(_dumps([f"j{i}", f"l{i}", topic, "phx_leave", {}]))

    def close(self) -> None:
        """Start the closing handshake; the server echoes the close and hangs up."""
        if self.state == OPEN:
            self.state = CLOSING
            self.tr.write(client_close_frame(1000))
        elif self.state in (CONNECTING, HANDSHAKE):
            self.abort()

    def abort(self) -> None:
        if self.tr is not None:
            self.tr.abort()

    def _wake(self, exc: BaseException | None = None) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)


class Phase:
    """CPU and wall time of one phase of this process."""

    __slots__ = ("cpu0", "lag_max", "lag_over_50ms", "name", "sys0", "t0")

    def __init__(self, name: str) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.name = name
        self.t0 = time.monotonic()
        self.cpu0 = usage.ru_utime
        self.sys0 = usage.ru_stime
        self.lag_max = 0.0
        self.lag_over_50ms = 0

    def end(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.monotonic() - self.t0
        user = usage.ru_utime - self.cpu0
        system = usage.ru_stime - self.sys0
        return {
            "name": self.name,
            "wall_s": round(wall, 3),
            "cpu_s": round(user + system, 3),
            "user_s": round(user, 3),
            "system_s": round(system, 3),
            "utilisation": round((user + system) / wall, 4) if wall > 0 else 0.0,
            "max_loop_lag_ms": round(self.lag_max * 1000, 1),
            "loop_lags_over_50ms": self.lag_over_50ms,
        }


class Worker:
    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = config
        self.wid: int = config["wid"]
        self.procs: int = config["procs"]
        self.host: str = config["host"]
        self.port: int = config["port"]
        self.src_addrs: list[str | None] = config["src_addrs"]
        self.topics: list[str] = config["topics"]
        self.join_params: dict[str, Any] = config.get("join_params", {})
        self.scenario: str = config["scenario"]
        self.heartbeat: float = config["heartbeat"]
        self.concurrency: int = config["connect_concurrency"]
        self.connect_timeout: float = config["connect_timeout"]
        self.run_id: str = config["run_id"]
        self.loop = asyncio.get_running_loop()
        from realtime import TokenVerifier

        self.verifier = TokenVerifier(config["secret"])
        self.ttl: float = config["ttl"]
        self.starts = room_starts(config["n"], config["room_min"], config["room_max"], config["seed"])
        self.n_rooms = len(self.starts)
        key = base64.b64encode(os.urandom(16))
        self.key = key
        self.expected_accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        self.request_head = (
            f"GET {config['path']}?vsn=2.0.0&token=".encode(),
            (
                f" HTTP/1.1\r\nHost: {config['host_header']}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
                "Sec-WebSocket-Version: 13\r\nUser-Agent: viral-engine-loadtest\r\n\r\n"
            ).encode(),
        )
        self.conns: list[Conn] = []
        hb_tick = 1.0 if self.heartbeat >= 1 else self.heartbeat
        self.hb_tick = hb_tick
        self.hb_groups: list[list[Conn]] = [[] for _ in range(max(1, round(self.heartbeat / hb_tick)))]
        # Counters.
        self.open = 0
        self.connected = 0
        self.connect_failures = 0  # held sockets that did not get connected and joined
        self.not_attempted = 0  # held sockets never tried: too many failures before them
        self.joined = 0  # sockets joined to every topic
        self.joins_ok = 0
        self.joins_failed = 0
        self.leaves_ok = 0
        self.leaves_failed = 0
        self.frames = 0
        self.bytes_in = 0
        self.ticks = 0
        self.gaps = 0
        self.out_of_order = 0
        self.last_tick_ns = 0
        self.heartbeats_sent = 0
        self.heartbeat_replies = 0
        self.ops_sent = 0
        self.ops_ok = 0
        self.ops_failed = 0
        self.ops_skipped = 0
        self.by_event: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.close_codes: dict[str, int] = {}
        self.closes_by_client: dict[str, int] = {}
        self.churn = {"started": 0, "connected": 0, "joined": 0, "left": 0, "disconnected": 0, "failed": 0}
        self.tick_hist = Hist()
        self.connect_hist = Hist()
        self.join_hist = Hist()
        self.leave_hist = Hist()
        self.op_hist = Hist()
        self.hb_hist = Hist()
        self.phases: list[dict[str, Any]] = []
        self.phase = Phase("start")
        self.local_addrs: dict[str, int] = {}
        self.connecting_done = False
        self.rss_kb_start = self_rss_kb()
        self.rss_kb_joined = 0
        self._churn_tasks: set[asyncio.Task[None]] = set()

    # Counters.

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def count_close(self, code: int, by_client: bool) -> None:
        table = self.closes_by_client if by_client else self.close_codes
        key = str(code)
        table[key] = table.get(key, 0) + 1

    # Frames in.

    def on_open(self, conn: Conn, now: int) -> None:
        self.connected += 1
        sockname = conn.tr.get_extra_info("sockname")
        if sockname:
            self.local_addrs[sockname[0]] = self.local_addrs.get(sockname[0], 0) + 1
        conn.join_all(now)

    def on_message(self, conn: Conn, payload: bytes | bytearray, now: int) -> None:
        self.frames += 1
        try:
            msg = _loads(payload)
            event = msg[3]
        except (orjson.JSONDecodeError, IndexError, TypeError):
            self.error("protocol:not_phoenix_v2")
            return
        if event == TICK_EVENT:
            body = msg[4]
            seq = body["seq"]
            self.ticks += 1
            self.last_tick_ns = now
            self.tick_hist.record((now - body["sent_at"]) // 1000)
            last = conn.last_seq
            if seq == last + 1:
                conn.last_seq = seq
            elif seq > last:
                self.gaps += seq - last - 1
                conn.last_seq = seq
            else:
                self.out_of_order += 1
        elif event == "phx_reply":
            self.on_reply(conn, msg, now)
        else:
            self.by_event[event] = self.by_event.get(event, 0) + 1

    def on_reply(self, conn: Conn, msg: list[Any], now: int) -> None:
        ref = msg[1]
        if not isinstance(ref, str) or not ref:
            self.error("protocol:reply_without_ref")
            return
        reply = msg[4]
        ok = isinstance(reply, dict) and reply.get("status") == "ok"
        kind = ref[0]
        if kind == "h":
            self.heartbeat_replies += 1
            if conn.hb_t:
                self.hb_hist.record((now - conn.hb_t) // 1000)
                conn.hb_t = 0
            return
        if kind == "j":
            if ok:
                self.joins_ok += 1
            else:
                self.joins_failed += 1
                self.error(f"join:{_reason(reply)}")
                conn.refused = True
            conn.pending -= 1
            if conn.pending == 0:
                self.join_hist.record((now - conn.t0) // 1000)
                conn.t0 = 0
                if conn.refused:
                    conn._wake(ConnectionError("join refused"))
                else:
                    conn.ok = True
                    self.joined += 1
                    conn._wake()
        elif kind == "l":
            if ok:
                self.leaves_ok += 1
            else:
                self.leaves_failed += 1
                self.error(f"leave:{_reason(reply)}")
            conn.pending -= 1
            if conn.pending == 0:
                self.leave_hist.record((now - conn.t0) // 1000)
                conn.t0 = 0
                conn._wake()
        elif kind == "e":
            if ok:
                self.ops_ok += 1
            else:
                self.ops_failed += 1
                self.error(f"event:{_reason(reply)}")
            if conn.t0:
                self.op_hist.record((now - conn.t0) // 1000)
                conn.t0 = 0
        else:
            self.error("protocol:unknown_ref")

    # Connecting.

    def new_conn(self, idx: int, uid: str, room: int, topics: list[str]) -> Conn:
        conn = Conn(self, idx, uid, room, tuple(expand(t, uid, room) for t in topics))
        token = self.verifier.issue({"sub": uid, "role": "student"}, ttl=self.ttl)
        head, tail = self.request_head
        conn.req = head + token.encode() + tail
        return conn

    async def open_conn(self, conn: Conn) -> bool:
        """Connect, upgrade and join every topic; False (with the error counted) when any step failed."""
        src = self.src_addrs[conn.idx % len(self.src_addrs)] if conn.idx >= 0 else self._churn_src()
        conn.waiter = self.loop.create_future()
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self.loop.create_connection(
                    lambda: conn, self.host, self.port, local_addr=(src, 0) if src else None
                )
                await conn.waiter
            return True
        except TimeoutError:
            stage = {CONNECTING: "tcp", HANDSHAKE: "upgrade", OPEN: "join"}.get(conn.state, "close")
            self.error(f"timeout:{stage}")
            conn.abort()
        except OSError as exc:
            # After the TCP connect, failures were counted where they happened (upgrade refused,
            # join refused, closed by the server, connection lost).
            if conn.state == CONNECTING:
                self.error(f"connect:{errno.errorcode.get(exc.errno or 0, type(exc).__name__)}")
        finally:
            conn.waiter = None
        return False

    def _churn_src(self) -> str | None:
        return random.choice(self.src_addrs)

    async def connect_all(self) -> None:
        start, end = self.cfg["start"], self.cfg["end"]
        indexes = iter(range(start, end))
        groups = self.hb_groups

        give_up = self.cfg.get("give_up_after") or max(100, (end - start) // 50)

        async def runner() -> None:
            for idx in indexes:
                if self.connect_failures >= give_up:
                    # The server stopped taking sockets (its open-files limit, a full accept queue):
                    # waiting out a timeout for each of the rest would only take time.
                    self.not_attempted += 1
                    continue
                uid = f"loadtest-u{idx}"
                conn = self.new_conn(idx, uid, room_of(self.starts, idx), self.topics)
                self.conns.append(conn)
                if await self.open_conn(conn):
                    groups[idx % len(groups)].append(conn)
                else:
                    self.connect_failures += 1

        await asyncio.gather(*(runner() for _ in range(min(self.concurrency, max(1, end - start)))))
        self.connecting_done = True
        self.rss_kb_joined = self_rss_kb()
        # Everything made so far lives until the end: keep it out of the collector's scans.
        gc.collect()
        gc.freeze()

    # Periodic work.

    async def heartbeats(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(self.hb_tick)
            now = _now_ns()
            frame_text = HEARTBEAT
            for conn in self.hb_groups[tick % len(self.hb_groups)]:
                if conn.state == OPEN:
                    conn.hb_t = now
                    conn.send(frame_text)
                    self.heartbeats_sent += 1
            tick += 1

    async def lag_monitor(self) -> None:
        interval = 0.05
        while True:
            t = time.monotonic()
            await asyncio.sleep(interval)
            lag = time.monotonic() - t - interval
            phase = self.phase
            if lag > phase.lag_max:
                phase.lag_max = lag
            if lag > 0.05:
                phase.lag_over_50ms += 1

    def progress(self) -> dict[str, Any]:
        return {
            "type": "progress",
            "wid": self.wid,
            "connected": self.connected,
            "joined": self.joined,
            "open": self.open,
            "join_failures": self.joins_failed,
            "joins_ok": self.joins_ok,
            "connect_failures": self.connect_failures,
            "not_attempted": self.not_attempted,
            "errors": sum(self.errors.values()),
            "frames": self.frames,
            "ticks": self.ticks,
            "churn": dict(self.churn),
            "ops_ok": self.ops_ok,
        }

    # Scenario activity during `run`.

    async def pace(self, rate: float, duration: float, action: Callable[[int], None]) -> None:
        """Call action(k) at t0 + k/rate for k = 0 … round(rate * duration) - 1 (an open loop: an
        action whose time has come runs even if the loop fell behind), then wait out the duration."""
        t0 = time.monotonic()
        total = round(rate * duration) if rate > 0 else 0
        k = 0
        while k < total:
            elapsed = time.monotonic() - t0
            due = min(total, int(elapsed * rate) + 1)
            while k < due:
                action(k)
                k += 1
            if k < total:
                await asyncio.sleep(max(0.0, k / rate - (time.monotonic() - t0)))
        rest = duration - (time.monotonic() - t0)
        if rest > 0:
            await asyncio.sleep(rest)

    def _live(self) -> list[Conn]:
        return [c for c in self.conns if c.ok and c.state == OPEN]

    def presence_op(self, live: list[Conn], topic_index: int) -> Callable[[int], None]:
        statuses = (b'{"status":"idle"}', b'{"status":"online"}')

        def act(k: int) -> None:
            if not live:
                return
            conn = live[k % len(live)]
            if conn.state != OPEN or conn.t0:
                self.ops_skipped += 1
                return
            status = statuses[(k // len(live)) % 2]
            i = topic_index
            conn.t0 = _now_ns()
            conn.send(b'["j%d","e",%s,"presence_update",%s]' % (i, _dumps(conn.topics[i]), status))
            self.ops_sent += 1

        return act

    def track_op(self, live: list[Conn], topic_index: int) -> Callable[[int], None]:
        def act(k: int) -> None:
            if not live:
                return
            conn = live[k % len(live)]
            if conn.state != OPEN or conn.t0:
                self.ops_skipped += 1
                return
            event = {
                "id": f"lt-{self.run_id}-{self.wid}-{k}",
                "type": "practice_completed",
                "user_id": conn.uid,
                "props": {"subject": f"loadtest-{conn.room}", "source": "loadtest"},
            }
            conn.t0 = _now_ns()
            conn.send(_dumps([f"j{topic_index}", "e", conn.topics[topic_index], "track", event]))
            self.ops_sent += 1

        return act

    def churn_op(self, churn: dict[str, Any]) -> Callable[[int], None]:
        def act(k: int) -> None:
            task = self.loop.create_task(self.churn_one(k, churn))
            self._churn_tasks.add(task)
            task.add_done_callback(self._churn_tasks.discard)

        return act

    async def churn_one(self, k: int, churn: dict[str, Any]) -> None:
        """A short-lived socket: connect, join, hold, leave, disconnect."""
        counts = self.churn
        counts["started"] += 1
        uid = f"loadtest-c{self.run_id}-{self.wid}-{k}"
        room = (k * self.procs + self.wid) % self.n_rooms
        conn = self.new_conn(-1, uid, room, churn["topics"])
        if not await self.open_conn(conn):
            counts["failed"] += 1
            if conn.state == OPEN:
                counts["connected"] += 1
                conn.close()
            return
        counts["connected"] += 1
        counts["joined"] += 1
        try:
            await asyncio.sleep(churn["hold"])
            if conn.state != OPEN:
                counts["failed"] += 1
                return
            conn.waiter = self.loop.create_future()
            conn.leave_all()
            async with asyncio.timeout(self.connect_timeout):
                await conn.waiter
            counts["left"] += 1
            conn.waiter = self.loop.create_future()
            conn.close()
            async with asyncio.timeout(self.connect_timeout):
                with contextlib.suppress(ConnectionError):
                    await conn.waiter
            counts["disconnected"] += 1
        except (TimeoutError, ConnectionError):
            counts["failed"] += 1
            self.error("churn:timeout" if conn.state != CLOSED else "churn:closed")
            conn.abort()
        finally:
            conn.waiter = None

    async def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        duration = float(spec["duration"])
        live = self._live()
        rate = float(spec.get("ops_rate", 0.0))
        before = self.snapshot()
        # Latencies of this phase only (the connect phase's heartbeats and joins are reported apart).
        self.hb_hist = Hist()
        self.op_hist = Hist()
        if self.scenario == "rooms":
            await self.pace(rate, duration, self.presence_op(live, spec["op_topic_index"]))
        elif self.scenario == "mixed":
            await self.pace(rate, duration, self.track_op(live, spec["op_topic_index"]))
        elif self.scenario == "churn":
            await self.pace(float(spec["churn"]["rate"]), duration, self.churn_op(spec["churn"]))
            if self._churn_tasks:
                await asyncio.wait(set(self._churn_tasks), timeout=spec["churn"]["hold"] + 15)
        else:
            await asyncio.sleep(duration)
        # Replies to the last operations.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self.ops_ok + self.ops_failed < self.ops_sent:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return {"type": "ran", "wid": self.wid, "delta": self.delta(before)}

    async def drain(self, last_seq: int, timeout: float) -> dict[str, Any]:
        """Wait until every joined socket has broadcast `last_seq` (or `timeout` s without progress)."""
        subscribers = [c for c in self.conns if c.ok]
        last_progress = time.monotonic()
        seen = self.ticks
        while True:
            if all(c.last_seq >= last_seq or c.state != OPEN for c in subscribers):
                break
            await asyncio.sleep(0.02)
            if self.ticks != seen:
                seen = self.ticks
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > timeout:
                break
        missing = sum(max(0, last_seq - c.last_seq) for c in subscribers)
        return {
            "type": "drained",
            "wid": self.wid,
            "subscribers": len(subscribers),
            "complete_sockets": sum(1 for c in subscribers if c.last_seq >= last_seq),
            "missing_frames": missing,
            "last_tick_ns": self.last_tick_ns,
        }

    def snapshot(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "bytes_in": self.bytes_in,
            "ticks": self.ticks,
            "joins_ok": self.joins_ok,
            "connect_failures": self.connect_failures,
            "not_attempted": self.not_attempted,
            "joins_failed": self.joins_failed,
            "leaves_ok": self.leaves_ok,
            "ops_sent": self.ops_sent,
            "ops_ok": self.ops_ok,
            "ops_failed": self.ops_failed,
            "ops_skipped": self.ops_skipped,
            "heartbeats_sent": self.heartbeats_sent,
            "heartbeat_replies": self.heartbeat_replies,
            "churn": dict(self.churn),
            "by_event": dict(self.by_event),
            "connected": self.connected,
        }

    def delta(self, before: dict[str, Any]) -> dict[str, Any]:
        after = self.snapshot()
        out: dict[str, Any] = {}
        for key, value in after.items():
            if isinstance(value, dict):
                out[key] = {k: v - before[key].get(k, 0) for k, v in value.items()}
            else:
                out[key] = value - before[key]
        return out

    def report(self) -> dict[str, Any]:
        return {
            "type": "report",
            "wid": self.wid,
            "pid": os.getpid(),
            "sockets": self.cfg["end"] - self.cfg["start"],
            **self.snapshot(),
            "joined": self.joined,
            "open": self.open,
            "gaps": self.gaps,
            "out_of_order": self.out_of_order,
            "errors": dict(self.errors),
            "close_codes": dict(self.close_codes),
            "local_addrs": dict(self.local_addrs),
            "hists": {
                "tick": self.tick_hist.export(),
                "connect": self.connect_hist.export(),
                "join": self.join_hist.export(),
                "leave": self.leave_hist.export(),
                "op": self.op_hist.export(),
                "heartbeat": self.hb_hist.export(),
            },
            "phases": self.phases,
            "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
            # VmRSS, not ru_maxrss: that one survives execve and so holds the driver's size at fork.
            "rss_kb_start": self.rss_kb_start,
            "rss_kb_joined": self.rss_kb_joined,
            "rss_kb": self_rss_kb(),
        }

    async def close_all(self, timeout: float = 10.0) -> dict[str, Any]:
        for conn in self.conns:
            conn.close()
        deadline = time.monotonic() + timeout
        while self.open > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        stuck = self.open
        for conn in self.conns:
            if conn.state != CLOSED:
                conn.abort()
        await asyncio.sleep(0)
        return {
            "type": "closed",
            "wid": self.wid,
            "close_codes_at_shutdown": dict(self.closes_by_client),
            "not_closed_in_time": stuck,
        }

    def mark(self, name: str) -> None:
        self.phases.append(self.phase.end())
        self.phase = Phase(name)


def self_rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _reason(reply: Any) -> str:
    if isinstance(reply, dict):
        response = reply.get("response")
        if isinstance(response, dict) and isinstance(response.get("reason"), str):
            return response["reason"][:60]
        status = reply.get("status")
        if isinstance(status, str):
            return status
    return "malformed_reply"


def raise_nofile(needed: int) -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to `needed` (and the hard limit too, when this process may raise it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft, hard
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
        return resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def emit(message: dict[str, Any]) -> None:
    sys.stdout.buffer.write(_dumps(message) + b"\n")
    sys.stdout.buffer.flush()


async def serve() -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    config = _loads(await reader.readline())
    raise_nofile(config["end"] - config["start"] + config.get("extra_fds", 256))
    gc.set_threshold(100_000, *gc.get_threshold()[1:])
    worker = Worker(config)
    emit({"type": "ready", "wid": worker.wid, "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE))})
    background = [loop.create_task(worker.lag_monitor()), loop.create_task(worker.heartbeats())]

    async def progress() -> None:
        while True:
            await asyncio.sleep(0.5)
            emit(worker.progress())

    background.append(loop.create_task(progress()))
    jobs: set[asyncio.Task[None]] = set()

    async def handle(command: dict[str, Any]) -> None:
        cmd = command["cmd"]
        if cmd == "connect":
            worker.mark("connect")
            await worker.connect_all()
            emit({**worker.progress(), "type": "connected", "by_event": dict(worker.by_event)})
        elif cmd == "mark":
            worker.mark(command["name"])
            emit({"type": "marked", "wid": worker.wid})
        elif cmd == "run":
            worker.mark("run")
            emit(await worker.run(command))
        elif cmd == "drain":
            worker.mark("drain")
            emit(await worker.drain(command["last_seq"], command["timeout"]))
        elif cmd == "report":
            worker.mark("report")
            emit(worker.report())
        elif cmd == "close":
            emit(await worker.close_all())

    while line := await reader.readline():
        command = _loads(line)
        if command["cmd"] == "quit":
            break
        task = loop.create_task(handle(command))
        jobs.add(task)
        task.add_done_callback(jobs.discard)
        task.add_done_callback(_crash_on_error)
    for task in background:
        task.cancel()
    return 0


def _crash_on_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        emit({"type": "crashed", "error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1)


# A measurement of the client's own frame path, without a server: `--bench-parser`.


def bench_parser(frames: int = 200_000, per_read: int = 8) -> dict[str, Any]:
    """Feed `frames` broadcast frames to one Conn in reads of `per_read` frames and in split reads;
    returns frames/s on one core for each."""

    class _Transport:
        def write(self, data: bytes) -> None:
            pass

        def get_extra_info(self, name: str) -> Any:
            return ("127.0.0.1", 0)

    loop = asyncio.new_event_loop()
    results: dict[str, Any] = {}
    try:
        asyncio.set_event_loop(loop)

        async def make() -> Worker:
            return Worker(_bench_config())

        worker = loop.run_until_complete(make())
        conn = Conn(worker, 0, "u", 0, ("feed:subject:loadtest",))
        conn.tr = _Transport()
        conn.state = OPEN
        t_sent = _now_ns()
        stream = [
            frame_of(
                _dumps([None, None, "feed:subject:loadtest", TICK_EVENT, {"seq": i + 1, "sent_at": t_sent}])
            )
            for i in range(frames)
        ]
        for name, chunks in (
            ("whole_reads", _chunks(stream, per_read)),
            ("split_reads", _split(b"".join(stream), 1000)),
        ):
            conn.last_seq = 0
            worker.ticks = worker.gaps = 0
            worker.tick_hist = Hist()
            t0 = time.process_time()
            for chunk in chunks:
                conn.data_received(chunk)
            cpu = time.process_time() - t0
            assert worker.ticks == frames and worker.gaps == 0, (worker.ticks, worker.gaps)
            results[name] = {"frames": frames, "cpu_s": round(cpu, 3), "frames_per_s": round(frames / cpu)}
    finally:
        loop.close()
    return results


def _bench_config() -> dict[str, Any]:
    return {
        "wid": 0,
        "procs": 1,
        "host": "127.0.0.1",
        "port": 1,
        "host_header": "127.0.0.1:1",
        "path": "/socket/websocket",
        "src_addrs": [None],
        "topics": ["feed:subject:loadtest"],
        "scenario": "broadcast",
        "heartbeat": 30.0,
        "connect_concurrency": 1,
        "connect_timeout": 1.0,
        "run_id": "bench",
        "secret": "bench-parser-only",
        "ttl": 60,
        "n": 1,
        "room_min": 10,
        "room_max": 50,
        "seed": 1,
        "start": 0,
        "end": 1,
    }


def frame_of(payload: bytes, opcode: int = 0x1, fin: bool = True) -> bytes:
    """An unmasked server frame (for tests and the parser benchmark)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, n))
    elif n < 65536:
        head = bytes((b0, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, 127)) + n.to_bytes(8, "big")
    return head + payload


def _chunks(frames: list[bytes], per_read: int) -> list[bytes]:
    return [b"".join(frames[i : i + per_read]) for i in range(0, len(frames), per_read)]


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def main() -> int:
    if "--bench-parser" in sys.argv[1:]:
        print(orjson.dumps(bench_parser(), option=orjson.OPT_INDENT_2).decode())
        return 0
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve())


if __name__ == "__main__":
    sys.exit(main())
