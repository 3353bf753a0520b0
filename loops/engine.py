"""What every loop shares: its services, the effects it collects during a transaction, and the engine
that feeds it events (as a consumer of the event stream), timed jobs (through the scheduler) and user
actions (from `user:{id}` messages and `POST /api/loops/{action}`).

A loop never pushes or emits inside a transaction: it records pushes and events in `Effects`, and
they go out after the commit — so a rolled-back batch sends nothing, and a replayed one (the
consumer's and the scheduler's at-least-once) finds its state already moved and sends nothing twice.
Every other user a payload names is shown through the privacy rule (store/privacy.py): in a room's
scope for what the room sees, as for anyone else (`OUTSIDER`) in what a whole room or a copy provider
may read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from metrics import EventIn, experiments
from metrics.attribution import create_link, verified_link
from metrics.compliance import SocialAction, Verdict, told_to_sender
from metrics.links import LinkError, LinkSigner
from metrics.rewards import Paid, pay
from realtime import BrokerUnavailable, Hub
from store import Database, Experiment, Link, LoopItem, LoopJob, LoopMember
from store.privacy import ANONYMOUS_NAME, OUTSIDER, PrivacyRules, PrivacyState, Shown, Viewer

from .clock import Clock, SystemClock
from .copy import CopyRequest, CopyRouter
from .orchestrator import Orchestrator
from .scheduler import schedule

log = logging.getLogger(__name__)

Emit = Callable[[list[EventIn]], Awaitable[Any]]


@dataclass(frozen=True)
class LoopConfig:
    """Every loop's knobs (README "Viral loops"); `LOOPS_CONFIG` (JSON) overrides any of them."""

    nudge_ttl_minutes: int = 60
    nudge_pair_cooldown_hours: int = 24
    nudge_exam_days: int = 7
    nudge_sessions: int = 3
    nudge_session_days: int = 14
    nudge_weak_score: float = 70.0
    nudge_buddies: int = 3
    challenge_ttl_hours: int = 48
    challenge_questions: int = 5
    rally_days: int = 7
    parent_share_days: int = 30
    parent_score_jump: float = 15.0
    parent_streak_milestones: tuple[int, ...] = (7, 30, 100)
    streak_window_hours: int = 24
    rescue_at_risk_hours: int = 6
    rescue_pass_score: float = 60.0

    @classmethod
    def from_json(cls, value: str) -> LoopConfig:
        if not value.strip():
            return cls()
        raw = orjson.loads(value)
        if not isinstance(raw, dict):
            raise ValueError("LOOPS_CONFIG must be a JSON object")
        defaults = cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"LOOPS_CONFIG: unknown keys {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, given in raw.items():
            default = getattr(defaults, key)
            if isinstance(default, tuple):
                if not isinstance(given, list) or not all(isinstance(v, int) and v > 0 for v in given):
                    raise ValueError(f"LOOPS_CONFIG: {key} must be a list of positive whole numbers")
                values[key] = tuple(given)
            elif isinstance(given, bool) or not isinstance(given, (int, float)) or given <= 0:
                raise ValueError(f"LOOPS_CONFIG: {key} must be a positive number")
            elif isinstance(default, int) and not isinstance(given, int):
                raise ValueError(f"LOOPS_CONFIG: {key} must be a whole number")
            else:
                values[key] = type(default)(given)
        return replace(defaults, **values)


class ActionError(Exception):
    """A user action refused, with a stable `code` and a message the client can show; a refusal by
    the compliance gate or the orchestrator (`code` "refused") also says which rule (`refused`)."""

    def __init__(self, code: str, message: str, refused: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.refused = refused

    def as_dict(self) -> dict[str, str]:
        found = {"code": self.code}
        if self.refused is not None:
            found["refused"] = self.refused
        return found


@dataclass
class Effects:
    """What a transaction wants done once it commits: pushes, events to emit, jobs' follow-ups."""

    pushes: list[tuple[str, str, dict[str, Any], str]] = field(default_factory=list)
    events: list[EventIn] = field(default_factory=list)
    loop: str = ""  # whose handler is running (the engine sets it): pushes are counted per loop

    def push(self, topic: str, event: str, payload: dict[str, Any]) -> None:
        self.pushes.append((topic, event, payload, self.loop))

    def to_user(self, user_id: str, event: str, payload: dict[str, Any]) -> None:
        self.push(f"user:{user_id}", event, payload)

    def emit(self, event: EventIn) -> None:
        self.events.append(event)

    def reward(self, paid: Paid | None) -> None:
        if paid is not None:
            self.to_user(paid.user_id, "reward", paid.push_payload())


@dataclass
class LoopServices:
    database: Database
    hub: Hub
    signer: LinkSigner
    emit: Emit
    privacy: PrivacyRules
    orchestrator: Orchestrator = field(default_factory=Orchestrator)
    clock: Clock = field(default_factory=SystemClock)
    copy: CopyRouter = field(default_factory=lambda: CopyRouter([], None))
    config: LoopConfig = field(default_factory=LoopConfig)


EventHandler = Callable[[AsyncSession, dict[str, Any], Effects], Awaitable[None]]
JobHandler = Callable[[AsyncSession, LoopJob, Effects], Awaitable[None]]
ActionHandler = Callable[[AsyncSession, dict[str, Any], dict[str, Any], Effects], Awaitable[dict[str, Any]]]


class Loop:
    """One loop: the events it reacts to, the timed jobs it owns, the actions users take in it."""

    name: str = ""

    def __init__(self, services: LoopServices) -> None:
        self.services = services
        self.config = services.config
        self.on_events: dict[str, EventHandler] = {}
        self.jobs: dict[str, JobHandler] = {}
        self.actions: dict[str, ActionHandler] = {}

    async def setup(self, session: AsyncSession) -> None:
        """At start-up, in a transaction: make sure recurring jobs exist (idempotent)."""

    # Helpers the loops share.

    def now(self) -> datetime:
        return self.services.clock.now()

    async def decide(
        self,
        session: AsyncSession,
        action: str,
        *,
        sender: str | None,
        recipient: str | None,
        outside: bool = False,
        update: bool = False,
        actor: Mapping[str, Any] | None = None,
    ) -> Verdict:
        """The orchestrator's verdict, recorded. `actor`: the claims of the acting user, when they are
        the sender (what their token says adds to the store's protection)."""
        social = SocialAction(self.name, action, sender, recipient, outside)
        if actor is not None:
            assert sender == str(actor["sub"])
            social = social.by(actor)
        return await self.services.orchestrator.decide(session, social, self.now(), update=update)

    async def gate(
        self, session: AsyncSession, actor: Mapping[str, Any], action: str, doing: str
    ) -> dict[str, Any] | None:
        """The compliance gate for the acting user taking something that came from outside the
        platform (a link): None when they may, else the refusal for the engine to answer with."""
        me = str(actor["sub"])
        verdict = await self.decide(session, action, sender=me, recipient=None, outside=True, actor=actor)
        if verdict.allowed:
            return None
        return {"refused": verdict.reason, "message": f"you cannot {doing}: {verdict.message}"}

    async def by_link(self, session: AsyncSession, item: LoopItem, token: Any, needs: str) -> Link:
        """The item's own invite link, from the whole token: signed by us for the item's owner,
        unexpired, and the very link the item was shared with."""
        if not isinstance(token, str) or not token:
            raise ActionError("forbidden", f"this {needs} needs its invite link")
        try:
            link = await verified_link(session, self.services.signer, token, self.now())
        except LinkError as exc:
            raise ActionError("invalid_link", str(exc)) from None
        if link.nonce != item.data.get("link_nonce") or link.referrer_id != item.owner_id:
            raise ActionError("invalid_link", f"this invite link is not for this {needs}")
        return link

    async def share_item(
        self, session: AsyncSession, fx: Effects, item: LoopItem, sender: str, target: str, ttl: int
    ) -> dict[str, str]:
        """The item's invite link for `sender` to share, leading to `target`, recorded on the item and
        announced as `invite_sent`; returns `{token, url}` for the reply."""
        now = self.now()
        link = await create_link(
            session,
            self.services.signer,
            referrer=sender,
            source=self.name,
            target=target,
            now=now,
            ttl=ttl,
        )
        item.data = {**(item.data or {}), "link_nonce": link.nonce}
        fx.emit(
            EventIn(
                f"{item.id}-invite",
                "invite_sent",
                sender,
                now,
                {"source": self.name, "link_token": link.token},
            )
        )
        return {"token": link.token, "url": f"/r/{link.token}"}

    # Showing other users (the privacy rule, store/privacy.py).

    async def states(
        self, session: AsyncSession, uids: Iterable[str], actor: Mapping[str, Any] | None = None
    ) -> dict[str, PrivacyState]:
        """The users' privacy states from the store; the acting user's with what their token adds."""
        found = await self.services.privacy.load(session, uids)
        if actor is not None and str(actor["sub"]) in found:
            me = str(actor["sub"])
            found[me] = found[me].with_claims(actor)
        return found

    async def state(
        self, session: AsyncSession, uid: str, actor: Mapping[str, Any] | None = None
    ) -> PrivacyState:
        return (await self.states(session, [uid], actor))[uid]

    def show(self, state: PrivacyState, viewer: Viewer, scope: str) -> Shown | None:
        return self.services.privacy.show(state, viewer, scope)

    def shown(self, state: PrivacyState, viewer: Viewer, scope: str) -> dict[str, str] | None:
        """The user as `viewer` sees them in `scope`: {user_id, name} or {handle, name}; None: not at all."""
        return self.services.privacy.show_as(state, viewer, scope)

    def named(self, state: PrivacyState, viewer: Viewer = OUTSIDER) -> str:
        """How the user is named to `viewer`. As named to anyone (`OUTSIDER`, the default) it is also
        what copy may carry to an outside provider: never a minor's name."""
        shown = self.services.privacy.show(state, viewer, "")
        return shown.name if shown is not None else ANONYMOUS_NAME

    async def variant(self, session: AsyncSession, user_id: str, fx: Effects) -> dict[str, Any]:
        """This loop's settings for `user_id` from its experiment (metrics.experiments), if any: the
        assigned variant's config while one runs (and `experiment_exposure` emitted the first time
        the user sees it), the declared winner's config once stopped, otherwise nothing."""
        chosen = await session.scalar(
            select(Experiment)
            .where(Experiment.loop == self.name, Experiment.status.in_(("running", "stopped")))
            .order_by((Experiment.status == "running").desc(), Experiment.updated_at.desc())
            .limit(1)
        )
        if chosen is None or (chosen.status == "stopped" and chosen.winner is None):
            return {}
        found = await experiments.assignment(session, chosen, user_id)
        if found.new_exposure:
            # One id per experiment and user (until the exposure is recorded every call announces it
            # again), keyed with the app's secret so nobody can compute it in advance.
            keyed = self.services.privacy.handle(f"experiment_exposure:{chosen.key}", user_id)
            fx.emit(
                EventIn(
                    f"exposure-{keyed.removeprefix('anon-')}",
                    "experiment_exposure",
                    user_id,
                    self.now(),
                    {"experiment": chosen.key, "variant": found.variant},
                )
            )
        return dict(found.config or {})

    async def text(self, kind: str, **variables: Any) -> str:
        return (await self.services.copy.render(CopyRequest(kind, "en", variables))).text

    async def schedule(
        self, session: AsyncSession, kind: str, at: datetime, payload: dict[str, Any], key: str
    ) -> bool:
        return await schedule(session, kind, at, payload, key)

    async def reward(
        self, session: AsyncSession, fx: Effects, user_id: str, reason: str, ref: str, at: datetime
    ) -> Paid | None:
        paid = await pay(session, user_id, reason, ref, at)
        fx.reward(paid)
        return paid

    async def invite_each(
        self,
        session: AsyncSession,
        fx: Effects,
        item: LoopItem,
        *,
        actor: Mapping[str, Any],
        recipients: list[str],
        action: str,
        event: str,
        payload: dict[str, Any],
    ) -> dict[str, Any]:
        """Invite each recipient to `item` through the orchestrator, as the acting user: the allowed
        ones become invited members and get `event` with `payload`; returns who was invited and why
        the others were not."""
        invited: list[str] = []
        held: dict[str, str] = {}
        sender = str(actor["sub"])
        for recipient in dict.fromkeys(recipients):
            verdict = await self.decide(session, action, sender=sender, recipient=recipient, actor=actor)
            if not verdict.allowed:
                held[recipient] = told_to_sender(verdict.reason)
                continue
            await self.member(session, item.id, recipient, "invited", self.now())
            invited.append(recipient)
            fx.to_user(recipient, event, payload)
        return {"invited": invited, "not_sent": held}

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}_{secrets.token_urlsafe(9)}"

    @staticmethod
    async def item(session: AsyncSession, item_id: Any, loop: str) -> LoopItem:
        if not isinstance(item_id, str) or len(item_id) > 32:
            raise ActionError("invalid", "item_id must be a string")
        item = await session.get(LoopItem, item_id, with_for_update=True)
        if item is None or item.loop != loop:
            raise ActionError("not_found", f"no such {loop.replace('_', ' ')}")
        return item

    @staticmethod
    def move(item: LoopItem, state: str, at: datetime, **data: Any) -> None:
        item.state = state
        item.updated_at = at
        if data:
            item.data = {**item.data, **data}

    @staticmethod
    async def member(
        session: AsyncSession, item_id: str, user_id: str, role: str, at: datetime
    ) -> LoopMember:
        row = await session.get(LoopMember, (item_id, user_id))
        if row is None:
            row = LoopMember(item_id=item_id, user_id=user_id, role=role, joined_at=at, updated_at=at)
            session.add(row)
            await session.flush()
        return row


def _owner(handler: Any) -> str:
    """The name of the loop a bound handler belongs to."""
    return str(getattr(getattr(handler, "__self__", None), "name", ""))


def hours(n: float) -> timedelta:
    return timedelta(hours=n)


class LoopEngine:
    """Dispatches events, jobs and actions to the loops and sends their effects after each commit.

    As a consumer of the event stream its `name` is "loops"; `register_jobs(scheduler)` hands every
    loop's job kinds to the durable scheduler.
    """

    name = "loops"

    def __init__(self, services: LoopServices, loops: list[Loop]) -> None:
        self.services = services
        self.loops = loops
        self._events: dict[str, list[EventHandler]] = {}
        self._jobs: dict[str, JobHandler] = {}
        self._actions: dict[str, ActionHandler] = {}
        self._setup_task: asyncio.Task[None] | None = None
        # Per loop, pushes attempted and refused by the broker in this process (guardrails read it).
        self.delivery: dict[str, tuple[int, int]] = {}
        self.setups: list[Callable[[AsyncSession], Awaitable[None]]] = [loop.setup for loop in loops]
        for loop in loops:
            for etype, handler in loop.on_events.items():
                self._events.setdefault(etype, []).append(handler)
            for kind, job in loop.jobs.items():
                self._jobs[kind] = job
            for action, act in loop.actions.items():
                if action in self._actions:
                    raise ValueError(f"two loops define the action {action!r}")
                self._actions[action] = act

    async def start(self) -> None:
        """Set the loops up (recurring jobs) in the background, retrying while the database is down:
        the web process must come up (and say 503 on /readyz) even then."""
        self._setup_task = asyncio.create_task(self._setup(), name="loops-setup")

    async def stop(self) -> None:
        if self._setup_task is not None:
            self._setup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._setup_task

    async def _setup(self, delay: float = 1.0) -> None:
        while True:
            try:
                async with self.services.database.session() as session, session.begin():
                    for setup in self.setups:
                        await setup(session)
                return
            except Exception as exc:
                log.warning("loop setup failed (%s); retrying in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def rally_standings(self, item_id: str, viewer: Viewer) -> list[dict[str, Any]]:
        """A rally's current standings as `viewer` sees them (the `rally:{id}` join reply)."""
        rally = next(loop for loop in self.loops if loop.name == "results_rally")
        async with self.services.database.session() as session:
            item = await session.get(LoopItem, item_id)
            if item is None:
                return []
            standings: list[dict[str, Any]] = await rally.standings(session, item, viewer)  # type: ignore[attr-defined]
            return standings

    @property
    def action_names(self) -> list[str]:
        return sorted(self._actions)

    # Events (ConsumerRunner's Consumer protocol).

    async def handle(
        self, events: list[dict[str, Any]], session: AsyncSession
    ) -> Callable[[], Awaitable[None]] | None:
        fx = Effects()
        for event in events:
            for handler in self._events.get(event["type"], ()):
                fx.loop = _owner(handler)
                await handler(session, event, fx)
        return (lambda: self.flush(fx)) if fx.pushes or fx.events else None

    # Jobs.

    def register_jobs(self, scheduler: Any) -> None:
        for kind, job in self._jobs.items():
            scheduler.register(kind, self._job_runner(job))

    def _job_runner(self, job: JobHandler) -> Callable[[AsyncSession, LoopJob], Awaitable[Any]]:
        async def run(session: AsyncSession, row: LoopJob) -> Callable[[], Awaitable[None]] | None:
            fx = Effects(loop=_owner(job))
            await job(session, row, fx)
            return (lambda: self.flush(fx)) if fx.pushes or fx.events else None

        return run

    # User actions.

    async def act(self, actor: dict[str, Any], action: str, params: Any) -> dict[str, Any]:
        handler = self._actions.get(action)
        if handler is None:
            raise ActionError("unknown_action", f"unknown action {action!r}; known: {self.action_names}")
        if not isinstance(params, dict):
            raise ActionError("invalid", "the action's payload must be a JSON object")
        fx = Effects(loop=_owner(handler))
        async with self.services.database.session() as session, session.begin():
            reply = await handler(session, actor, params, fx)
        await self.flush(fx)
        if "refused" in reply:  # the refusal is recorded (committed above); the caller gets an error
            reason = told_to_sender(str(reply["refused"]))
            raise ActionError("refused", str(reply.get("message") or f"not sent: {reason}"), reason)
        return reply

    async def flush(self, fx: Effects) -> None:
        if fx.events:
            try:
                await self.services.emit(fx.events)
            except Exception:  # the loop's own state is committed; the events are its announcement
                log.exception("loop events could not be emitted: %s", [e.id for e in fx.events])
        for topic, event, payload, loop in fx.pushes:
            attempted, failed = self.delivery.get(loop, (0, 0))
            try:
                await self.services.hub.broadcast(topic, event, payload)
            except BrokerUnavailable as exc:
                log.warning("loop push to %s lost: %s", topic, exc)
                failed += 1
            self.delivery[loop] = (attempted + 1, failed)
