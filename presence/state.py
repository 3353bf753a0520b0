"""The presence state of the whole cluster as one node sees it: pure data, no I/O.

Every entry is one connection's presence on one topic (Phoenix's "meta"), owned by the node whose
socket holds it. Listing follows Phoenix Presence: a key (user) maps to `{"metas": [...]}`, and
every change becomes a pending `presence_diff` (`joins`/`leaves`) per topic, taken in batches.
Entries that are not listed (opted-out or hidden users) still count in the totals.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

Meta = dict[str, Any]


@dataclass(slots=True)
class Entry:
    node: str
    topic: str
    key: str
    ref: str
    meta: Meta  # what clients see; carries "phx_ref"
    uid: str  # the real user id: internal, for counts; never sent to clients
    listed: bool

    def wire(self) -> list[Any]:
        return [self.topic, self.key, self.ref, self.meta, self.uid, self.listed]

    @classmethod
    def from_wire(cls, node: str, item: list[Any]) -> Entry:
        topic, key, ref, meta, uid, listed = item
        return cls(node, topic, key, ref, meta, uid, bool(listed))


@dataclass(slots=True)
class _Diff:
    joins: dict[str, dict[str, Meta]] = field(default_factory=dict)  # key -> ref -> meta
    leaves: dict[str, dict[str, Meta]] = field(default_factory=dict)

    def join(self, entry: Entry) -> None:
        self.joins.setdefault(entry.key, {})[entry.ref] = entry.meta

    def leave(self, entry: Entry) -> None:
        joined = self.joins.get(entry.key)
        if joined is not None and entry.ref in joined:
            # Joined and left within one batch: nobody needs to hear of it.
            del joined[entry.ref]
            if not joined:
                del self.joins[entry.key]
            return
        self.leaves.setdefault(entry.key, {})[entry.ref] = entry.meta

    def payload(self) -> dict[str, Any]:
        return {
            "joins": {k: {"metas": list(metas.values())} for k, metas in self.joins.items()},
            "leaves": {k: {"metas": list(metas.values())} for k, metas in self.leaves.items()},
        }


class PresenceState:
    def __init__(self) -> None:
        # topic -> key -> ref -> Entry
        self._topics: dict[str, dict[str, dict[str, Entry]]] = {}
        self._by_node: dict[str, dict[str, Entry]] = defaultdict(dict)  # node -> ref -> Entry
        # topic -> uid -> number of entries; and uid -> entries over all topics
        self._topic_users: dict[str, dict[str, int]] = defaultdict(dict)
        self._users: dict[str, int] = {}
        self._diffs: dict[str, _Diff] = {}

    # Changes.

    def add(self, entry: Entry) -> None:
        """Add an entry; a ref already known is left alone (a ref's meta never changes: an update
        is a new ref, the way Phoenix does it, so clients can tell the two apart)."""
        if entry.ref in self._by_node[entry.node]:
            return
        self._topics.setdefault(entry.topic, {}).setdefault(entry.key, {})[entry.ref] = entry
        self._by_node[entry.node][entry.ref] = entry
        users = self._topic_users[entry.topic]
        users[entry.uid] = users.get(entry.uid, 0) + 1
        self._users[entry.uid] = self._users.get(entry.uid, 0) + 1
        if entry.listed:
            self._diff(entry.topic).join(entry)

    def remove(self, node: str, ref: str) -> Entry | None:
        entry = self._by_node.get(node, {}).pop(ref, None)
        if entry is None:
            return None
        keys = self._topics[entry.topic]
        metas = keys[entry.key]
        del metas[ref]
        if not metas:
            del keys[entry.key]
            if not keys:
                del self._topics[entry.topic]
        users = self._topic_users[entry.topic]
        left = users[entry.uid] - 1
        if left:
            users[entry.uid] = left
        else:
            del users[entry.uid]
            if not users:
                del self._topic_users[entry.topic]
        total = self._users[entry.uid] - 1
        if total:
            self._users[entry.uid] = total
        else:
            del self._users[entry.uid]
        if entry.listed:
            self._diff(entry.topic).leave(entry)
        return entry

    def drop_node(self, node: str) -> int:
        """Forget every entry of a node (it died): each listed one becomes a leave."""
        refs = list(self._by_node.get(node, {}))
        for ref in refs:
            self.remove(node, ref)
        self._by_node.pop(node, None)
        return len(refs)

    def replace_node(self, node: str, entries: list[Entry]) -> None:
        """Make a node's entries exactly `entries` (a full state from that node); diffs only for changes."""
        current = self._by_node.get(node, {})
        incoming = {e.ref: e for e in entries}
        for ref in [r for r in current if r not in incoming]:
            self.remove(node, ref)
        for entry in incoming.values():
            self.add(entry)

    # Reading.

    def node_entries(self, node: str) -> list[Entry]:
        return list(self._by_node.get(node, {}).values())

    def nodes(self) -> list[str]:
        return [n for n, refs in self._by_node.items() if refs]

    def listing(self, topic: str) -> dict[str, dict[str, list[Meta]]]:
        """`presence_state` for a topic: listed entries only, from memory."""
        result: dict[str, dict[str, list[Meta]]] = {}
        for key, metas in self._topics.get(topic, {}).items():
            listed = [e.meta for e in metas.values() if e.listed]
            if listed:
                result[key] = {"metas": listed}
        return result

    def users_in(self, topic: str) -> int:
        return len(self._topic_users.get(topic, ()))

    def total_users(self) -> int:
        return len(self._users)

    def counts(self, subject_prefix: str) -> dict[str, Any]:
        """`presence_counts`: distinct users online, and per subject topic (listed or not)."""
        by_subject = {
            topic[len(subject_prefix) :]: len(users)
            for topic, users in self._topic_users.items()
            if topic.startswith(subject_prefix)
        }
        return {"total": len(self._users), "by_subject": dict(sorted(by_subject.items()))}

    def take_diffs(self) -> dict[str, dict[str, Any]]:
        """The pending `presence_diff` payload per topic since the last call (empty diffs omitted)."""
        diffs = self._diffs
        self._diffs = {}
        return {topic: diff.payload() for topic, diff in diffs.items() if diff.joins or diff.leaves}

    def _diff(self, topic: str) -> _Diff:
        diff = self._diffs.get(topic)
        if diff is None:
            diff = self._diffs[topic] = _Diff()
        return diff
