"""Who may join what: the product's roles read from verified token claims."""

from __future__ import annotations

from typing import Any

ROLES = frozenset({"student", "parent", "tutor", "admin"})


def is_admin(claims: dict[str, Any]) -> bool:
    return claims.get("role") == "admin"


def is_self_or_admin(claims: dict[str, Any], user_id: str) -> bool:
    return claims.get("sub") == user_id or is_admin(claims)
