"""The socket under attack: whatever a client sends, the server stays up, answers that client with the
documented error reply or close code, and a well-behaved witness on the same server loses nothing.

Real `viral-engine serve` processes, both WebSocket implementations (`ws_impl`), raw clients that
write bytes no library would. Hypothesis draws the inputs; one server and one witness serve every
example of a test. Each test prints the inputs it tried (`pytest -s`) and checks at the end that no
channel handler raised, nothing crashed in the log and every attacker's socket is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from servers import ServerProcess, make_token

from metrics.events import EVENT_TYPES
from realtime import SocketLimits
from realtime.stats import RealtimeStats
from web.config import SOCKET_LIMIT_VARIABLES, ConfigError, Settings

from .socket_kit import (
    CLOSE_INVALID_PAYLOAD,
    CLOSE_POLICY,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED_DATA,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Closed,
    FuzzRig,
    RawWebSocket,
    Witness,
    close_payload,
    crash_lines,
    fragments,
    frame,
    metrics,
    until_metric,
)

# `make test-soak` sets FUZZ_SCALE=10: ten times the examples of every fuzz test below.
SCALE = max(1, int(os.environ.get("FUZZ_SCALE", "1")))

DEFAULT = SocketLimits()
LIMIT = DEFAULT.max_frame_bytes
# On the websockets-sansio path uvicorn's own WebSocket layer refuses frames this much larger than
# the socket's limit (web.cli.uvicorn_options), the socket layer those in between; the fast path
# refuses them all from the frame header. Every one must get 1009.
WS_LAYER_LIMIT = 4 * LIMIT
FUZZ = settings(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@pytest.fixture
def rig(server: ServerProcess, ws_impl: str) -> Iterator[FuzzRig]:
    """A server with the default limits, and its witness."""
    OUTCOMES.clear()
    fuzz_rig = FuzzRig(server, ws_impl).start()
    yield fuzz_rig
    fuzz_rig.close()


# What a frame must get (README "The protocol", "Backpressure and isolation"; SPEC §6).

# What the frames checked by `expect_outcome` got in the current test (printed in its report).
OUTCOMES: Counter[str] = Counter()


@dataclass(frozen=True)
class Expect:
    kind: str  # "close" | "reply" | "silent"
    code: int = 0
    ref: str = ""


def _ref_ok(value: Any) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def expected(data: bytes, limit: int = LIMIT) -> Expect:
    """The documented outcome of one text frame: a close code, a reply to its ref, or nothing."""
    if len(data) > limit:
        return Expect("close", CLOSE_TOO_BIG)
    try:
        data.decode()
        value = orjson.loads(data)  # RFC 8259 JSON, nesting up to 1024 (the server's parser)
    except (UnicodeDecodeError, orjson.JSONDecodeError):
        return Expect("close", CLOSE_INVALID_PAYLOAD)
    if not isinstance(value, list) or len(value) != 5:
        return Expect("close", CLOSE_INVALID_PAYLOAD)
    join_ref, ref, topic, event, _ = value
    if not (_ref_ok(join_ref) and _ref_ok(ref)):
        return Expect("close", CLOSE_INVALID_PAYLOAD)
    if not (isinstance(topic, str) and topic and isinstance(event, str) and event):
        return Expect("close", CLOSE_INVALID_PAYLOAD)
    return Expect("silent") if ref is None else Expect("reply", ref=str(ref))


def assert_reply_shape(reply: dict[str, Any], sent: bytes) -> None:
    assert reply.get("status") in ("ok", "error"), f"reply {reply!r} to {sent[:200]!r}"
    response = reply.get("response")
    assert isinstance(response, dict), f"reply {reply!r} to {sent[:200]!r}"
    if reply["status"] == "error":
        assert isinstance(response.get("reason"), str) and response["reason"], (
            f"error reply without a reason: {reply!r} to {sent[:200]!r}"
        )


async def expect_outcome(ws: RawWebSocket, data: bytes, outcome: Expect) -> bool:
    """Check what the server did with `data` (already sent); True if the socket is still open."""
    if outcome.kind == "close":
        closed = await ws.closed()
        assert closed.code == outcome.code, f"{data[:200]!r}: expected close {outcome.code}, got {closed}"
        OUTCOMES[f"close {closed.code}"] += 1
        return False
    if outcome.kind == "reply":
        reply = await ws.reply(outcome.ref)
        assert_reply_shape(reply, data)
        OUTCOMES[f"reply {reply['status']}"] += 1
    else:
        OUTCOMES["no reply (ref null)"] += 1
    return True


async def still_answers(ws: RawWebSocket) -> None:
    await ws.send_json([None, "alive?", "phoenix", "heartbeat", {}])
    assert await ws.reply("alive?") == {"status": "ok", "response": {}}


async def goodbye(ws: RawWebSocket, clean: bool) -> None:
    """End the attacker's connection: a proper close handshake, or a TCP reset."""
    if clean and not ws.ended:
        with contextlib.suppress(Closed):
            await ws.send_frame(OP_CLOSE, close_payload(1000))
            await ws.closed(timeout=10)
    ws.abort()


async def attacker(server: ServerProcess, as_witness: bool, join: bool) -> RawWebSocket:
    """A raw client; as the witness's own user (a second tab on the witness's topic) or another."""
    user = "witness" if as_witness else "mallory"
    ws = await RawWebSocket.connect(server.port, make_token(user))
    if join:
        await ws.send_json(["j", "j", f"user:{user}", "phx_join", {}])
        assert (await ws.reply("j"))["status"] == "ok"
    return ws


# Strategies.

KNOWN_TOPICS = [
    "phoenix",
    "user:mallory",
    "user:witness",
    "user:someone-else",
    "presence:global",
    "presence:subject:algebra",
    "presence:subject:",
    "presence:subject:bad subject!",
    "feed:global",
    "feed:subject:algebra",
    "feed:user:mallory",
    "feed:user:witness",
    "feed:nope",
    "leaderboard:algebra:daily",
    "leaderboard:algebra:yearly",
    "challenge:1",
    "rally:r1",
    "dashboard:k_factor",
    "dashboard:experiments",
    "dashboard:experiment:x",
    "dashboard:guardrails",
    "no:such:topic",
]
LOOP_ACTIONS = [
    "challenge",
    "accept_challenge",
    "decline_challenge",
    "submit_challenge",
    "start_rally",
    "invite_to_rally",
    "join_rally",
    "request_rescue",
    "join_rescue",
    "invite_buddy",
    "accept_nudge",
]
KNOWN_EVENTS = [
    "heartbeat",
    "phx_join",
    "phx_leave",
    "phx_reply",
    "phx_close",
    "phx_error",
    "track",
    "react",
    "presence_update",
    *LOOP_ACTIONS,
]
PARAM_KEYS = [
    "type",
    "user_id",
    "ts",
    "id",
    "props",
    "subject",
    "status",
    "hidden",
    "since",
    "epoch",
    "limit",
    "offset",
    "kind",
    "days",
    "friend_id",
    "friend_ids",
    "outside",
    "challenge_id",
    "rally_id",
    "rescue_id",
    "nudge_id",
    "buddy_id",
    "deck_id",
    "score",
    "token",
    "user_ids",
    "minutes",
    "source",
]

leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(["mallory", "witness", "algebra", "cheer", "idle", "2026-01-01T00:00:00Z", ""])
)
keys = st.sampled_from(PARAM_KEYS) | st.text(max_size=12)
json_values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=20,
)
json_objects = st.dictionaries(keys, json_values, max_size=6)


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each drawn `weight` times as often as a weight of 1."""
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(lambda s: s)


# Mostly well-typed, so that most messages get past the envelope checks and reach the channels.
refs = weighted(
    (3, st.none() | st.sampled_from(["1", "2", "j"]) | st.text(max_size=12)),
    (1, st.integers(-(2**63), 2**63 - 1)),
    (1, st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.lists(leaves, max_size=2)),
)
tracked_events = st.fixed_dictionaries(
    {"type": st.sampled_from(sorted(EVENT_TYPES)) | st.text(max_size=10)},
    optional={
        "user_id": st.sampled_from(["mallory", "witness", "x" * 65]) | st.text(max_size=10),
        "props": json_objects,
        "ts": leaves,
        "id": leaves,
        "extra": leaves,
    },
)
payloads = json_values | json_objects | tracked_events
topics = weighted((6, st.sampled_from(KNOWN_TOPICS)), (2, st.text(max_size=40)), (1, json_values))
events = weighted((6, st.sampled_from(KNOWN_EVENTS)), (2, st.text(max_size=30)), (1, json_values))
phoenix_messages = st.tuples(refs, refs, topics, events, payloads).map(list)
# Envelopes the socket accepts, so that the payload reaches the channel behind the topic.
well_typed_messages = st.tuples(
    st.none() | st.sampled_from(["j", "1"]) | st.text(max_size=8),
    st.none() | st.text(max_size=12) | st.integers(-(2**63), 2**63 - 1),
    st.sampled_from(KNOWN_TOPICS) | st.text(min_size=1, max_size=40),
    st.sampled_from(KNOWN_EVENTS) | st.text(min_size=1, max_size=30),
    payloads,
).map(list)
wrong_arity = st.lists(json_values, max_size=9).filter(lambda v: len(v) != 5)
JSON_PUNCTUATION = '[]{}",:0123456789-+.eE \\/ntrufalsn'


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    """A valid-looking message with a few bytes changed: JSON that is almost right."""
    data = bytearray(orjson.dumps(draw(phoenix_messages)))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        char = ord(draw(st.sampled_from(JSON_PUNCTUATION)))
        if op == "replace" and data:
            data[at] = char
        elif op == "insert":
            data.insert(at, char)
        elif op == "delete" and data:
            del data[at]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


random_frames = weighted(
    (8, phoenix_messages.map(orjson.dumps)),
    (1, wrong_arity.map(orjson.dumps)),
    (1, json_values.map(orjson.dumps)),
    (1, st.text(max_size=300).map(str.encode)),
    (2, mutated_messages()),
)


# 1. Random frames: Phoenix-like messages with random refs, topics, events and payloads, arrays of
# the wrong arity or types, any JSON, any text, almost-JSON.


async def run_frames(server: ServerProcess, frames: list[bytes], as_witness: bool, join: bool) -> None:
    ws = await attacker(server, as_witness, join)
    try:
        for data in frames:
            outcome = expected(data)
            await ws.send_text(data)
            if not await expect_outcome(ws, data, outcome):
                return
        await still_answers(ws)
    finally:
        await goodbye(ws, clean=True)


def test_random_frames_get_a_reply_or_a_1007_and_hurt_no_one(rig: FuzzRig) -> None:
    @settings(FUZZ, max_examples=250 * SCALE)
    @given(
        valid=st.lists(well_typed_messages.map(orjson.dumps), max_size=6),
        last=st.none() | random_frames,
        as_witness=st.booleans(),
        join=st.booleans(),
    )
    def fuzz(valid: list[bytes], last: bytes | None, as_witness: bool, join: bool) -> None:
        frames = valid if last is None else [*valid, last]
        rig.example(
            "random frames",
            lambda: run_frames(rig.server, frames, as_witness, join),
            f"frames={frames!r} as_witness={as_witness} join={join}",
        )

    fuzz()
    after = rig.finish()
    rig.report(after, OUTCOMES)
    assert (
        after["viral_realtime_malformed_frames_total"] > rig.baseline["viral_realtime_malformed_frames_total"]
    )


# 2. Frames over WS_MAX_FRAME_BYTES: whole, fragmented, or only announced in the header.

huge_cases = st.one_of(
    st.tuples(st.just("whole"), st.integers(LIMIT + 1, WS_LAYER_LIMIT) | st.integers(LIMIT + 1, LIMIT + 64)),
    st.tuples(st.just("whole"), st.integers(WS_LAYER_LIMIT + 1, WS_LAYER_LIMIT + (1 << 20))),
    st.tuples(st.just("fragmented"), st.integers(LIMIT + 1, 2 * WS_LAYER_LIMIT)),
    st.tuples(st.just("announced"), st.integers(WS_LAYER_LIMIT + 1, 2**63 - 1)),
)


def padded_heartbeat(size: int) -> bytes:
    head = orjson.dumps([None, "big", "phoenix", "heartbeat", {"pad": ""}])
    return head[:-3] + b"x" * (size - len(head)) + head[-3:]


async def run_huge(server: ServerProcess, kind: str, size: int, pieces: int, as_witness: bool) -> None:
    ws = await attacker(server, as_witness, join=as_witness)
    try:
        if kind == "announced":
            # Only the header and a few bytes: the server must refuse on the announced length.
            data = frame(OP_TEXT, b'[null,"1","phoenix"', length=size)
        elif kind == "whole":
            data = frame(OP_TEXT, padded_heartbeat(size))
        else:
            payload = padded_heartbeat(size)
            step = math.ceil(size / pieces)
            data = b"".join(fragments(OP_TEXT, payload, list(range(step, size, step))))
        # The server may stop reading part-way: write in the background, judge by what comes back.
        writing = asyncio.create_task(ws.send_raw(data))
        closed = await ws.closed(timeout=30)
        writing.cancel()
        with contextlib.suppress(asyncio.CancelledError, Closed):
            await writing
        assert closed.code == CLOSE_TOO_BIG, f"{kind} frame of {size} bytes: {closed}"
        assert closed.reason, "a 1009 close must say why"
    finally:
        ws.abort()


def test_frames_over_the_size_limit_are_closed_with_1009(rig: FuzzRig) -> None:
    socket_layer = 0

    @settings(FUZZ, max_examples=30 * SCALE)
    @given(case=huge_cases, pieces=st.integers(2, 40), as_witness=st.booleans())
    def fuzz(case: tuple[str, int], pieces: int, as_witness: bool) -> None:
        nonlocal socket_layer
        kind, size = case
        if kind == "whole" and size <= WS_LAYER_LIMIT:
            socket_layer += 1
        rig.example(
            "huge frames",
            lambda: run_huge(rig.server, kind, size, pieces, as_witness),
            f"{kind} size={size} pieces={pieces} as_witness={as_witness}",
        )

    fuzz()
    after = rig.finish()
    rig.report(after, OUTCOMES)
    counted = (
        after["viral_realtime_oversized_frames_total"] - rig.baseline["viral_realtime_oversized_frames_total"]
    )
    assert counted >= socket_layer, f"{socket_layer} oversized frames refused, {counted} counted"


async def test_a_refused_frame_is_counted_once_as_what_it_is(server_factory: Any, ws_impl: str) -> None:
    """A 1 MiB frame is one oversized frame (and no malformed ones), whichever layer refuses it."""
    server = server_factory(args=("--ws", ws_impl))
    before = await metrics(server)
    ws = await RawWebSocket.connect(server.port, make_token("mallory"))
    writing = asyncio.create_task(ws.send_raw(frame(OP_TEXT, padded_heartbeat(1 << 20))))
    assert (await ws.closed()).code == CLOSE_TOO_BIG
    with contextlib.suppress(Closed):
        await writing
    ws.abort()
    await until_metric(server, "viral_realtime_sockets", lambda v: v == 0)
    after = await metrics(server)
    grew = {
        name: after[f"viral_realtime_{name}_total"] - before[f"viral_realtime_{name}_total"]
        for name in ("oversized_frames", "malformed_frames")
    }
    assert grew == {"oversized_frames": 1, "malformed_frames": 0}


# 3. Deep JSON: nesting from 1 to 100,000 levels, as the whole frame or inside a payload.

depths = st.one_of(
    st.integers(1, 300),
    st.integers(250, 260),
    st.integers(1015, 1030),
    st.integers(1, 100_000),
    st.sampled_from([10_000, 32_000, 100_000]),
)


def nested(depth: int, container: str) -> bytes:
    if container == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


DEEP_PLACES = {
    # where: (join first?, topic to join first, frame around the nested value)
    "frame": (None, b"%s"),
    "heartbeat": (None, b'[null,"d","phoenix","heartbeat",%s]'),
    "join": (None, b'["d","d","user:mallory","phx_join",{"deep":%s}]'),
    "track": (
        "user:mallory",
        b'["j","d","user:mallory","track",{"type":"session_started","user_id":"mallory",'
        b'"props":{"subject":"algebra","deep":%s}}]',
    ),
    "track_payload": ("user:mallory", b'["j","d","user:mallory","track",%s]'),
    "presence_update": (
        "presence:subject:algebra",
        b'["j","d","presence:subject:algebra","presence_update",%s]',
    ),
    "loop_action": ("user:mallory", b'["j","d","user:mallory","challenge",{"friend_id":%s}]'),
    "react": ("feed:global", b'["j","d","feed:global","react",{"offset":%s,"kind":"cheer"}]'),
    "topic": (None, b'["d","d",%s,"phx_join",{}]'),
}


async def run_deep(server: ServerProcess, depth: int, container: str, place: str) -> None:
    topic, template = DEEP_PLACES[place]
    ws = await RawWebSocket.connect(server.port, make_token("mallory"))
    try:
        if topic is not None:
            await ws.send_json(["j", "j", topic, "phx_join", {}])
            assert (await ws.reply("j"))["status"] == "ok"
        data = template % nested(depth, container)
        outcome = expected(data)
        writing = asyncio.create_task(ws.send_text(data))
        if await expect_outcome(ws, data, outcome):
            await still_answers(ws)
        with contextlib.suppress(Closed):
            await writing
    finally:
        await goodbye(ws, clean=True)


def test_deeply_nested_json_gets_a_reply_or_a_close_never_a_crash(rig: FuzzRig) -> None:
    @settings(FUZZ, max_examples=60 * SCALE)
    @given(
        depth=depths,
        container=st.sampled_from(["array", "object"]),
        place=st.sampled_from(sorted(DEEP_PLACES)),
    )
    # Always tried: event props the encoder cannot store (they crashed the channel, now "invalid
    # event"), the parser's own limit, and 100,000 levels.
    @example(depth=300, container="object", place="track")
    @example(depth=1021, container="array", place="heartbeat")
    @example(depth=1030, container="array", place="heartbeat")
    @example(depth=100_000, container="array", place="frame")
    def fuzz(depth: int, container: str, place: str) -> None:
        rig.example(
            "deep json",
            lambda: run_deep(rig.server, depth, container, place),
            f"depth={depth} container={container} place={place}",
        )

    fuzz()
    rig.report(rig.finish(), OUTCOMES)


# 4. Invalid UTF-8 in text frames, whole or split across fragments anywhere.

INVALID_UTF8 = [
    b"\xff",
    b"\xfe",
    b"\x80",
    b"\xc0\xaf",  # overlong "/"
    b"\xe0\x80\xaf",
    b"\xed\xa0\x80",  # a UTF-16 surrogate
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\xe2\x82",  # truncated
    b"\xf8\x88\x80\x80\x80",
]
invalid_sequences = st.sampled_from(INVALID_UTF8) | st.binary(min_size=1, max_size=6).filter(
    lambda b: not _decodes(b)
)


def _decodes(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


async def run_utf8(
    server: ServerProcess, text: str, bad: bytes | None, at: int, cuts: list[int], as_witness: bool
) -> None:
    ws = await attacker(server, as_witness, join=as_witness)
    try:
        data = orjson.dumps([None, "u", "phoenix", "heartbeat", {"text": text}])
        if bad is not None:
            at = min(at, len(data))
            data = data[:at] + bad + data[at:]
        outcome = expected(data)
        for piece in fragments(OP_TEXT, data, cuts):
            await ws.send_raw(piece)
        if bad is None:
            assert outcome.kind == "reply"
        else:
            assert outcome == Expect("close", CLOSE_INVALID_PAYLOAD)
        if await expect_outcome(ws, data, outcome):
            await still_answers(ws)
    finally:
        await goodbye(ws, clean=True)


def test_invalid_utf8_text_is_closed_with_1007(rig: FuzzRig) -> None:
    @settings(FUZZ, max_examples=100 * SCALE)
    @given(
        text=st.text(min_size=1, max_size=60),
        bad=st.none() | invalid_sequences,
        at=st.integers(0, 200),
        cuts=st.lists(st.integers(1, 200), max_size=4),
        as_witness=st.booleans(),
    )
    def fuzz(text: str, bad: bytes | None, at: int, cuts: list[int], as_witness: bool) -> None:
        category = "invalid utf-8" if bad is not None else "valid utf-8 split across fragments"
        rig.example(
            category,
            lambda: run_utf8(rig.server, text, bad, at, cuts, as_witness),
            f"text={text!r} bad={bad!r} at={at} cuts={cuts} as_witness={as_witness}",
        )

    fuzz()
    rig.report(rig.finish(), OUTCOMES)


# 5. Binary frames: refused with 1003 whatever they hold.


async def run_binary(server: ServerProcess, payload: bytes, cuts: list[int], as_witness: bool) -> None:
    ws = await attacker(server, as_witness, join=as_witness)
    try:
        for piece in fragments(OP_BINARY, payload, cuts):
            await ws.send_raw(piece)
        closed = await ws.closed()
        assert closed.code == CLOSE_UNSUPPORTED_DATA, f"binary {payload[:60]!r}: {closed}"
        assert "binary frames are not supported" in closed.reason
    finally:
        ws.abort()


def test_binary_frames_are_closed_with_1003(rig: FuzzRig) -> None:
    @settings(FUZZ, max_examples=40 * SCALE)
    @given(
        payload=st.binary(max_size=4096) | phoenix_messages.map(orjson.dumps),
        cuts=st.lists(st.integers(1, 4096), max_size=3),
        as_witness=st.booleans(),
    )
    def fuzz(payload: bytes, cuts: list[int], as_witness: bool) -> None:
        rig.example(
            "binary frames",
            lambda: run_binary(rig.server, payload, cuts, as_witness),
            f"payload={payload[:200]!r} cuts={cuts} as_witness={as_witness}",
        )

    fuzz()
    after = rig.finish()
    rig.report(after, OUTCOMES)
    refused = (
        after["viral_realtime_malformed_frames_total"] - rig.baseline["viral_realtime_malformed_frames_total"]
    )
    assert refused >= rig.inputs["binary frames"]


# 6. Framing and control-frame abuse, below the Phoenix layer (RFC 6455 §5): a peer that breaks the
# framing rules is failed with 1002; valid control frames are answered and change nothing.

HEARTBEAT = orjson.dumps([None, "hb", "phoenix", "heartbeat", {}])
VALID_CLOSE_CODES = st.sampled_from([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011]) | st.integers(
    3000, 4999
)
control_payloads = st.binary(max_size=125)

abuses = st.one_of(
    st.tuples(st.just("unmasked"), st.just(0)),
    st.tuples(st.just("reserved opcode"), st.integers(3, 7)),
    st.tuples(st.just("rsv bits"), st.integers(1, 7)),
    st.tuples(st.just("oversized ping"), st.integers(126, 4096)),
    st.tuples(st.just("fragmented control"), st.sampled_from([OP_PING, OP_PONG, OP_CLOSE])),
    st.tuples(st.just("orphan continuation"), st.integers(0, 1)),
    st.tuples(st.just("interrupted message"), st.sampled_from([OP_TEXT, OP_BINARY])),
    st.tuples(st.just("length with top bit set"), st.integers(2**63, 2**64 - 1)),
    st.tuples(st.just("valid close"), VALID_CLOSE_CODES),
    st.tuples(st.just("ping"), st.just(0)),
    st.tuples(st.just("unsolicited pong"), st.just(0)),
    st.tuples(st.just("ping inside a fragmented message"), st.integers(1, len(HEARTBEAT) - 1)),
    st.tuples(st.just("many fragments"), st.integers(2, 120)),
    st.tuples(st.just("empty fragments"), st.integers(1, 20)),
    st.tuples(st.just("truncated then reset"), st.integers(1, 200)),
    st.tuples(st.just("truncated then half-close"), st.integers(1, 200)),
)


async def expect_protocol_error(
    ws: RawWebSocket, what: str, codes: tuple[int, ...] = (CLOSE_PROTOCOL_ERROR,)
) -> None:
    closed = await ws.closed()
    assert closed.code in codes, f"{what}: expected close {codes}, got {closed}"


async def run_abuse(server: ServerProcess, kind: str, n: Any, blob: bytes, as_witness: bool) -> None:
    ws = await attacker(server, as_witness, join=as_witness)
    clean = True
    try:
        if kind == "unmasked":
            await ws.send_frame(OP_TEXT, HEARTBEAT, mask=False)
            await expect_protocol_error(ws, kind)
        elif kind == "reserved opcode":
            await ws.send_frame(n, blob)
            await expect_protocol_error(ws, f"opcode {n}")
        elif kind == "rsv bits":
            await ws.send_frame(OP_TEXT, HEARTBEAT, rsv=n)
            await expect_protocol_error(ws, f"rsv {n}")
        elif kind == "oversized ping":
            await ws.send_frame(OP_PING, os.urandom(n))
            await expect_protocol_error(ws, f"ping of {n} bytes")
        elif kind == "fragmented control":
            await ws.send_frame(n, blob[:10], fin=False)
            await ws.send_frame(OP_CONT, blob[10:20])
            await expect_protocol_error(ws, f"fragmented opcode {n}")
        elif kind == "orphan continuation":
            await ws.send_frame(OP_CONT, HEARTBEAT, fin=bool(n))
            await expect_protocol_error(ws, kind)
        elif kind == "interrupted message":
            await ws.send_frame(OP_TEXT, HEARTBEAT[:5], fin=False)
            await ws.send_frame(n, HEARTBEAT)
            await expect_protocol_error(ws, kind)
        elif kind == "length with top bit set":
            await ws.send_raw(bytes((0x81, 0xFF)) + struct.pack("!Q", n) + os.urandom(4))
            await expect_protocol_error(ws, kind, (CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG))
        elif kind == "valid close":
            await ws.send_frame(OP_CLOSE, close_payload(n, b"client leaving"))
            closed = await ws.closed()
            assert closed.code in (n, 1000), f"close {n} answered with {closed}"
            await ws.eof()
        elif kind == "ping":
            await ws.send_frame(OP_PING, blob)
            await still_answers(ws)
            assert ws.pongs == [blob], f"ping {blob!r} answered with pongs {ws.pongs!r}"
        elif kind == "unsolicited pong":
            await ws.send_frame(OP_PONG, blob)
            await still_answers(ws)
        elif kind == "ping inside a fragmented message":
            await ws.send_frame(OP_TEXT, HEARTBEAT[:n], fin=False)
            await ws.send_frame(OP_PING, blob)
            await ws.send_frame(OP_CONT, HEARTBEAT[n:])
            assert await ws.reply("hb") == {"status": "ok", "response": {}}
            assert ws.pongs == [blob]
        elif kind == "many fragments":
            for piece in fragments(
                OP_TEXT, HEARTBEAT, list(range(1, len(HEARTBEAT), max(1, len(HEARTBEAT) // n)))
            ):
                await ws.send_raw(piece)
            assert await ws.reply("hb") == {"status": "ok", "response": {}}
        elif kind == "empty fragments":
            await ws.send_frame(OP_TEXT, HEARTBEAT, fin=False)
            for _ in range(n - 1):
                await ws.send_frame(OP_CONT, b"", fin=False)
            await ws.send_frame(OP_CONT, b"")
            assert await ws.reply("hb") == {"status": "ok", "response": {}}
        elif kind == "truncated then reset":
            await ws.send_raw(frame(OP_TEXT, HEARTBEAT + b" " * n)[: 6 + n // 2])
            clean = False
        elif kind == "truncated then half-close":
            await ws.send_raw(frame(OP_TEXT, HEARTBEAT + b" " * n)[: 6 + n // 2])
            ws.writer.write_eof()
            # The server must not keep a connection whose peer can never finish its frame.
            closed = await ws.closed()
            assert closed.code in (None, CLOSE_PROTOCOL_ERROR, 1006), f"{kind}: {closed}"
            clean = False
        else:
            raise AssertionError(kind)
    finally:
        await goodbye(ws, clean=clean)


def test_framing_and_control_frame_abuse_fails_only_that_connection(rig: FuzzRig) -> None:
    @settings(FUZZ, max_examples=150 * SCALE)
    @given(case=abuses, blob=control_payloads, as_witness=st.booleans())
    def fuzz(case: tuple[str, Any], blob: bytes, as_witness: bool) -> None:
        kind, n = case
        rig.example(
            f"framing: {kind}",
            lambda: run_abuse(rig.server, kind, n, blob, as_witness),
            f"{kind} n={n!r} blob={blob!r} as_witness={as_witness}",
        )

    fuzz()
    rig.report(rig.finish(), OUTCOMES)


# Close frames and opcodes that RFC 6455 says fail the connection (§5.2 reserved opcodes, §5.5.1 a
# close body is empty or a code plus UTF-8, §7.4 codes that may not be sent).
INVALID_CLOSE_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535]
RFC6455_VIOLATIONS = [
    *[
        (f"reserved control opcode {op:#x}", frame(op, b"x"), (CLOSE_PROTOCOL_ERROR,))
        for op in range(0xB, 0x10)
    ],
    *[
        (f"close code {code}", frame(OP_CLOSE, close_payload(code, b"bye")), (CLOSE_PROTOCOL_ERROR,))
        for code in INVALID_CLOSE_CODES
    ],
    ("one-byte close body", frame(OP_CLOSE, b"\x03"), (CLOSE_PROTOCOL_ERROR,)),
    *[
        (f"close reason {bad!r}", frame(OP_CLOSE, close_payload(1000, b"bye" + bad)), (1002, 1007))
        for bad in INVALID_UTF8
    ],
]


async def test_invalid_close_frames_and_reserved_control_opcodes_fail_the_connection(
    server_factory: Any, ws_impl: str
) -> None:
    server = server_factory(args=("--ws", ws_impl))
    wrong = []
    for what, data, codes in RFC6455_VIOLATIONS:
        ws = await RawWebSocket.connect(server.port, make_token("mallory"))
        await ws.send_raw(data)
        try:
            closed = await ws.closed(timeout=10)
        except AssertionError as exc:
            wrong.append(f"{what}: {exc}")
        else:
            if closed.code not in codes:
                wrong.append(f"{what}: expected close {codes}, got {closed.code} {closed.reason!r}")
        ws.abort()
    assert wrong == []


# 7. Floods of joins, heartbeats and events on a server with tight limits: joins over WS_MAX_TOPICS
# are refused, messages over the rate get "rate limited" replies, 500 refusals in a row close 1008.

FLOOD_LIMITS = {
    "WS_MAX_TOPICS": "8",
    "WS_RATE_BURST": "20",
    # One token per 10 s: no refill lands during an example, so the counts below are exact.
    "WS_RATE_PER_SECOND": "0.1",
}
STRIKES = DEFAULT.rate_strikes_before_close
JOINABLE = ["presence:subject:s{}", "feed:subject:s{}", "leaderboard:s{}:daily"]


def flood_message(kind: str, i: int, user: str, with_ref: bool) -> list[Any]:
    ref = f"f{i}" if with_ref else None
    if kind == "joins":
        return [ref, ref, JOINABLE[i % 3].format(i), "phx_join", {}]
    if kind == "heartbeats":
        return [None, ref, "phoenix", "heartbeat", {}]
    variant = i % 4
    if variant == 0:
        event = {"type": "session_started", "user_id": user, "props": {"subject": "algebra"}}
        return ["j", ref, f"user:{user}", "track", event]
    if variant == 1:
        return ["j", ref, f"user:{user}", "track", {"type": "nonsense"}]
    if variant == 2:
        return ["j", ref, f"user:{user}", "no_such_event", {}]
    return [None, ref, "presence:subject:algebra", "presence_update", {"status": "idle"}]


async def run_flood(server: ServerProcess, kind: str, count: int, with_ref: bool, as_witness: bool) -> None:
    user = "witness" if as_witness else "mallory"
    burst, max_topics = int(FLOOD_LIMITS["WS_RATE_BURST"]), int(FLOOD_LIMITS["WS_MAX_TOPICS"])
    ws = await attacker(server, as_witness, join=kind == "events")
    started = time.monotonic()
    tokens = burst - (1 if kind == "events" else 0)
    refused = max(0, count - tokens)
    closed: Closed | None = None
    try:
        flood = [frame(OP_TEXT, orjson.dumps(flood_message(kind, i, user, with_ref))) for i in range(count)]
        await ws.send_raw(b"".join(flood))
        answered, limited, joined, too_many = 0, 0, 0, 0
        for i in range(count if with_ref else 0):
            try:
                reply = await ws.reply(f"f{i}")
            except Closed as exc:
                closed = exc
                break
            assert_reply_shape(reply, b"flood")
            response = reply["response"]
            if response.get("reason") == "rate limited":
                assert response["retry_after_ms"] > 0
                assert i >= tokens, f"message {i} of a flood was rate limited within the burst of {tokens}"
                limited += 1
            else:
                answered += 1
                joined += kind == "joins" and reply["status"] == "ok"
                too_many += response.get("reason") == f"too many topics (limit {max_topics})"
        skipped = [m for m in ws.pushes if m[3] == "phx_reply"]
        assert not skipped, f"replies out of order: {skipped[:3]!r}"
        # One token per 10 s: unless the example took that long, the bucket is exact.
        exact = (time.monotonic() - started) * float(FLOOD_LIMITS["WS_RATE_PER_SECOND"]) < 1
        if with_ref and exact:
            assert answered <= min(count, tokens), (kind, count, answered, tokens)
            if closed is None:  # (what a close cuts short: test_replies_sent_before_a_close_are_delivered)
                assert answered == min(count, tokens), (kind, count, answered, tokens)
                assert limited in (min(refused, STRIKES - 1), min(refused, STRIKES)), (kind, count, limited)
        if kind == "joins":
            assert joined == min(max_topics, answered), (joined, answered)
            assert too_many == answered - joined, (too_many, answered, joined)
        if refused >= STRIKES and exact:
            closed = closed or await ws.closed()
        if closed is None:
            # Not closed: it still answers (politely refused, as its bucket is empty).
            await ws.send_json([None, "after", "phoenix", "heartbeat", {}])
            try:
                reply = await ws.reply("after")
            except Closed as exc:
                closed = exc
                refused += 1  # this heartbeat was a refusal too
            else:
                assert reply["status"] == "ok" or reply["response"]["reason"] == "rate limited", reply
        if closed is not None:
            assert closed.code == CLOSE_POLICY and "rate limit" in closed.reason, (kind, count, closed)
            assert refused >= STRIKES, f"closed after {refused} refusals: {closed}"
    finally:
        await goodbye(ws, clean=True)


def test_floods_of_joins_heartbeats_and_events_are_refused_then_closed(
    server_factory: Any, ws_impl: str
) -> None:
    server = server_factory(FLOOD_LIMITS, args=("--ws", ws_impl))
    # The witness lives under the same tight limits: it heartbeats no more often than its bucket allows.
    OUTCOMES.clear()
    flood_rig = FuzzRig(server, ws_impl, heartbeat_every=8.0).start()
    try:

        @settings(FUZZ, max_examples=24 * SCALE)
        @given(
            kind=st.sampled_from(["joins", "heartbeats", "events"]),
            count=st.integers(1, 60) | st.integers(STRIKES, STRIKES + 60) | st.integers(1, STRIKES + 200),
            with_ref=st.booleans(),
            as_witness=st.booleans(),
        )
        def fuzz(kind: str, count: int, with_ref: bool, as_witness: bool) -> None:
            flood_rig.example(
                f"flood of {kind}",
                lambda: run_flood(server, kind, count, with_ref, as_witness),
                f"{kind} count={count} with_ref={with_ref} as_witness={as_witness}",
            )

        fuzz()
        after = flood_rig.finish()
        flood_rig.report(after, OUTCOMES)
        base = flood_rig.baseline
        assert after["viral_realtime_rate_limited_total"] > base["viral_realtime_rate_limited_total"]
    finally:
        flood_rig.close()


async def test_replies_sent_before_a_close_are_delivered(server_factory: Any, ws_impl: str) -> None:
    """What the socket answered before it closed reaches the client, in order, and then the close:
    a flood's refusals before its 1008, valid messages' replies before a malformed frame's 1007."""
    limits = {"WS_RATE_BURST": "5", "WS_RATE_PER_SECOND": "0.05", "WS_RATE_STRIKES_BEFORE_CLOSE": "20"}
    server = server_factory(limits, args=("--ws", ws_impl))

    def heartbeat(ref: str) -> bytes:
        return frame(OP_TEXT, orjson.dumps([None, ref, "phoenix", "heartbeat", {}]))

    ws = await RawWebSocket.connect(server.port, make_token("mallory"))
    await ws.send_raw(b"".join(heartbeat(f"h{i}") for i in range(40)))
    replies = [await ws.reply(f"h{i}") for i in range(24)]  # 5 answered, 19 refused, the 20th closes
    assert [r["status"] for r in replies] == ["ok"] * 5 + ["error"] * 19
    closed = await ws.closed()
    assert closed.code == CLOSE_POLICY, closed
    ws.abort()

    ws = await RawWebSocket.connect(server.port, make_token("mallory"))
    await ws.send_raw(b"".join(heartbeat(f"v{i}") for i in range(4)) + frame(OP_TEXT, b"not json"))
    assert [await ws.reply(f"v{i}") for i in range(4)] == [{"status": "ok", "response": {}}] * 4
    assert (await ws.closed()).code == CLOSE_INVALID_PAYLOAD
    ws.abort()


async def test_a_sustained_flood_above_the_rate_limit_is_closed_with_1008(
    server_factory: Any, ws_impl: str
) -> None:
    """README: more than the rate limit gets "rate limited" replies, and a client that keeps on is
    closed with 1008. A flood at 40x WS_RATE_PER_SECOND (default limits) for up to 10 s must be closed,
    though a token refills every 1/rate seconds and lets one message through."""
    server = server_factory(args=("--ws", ws_impl))
    ws = await RawWebSocket.connect(server.port, make_token("mallory"))
    chunk = b"".join(
        frame(OP_TEXT, orjson.dumps([None, None, "phoenix", "heartbeat", {}])) for _ in range(100)
    )
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline and not ws.ended:
            await ws.send_raw(chunk)  # 100 messages every 50 ms: 2,000 a second
            with contextlib.suppress(TimeoutError):
                await ws.receive(0.05)
    except Closed:
        pass
    finally:
        ws.abort()
    assert ws.ended, "a client flooding at 40x the rate limit for 10 s was never closed"


# Limits: configurable (WS_* environment), reported in /metrics, enforced.

TIGHT_LIMITS = {
    "WS_MAX_FRAME_BYTES": "2048",
    "WS_MAX_TOPICS": "3",
    "WS_RATE_PER_SECOND": "0.05",  # one token per 20 s: none refills during the test
    "WS_RATE_BURST": "12",
    "WS_RATE_STRIKES_BEFORE_CLOSE": "6",
    "WS_OUTBOUND_MAX_BYTES": "65536",
    "WS_OUTBOUND_MAX_MESSAGES": "32",
    "WS_IDLE_TIMEOUT": "45",
    "WS_MAX_SOCKETS": "50",
}


def limit_metric(name: str) -> str:
    return f'viral_ws_limit{{name="{name}"}}'


async def test_default_limits_and_every_refusal_counter_are_in_metrics(server: ServerProcess) -> None:
    values = await metrics(server)
    for field in fields(SocketLimits):
        if field.name == "max_sockets":  # 0 by default: derived from the open-files limit
            assert values[limit_metric(field.name)] > 0
        else:
            assert values.get(limit_metric(field.name)) == getattr(DEFAULT, field.name), field.name
    for field in fields(RealtimeStats):
        assert f"viral_realtime_{field.name}_total" in values, f"counter {field.name} is not exported"


def test_every_limit_has_its_variable_and_unworkable_values_are_refused() -> None:
    # Every per-socket limit has its variable (max_sockets, per process: WS_MAX_SOCKETS, 0 = automatic).
    assert set(SOCKET_LIMIT_VARIABLES) | {"max_sockets"} == {field.name for field in fields(SocketLimits)}
    assert set(TIGHT_LIMITS) == {*SOCKET_LIMIT_VARIABLES.values(), "WS_MAX_SOCKETS"}
    base = {"SECRET_KEY": "k" * 40}
    limits = Settings.from_env({**base, **TIGHT_LIMITS}).limits
    for name, variable in [*SOCKET_LIMIT_VARIABLES.items(), ("max_sockets", "WS_MAX_SOCKETS")]:
        assert getattr(limits, name) == float(TIGHT_LIMITS[variable]), variable
    for variable, value in [
        ("WS_RATE_PER_SECOND", "0"),  # would divide by zero in retry_after_ms
        ("WS_MAX_FRAME_BYTES", "-1"),
        ("WS_MAX_TOPICS", "0"),
        ("WS_RATE_BURST", "0.5"),
        ("WS_IDLE_TIMEOUT", "nan"),
        ("WS_OUTBOUND_MAX_BYTES", "lots"),
    ]:
        with pytest.raises(ConfigError, match=variable):
            Settings.from_env({**base, variable: value})


async def test_a_server_refuses_to_start_with_an_unworkable_limit(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, {"WS_RATE_PER_SECOND": "0"})
    with pytest.raises(RuntimeError, match="server exited early"):
        await asyncio.to_thread(server.start)
    assert "WS_RATE_PER_SECOND must be a positive number" in server.log()


async def test_limits_set_in_the_environment_are_reported_and_enforced(
    server_factory: Any, ws_impl: str
) -> None:
    server = server_factory(TIGHT_LIMITS, args=("--ws", ws_impl))
    before = await metrics(server)
    for name, variable in [*SOCKET_LIMIT_VARIABLES.items(), ("max_sockets", "WS_MAX_SOCKETS")]:
        assert before[limit_metric(name)] == float(TIGHT_LIMITS[variable]), variable

    def grew(after: dict[str, float], counter: str) -> float:
        key = f"viral_realtime_{counter}_total"
        return after[key] - before[key]

    witness = await Witness(server).start()
    try:
        # WS_MAX_FRAME_BYTES=2048: a 2,000-byte frame is answered, a 3 KB one closed with 1009.
        ws = await RawWebSocket.connect(server.port, make_token("mallory"))
        await ws.send_text(padded_heartbeat(2000).replace(b'"big"', b'"ok!"'))
        assert await ws.reply("ok!") == {"status": "ok", "response": {}}
        await ws.send_text(padded_heartbeat(3 * 1024))
        closed = await ws.closed()
        assert closed.code == CLOSE_TOO_BIG and "2048" in closed.reason, closed
        ws.abort()
        assert grew(await metrics(server), "oversized_frames") == 1

        # WS_MAX_TOPICS=3: the fourth join is refused and counted.
        ws = await RawWebSocket.connect(server.port, make_token("mallory"))
        for i, topic in enumerate(["user:mallory", "feed:global", "presence:global", "feed:subject:algebra"]):
            await ws.send_json([str(i), str(i), topic, "phx_join", {}])
            reply = await ws.reply(str(i))
            assert reply["status"] == ("ok" if i < 3 else "error"), (topic, reply)
        assert reply["response"] == {"reason": "too many topics (limit 3)"}
        assert grew(await metrics(server), "joins_refused") == 1

        # WS_RATE_BURST=12, of which the joins spent four: eight more are answered, then refusals,
        # and the sixth refusal in a row (WS_RATE_STRIKES_BEFORE_CLOSE=6) closes the socket with 1008.
        heartbeats = [
            frame(OP_TEXT, orjson.dumps([None, f"h{i}", "phoenix", "heartbeat", {}])) for i in range(20)
        ]
        await ws.send_raw(b"".join(heartbeats))
        replies: list[dict[str, Any]] = []
        with pytest.raises(Closed) as closing:
            for i in range(20):
                replies.append(await ws.reply(f"h{i}"))
        closed = closing.value
        assert closed.code == CLOSE_POLICY and "rate limit" in closed.reason, closed
        ok = {"status": "ok", "response": {}}
        statuses = [r if r["status"] == "ok" else r["response"]["reason"] for r in replies]
        # Every reply before the close, in order (the ASGI path drops some: a bug reported to the lead,
        # see test_replies_sent_before_a_close_are_delivered).
        expected = [ok] * 8 + ["rate limited"] * 5
        assert statuses == expected[: len(statuses)], statuses
        if ws_impl != "websockets-sansio":
            assert len(statuses) == 13, statuses
        for refused in replies[8:]:
            assert 0 < refused["response"]["retry_after_ms"] <= 20_001
        with pytest.raises(Closed):  # the socket has gone
            await ws.send_json([None, "late", "phoenix", "heartbeat", {}])
            await ws.reply("late")
        ws.abort()
        assert grew(await metrics(server), "rate_limited") == 6

        # Malformed and binary frames are counted too.
        for bad, code in ((b"not json", CLOSE_INVALID_PAYLOAD), (None, CLOSE_UNSUPPORTED_DATA)):
            ws = await RawWebSocket.connect(server.port, make_token("mallory"))
            if bad is None:
                await ws.send_frame(OP_BINARY, b"\x00\x01")
            else:
                await ws.send_text(bad)
            assert (await ws.closed()).code == code
            ws.abort()
        assert grew(await metrics(server), "malformed_frames") == 2

        await witness.publish(3)
        await witness.heartbeat()
        await witness.check()
    finally:
        await witness.close()


# A reader that never reads, with a big backlog of broadcasts.


def stalled_reader(port: int, user: str) -> socket.socket:
    """A real client that joins its topic, then never reads again (its receive buffer kept tiny)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", port))
    sock.sendall(RawWebSocket.upgrade_request(port, make_token(user), "dGhlIHNhbXBsZSBub25jZQ=="))
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert b" 101 " in response.split(b"\r\n", 1)[0], response
    sock.sendall(frame(OP_TEXT, orjson.dumps(["1", "1", f"user:{user}", "phx_join", {}])))
    return sock


def connection_ended(sock: socket.socket) -> bool:
    """Drain what the server sent: True if the connection was closed (close frame then EOF, or reset)."""
    sock.settimeout(20)
    try:
        while sock.recv(1 << 20):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


async def test_slow_readers_are_dropped_while_the_witness_gets_everything(
    server: ServerProcess, ws_impl: str
) -> None:
    # Default limits: WS_OUTBOUND_MAX_BYTES 1 MiB on the fast path, 1024 queued messages on the ASGI path.
    witness = await Witness(server).start()
    stalled = [await asyncio.to_thread(stalled_reader, server.port, "witness") for _ in range(3)]
    try:
        await until_metric(server, "viral_realtime_sockets", lambda v: v == 4)
        dropped_before = (await metrics(server))["viral_realtime_slow_consumers_dropped_total"]
        # 16 KB broadcasts until all three are dropped; the witness heartbeats all along.
        while (await metrics(server))["viral_realtime_slow_consumers_dropped_total"] < dropped_before + 3:
            assert witness.published < 5000, "the stalled readers were never dropped"
            await witness.publish(25, pad=16_000)
            await witness.heartbeat()
        await witness.publish(5)
        await witness.check(timeout=60)
        await witness.heartbeat(force=True)
        after = await metrics(server)
        assert after["viral_realtime_slow_consumers_dropped_total"] == dropped_before + 3
        # Once they read again they find their connection closed (a close frame, or a reset).
        ended = await asyncio.gather(*(asyncio.to_thread(connection_ended, s) for s in stalled))
        assert all(ended), "a slow reader's connection was left open"
        await until_metric(server, "viral_realtime_sockets", lambda v: v == 1, timeout=30)
        print(
            f"[slow readers {ws_impl}] 3 dropped after {witness.published} broadcasts; witness lost "
            f"{witness.lost}, {witness.heartbeats} heartbeats answered"
        )
        assert crash_lines(server) == []
    finally:
        for sock in stalled:
            sock.close()
        await witness.close()


async def test_a_dropped_slow_reader_is_let_go_while_it_still_does_not_read(
    server_factory: Any, ws_impl: str
) -> None:
    """Dropped means gone: the server frees a slow reader that never reads again (README: aborted if it
    does not answer the close within 5 s), rather than holding its connection and buffers for ever."""
    server = server_factory(
        {"WS_OUTBOUND_MAX_BYTES": "65536", "WS_OUTBOUND_MAX_MESSAGES": "16"}, args=("--ws", ws_impl)
    )
    witness = await Witness(server).start()
    stalled = await asyncio.to_thread(stalled_reader, server.port, "witness")
    try:
        await until_metric(server, "viral_realtime_sockets", lambda v: v == 2)
        while (await metrics(server))["viral_realtime_slow_consumers_dropped_total"] < 1:
            assert witness.published < 2000, "the stalled reader was never dropped"
            await witness.publish(10, pad=16_000)
        await witness.check()
        await until_metric(server, "viral_realtime_sockets", lambda v: v == 1, timeout=30)
        assert await asyncio.to_thread(connection_ended, stalled)
    finally:
        stalled.close()
        await witness.close()


# 200 clients that vanish mid-handshake or mid-frame.

ABRUPT_KINDS = [
    "reset after connect",
    "reset mid-request",
    "reset after request",
    "reset after upgrade",
    "reset mid-frame",
    "reset after join",
    "half-close mid-frame",
    "close mid-request",
]


async def abrupt_client(server: ServerProcess, kind: str, i: int) -> None:
    ws = await RawWebSocket.open_tcp(server.port)
    request = RawWebSocket.upgrade_request(server.port, make_token(f"ghost{i}"), "dGhlIHNhbXBsZSBub25jZQ==")
    try:
        if kind == "reset after connect":
            return
        if kind in ("reset mid-request", "close mid-request"):
            await ws.send_raw(request[: len(request) // 2])
            if kind == "close mid-request":
                ws.writer.write_eof()
                await ws.eof()
            return
        await ws.send_raw(request)
        if kind == "reset after request":
            return
        await asyncio.wait_for(ws.reader.readuntil(b"\r\n\r\n"), 20)
        if kind == "reset after upgrade":
            return
        join = frame(OP_TEXT, orjson.dumps(["1", "1", f"user:ghost{i}", "phx_join", {}]))
        if kind == "reset after join":
            await ws.send_raw(join)
            await ws.reply("1")
            return
        await ws.send_raw(join[: len(join) // 2])
        if kind == "half-close mid-frame":
            ws.writer.write_eof()
            await ws.eof()
    finally:
        ws.abort()


async def test_clients_vanishing_mid_handshake_or_mid_frame_leave_the_server_healthy(
    server: ServerProcess, ws_impl: str
) -> None:
    witness = await Witness(server).start()
    try:
        baseline = await metrics(server)
        assert baseline["viral_realtime_sockets"] == 1
        kinds = [ABRUPT_KINDS[i % len(ABRUPT_KINDS)] for i in range(200)]
        for start in range(0, 200, 50):  # 50 at a time, with broadcasts to the witness in between
            batch = [abrupt_client(server, kinds[i], i) for i in range(start, start + 50)]
            await asyncio.gather(*batch, witness.publish(5))
            await witness.heartbeat()
        await witness.check()
        await until_metric(server, "viral_realtime_sockets", lambda v: v == 1, timeout=45)
        # No descriptor is kept for a vanished client (slack for the database pool, up to 20, which
        # may grow while the upgrades look the users up).
        fds = baseline["process_open_fds"]
        await until_metric(server, "process_open_fds", lambda v: v <= fds + 25, timeout=45)
        async with httpx.AsyncClient(timeout=20) as http:
            assert (await http.get(f"{server.http}/healthz")).status_code == 200
            assert (await http.get(f"{server.http}/readyz")).status_code == 200
        # A new client still gets in and is served.
        ws = await RawWebSocket.connect(server.port, make_token("late"))
        await still_answers(ws)
        await goodbye(ws, clean=True)
        assert crash_lines(server) == []
        print(
            f"[abrupt clients {ws_impl}] 200 clients dropped ({len(ABRUPT_KINDS)} ways); sockets back to 1; "
            f"witness {witness.published} broadcasts, {witness.lost} lost"
        )
    finally:
        await witness.close()
