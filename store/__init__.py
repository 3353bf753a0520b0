"""Persistence: SQLAlchemy 2 async models, engine setup and Alembic migrations (`store.migrate`)."""

from .database import Database, dialect_insert
from .models import (
    Base,
    Click,
    Consumption,
    Conversion,
    Event,
    Feed,
    FeedItem,
    Link,
    LinkRejection,
    Reaction,
    Reward,
    ScoreEntry,
    User,
)
from .types import utcnow

__all__ = [
    "Base",
    "Click",
    "Consumption",
    "Conversion",
    "Database",
    "Event",
    "Feed",
    "FeedItem",
    "Link",
    "LinkRejection",
    "Reaction",
    "Reward",
    "ScoreEntry",
    "User",
    "dialect_insert",
    "utcnow",
]
