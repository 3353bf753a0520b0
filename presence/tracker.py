"""Presence across nodes: each node owns its sockets' entries and replicates everyone's over the broker.

No lock and no coordinator. Every node publishes, on one internal topic and from one task (so
Redis keeps them in order):

- `delta`: its local joins and leaves since the last tick, numbered by a per-node sequence;
- `hb`: a heartbeat carrying its current sequence, every `heartbeat_interval`;
- `state`: its full local state, when a peer asks with `sync_req` (a new peer, or one that saw a
  gap in the sequence — a lost message is repaired, not ignored);
- `bye`: on a clean shutdown, so peers drop its entries at once.

A peer silent for `node_timeout` is dead: its entries are removed and their leaves pushed. A
restarted process is a new node (a new id), and a `state` carries only the sender's own entries,
so nothing of a dead incarnation can come back. Diffs to clients and deltas to peers go out in
batches every `diff_interval`, like Phoenix Presence's broadcast period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from realtime import BrokerUnavailable, Hub

from .state import Entry, Meta, PresenceState

log = logging.getLogger(__name__)

SYNC_TOPIC = "__presence__"


@dataclass(frozen=True, slots=True)
class PresenceConfig:
    diff_interval: float = 0.25
    heartbeat_interval: float = 2.0
    node_timeout: float = 10.0
    counts_interval: float = 1.0
    counts_topic: str = "presence:global"
    subject_prefix: str = "presence:subject:"


@dataclass(slots=True)
class _Peer:
    seq: int | None = None  # last sequence applied; None until its state arrived
    last_seen: float = 0.0
    sync_asked_at: float = -1e9


class PresenceTracker:
    def __init__(self, hub: Hub, config: PresenceConfig | None = None, node_id: str | None = None) -> None:
        self.hub = hub
        self.config = config or PresenceConfig()
        self.node = node_id or uuid.uuid4().hex[:16]
        self.state = PresenceState()
        self._seq = 0
        self._ops: list[list[Any]] = []
        self._peers: dict[str, _Peer] = {}
        self._owned: dict[object, set[str]] = {}
        self._sync_targets: set[str] = set()  # peers we must ask for their state
        self._state_wanted = False  # a peer asked for ours
        self._last_counts: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None

    # Lifecycle.

    async def start(self) -> None:
        await self.hub.listen(SYNC_TOPIC, self._on_message)
        await self._publish({"t": "sync_req", "node": self.node, "target": None})
        self._task = asyncio.create_task(self._run(), name="presence-tracker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(BrokerUnavailable):
            await self._publish({"t": "bye", "node": self.node})
        self.hub.unlisten(SYNC_TOPIC, self._on_message)

    # Local tracking (called by channels).

    def track(self, owner: object, topic: str, key: str, meta: Meta, *, uid: str, listed: bool) -> str:
        """Add a presence for `owner` (usually a channel); returns its `phx_ref`."""
        ref = secrets.token_urlsafe(9)
        entry = Entry(
            self.node,
            topic,
            key,
            ref,
            {**meta, "phx_ref": ref, "online_at": int(time.time() * 1000)},
            uid,
            listed,
        )
        self.state.add(entry)
        self._ops.append(["j", *entry.wire()])
        self._owned.setdefault(owner, set()).add(ref)
        return ref

    def update(self, owner: object, ref: str, meta: Meta, *, listed: bool) -> str:
        """Replace a presence's meta; as in Phoenix the meta gets a new ref (`phx_ref_prev` is the old)."""
        if ref not in self._owned.get(owner, ()):
            raise KeyError(f"no presence {ref!r} owned by this channel")
        old = self.state.remove(self.node, ref)
        if old is None:
            raise KeyError(f"no presence {ref!r}")
        self._owned[owner].discard(ref)
        self._ops.append(["l", ref])
        new_ref = secrets.token_urlsafe(9)
        online_at = old.meta.get("online_at")
        entry = Entry(
            self.node,
            old.topic,
            old.key,
            new_ref,
            {**meta, "phx_ref": new_ref, "phx_ref_prev": ref, "online_at": online_at},
            old.uid,
            listed,
        )
        self.state.add(entry)
        self._ops.append(["j", *entry.wire()])
        self._owned[owner].add(new_ref)
        return new_ref

    def untrack(self, owner: object) -> None:
        """Remove every presence `owner` holds (its channel left or its socket closed)."""
        for ref in self._owned.pop(owner, ()):
            if self.state.remove(self.node, ref) is not None:
                self._ops.append(["l", ref])

    # Reading.

    def listing(self, topic: str) -> dict[str, dict[str, list[Meta]]]:
        return self.state.listing(topic)

    def counts(self) -> dict[str, Any]:
        return self.state.counts(self.config.subject_prefix)

    def peers(self) -> list[str]:
        return sorted(self._peers)

    # The replication loop: one task sends everything, in order.

    async def _run(self) -> None:
        cfg = self.config
        next_heartbeat = 0.0
        next_counts = 0.0
        while True:
            await asyncio.sleep(cfg.diff_interval)
            now = time.monotonic()
            try:
                await self._send_pending(now >= next_heartbeat)
                if now >= next_heartbeat:
                    next_heartbeat = now + cfg.heartbeat_interval
            except BrokerUnavailable as exc:
                # Peers see the sequence jump on our next heartbeat and ask for our state.
                log.warning("presence replication paused: %s", exc)
            except Exception:
                log.exception("presence replication failed")
            self._expire_peers(now)
            self._push_diffs()
            if now >= next_counts:
                self._push_counts()
                next_counts = now + cfg.counts_interval

    async def _send_pending(self, heartbeat: bool) -> None:
        if self._ops:
            ops, self._ops = self._ops, []
            self._seq += 1
            await self._publish({"t": "delta", "node": self.node, "seq": self._seq, "ops": ops})
        if self._state_wanted:
            self._state_wanted = False
            entries = [e.wire() for e in self.state.node_entries(self.node)]
            await self._publish({"t": "state", "node": self.node, "seq": self._seq, "entries": entries})
        for target in list(self._sync_targets):
            self._sync_targets.discard(target)
            await self._publish({"t": "sync_req", "node": self.node, "target": target})
        if heartbeat:
            await self._publish({"t": "hb", "node": self.node, "seq": self._seq})

    async def _publish(self, message: dict[str, Any]) -> None:
        await self.hub.publish_raw(SYNC_TOPIC, orjson.dumps(message))

    def _expire_peers(self, now: float) -> None:
        for node, peer in list(self._peers.items()):
            if now - peer.last_seen > self.config.node_timeout:
                removed = self.state.drop_node(node)
                del self._peers[node]
                log.warning(
                    "presence: node %s silent for %.1fs; removed its %d entries",
                    node,
                    now - peer.last_seen,
                    removed,
                )

    def _push_diffs(self) -> None:
        for topic, diff in self.state.take_diffs().items():
            if self.hub.local_count(topic):
                self.hub.push_local(topic, "presence_diff", diff)

    def _push_counts(self) -> None:
        counts = self.counts()
        if counts != self._last_counts and self.hub.local_count(self.config.counts_topic):
            self.hub.push_local(self.config.counts_topic, "presence_counts", counts)
            self._last_counts = counts

    # Messages from peers (called synchronously by the hub).

    def _on_message(self, raw: bytes) -> None:
        try:
            message = orjson.loads(raw)
            node = message["node"]
            kind = message["t"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("presence: ignoring a malformed replication message")
            return
        if node == self.node:
            return
        now = time.monotonic()
        if kind == "bye":
            self.state.drop_node(node)
            self._peers.pop(node, None)
            return
        peer = self._peers.get(node)
        if peer is None:
            peer = self._peers[node] = _Peer()
        peer.last_seen = now
        if kind == "sync_req":
            if message.get("target") in (None, self.node):
                self._state_wanted = True
            if peer.seq is None:
                self._ask_state(node, peer, now)  # a newcomer: we want its state too
        elif kind == "state":
            self.state.replace_node(node, [Entry.from_wire(node, item) for item in message["entries"]])
            peer.seq = int(message["seq"])
        elif kind == "delta":
            seq = int(message["seq"])
            if peer.seq is None or seq > peer.seq + 1:
                self._ask_state(node, peer, now)
            elif seq == peer.seq + 1:
                self._apply(node, message["ops"])
                peer.seq = seq
        elif kind == "hb":
            if peer.seq is None or int(message["seq"]) > peer.seq:
                self._ask_state(node, peer, now)

    def _ask_state(self, node: str, peer: _Peer, now: float) -> None:
        # At most once a second per peer: a state is on its way meanwhile.
        if now - peer.sync_asked_at >= 1.0:
            peer.sync_asked_at = now
            self._sync_targets.add(node)

    def _apply(self, node: str, ops: list[list[Any]]) -> None:
        for op in ops:
            if op[0] == "j":
                self.state.add(Entry.from_wire(node, op[1:]))
            elif op[0] == "l":
                self.state.remove(node, op[1])
