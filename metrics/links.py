"""Signed invite links (pure: no I/O).

A link token is `{random}.{key id}.{expiry}.{signature}`: 128 random bits (URL-safe), the id of the
key that signed it, the expiry in epoch seconds, and HMAC-SHA256 over random part, referrer and
expiry. The referrer is not in the token (it is looked up by the random part), so the signature
also proves the stored referrer is the one the link was made for. Keys rotate: every key in
`SECRET_KEY` + `SECRET_KEY_OLD` verifies, the first signs; the old ones only before `old_until` (epoch
seconds, `SECRET_KEY_OLD_UNTIL`), judged at the moment `verify` is told (a click's, or a signup's).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

SOURCES = frozenset(
    {
        "buddy_challenge",
        "results_rally",
        "proud_parent",
        "streak_rescue",
        "study_buddy",
        "session_share",
        "direct",
    }
)
# App paths a link may lead to (no open redirect): exact "/" or one of these prefixes.
TARGET_PREFIXES = ("/join", "/signup", "/challenge/", "/rally/", "/practice/", "/subjects/", "/invite/")
TARGET = re.compile(r"^/[A-Za-z0-9/_\-]*$")
DEFAULT_TTL = 30 * 86400
MAX_TTL = 90 * 86400


class LinkError(ValueError):
    """Why a link is refused; `reason` is a stable code: `malformed`, `unknown_key`, `bad_signature`,
    `expired` (and `unknown` for a well-formed token we have no record of)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def key_id(key: str) -> str:
    return hashlib.sha256(b"link-key-id\x00" + key.encode()).hexdigest()[:8]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class ParsedLink:
    nonce: str
    kid: str
    expires: int
    signature: str

    @property
    def token(self) -> str:
        return f"{self.nonce}.{self.kid}.{self.expires}.{self.signature}"


class LinkSigner:
    def __init__(self, secret: str, old_secrets: Sequence[str] = (), old_until: float | None = None) -> None:
        self._current = secret
        self._keys = {key_id(k): k for k in (secret, *old_secrets)}
        self._old_until = old_until

    def _sign(self, key: str, nonce: str, referrer: str, expires: int) -> str:
        message = f"{nonce}\x00{referrer}\x00{expires}".encode()
        return _b64(hmac.new(key.encode(), message, hashlib.sha256).digest())

    def issue(self, referrer: str, now: int, ttl: int = DEFAULT_TTL) -> ParsedLink:
        nonce = secrets.token_urlsafe(16)
        expires = now + ttl
        return ParsedLink(
            nonce, key_id(self._current), expires, self._sign(self._current, nonce, referrer, expires)
        )

    @staticmethod
    def parse(token: str) -> ParsedLink:
        parts = token.split(".")
        if len(parts) != 4 or not all(parts) or not parts[2].isdigit() or len(token) > 200:
            raise LinkError("malformed", "this invite link is not one of ours")
        return ParsedLink(parts[0], parts[1], int(parts[2]), parts[3])

    def verify(self, link: ParsedLink, referrer: str, now: int) -> None:
        """Raise LinkError unless `link` was signed by one of our keys for `referrer` and is unexpired."""
        key = self._keys.get(link.kid)
        if (
            key is not None
            and key != self._current
            and self._old_until is not None
            and now >= self._old_until
        ):
            key = None  # the rotation's grace period is over
        if key is None:
            raise LinkError("unknown_key", "this invite link was signed with a key we no longer accept")
        expected = self._sign(key, link.nonce, referrer, link.expires)
        if not hmac.compare_digest(expected, link.signature):
            raise LinkError("bad_signature", "this invite link has been altered")
        if link.expires <= now:
            raise LinkError("expired", "this invite link has expired")


def check_target(target: object) -> str:
    """The app path a link leads to; only allow-listed paths (never another site)."""
    if target is None or target == "/":
        return "/"
    if (
        not isinstance(target, str)
        or not TARGET.match(target)
        or "//" in target
        or not target.startswith(TARGET_PREFIXES)
    ):
        raise ValueError(f"target must be an app path starting with one of {list(TARGET_PREFIXES)}")
    return target
