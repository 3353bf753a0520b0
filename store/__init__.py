"""Persistence: SQLAlchemy 2 async engine setup.

Models and Alembic migrations arrive with the event store.
"""

from .database import Database

__all__ = ["Database"]
