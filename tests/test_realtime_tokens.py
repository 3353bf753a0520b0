"""Token verification: signature, expiry, required claims, rotation, the phoenix.js sub-protocol."""

from __future__ import annotations

import base64
import time

import jwt
import pytest

from realtime.tokens import InvalidToken, TokenVerifier, token_from_subprotocols

KEY = "k" * 40


def test_valid_token_yields_its_claims():
    token = TokenVerifier(KEY).issue({"sub": "u1", "role": "student", "minor": True})
    claims = TokenVerifier(KEY).verify(token)
    assert claims["sub"] == "u1" and claims["minor"] is True


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (None, "missing token"),
        ("", "missing token"),
        ("not-a-jwt", "invalid token"),
        (
            jwt.encode({"sub": "u", "exp": time.time() + 86400}, "other-key-" * 4, algorithm="HS256"),
            "signature",
        ),
        (jwt.encode({"sub": "u", "exp": time.time() - 5}, KEY, algorithm="HS256"), "expired"),
        (jwt.encode({"exp": time.time() + 86400}, KEY, algorithm="HS256"), "'sub'"),
        (jwt.encode({"sub": "u"}, KEY, algorithm="HS256"), "'exp'"),
        (jwt.encode({"sub": 5, "exp": time.time() + 86400}, KEY, algorithm="HS256"), "(?i)sub"),
        (jwt.encode({"sub": "u", "exp": time.time() + 86400}, None, algorithm="none"), "invalid token"),
    ],
)
def test_bad_tokens_are_refused_with_a_reason(token, message):
    with pytest.raises(InvalidToken, match=message):
        TokenVerifier(KEY).verify(token)


def test_old_key_still_verifies_during_rotation():
    old = TokenVerifier("old-" * 10).issue({"sub": "u1"})
    assert TokenVerifier(KEY, old_secrets=["old-" * 10]).verify(old)["sub"] == "u1"
    with pytest.raises(InvalidToken):
        TokenVerifier(KEY).verify(old)


def test_phoenix_js_subprotocol_token_is_extracted():
    token = TokenVerifier(KEY).issue({"sub": "u1"})
    encoded = base64.b64encode(token.encode()).decode().rstrip("=")
    assert token_from_subprotocols(["phoenix", f"base64url.bearer.phx.{encoded}"]) == token
    assert token_from_subprotocols(["phoenix"]) is None
    assert token_from_subprotocols(["base64url.bearer.phx.%%%"]) is None
