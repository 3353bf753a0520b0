"""Which keys verify tokens and invite links: `SECRET_KEY` always, and the `SECRET_KEY_OLD` keys of a
rotation until `SECRET_KEY_OLD_UNTIL` (the grace period), after which they stop verifying without a
restart. New tokens and links are always signed with `SECRET_KEY`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from metrics.links import LinkSigner
from realtime import Revocations, TokenVerifier
from store.privacy import PrivacyRules

from .config import Settings


class RotatingTokenVerifier(TokenVerifier):
    """A TokenVerifier whose old keys verify only before `old_until` (epoch seconds; None: no end)."""

    def __init__(
        self,
        secret: str,
        *,
        old_secrets: Sequence[str] = (),
        old_until: float | None = None,
        clock: Callable[[], float] = time.time,
        revocations: Revocations | None = None,
    ) -> None:
        super().__init__(secret, old_secrets=old_secrets, revocations=revocations)
        self._current_only = TokenVerifier(secret, revocations=revocations)
        self._old_until = old_until
        self._clock = clock

    def verify(self, token: str | None) -> dict[str, Any]:
        if self._old_until is not None and self._clock() >= self._old_until:
            return self._current_only.verify(token)
        return super().verify(token)


def token_verifier(settings: Settings, revocations: Revocations | None = None) -> TokenVerifier:
    return RotatingTokenVerifier(
        settings.secret_key,
        old_secrets=settings.old_secret_keys,
        old_until=settings.old_secret_keys_until,
        revocations=revocations,
    )


def privacy_rules(settings: Settings) -> PrivacyRules:
    """Privacy states and the rule showing users; its handles and tombstones are keyed by the secret."""
    return PrivacyRules(settings.secret_key)


def link_signer(settings: Settings) -> LinkSigner:
    return LinkSigner(settings.secret_key, settings.old_secret_keys, old_until=settings.old_secret_keys_until)
