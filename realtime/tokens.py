"""Signed bearer tokens (JWT, HS256) for sockets and HTTP APIs.

The engine checks signature, expiry and that `sub` is present; what the other claims mean
(roles, minors, subjects) is the application's business.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jwt

ALGORITHM = "HS256"
# phoenix.js ≥ 1.7 sends `authToken` as the second of two sub-protocols: ["phoenix", PREFIX + base64(token)].
SUBPROTOCOL_TOKEN_PREFIX = "base64url.bearer.phx."


class InvalidToken(Exception):
    """The token is missing, malformed, forged or expired; str() is safe to show the client."""


class Revocations:
    """Subjects whose tokens issued before some time are refused (a deleted user's, say).

    Held by a key the application derives from the subject (`key_of`), so the list need not keep ids.
    A revoked subject's token without `iat` is refused too: nothing shows it is newer.
    """

    def __init__(self, key_of: Callable[[str], str]) -> None:
        self._key_of = key_of
        self._before: dict[str, float] = {}

    def revoke(self, key: str, before: float) -> None:
        self._before[key] = max(before, self._before.get(key, before))

    def replace(self, entries: Mapping[str, float]) -> None:
        self._before = dict(entries)

    def refused(self, claims: Mapping[str, Any]) -> bool:
        if not self._before:
            return False
        before = self._before.get(self._key_of(str(claims["sub"])))
        if before is None:
            return False
        issued = claims.get("iat")
        return not isinstance(issued, int | float) or isinstance(issued, bool) or issued < before


class TokenVerifier:
    """Verifies tokens with the current key, and with older keys during a rotation."""

    def __init__(
        self,
        secret: str,
        *,
        old_secrets: Sequence[str] = (),
        leeway: float = 0.0,
        revocations: Revocations | None = None,
    ) -> None:
        if not secret:
            raise ValueError("a token secret is required")
        self._keys = [secret, *old_secrets]
        self._secret = secret
        self._leeway = leeway
        self.revocations = revocations

    def verify(self, token: str | None) -> dict[str, Any]:
        if not token:
            raise InvalidToken("missing token")
        last_error = "invalid token"
        for key in self._keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=[ALGORITHM],
                    leeway=self._leeway,
                    options={"require": ["sub", "exp"]},
                )
            except jwt.ExpiredSignatureError:
                raise InvalidToken("token expired") from None
            except jwt.InvalidSignatureError:
                last_error = "invalid token signature"
                continue
            except jwt.MissingRequiredClaimError as exc:
                raise InvalidToken(f"token lacks the {exc.claim!r} claim") from None
            except jwt.PyJWTError as exc:
                raise InvalidToken(f"invalid token: {exc}") from None
            if not isinstance(claims.get("sub"), str) or not claims["sub"]:
                raise InvalidToken("token 'sub' must be a non-empty string")
            if self.revocations is not None and self.revocations.refused(claims):
                raise InvalidToken("token revoked: its user was deleted after it was issued")
            return claims
        raise InvalidToken(last_error)

    def issue(self, claims: Mapping[str, Any], *, ttl: float = 3600.0) -> str:
        now = int(time.time())
        body = {"iat": now, "exp": now + int(ttl), **claims}
        return jwt.encode(body, self._secret, algorithm=ALGORITHM)


def token_from_subprotocols(subprotocols: Sequence[str]) -> str | None:
    """Extract the token phoenix.js puts in `Sec-WebSocket-Protocol`, or None."""
    for proto in subprotocols:
        if proto.startswith(SUBPROTOCOL_TOKEN_PREFIX):
            encoded = proto[len(SUBPROTOCOL_TOKEN_PREFIX) :]
            # phoenix.js uses btoa() with the padding stripped; accept the URL-safe alphabet too.
            encoded = encoded.replace("-", "+").replace("_", "/")
            encoded += "=" * (-len(encoded) % 4)
            try:
                return base64.b64decode(encoded, validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                return None
    return None
