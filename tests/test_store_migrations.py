"""The Alembic migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

from alembic import command

from store.migrate import alembic_config


async def test_migrations_match_the_models(database_url):
    # `alembic check` fails when autogenerate would write a migration: models and migrations differ.
    await asyncio.to_thread(command.check, alembic_config(database_url))
