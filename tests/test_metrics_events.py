"""Event validation (SPEC §8): per-field errors a client can act on, and who may send what."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from metrics import EventRejected, validate_event
from metrics.events import client_event_id

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def check(raw, caller="maya", admin=False):
    return validate_event(raw, caller=caller, is_admin=admin, now=NOW)


def errors(raw, **kw):
    with pytest.raises(EventRejected) as info:
        check(raw, **kw)
    return info.value.errors


def test_a_valid_event_gets_an_id_and_the_server_time():
    event = check(
        {"type": "session_completed", "user_id": "maya", "props": {"subject": "algebra", "minutes": 20}}
    )
    assert len(event.id) == 32 and event.ts == NOW
    assert event.props == {"subject": "algebra", "minutes": 20}


def test_the_given_id_is_the_idempotency_key_within_its_sender():
    event = check({"type": "signup", "user_id": "maya", "id": "evt-1"})
    assert event.client_id == "evt-1"
    assert (
        event.id
        == client_event_id("maya", "evt-1")
        == check({"type": "signup", "user_id": "maya", "id": "evt-1"}).id
    )


def test_two_senders_choosing_the_same_id_get_different_events():
    mine = check({"type": "signup", "user_id": "maya", "id": "opt-out-maya-1"}, caller="maya")
    theirs = check({"type": "signup", "user_id": "ops", "id": "opt-out-maya-1"}, caller="ops", admin=True)
    assert mine.id != theirs.id


def test_a_client_cannot_choose_an_id_in_the_servers_namespace():
    # Whatever a client sends, its stored id is "c-" and 40 hex digits: never one the server makes.
    for chosen in ("opt-out-maya-1700000000", "exposure-abc", "c-" + "0" * 40):
        stored = check({"type": "signup", "user_id": "maya", "id": chosen}).id
        assert stored != chosen and stored.startswith("c-") and len(stored) == 42


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ([], "event"),
        ({"type": "dancing", "user_id": "maya"}, "type"),
        ({"type": "signup"}, "user_id"),
        ({"type": "signup", "user_id": "bad id!"}, "user_id"),
        ({"type": "signup", "user_id": "maya", "id": "x" * 65}, "id"),
        ({"type": "signup", "user_id": "maya", "props": []}, "props"),
        ({"type": "quiz_result", "user_id": "maya", "props": {"subject": "math"}}, "props.score"),
        (
            {"type": "quiz_result", "user_id": "maya", "props": {"subject": "math", "score": True}},
            "props.score",
        ),
        ({"type": "streak_updated", "user_id": "maya", "props": {"days": "7"}}, "props.days"),
        ({"type": "signup", "user_id": "maya", "ts": "yesterday"}, "ts"),
        ({"type": "signup", "user_id": "maya", "ts": "2026-11-26T12:00:00"}, "ts"),
        ({"type": "signup", "user_id": "maya", "color": "red"}, "event"),
    ],
)
def test_each_problem_is_named_by_its_field(raw, field):
    assert field in errors(raw)


def test_users_send_only_their_own_events():
    assert "your own user id" in errors({"type": "signup", "user_id": "sam"})["user_id"]
    assert check({"type": "signup", "user_id": "sam"}, admin=True).user_id == "sam"


def test_only_admins_backfill_the_past_and_nobody_sends_the_future():
    past = (NOW - timedelta(days=3)).isoformat()
    assert "only admins" in errors({"type": "signup", "user_id": "maya", "ts": past})["ts"]
    assert check({"type": "signup", "user_id": "maya", "ts": past}, admin=True).ts == NOW - timedelta(days=3)
    future = (NOW + timedelta(hours=1)).isoformat()
    assert "future" in errors({"type": "signup", "user_id": "maya", "ts": future}, admin=True)["ts"]
    skewed = (NOW - timedelta(minutes=2)).timestamp()
    assert check({"type": "signup", "user_id": "maya", "ts": skewed}).ts == NOW - timedelta(minutes=2)


def test_props_are_bounded():
    assert "4096" in errors({"type": "signup", "user_id": "maya", "props": {"x": "y" * 5000}})["props"]
