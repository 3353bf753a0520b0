"""Keep bearer tokens out of logs: uvicorn logs request and WebSocket paths with their query string.

A parameter is redacted when its name, percent-decoded as the server decodes it (and then again, for
good measure), is `token` in any case: `?%74oken=` and `?TOKEN=` are redacted like `?token=`.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import unquote_plus

REDACTED = "[redacted]"
# A query string in a log line: from `?` to the end of the path (a space or a quote ends it).
_QUERY = re.compile(r"\?([^\s\"']*)")


def _names_token(raw_name: str) -> bool:
    name = raw_name
    for _ in range(3):
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    return name.strip().lower() == "token"


def _redact_query(match: re.Match[str]) -> str:
    pairs = []
    for pair in match.group(1).split("&"):
        name, sep, value = pair.partition("=")
        pairs.append(f"{name}={REDACTED}" if sep and value and _names_token(name) else pair)
    return "?" + "&".join(pairs)


def redact(text: str) -> str:
    """`text` with the value of every token parameter of every query string in it replaced."""
    return _QUERY.sub(_redact_query, text) if "?" in text else text


def _redacted(arg: Any) -> Any:
    return redact(arg) if isinstance(arg, str) else arg


class RedactTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # The arguments are redacted in place (uvicorn's access formatter reads them one by one).
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redacted(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redacted(v) for k, v in record.args.items()}
        return True


def install_token_redaction() -> None:
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
