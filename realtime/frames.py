"""Server→client WebSocket frames built once and shared by every subscriber.

Frames from a server are never masked (RFC 6455 §5.1), so a whole text frame — header and
payload — is the same bytes for every socket a broadcast goes to. Pure, no I/O.
"""

from __future__ import annotations

import struct

_FIN_TEXT = 0x81
_FIN_CLOSE = 0x88


def _header(opcode_byte: int, length: int) -> bytes:
    if length < 126:
        return bytes((opcode_byte, length))
    if length < 1 << 16:
        return struct.pack("!BBH", opcode_byte, 126, length)
    return struct.pack("!BBQ", opcode_byte, 127, length)


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked, uncompressed text frame carrying `payload` (UTF-8 bytes)."""
    return _header(_FIN_TEXT, len(payload)) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit the 123 bytes a control frame allows."""
    body = struct.pack("!H", code) + reason.encode()[:123].decode(errors="ignore").encode()
    return _header(_FIN_CLOSE, len(body)) + body
