"""The official Phoenix JavaScript client (npm `phoenix`, with `ws` under Node) works unchanged."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from servers import ROOT, ServerProcess, make_token

JS = ROOT / "tests" / "js"


class NodeClient:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def expect(self, event: str, timeout: float = 10.0) -> dict:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not line:
                stderr = (await self.proc.stderr.read()).decode() if self.proc.stderr else ""
                raise AssertionError(f"node client exited before {event!r}: {stderr}")
            message = json.loads(line)
            if message["event"] == event:
                return message

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()

    async def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()


@pytest.fixture
def node() -> str:
    path = shutil.which("node")
    if path is None or not (JS / "node_modules" / "phoenix").exists():
        pytest.fail("node and tests/js/node_modules are required: run `make node` (make test does it)")
    return path


async def _client(
    node: str, server: ServerProcess, token: str, topic: str, mode: str = "params"
) -> NodeClient:
    proc = await asyncio.create_subprocess_exec(
        node,
        str(JS / "phoenix_client.mjs"),
        f"ws://127.0.0.1:{server.port}/socket",
        token,
        topic,
        mode,
        cwd=JS,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return NodeClient(proc)


async def test_phoenix_js_joins_receives_leaves_and_reconnects_after_restart(
    node, tmp_path: Path, server_database: str
):
    env = {"DATABASE_URL": server_database}
    server = ServerProcess(tmp_path, env).start()
    client = await _client(node, server, make_token("u1"), "user:u1")
    try:
        assert (await client.expect("joined"))["count"] == 1
        assert (await asyncio.to_thread(server.publish, "user:u1", "nudge", {"n": 1})).status_code == 202
        assert (await client.expect("nudge"))["payload"] == {"n": 1}

        server.terminate()  # SIGTERM: sockets get 1001 and the client starts reconnecting
        assert (await client.expect("close"))["code"] == 1001
        server = ServerProcess(tmp_path, env, port=server.port).start()
        assert (await client.expect("joined", timeout=20))["count"] == 2  # phoenix.js rejoined by itself
        assert (await asyncio.to_thread(server.publish, "user:u1", "nudge", {"n": 2})).status_code == 202
        assert (await client.expect("nudge"))["payload"] == {"n": 2}

        await client.command("leave")
        assert (await client.expect("left"))["state"] == "closed"
        assert (await asyncio.to_thread(server.publish, "user:u1", "nudge", {"n": 3})).json()[
            "local_subscribers"
        ] == 0
        await client.command("exit")
        assert await asyncio.wait_for(client.proc.wait(), 10) == 0
    finally:
        await client.close()
        server.kill()


async def test_phoenix_js_auth_token_in_the_subprotocol(node, server):
    client = await _client(node, server, make_token("u7"), "user:u7", mode="authToken")
    try:
        await client.expect("joined")
        assert (await asyncio.to_thread(server.publish, "user:u7", "nudge", {"ok": True})).status_code == 202
        assert (await client.expect("nudge"))["payload"] == {"ok": True}
    finally:
        await client.close()


async def test_phoenix_js_sees_an_unauthorized_join_as_an_error(node, server):
    client = await _client(node, server, make_token("u1"), "user:someone-else")
    try:
        assert (await client.expect("join_error"))["resp"] == {"reason": "unauthorized"}
    finally:
        await client.close()
