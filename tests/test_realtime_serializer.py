"""The Phoenix V2 serializer: round trips, and a clear ProtocolError for every malformed shape."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from realtime import serializer
from realtime.serializer import ProtocolError

refs = st.one_of(st.none(), st.text(max_size=12))
names = st.text(min_size=1, max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(refs, refs, names, names, json_values)
def test_encode_then_decode_round_trips(join_ref, ref, topic, event, payload):
    msg = serializer.decode(serializer.encode(join_ref, ref, topic, event, payload))
    assert (msg.join_ref, msg.ref, msg.topic, msg.event, msg.payload) == (
        join_ref,
        ref,
        topic,
        event,
        payload,
    )


@given(names, names, json_values)
def test_broadcast_frames_carry_no_refs(topic, event, payload):
    assert orjson.loads(serializer.encode_broadcast(topic, event, payload)) == [
        None,
        None,
        topic,
        event,
        payload,
    ]


def test_reply_has_status_and_response():
    frame = orjson.loads(serializer.encode_reply("1", "2", "t", "ok", {"a": 1}))
    assert frame == ["1", "2", "t", "phx_reply", {"status": "ok", "response": {"a": 1}}]


@given(json_values.filter(lambda v: not isinstance(v, list)))
def test_anything_but_an_array_is_refused(value):
    with pytest.raises(ProtocolError, match="must be a JSON array"):
        serializer.decode(orjson.dumps(value))


@given(st.lists(json_values, max_size=9).filter(lambda v: len(v) != 5))
def test_wrong_arity_is_refused(value):
    with pytest.raises(ProtocolError, match="5 elements"):
        serializer.decode(orjson.dumps(value))


@given(
    st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.lists(st.integers(-100, 100), max_size=2),
        st.dictionaries(st.text(), st.integers(-100, 100), max_size=2),
    ),
    st.sampled_from([0, 1]),
)
def test_refs_of_the_wrong_type_are_refused(bad, position):
    frame = [None, None, "t", "e", {}]
    frame[position] = bad
    with pytest.raises(ProtocolError, match="must be a string or null"):
        serializer.decode(orjson.dumps(frame))


def test_integer_refs_are_accepted_as_strings():
    assert serializer.decode(b'[1, 2, "t", "e", {}]').ref == "2"


@given(
    st.one_of(st.none(), st.integers(-(2**53), 2**53), st.just(""), st.lists(st.text(), max_size=2)),
    st.sampled_from([2, 3]),
)
def test_topic_and_event_must_be_non_empty_strings(bad, position):
    frame = ["1", "1", "t", "e", {}]
    frame[position] = bad
    with pytest.raises(ProtocolError, match="non-empty string"):
        serializer.decode(orjson.dumps(frame))


@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_escape_as_another_exception(data):
    try:
        serializer.decode(data)
    except ProtocolError:
        pass


@pytest.mark.parametrize("data", [b"", b"[", b"\xff\xfe", b'["1","1","t","e",{}]trailing', b"nul\x00"])
def test_non_json_is_refused_with_a_reason(data):
    with pytest.raises(ProtocolError, match="not valid JSON"):
        serializer.decode(data)


@pytest.mark.parametrize(
    ("vsn", "ok"),
    [("2.0.0", True), ("2.1.0", True), (None, True), ("1.0.0", False), ("3.0.0", False), ("x", False)],
)
def test_vsn_negotiation(vsn, ok):
    if ok:
        assert serializer.negotiate_vsn(vsn) == "2.0.0"
    else:
        with pytest.raises(ProtocolError, match=r"vsn=2\.0\.0"):
            serializer.negotiate_vsn(vsn)
