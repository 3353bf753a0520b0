"""Pre-built server frames parse as the frames a WebSocket client expects."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from realtime import frames


def parse(data: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    gen = Frame.parse(reader.read_exact, mask=False)
    try:
        while True:
            next(gen)
    except StopIteration as done:
        return done.value


@given(st.binary(max_size=70_000))
def test_text_frame_parses_back_to_its_payload(payload):
    frame = parse(frames.text_frame(payload))
    assert frame.opcode is Opcode.TEXT
    assert frame.fin
    assert frame.data == payload


def test_length_encodings_at_the_boundaries():
    for size in (0, 125, 126, 65535, 65536):
        assert parse(frames.text_frame(b"a" * size)).data == b"a" * size


def test_close_frame_carries_code_and_reason():
    frame = parse(frames.close_frame(1008, "slow consumer"))
    assert frame.opcode is Opcode.CLOSE
    assert Close.parse(frame.data) == Close(1008, "slow consumer")


def test_close_reason_is_cut_to_valid_utf8_within_the_control_frame_limit():
    frame = parse(frames.close_frame(1000, "é" * 100))
    close = Close.parse(frame.data)
    assert len(frame.data) <= 125
    assert set(close.reason) == {"é"}
