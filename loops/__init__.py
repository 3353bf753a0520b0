"""The viral loops as event-driven state machines, their scheduler and personalisation providers."""

from .challenge import BuddyChallenge
from .clock import Clock, ManualClock, SystemClock
from .engine import ActionError, Effects, Loop, LoopConfig, LoopEngine, LoopServices
from .insights import SessionIntelligence
from .orchestrator import Orchestrator, PacingRules
from .parent import ProudParent
from .rally import ResultsRally
from .scheduler import Scheduler, cancel, schedule
from .streak import StreakRescue
from .study_buddy import StudyBuddy

LOOPS = (StudyBuddy, BuddyChallenge, ResultsRally, ProudParent, StreakRescue, SessionIntelligence)


def build_engine(services: LoopServices) -> LoopEngine:
    """The engine with all six loops."""
    return LoopEngine(services, [loop(services) for loop in LOOPS])


__all__ = [
    "LOOPS",
    "ActionError",
    "BuddyChallenge",
    "Clock",
    "Effects",
    "Loop",
    "LoopConfig",
    "LoopEngine",
    "LoopServices",
    "ManualClock",
    "Orchestrator",
    "PacingRules",
    "ProudParent",
    "ResultsRally",
    "Scheduler",
    "SessionIntelligence",
    "StreakRescue",
    "StudyBuddy",
    "SystemClock",
    "build_engine",
    "cancel",
    "schedule",
]
