"""Persistence: SQLAlchemy 2 async models, engine setup and Alembic migrations (`store.migrate`)."""

from .database import Database
from .models import Base, Consumption, Event, Feed, FeedItem, Reaction, ScoreEntry, User
from .types import utcnow

__all__ = [
    "Base",
    "Consumption",
    "Database",
    "Event",
    "Feed",
    "FeedItem",
    "Reaction",
    "ScoreEntry",
    "User",
    "utcnow",
]
