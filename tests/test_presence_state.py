"""The cluster presence state, pure: listings, batched diffs, node replacement and removal, counts."""

from __future__ import annotations

from presence import Entry, PresenceState


def entry(ref: str, key: str = "u1", topic: str = "presence:subject:math", node: str = "n1", **kw) -> Entry:
    listed = kw.pop("listed", True)
    uid = kw.pop("uid", key)
    return Entry(node, topic, key, ref, {"phx_ref": ref, **kw}, uid, listed)


def test_two_tabs_are_one_key_with_two_metas():
    state = PresenceState()
    state.add(entry("a"))
    state.add(entry("b"))
    assert state.listing("presence:subject:math") == {"u1": {"metas": [{"phx_ref": "a"}, {"phx_ref": "b"}]}}
    assert state.users_in("presence:subject:math") == 1


def test_closing_one_tab_leaves_only_that_meta():
    state = PresenceState()
    state.add(entry("a"))
    state.add(entry("b"))
    state.take_diffs()
    state.remove("n1", "a")
    assert state.take_diffs() == {
        "presence:subject:math": {"joins": {}, "leaves": {"u1": {"metas": [{"phx_ref": "a"}]}}}
    }
    assert state.listing("presence:subject:math") == {"u1": {"metas": [{"phx_ref": "b"}]}}


def test_a_join_and_leave_in_one_batch_cancel_out():
    state = PresenceState()
    state.add(entry("a"))
    state.remove("n1", "a")
    assert state.take_diffs() == {}


def test_diffs_are_batched_per_topic_until_taken():
    state = PresenceState()
    for i in range(100):
        state.add(entry(f"r{i}", key=f"u{i}"))
    diffs = state.take_diffs()
    assert list(diffs) == ["presence:subject:math"]
    assert len(diffs["presence:subject:math"]["joins"]) == 100
    assert state.take_diffs() == {}


def test_unlisted_entries_count_but_are_never_listed_or_diffed():
    state = PresenceState()
    state.add(entry("a", key="shy", listed=False))
    assert state.listing("presence:subject:math") == {}
    assert state.take_diffs() == {}
    assert state.counts("presence:subject:") == {"total": 1, "by_subject": {"math": 1}}


def test_counts_are_distinct_users_over_topics_and_nodes():
    state = PresenceState()
    state.add(entry("a", key="u1"))
    state.add(entry("b", key="u1", node="n2"))  # the same user on another node
    state.add(entry("c", key="u2", topic="presence:subject:art"))
    state.add(entry("d", key="", uid="u3", topic="presence:global", listed=False))
    assert state.counts("presence:subject:") == {"total": 3, "by_subject": {"art": 1, "math": 1}}
    state.remove("n1", "a")
    state.remove("n2", "b")
    assert state.counts("presence:subject:") == {"total": 2, "by_subject": {"art": 1}}


def test_dropping_a_node_leaves_all_its_entries():
    state = PresenceState()
    state.add(entry("a", key="u1", node="n1"))
    state.add(entry("b", key="u2", node="n2"))
    state.take_diffs()
    assert state.drop_node("n2") == 1
    assert state.take_diffs()["presence:subject:math"]["leaves"] == {"u2": {"metas": [{"phx_ref": "b"}]}}
    assert state.nodes() == ["n1"]


def test_replacing_a_node_diffs_only_what_changed():
    state = PresenceState()
    state.add(entry("a", key="u1", node="n2"))
    state.add(entry("b", key="u2", node="n2"))
    state.take_diffs()
    state.replace_node("n2", [entry("b", key="u2", node="n2"), entry("c", key="u3", node="n2")])
    diff = state.take_diffs()["presence:subject:math"]
    assert diff == {
        "joins": {"u3": {"metas": [{"phx_ref": "c"}]}},
        "leaves": {"u1": {"metas": [{"phx_ref": "a"}]}},
    }


def test_a_known_ref_is_not_added_twice():
    state = PresenceState()
    state.add(entry("a"))
    state.add(entry("a"))
    assert state.listing("presence:subject:math") == {"u1": {"metas": [{"phx_ref": "a"}]}}
    assert state.counts("presence:subject:")["total"] == 1
