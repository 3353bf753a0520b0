"""The web process: the Starlette app, HTTP API, dashboards and the `viral-engine` CLI."""

from .app import create_app
from .config import Settings

__all__ = ["Settings", "create_app"]
