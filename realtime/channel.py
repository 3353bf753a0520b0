"""Channels: one joined topic on one socket, in the style of Phoenix.Channel.

A channel class authorises the join, answers client events and may filter outgoing broadcasts.
Subclass `Channel` and override what you need; everything has a safe default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .socket import Socket


class JoinError(Exception):
    """Refuse a join; `response` is sent to the client as the error reply."""

    def __init__(self, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.response: dict[str, Any] = {"reason": reason, **extra}


class ReplyError(Exception):
    """Answer a client event with `{"status": "error", "response": response}`."""

    def __init__(self, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.response: dict[str, Any] = {"reason": reason, **extra}


class _NoReply:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_REPLY"


NO_REPLY: Any = _NoReply()
"""Return this from `handle_in` to send no reply (Phoenix's `{:noreply, socket}`)."""


class Channel:
    """Base class. Lifecycle: `join` → (`handle_in` | `handle_out` | `handle_info`)* → `terminate`."""

    # Broadcast events this channel wants to see (and may rewrite or drop) before they reach its client.
    # Everything else is written to the socket as the pre-encoded frame shared by all subscribers.
    intercept: ClassVar[frozenset[str]] = frozenset()

    __slots__ = ("join_ref", "socket", "topic")

    def __init__(self, socket: Socket, topic: str, join_ref: str | None) -> None:
        self.socket = socket
        self.topic = topic
        self.join_ref = join_ref

    @property
    def claims(self) -> dict[str, Any]:
        """The verified token claims of the socket's user."""
        return self.socket.claims

    @property
    def context(self) -> Any:
        """The application's services, as given to `PhoenixEndpoint(context=...)`."""
        return self.socket.context

    async def join(self, params: dict[str, Any]) -> dict[str, Any] | None:
        """Authorise the join and return the reply's response; raise JoinError to refuse."""
        raise JoinError("join not allowed")

    async def after_join(self) -> None:
        """Runs right after the join reply went out: push initial state here (Phoenix's `:after_join`)."""

    async def handle_in(self, event: str, payload: Any, ref: str | None) -> Any:
        """Answer a client event: return the ok response, raise ReplyError, or return NO_REPLY."""
        raise ReplyError(f"unknown event {event!r} on topic {self.topic!r}")

    def handle_out(self, event: str, payload: Any) -> Any:
        """For events listed in `intercept`: return the payload to push to this client, or None to drop it."""
        return payload

    async def handle_info(self, message: Any) -> None:
        """A message for this channel from inside the server (not from the client)."""

    async def terminate(self, reason: str) -> None:
        """Called once when the channel ends: leave, replaced join, crash or socket close."""

    # Helpers for subclasses.

    def push(self, event: str, payload: Any) -> None:
        """Send an event to this channel's client only."""
        self.socket.push(self, event, payload)

    async def broadcast(self, event: str, payload: Any) -> int:
        """Send an event to every subscriber of this channel's topic on every node."""
        return await self.socket.hub.broadcast(self.topic, event, payload)
