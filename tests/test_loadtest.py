"""The load tester (`viral-engine loadtest`, bench/loadtest.py): every scenario, small, against a real
`viral-engine serve`; its loopback-only rule; and its WebSocket client's frame parser and histograms
in process. No timing assertions: the numbers it measures are only checked for being reported."""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from servers import ROOT, SECRET, ServerProcess

from bench import loadtest
from bench.loadtest_worker import (
    CLOSED,
    OPEN,
    TICK_EVENT,
    Conn,
    Hist,
    Worker,
    _bench_config,
    bin_bounds,
    bin_index,
    frame_of,
    hist_summary,
    merge_hist_exports,
)


@pytest.fixture(scope="module")
def lt_server(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Iterator[ServerProcess]:
    """One server for the scenario runs (each run uses its own users and topics)."""
    tmp = tmp_path_factory.mktemp("loadtest")
    shutil.copy(sqlite_template, tmp / "lt.db")
    server = ServerProcess(tmp, {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/lt.db"}).start()
    yield server
    server.kill()


def loadtest_cmd(server: ServerProcess, *args: str, cli: bool = False) -> list[str]:
    """The command line; `cli`: through `viral-engine loadtest` (web.cli), else `python -m bench.loadtest`
    (the same main(), without the 2 s of importing the web app that web/__init__.py costs)."""
    return [
        sys.executable,
        *(("-m", "web.cli", "loadtest") if cli else ("-m", "bench.loadtest")),
        *("--url", f"ws://127.0.0.1:{server.port}", "--secret", SECRET),
        *("--json", "--no-save", "--procs", "2", "--settle", "1"),
        *args,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def run_loadtest(server: ServerProcess, *args: str, timeout: float = 90) -> dict[str, Any]:
    proc = subprocess.run(
        loadtest_cmd(server, *args), capture_output=True, timeout=timeout, env=_env(), cwd=ROOT
    )
    return parse_output(proc.returncode, proc.stdout, proc.stderr)


def parse_output(code: int, stdout: bytes, stderr: bytes) -> dict[str, Any]:
    lines = stdout.decode().splitlines()
    assert len(lines) == 1, (
        f"--json prints exactly one line, got {stdout[:2000]!r}; stderr {stderr[-2000:]!r}"
    )
    result = orjson.loads(lines[0])
    assert isinstance(result, dict)
    assert code == (0 if result["ok"] else 1), (code, stderr[-2000:])
    return result


def assert_clean(result: dict[str, Any], sockets: int) -> None:
    assert result["connect"]["joined"] == sockets, result["connect"]
    assert result["connect"]["join_failures"] == 0
    assert result["errors"] == {}, result["errors"]
    assert result["close_codes"] == {}, result["close_codes"]  # nothing closed by the server
    assert result["close_codes_at_shutdown"].get("1000", 0) >= sockets
    assert result["ok"] is True
    workers = result["client"]["workers"]
    assert len(workers) == 2 and sum(w["sockets"] for w in workers) == sockets
    for worker in workers:  # the client's own CPU, per phase, is reported
        assert worker["run"]["cpu_s"] >= 0 and worker["run"]["wall_s"] > 0
        assert 0 <= worker["run"]["utilisation"]


def server_side_peers(port: int) -> dict[str, int]:
    """Established connections to `port` as the kernel lists them: remote (source) address → count."""
    peers: dict[str, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if state != "01" or int(local.split(":")[1], 16) != port:
            continue
        address = str(ipaddress.IPv4Address(bytes.fromhex(remote.split(":")[0])[::-1]))
        peers[address] = peers.get(address, 0) + 1
    return peers


# The scenarios, end to end.


def test_idle_joins_every_socket_from_spread_addresses_and_reports_memory(server_factory: Any) -> None:
    server = server_factory()  # a fresh server: its RSS grows with the sockets
    n = 400
    proc = subprocess.Popen(
        loadtest_cmd(server, "--scenario", "idle", "--sockets", str(n), "--duration", "3", cli=True),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        cwd=ROOT,
    )
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        peers = server_side_peers(server.port)
        if sum(peers.values()) > sum(seen.values()):
            seen = peers
        if sum(seen.values()) >= n:
            break
        time.sleep(0.1)
    stdout, stderr = proc.communicate(timeout=60)
    result = parse_output(proc.returncode, stdout, stderr)
    assert_clean(result, n)
    # The server's view: the connections came from many 127.x.y.z source addresses, not one.
    assert sum(seen.values()) >= n, seen
    assert len(seen) >= 8, seen
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network("127.0.0.0/8") for a in seen)
    # And the client's view of its own local addresses says the same.
    used = result["source_addresses"]["used"]
    assert len(used) == 8 and sum(used.values()) == n
    assert max(used.values()) - min(used.values()) <= 1
    # Memory: from the server's /metrics, before and after every socket joined.
    server_figures = result["server"]
    assert server_figures["sockets_joined"] - server_figures["sockets_before"] == n
    assert server_figures["rss_per_socket_kb"] > 0
    assert result["run"]["heartbeats_sent"] > 0
    assert result["topics"] == ["user:{user}"]


def test_broadcast_delivers_every_publish_to_every_socket_in_order(lt_server: ServerProcess) -> None:
    n = 400
    result = run_loadtest(lt_server, "--scenario", "broadcast", "--sockets", str(n), "--duration", "3")
    assert_clean(result, n)
    b = result["broadcast"]
    assert b["topic"] == "feed:subject:loadtest"
    assert b["publishes"] == 30  # 10/s by default, for 3 s
    assert b["subscribers"] == n and b["complete_sockets"] == n
    assert b["delivered_frames"] == b["expected_frames"] == n * b["publishes"]
    assert b["missing_frames"] == b["gaps"] == b["out_of_order"] == 0
    latency = b["latency_ms"]
    assert latency["count"] == b["delivered_frames"]
    assert latency["p50"] is not None and latency["p50"] <= latency["p99"] <= latency["max"] + 0.01
    assert b["delivered_frames_per_s"] > 0
    assert result["server"]["run_frames_out"] >= b["delivered_frames"]


def test_rooms_spread_users_over_presence_rooms_with_traffic(lt_server: ServerProcess) -> None:
    n = 300
    result = run_loadtest(
        lt_server, "--scenario", "rooms", "--sockets", str(n), "--duration", "3", "--rate", "30"
    )
    assert_clean(result, n)
    assert n / 50 <= result["rooms"] <= n / 10
    assert result["frames_by_event_total"]["presence_state"] == n  # one per joiner
    assert result["run"]["frames_by_event"].get("presence_diff", 0) > 0  # the updates' diffs
    ops = result["run"]["ops"]
    assert ops["kind"] == "presence_update"
    assert ops["ok"] > 0 and ops["failed"] == 0
    assert ops["reply_latency_ms"]["count"] == ops["ok"]


def test_churn_connects_joins_leaves_and_disconnects(lt_server: ServerProcess) -> None:
    n = 200
    result = run_loadtest(
        lt_server,
        *("--scenario", "churn", "--sockets", str(n), "--duration", "3"),
        *("--churn-rate", "20", "--churn-hold", "0.5"),
    )
    assert_clean(result, n)
    churn = result["churn"]
    assert churn["started"] == 60  # 20/s for 3 s
    assert churn["connected"] == churn["joined"] == churn["left"] == churn["disconnected"] == churn["started"]
    assert churn["failed"] == 0
    assert churn["leave_latency_ms"]["count"] == churn["left"]
    assert churn["joins_per_s"] > 0


def test_mixed_student_behaviour(lt_server: ServerProcess) -> None:
    n = 200
    result = run_loadtest(
        lt_server, "--scenario", "mixed", "--sockets", str(n), "--duration", "4", "--rate", "10"
    )
    assert result["connect"]["joined"] == n and result["connect"]["join_failures"] == 0
    assert len(result["topics"]) == 4
    assert result["connect"]["joins_per_s"] > 0
    assert result["close_codes"] == {}
    ops = result["run"]["ops"]
    assert ops["kind"].startswith("track")
    assert ops["sent"] == 40  # 10/s for 4 s, each answered
    assert ops["ok"] + ops["failed"] == ops["sent"] and ops["ok"] > 0
    # A refusal by the server's event store would be reported as such (and fail the run), not hidden.
    assert all(kind.startswith("event:") for kind in result["errors"]), result["errors"]
    assert result["ok"] is (not result["errors"])
    # The events come back as feed items and leaderboard updates to the rooms.
    pushes = result["run"]["frames_by_event"]
    assert pushes.get("new_activity", 0) + pushes.get("leaderboard_update", 0) > 0, pushes


# What it refuses.


def test_refuses_a_non_loopback_address() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "web.cli", "loadtest", "--url", "ws://10.1.2.3:80", "--secret", "k"],
        capture_output=True,
        timeout=30,
        env=_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stdout == b""
    assert b"refusing to load-test ws://10.1.2.3:80" in proc.stderr
    assert b"not a loopback address" in proc.stderr


def test_refuses_a_host_name_that_resolves_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {
        "db.internal": ["10.0.0.5"],
        "half.example": ["127.0.0.1", "192.168.1.9"],  # every address must be loopback
        "localhost": ["127.0.0.1", "::1"],
    }

    def fake_getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        try:
            answers[host] = [str(ipaddress.ip_address(host))]  # a literal resolves to itself
        except ValueError:
            pass
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in answers[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    for url in ("ws://db.internal:8000", "ws://half.example:8000", "ws://nowhere.invalid:1"):
        with pytest.raises(loadtest.Refused, match=r"not a loopback address|cannot resolve"):
            loadtest.check_target(url)
        assert loadtest.main(["--url", url, "--secret", "k", "--json"]) == 2
    for url in ("ws://[::ffff:10.0.0.1]:80", "http://[::ffff:8.8.8.8]/", "ws://192.168.0.1:80"):
        with pytest.raises(loadtest.Refused, match="not a loopback address"):
            loadtest.check_target(url)
    with pytest.raises(loadtest.Refused, match="wss:// is not supported"):
        loadtest.check_target("wss://127.0.0.1:443")
    target = loadtest.check_target("ws://localhost:8000")
    assert target.connect_host == "127.0.0.1" and target.path == "/socket/websocket"
    assert loadtest.check_target("ws://127.9.9.9:1/custom/websocket").path == "/custom/websocket"
    assert loadtest.check_target("ws://[::ffff:127.0.0.1]:1").connect_host == "127.0.0.1"
    assert loadtest.check_target("ws://[::1]:1").connect_host == "::1"


def test_a_key_that_is_not_the_servers_is_refused_before_connecting(lt_server: ServerProcess) -> None:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "bench.loadtest"),
            *("--url", f"ws://127.0.0.1:{lt_server.port}", "--secret", "not-the-server-key", "--no-save"),
        ],
        capture_output=True,
        timeout=30,
        env=_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert b"not the server's SECRET_KEY" in proc.stderr


# The client's frame parser, in process.


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.1.3", 40000)


def unmask(frame: bytes) -> tuple[int, bytes]:
    """(first byte, payload) of one masked client frame."""
    length = frame[1] & 0x7F
    head = 2
    if length == 126:
        length, head = int.from_bytes(frame[2:4], "big"), 4
    mask = frame[head : head + 4]
    body = frame[head + 4 : head + 4 + length]
    return frame[0], bytes(b ^ mask[i % 4] for i, b in enumerate(body))


def server_stream() -> tuple[bytes, int]:
    """A server's byte stream: ticks, a 16-bit and a 64-bit length, a fragmented message, a ping, a
    close. Returns (bytes, number of ticks)."""
    t = time.monotonic_ns()
    frames = []
    for seq in range(1, 21):
        frames.append(frame_of(orjson.dumps([None, None, "t", TICK_EVENT, {"seq": seq, "sent_at": t}])))
    frames.append(frame_of(orjson.dumps([None, None, "t", "medium", {"pad": "x" * 300}])))
    frames.append(frame_of(orjson.dumps([None, None, "t", "large", {"pad": "y" * 70_000}])))
    whole = orjson.dumps([None, None, "t", "fragmented", {"pad": "z" * 500}])
    frames.append(frame_of(whole[:100], fin=False))
    frames.append(frame_of(whole[100:400], opcode=0x0, fin=False))
    frames.append(frame_of(b"hi", opcode=0x9))  # a ping between fragments, as RFC 6455 allows
    frames.append(frame_of(whole[400:], opcode=0x0))
    frames.append(frame_of(orjson.dumps([None, None, "t", TICK_EVENT, {"seq": 21, "sent_at": t}])))
    frames.append(frame_of((1001).to_bytes(2, "big") + b"going away", opcode=0x8))
    return b"".join(frames), 21


async def make_conn() -> tuple[Worker, Conn, FakeTransport]:
    worker = Worker(_bench_config())
    conn = Conn(worker, 0, "u", 0, ("t",))
    transport = FakeTransport()
    conn.tr = transport
    conn.state = OPEN
    worker.open = 1
    return worker, conn, transport


@pytest.mark.parametrize("split", ["whole", "bytewise", "random"])
async def test_client_parses_frames_in_any_split(split: str) -> None:
    stream, ticks = server_stream()
    worker, conn, transport = await make_conn()
    if split == "whole":
        chunks = [stream]
    elif split == "bytewise":
        chunks = [stream[i : i + 1] for i in range(len(stream))]
    else:
        rng = random.Random(7)
        chunks, i = [], 0
        while i < len(stream):
            size = rng.choice([1, 2, 3, 5, 9, 64, 700, 5000])
            chunks.append(stream[i : i + size])
            i += size
    for chunk in chunks:
        conn.data_received(chunk)
    assert worker.ticks == ticks and worker.gaps == 0 and worker.out_of_order == 0
    assert conn.last_seq == 21
    assert worker.by_event == {"medium": 1, "large": 1, "fragmented": 1}
    assert worker.frames == ticks + 3
    assert worker.errors == {}
    assert worker.tick_hist.count == ticks
    # The ping was answered with a masked pong carrying its payload, and the close was echoed.
    replies = [unmask(frame) for frame in transport.written]
    assert replies == [(0x8A, b"hi"), (0x88, (1001).to_bytes(2, "big"))]
    assert conn.state == CLOSED and transport.closed
    assert worker.close_codes == {"1001": 1} and worker.open == 0


async def test_client_upgrade_then_frames_in_the_same_read() -> None:
    worker, conn, transport = await make_conn()
    conn.state = 1  # HANDSHAKE
    worker.open = 0
    response = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + worker.expected_accept + b"\r\n\r\n"
    )
    reply = frame_of(orjson.dumps(["j0", "j0", "t", "phx_reply", {"status": "ok", "response": {}}]))
    data = response + reply
    conn.data_received(data[:30])  # the head split over two reads, the join reply right behind it
    conn.data_received(data[30:])
    # The join went out, masked, right after the 101; its reply was parsed from the same read.
    first, payload = unmask(transport.written[0])
    assert first == 0x81 and orjson.loads(payload) == ["j0", "j0", "t", "phx_join", {}]
    assert worker.joins_ok == 1 and worker.joined == 1 and conn.ok
    assert worker.local_addrs == {"127.0.1.3": 1}


async def test_client_refuses_a_bad_upgrade() -> None:
    worker, conn, transport = await make_conn()
    conn.state = 1
    conn.data_received(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
    assert worker.errors == {"upgrade:http_403": 1} and transport.closed
    worker, conn, transport = await make_conn()
    conn.state = 1
    conn.data_received(b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: forged\r\n\r\n")
    assert worker.errors == {"upgrade:bad_accept": 1} and transport.closed


def test_histograms_bin_and_merge() -> None:
    for us in [0, 9, 10, 999, 1000, 1099, 1100, 99_999, 100_000, 109_999, 9_999_999, 10_000_000, 10**9]:
        low, high = bin_bounds(bin_index(us))
        assert low <= us / 1000 < high, us
    a, b = Hist(), Hist()
    for us in range(0, 100_000, 100):  # 0-100 ms in 1,000 samples
        a.record(us)
    b.record(250_000)
    merged = merge_hist_exports([a.export(), b.export(), Hist().export()])
    summary = hist_summary(merged)
    assert summary["count"] == 1001
    assert summary["max"] == 250.0 and summary["min"] == 0.0
    assert 49 <= summary["p50"] <= 51 and 98 <= summary["p99"] <= 100
    assert hist_summary(Hist().export())["p50"] is None
