"""A Phoenix Channels V2 socket engine for Starlette/uvicorn, usable on its own.

Public surface: build a `Router` of `Channel` classes, make a `PhoenixEndpoint` with a
`TokenVerifier` and a broker (`broker_from_url("memory://" | "redis://…")`), mount it as an
ASGI websocket route, call `start()`/`stop()` from the app's lifespan, and serve with
`ws=PhoenixWebSocketProtocol` for the fast fan-out path.
"""

from .broker import Broker, BrokerUnavailable, MemoryBroker, RedisBroker, broker_from_url
from .channel import NO_REPLY, Channel, JoinError, ReplyError
from .endpoint import ConnectRefused, PhoenixEndpoint
from .hub import Hub
from .router import Router
from .serializer import Message, ProtocolError
from .socket import Socket, SocketLimits
from .stats import RealtimeStats
from .tokens import InvalidToken, Revocations, TokenVerifier

__all__ = [
    "NO_REPLY",
    "Broker",
    "BrokerUnavailable",
    "Channel",
    "ConnectRefused",
    "Hub",
    "InvalidToken",
    "JoinError",
    "MemoryBroker",
    "Message",
    "PhoenixEndpoint",
    "ProtocolError",
    "RealtimeStats",
    "RedisBroker",
    "ReplyError",
    "Revocations",
    "Router",
    "Socket",
    "SocketLimits",
    "TokenVerifier",
    "broker_from_url",
]
