"""Fixtures the HTTP abuse tests share: one fresh database and one server on it per test module."""

from __future__ import annotations

from typing import Any

import pytest

from .http_kit import fresh_database, serve


@pytest.fixture(scope="module")
def module_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from fresh_database(request, tmp_path_factory)


@pytest.fixture(scope="module")
def api(module_db: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from serve(module_db, tmp_path_factory)
