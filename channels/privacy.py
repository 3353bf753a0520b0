"""How a user may be shown to other users (SPEC §7): minors anonymised, opted-out users invisible.

Until the user store exists the facts come from the verified token claims: `minor` (SPEC §5) and
`opted_out` (the user turned social features off); `name` is the display name when the platform
puts one in the token.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

ANONYMOUS_NAME = "A student"


@dataclass(frozen=True, slots=True)
class Visibility:
    uid: str
    minor: bool
    opted_out: bool
    name: str | None
    role: str | None

    @classmethod
    def from_claims(cls, claims: dict[str, Any]) -> Visibility:
        name = claims.get("name")
        return cls(
            uid=str(claims["sub"]),
            minor=bool(claims.get("minor", False)),
            opted_out=bool(claims.get("opted_out", False)),
            name=name if isinstance(name, str) and name else None,
            role=claims.get("role") if isinstance(claims.get("role"), str) else None,
        )


def pseudonym(key: bytes, scope: str, uid: str) -> str:
    """A stable stand-in for a user id within one scope (topic): the same user's tabs group under
    one key, but the id cannot be read back and differs between topics, so it cannot be linked."""
    digest = hmac.new(key, f"{scope}\x00{uid}".encode(), hashlib.sha256).hexdigest()
    return f"anon-{digest[:20]}"
