"""Topic patterns map to channel classes; the longest prefix wins."""

from __future__ import annotations

import pytest

from realtime import Channel, Router


class A(Channel):
    pass


class B(Channel):
    pass


class C(Channel):
    pass


def test_exact_prefix_and_longest_match():
    router = Router()
    router.channel("feed:*", A)
    router.channel("feed:user:*", B)
    router.channel("presence:global", C)
    assert router.match("feed:global") is A
    assert router.match("feed:user:42") is B
    assert router.match("presence:global") is C
    assert router.match("presence:globalx") is None
    assert router.match("nope") is None


def test_wildcard_needs_at_least_one_character():
    router = Router()
    router.channel("user:*", A)
    assert router.match("user:") is None
    assert router.match("user:1") is A


def test_wildcard_only_at_the_end():
    with pytest.raises(ValueError, match="wildcard"):
        Router().channel("a:*:b", A)
