"""The product's channels: thin handlers that authorise joins and delegate to the domain packages."""

from realtime import Router

from .context import ChannelContext
from .dashboard import ExperimentsChannel, GuardrailsChannel, KFactorChannel
from .feed import FeedConsumer
from .feed_channel import FeedChannel
from .leaderboard import LeaderboardConsumer, Leaderboards, boards_from_url
from .leaderboard_channel import BoardWatcher, LeaderboardChannel
from .presence import GlobalPresenceChannel, SubjectPresenceChannel
from .rooms import LoopRoomChannel
from .user import UserChannel

__all__ = [
    "BoardWatcher",
    "ChannelContext",
    "ExperimentsChannel",
    "FeedChannel",
    "FeedConsumer",
    "GlobalPresenceChannel",
    "GuardrailsChannel",
    "KFactorChannel",
    "LeaderboardChannel",
    "LeaderboardConsumer",
    "Leaderboards",
    "LoopRoomChannel",
    "SubjectPresenceChannel",
    "UserChannel",
    "boards_from_url",
    "build_router",
]


def build_router() -> Router:
    """Every topic the product serves, mapped to its channel (SPEC §7)."""
    router = Router()
    router.channel("user:*", UserChannel)
    router.channel("presence:subject:*", SubjectPresenceChannel)
    router.channel("presence:global", GlobalPresenceChannel)
    router.channel("feed:*", FeedChannel)
    router.channel("leaderboard:*", LeaderboardChannel)
    router.channel("challenge:*", LoopRoomChannel)
    router.channel("rally:*", LoopRoomChannel)
    router.channel("dashboard:k_factor", KFactorChannel)
    router.channel("dashboard:experiments", ExperimentsChannel)
    router.channel("dashboard:experiment:*", ExperimentsChannel)
    router.channel("dashboard:guardrails", GuardrailsChannel)
    return router
