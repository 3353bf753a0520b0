"""The demo cohort: simulated students, parents and tutors that drive a running server through its
public interfaces only (the HTTP API and Phoenix sockets), so that every feed, leaderboard, loop,
experiment, metric and dashboard moves.

    python -m web.demo --url http://127.0.0.1:8000 [--students 60] [--speed 1] [--seed 7] [--duration S]

`viral-engine serve --demo` (and so `make run`) starts it beside the server. It signs its tokens with
the server's `SECRET_KEY` (the same environment, or the development key file in the same working
directory), refuses `ENV=production` and targets loopback addresses only. Demo data is marked: user
ids start with `demo-`, every event it posts carries `props.demo = true`, its links the campaign `demo`.

What the cohort does (times in demo seconds; `--speed` divides them):

- Set-up: `--students` student profiles (a third minors, each with a parent; 70 % of minors with a
  parental consent recorded by the parent's own token; 40 % of the others with a parent too), their
  parents, a tutor per 12 students, all in time zones where it is daytime now (so quiet hours do not
  swallow the loops). A quarter of the students (at most 12) get a backfilled streak (admins may post
  the past): a third of those at risk now, so they ask friends to rescue it; two children at 6 days,
  so today makes 7 and their parents get a proud-parent card. Two experiments are created and
  started: `demo-challenge-deadline` on the buddy challenge (48 h vs 24 h; the loop itself makes the
  exposures; target `session_completed`: 22 % vs 35 % of exposed self-study students book a tutoring
  session) and `demo-share-card` (the share card after a session; the "app" sends the exposures;
  target `invite_sent`; sequential).
- Sessions: about a quarter of the students online at once (at most 16), each visit a real socket for
  10-30 s on `user:{id}`, `presence:subject:{s}`, `feed:subject:{s}` (half also a leaderboard).
  Tutored students (45 %) have a tutoring session (`session_started`, `session_completed` with topic,
  minutes, score, tutor), the others practise (`practice_completed`); then a quiz (35 %), a
  diagnostic (8 %), an exam date (5 %, once per subject), more practice (15 %); `streak_updated` on a
  new UTC day. Scores follow each student's ability, so weak students get study-buddy nudges.
- Loops, through `POST /api/loops/{action}` with the student's own token, reacting to what their
  socket receives (or, for what the demo sent them while away, at their next visit): a challenge
  after practice (30 %), after a tutoring session (10 %) or on a challenge prompt (50 %), to an
  outside contact by link half the time when allowed to share, else to a friend, who accepts (75 %)
  or declines (10 %) and both submit; a rally after a quiz (20 %) with 1-3 peers invited, who join
  (60 %) after a diagnostic; study-buddy invites (70 %) and accepts (70 %); rescues asked on the
  first visit at risk, joined by 80 % of friends and saved by a good session; parents share their
  card (70 %); a cheer on 3 % of feed items seen. Nobody makes more than 6 gated social actions.
- Invites: after a session the share card makes a link (`POST /api/links`) and an `invite_sent`
  (30 % control, 40 % celebrate). Every link (shared, outside challenge, rally, parent card) reaches
  0-3 people (25/45/20/10 %) who click it at `GET /r/{token}`, each from their own loopback address
  and visitor cookie (15 % click twice); a clicker signs up (a new user's `signup` with
  `referral_token`; `first_value` for 75 %) with a probability steered so the 7-day K hovers around
  a target that wanders in 0.9-1.4: 0.6 below it, 0.3 near it, 0.05 above it; when K runs above the
  target an existing student comes back (the base grows). New users invite in turn. No referrer
  converts more than 5 times an hour or 25 times in all (the fraud rules would hold those); 3 % of
  the clicks on a demo-born referrer's link are their own (same visitor), which the fraud rules flag.
  An organic signup now and then.
- Guardrails: recipients of loop prompts complain (5 %; `complaint` with `props.loop`) or opt out
  (0.6 %), within budgets of 2 % of the loop's prompts, 1.2 % of its recipients and 3 % of an
  experiment variant's users, so warnings may open but nothing is paused (critical is 3 % and 5 %);
  `POST /api/guardrails/check` every 30 s.

Load, with 60 students at speed 1: about 7 requests/s and 16 sockets; never more than 8 requests in
flight nor 40 a second (times the speed). Every HTTP or socket error is logged (each kind at most
every 30 s) and survived. `--seed` fixes every choice (a random.Random per person, visit and link);
only the interleaving follows the server's timing. A summary line is printed every 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ipaddress
import logging
import random
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
import orjson

from realtime import TokenVerifier

log = logging.getLogger("viral.demo")

SUBJECTS: dict[str, tuple[str, ...]] = {
    "algebra": ("linear-equations", "quadratics", "inequalities", "functions"),
    "geometry": ("triangles", "circles", "proofs", "area"),
    "biology": ("cells", "genetics", "ecology"),
    "chemistry": ("stoichiometry", "bonding", "acids"),
    "physics": ("kinematics", "forces", "energy"),
    "english": ("essays", "grammar", "reading"),
    "spanish": ("verbs", "vocabulary", "listening"),
    "history": ("revolutions", "world-wars", "empires"),
}
FIRST = (
    "Maya Sam Leo Ava Noah Zoe Omar Ivy Eli Nora Ravi Lina Kai Mia Theo Aria Jon Sofia Amir Hana Luca "
    "Ella Yuki Finn Isla Dev Rosa Ben Chloe Arjun Tara Milo Nia Hugo Lea Idris Mei Owen Sana Felix"
).split()
ADULT = "Dana Chris Priya Miguel Grace Tom Aisha Paul Ingrid Kenji Laura Samir Helen Marco Ruth".split()
ZONES = (
    "Pacific/Honolulu America/Los_Angeles America/Denver America/Chicago America/New_York "
    "America/Sao_Paulo Atlantic/Azores Europe/London Europe/Berlin Europe/Athens Europe/Moscow Asia/Dubai "
    "Asia/Karachi Asia/Kolkata Asia/Dhaka Asia/Bangkok Asia/Singapore Asia/Tokyo Australia/Sydney "
    "Pacific/Auckland"
).split()

EXPERIMENTS: tuple[dict[str, Any], ...] = (
    {
        "key": "demo-challenge-deadline",
        "name": "Buddy challenge: 24 h instead of 48 h to answer (demo)",
        "hypothesis": "A tighter deadline brings challengers back to a tutoring session.",
        "loop": "buddy_challenge",
        "variants": [
            {"key": "control", "weight": 0.5, "config": {"challenge_ttl_hours": 48}},
            {"key": "short_deadline", "weight": 0.5, "config": {"challenge_ttl_hours": 24}},
        ],
        "target_metric": "session_completed",
        "guardrail_metrics": ["opt_out", "complaint"],
        "window_days": 14,
    },
    {
        "key": "demo-share-card",
        "name": "Share card after a session: plain vs celebratory (demo)",
        "hypothesis": "Celebrating the session makes students share their invite link more often.",
        "variants": [
            {"key": "control", "weight": 0.5, "config": {"copy": "plain"}},
            {"key": "celebrate", "weight": 0.5, "config": {"copy": "celebrate"}},
        ],
        "target_metric": "invite_sent",
        "guardrail_metrics": ["opt_out", "complaint"],
        "sequential": True,
    },
)
CHALLENGE_EXP, SHARE_EXP = EXPERIMENTS[0]["key"], EXPERIMENTS[1]["key"]
# Per variant: chance an exposed self-study student books a tutoring session (the first
# experiment's conversion), and chance the share card is used after a session (the second's).
BOOK_SESSION = {"control": 0.22, "short_deadline": 0.35}
SHARE = {"control": 0.3, "celebrate": 0.4, None: 0.33}

# Which loop a push belongs to (complaints name it); the first prompts of each loop.
PUSH_LOOP = {
    "loop_prompt": "buddy_challenge",
    "challenge_invite": "buddy_challenge",
    "rally_invite": "results_rally",
    "nudge": "study_buddy",
    "rescue_request": "streak_rescue",
    "rescue_invite": "streak_rescue",
    "parent_card": "proud_parent",
}
SYSTEM_PROMPTS = frozenset({"loop_prompt", "rescue_request", "parent_card"})  # and study-buddy nudges
SOCIAL_CAP = 6  # gated social actions per person (the gate allows 20 a day; the spam guardrail warns at 10)
COMPLAINT_SHARE, OPT_OUT_SHARE, EXPERIMENT_BAD_SHARE = 0.02, 0.012, 0.03
REFERRER_PER_HOUR, REFERRER_TOTAL = 5, 25
STREAK = timedelta(hours=24)
BACKFILL_GAP = timedelta(hours=23.5)  # between backfilled days: under the 24 h a streak allows
QUIET = {"refused", "forbidden", "not_found", "not_pending", "not_open", "already_submitted"}


class Stopped(Exception):
    """The demo is shutting down."""


@dataclass
class Person:
    """One simulated user and what the driver remembers about them."""

    id: str
    role: str
    name: str
    timezone: str
    minor: bool = False
    parent_id: str | None = None
    subjects: list[str] = field(default_factory=list)
    ability: dict[str, float] = field(default_factory=dict)
    tutored: bool = False
    tutor_id: str | None = None
    consent: bool = False
    new: bool = False  # signed up during the demo (the loop's output, not its base)
    visitor_id: str | None = None
    opted_out: bool = False
    active: bool = False  # has an event on record (counts in the K-factor base unless new)
    online: bool = False
    social: int = 0
    sessions: int = 0
    last_seen: float = 0.0
    streak_days: int = 0
    streak_last: datetime | None = None
    streak_deadline: datetime | None = None
    at_risk: bool = False
    rescue_id: str | None = None
    book_session: bool = False
    maybe_exposed: bool = False
    variants: dict[str, str] = field(default_factory=dict)
    diagnostics: set[str] = field(default_factory=set)
    exams: set[str] = field(default_factory=set)
    quizzes: list[float] = field(default_factory=list)
    inbox: list[tuple[str, str, float]] = field(default_factory=list)
    handled: set[str] = field(default_factory=set)
    prompted: dict[str, float] = field(default_factory=dict)
    conversions: collections.deque[float] = field(default_factory=collections.deque)
    converted: int = 0

    @property
    def can_share(self) -> bool:
        """May send invites outside the platform (COPPA: a minor needs a parent's consent)."""
        return not self.opted_out and (not self.minor or self.consent)

    def claims(self) -> dict[str, Any]:
        claims: dict[str, Any] = {"sub": self.id, "role": self.role}
        if self.minor:
            claims["minor"] = True
        else:
            claims["name"] = self.name
        if self.subjects:
            claims["subjects"] = self.subjects
        return claims

    def profile(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "display_name": self.name,
            "role": self.role,
            "minor": self.minor,
            "timezone": self.timezone,
            "subjects": self.subjects,
        }
        if self.parent_id:
            body["parent_id"] = self.parent_id
        return body


@dataclass(frozen=True)
class Link:
    token: str
    referrer: Person
    source: str
    challenge_id: str | None = None
    rally_id: str | None = None


@dataclass
class Reply:
    status: int
    body: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def get(self, key: str, default: Any = None) -> Any:
        return self.body.get(key, default) if isinstance(self.body, dict) else default


class Api:
    """HTTP to the server: at most `in_flight` requests at once and `rate` a second; errors are logged
    (each kind at most every 30 s) and returned, never raised."""

    def __init__(self, base: str, stats: collections.Counter[str], *, in_flight: int, rate: float) -> None:
        self.base = base.rstrip("/")
        self.stats = stats
        self.client = httpx.AsyncClient(
            base_url=self.base,
            timeout=15.0,
            limits=httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight),
        )
        self.slots = asyncio.Semaphore(in_flight)
        self.interval = 1.0 / rate
        self.next_at = 0.0
        self.spread = _spread_ok(self.base)
        self.closing = False  # shutting down: the server may be gone already, say nothing
        self._logged: dict[str, tuple[float, int]] = {}

    async def _turn(self) -> None:
        now = time.monotonic()
        self.next_at = max(self.next_at + self.interval, now)
        if self.next_at > now:
            await asyncio.sleep(self.next_at - now)

    def problem(self, key: str, message: str) -> None:
        """Log a problem, at most once every 30 s per kind, with how many were not logged."""
        if self.closing:
            log.debug("%s", message)
            return
        now = time.monotonic()
        last, hidden = self._logged.get(key, (0.0, 0))
        if now - last >= 30.0:
            suffix = f" (and {hidden} more like it)" if hidden else ""
            log.warning("%s%s", message, suffix)
            self._logged[key] = (now, 0)
        else:
            self._logged[key] = (last, hidden + 1)

    async def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: Any = None,
        *,
        quiet: tuple[int, ...] = (),
        headers: dict[str, str] | None = None,
        local_address: str | None = None,
    ) -> Reply:
        """One request; `quiet` statuses are expected outcomes (a refusal, a conflict), counted only."""
        hdrs = dict(headers or {})
        if token:
            hdrs["authorization"] = f"Bearer {token}"
        async with self.slots:
            await self._turn()
            self.stats["requests"] += 1
            try:
                if local_address is None:
                    response = await self.client.request(method, path, json=body, headers=hdrs)
                else:
                    transport = httpx.AsyncHTTPTransport(local_address=local_address)
                    async with httpx.AsyncClient(base_url=self.base, transport=transport, timeout=15) as one:
                        response = await one.request(method, path, headers=hdrs)
            except httpx.HTTPError as exc:
                self.stats["errors"] += 1
                self.problem(f"transport {type(exc).__name__}", f"{method} {path}: {exc!r}")
                if not self.closing:
                    await asyncio.sleep(1.0)  # the server is busy or gone: do not spin
                return Reply(0, None)
        try:
            parsed = response.json() if "json" in response.headers.get("content-type", "") else None
        except ValueError:
            parsed = None
        status = response.status_code
        if status >= 400:
            code = parsed.get("code") if isinstance(parsed, dict) else None
            if status in quiet or code in QUIET:
                self.stats["refused"] += 1
                log.debug("%s %s -> %d %s", method, path, status, response.text[:200])
            else:
                self.stats["errors"] += 1
                route = "/".join(path.split("?")[0].split("/")[:3])
                self.problem(f"{route} {status}", f"{method} {path} -> {status}: {response.text[:300]}")
        return Reply(status, parsed)

    async def close(self) -> None:
        await self.client.aclose()


def _spread_ok(base: str) -> bool:
    """Clicks come from many loopback addresses only when the server is on IPv4 loopback."""
    host = urlsplit(base).hostname or ""
    try:
        return ipaddress.ip_address(host).version == 4 and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PhxSocket:
    """A minimal Phoenix Channels V2 client: joins and requests matched to replies by ref, a
    heartbeat every 25 s, and every push handed to `on_push(topic, event, payload)`."""

    def __init__(self, ws: Any, on_push: Callable[[str, str, Any], None]) -> None:
        self.ws = ws
        self.on_push = on_push
        self._ref = 0
        self._joins: dict[str, str] = {}
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())
        self._beat = asyncio.create_task(self._heartbeat())

    @classmethod
    async def connect(cls, ws_base: str, token: str, on_push: Callable[[str, str, Any], None]) -> PhxSocket:
        import websockets

        ws = await websockets.connect(
            f"{ws_base}/socket/websocket?vsn=2.0.0&token={token}",
            open_timeout=5,
            close_timeout=2,
            ping_interval=None,
            max_size=8 << 20,
        )
        return cls(ws, on_push)

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                frame = orjson.loads(raw)
                if not isinstance(frame, list) or len(frame) != 5:
                    continue
                _, ref, topic, event, payload = frame
                if event == "phx_reply":
                    future = self._pending.pop(ref, None)
                    if future is not None and not future.done():
                        future.set_result(payload if isinstance(payload, dict) else {})
                else:
                    self.on_push(topic, event, payload)

    async def _heartbeat(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                await asyncio.sleep(25)
                await self.request("phoenix", "heartbeat", {})

    async def request(
        self, topic: str, event: str, payload: Any, timeout: float = 5.0
    ) -> dict[str, Any] | None:
        """Send one message and wait for its reply; None when it timed out or the socket is gone."""
        self._ref += 1
        ref = str(self._ref)
        if event == "phx_join":
            self._joins[topic] = ref
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ref] = future
        try:
            await self.ws.send(orjson.dumps([self._joins.get(topic), ref, topic, event, payload]).decode())
            return await asyncio.wait_for(future, timeout)
        except Exception:
            return None
        finally:
            self._pending.pop(ref, None)

    async def join(self, topic: str, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
        reply = await self.request(topic, "phx_join", params or {})
        if reply is None or reply.get("status") != "ok":
            return None
        response = reply.get("response")
        return response if isinstance(response, dict) else {}

    async def close(self) -> None:
        self._beat.cancel()
        with contextlib.suppress(Exception):
            await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader
        with contextlib.suppress(BaseException):
            await self._beat


def daytime_zones(now: datetime) -> list[str]:
    """Time zones where it is 09:00-17:00 now, so the recipients' quiet hours do not swallow the loops."""
    good: list[str] = []
    nearest: list[tuple[int, str]] = []
    for name in ZONES:
        try:
            hour = now.astimezone(ZoneInfo(name)).hour
        except (ZoneInfoNotFoundError, ValueError):
            continue
        nearest.append((abs(hour - 13), name))
        if 9 <= hour < 17:
            good.append(name)
    if good:
        return good
    return [min(nearest)[1]] if nearest else ["UTC"]


def advance_streak(p: Person, at: datetime) -> bool:
    """The server's streak rule (loops/streak.py), mirrored; True when the day count went up."""
    if p.streak_last is None or p.streak_deadline is None:
        p.streak_days, p.streak_last, p.streak_deadline = 1, at, at + STREAK
        return True
    if at <= p.streak_last:
        return False
    before = p.streak_days
    if at > p.streak_deadline or p.streak_days == 0:
        p.streak_days = 1
    elif at.date() > p.streak_last.date():
        p.streak_days += 1
    p.streak_last, p.streak_deadline = at, at + STREAK
    return p.streak_days > before


@dataclass
class DemoOptions:
    url: str = "http://127.0.0.1:8000"
    students: int = 60
    speed: float = 1.0
    seed: int = 7
    duration: float | None = None  # seconds from the start, set-up included; None: until stopped
    summary_every: float = 10.0
    in_flight: int = 8
    rate: float = 40.0  # requests a second at speed 1


class Demo:
    """The cohort and its behaviour; `run()` sets it up, then drives the server until stopped."""

    def __init__(self, options: DemoOptions, secret: str) -> None:
        self.o = options
        self.speed = max(options.speed, 0.01)
        self.verifier = TokenVerifier(secret)
        self.stats: collections.Counter[str] = collections.Counter()
        self.api = Api(
            options.url, self.stats, in_flight=options.in_flight, rate=options.rate * max(1.0, self.speed)
        )
        self.ws_base = "ws" + options.url.rstrip("/").removeprefix("http")
        self.run_tag = format(int(time.time()) % 36**5, "x")
        self.people: dict[str, Person] = {}
        self.students: list[Person] = []  # awake students, the ones who hold sessions
        self.dormant: collections.deque[Person] = collections.deque()
        self.parents: list[Person] = []
        self.tutors: list[Person] = []
        self.zones: list[str] = ["UTC"]
        self.tokens: dict[str, tuple[str, float]] = {}
        self.sockets: dict[str, PhxSocket] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stop = asyncio.Event()
        self.started = time.monotonic()
        self.target_k = 1.15
        self.k_server: tuple[int, int] | None = None  # (attributed signups, base) at the last read
        self.k_delta = [0, 0]  # signups and base added since
        self.k_last: dict[str, Any] = {}
        self.shown: collections.Counter[str] = collections.Counter()
        self.complaints: collections.Counter[str] = collections.Counter()
        self.opt_outs: collections.Counter[str] = collections.Counter()
        self.recipients: dict[str, set[str]] = collections.defaultdict(set)
        self.exposed: dict[str, dict[str, set[str]]] = collections.defaultdict(
            lambda: collections.defaultdict(set)
        )
        self.bad: dict[str, dict[str, set[str]]] = collections.defaultdict(
            lambda: collections.defaultdict(set)
        )
        self.counter = 0

    # Plumbing.

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    async def pause(self, demo_seconds: float) -> None:
        """Sleep `demo_seconds / speed`; raises Stopped when the demo ends meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), max(demo_seconds, 0.0) / self.speed)
        if self.stop.is_set():
            raise Stopped

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str = "") -> None:
        """Run a behaviour in the background; its failure is logged, never the demo's end."""
        if self.stop.is_set():
            coro.close()
            return
        task = asyncio.create_task(coro, name=name or None)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, Stopped):
            self.stats["errors"] += 1
            self.api.problem(f"task {type(exc).__name__}", f"demo task {task.get_name()} failed: {exc!r}")

    def token(self, p: Person | None) -> str:
        """A cached token for `p` (None: the demo's admin), re-signed an hour before it expires."""
        key = p.id if p is not None else "demo-ops"
        cached = self.tokens.get(key)
        if cached is not None and cached[1] - time.time() > 3600:
            return cached[0]
        claims = p.claims() if p is not None else {"sub": "demo-ops", "role": "admin", "name": "Demo ops"}
        token = self.verifier.issue(claims, ttl=6 * 3600)
        self.tokens[key] = (token, time.time() + 6 * 3600)
        return token

    @property
    def admin(self) -> str:
        return self.token(None)

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"demo-{prefix}-{self.run_tag}-{self.counter}"

    async def events(self, *items: tuple[Any, ...]) -> bool:
        """Post events `(type, person, props[, ts])` as the admin in one batch, marked as demo data;
        True when accepted. Only admins may post for others and date events in the past."""
        batch = []
        for etype, person, props, *ts in items:
            event: dict[str, Any] = {"type": etype, "user_id": person.id, "props": {**props, "demo": True}}
            if ts:
                event["ts"] = ts[0].isoformat()
            batch.append(event)
        reply = await self.api.call("POST", "/api/events", self.admin, batch)
        if reply.ok:
            self.stats["events"] += len(batch)
            for item in items:
                self.activate(item[1])
        return reply.ok

    def activate(self, p: Person) -> None:
        if not p.active:
            p.active = True
            if not p.new:
                self.k_delta[1] += 1

    async def act(self, p: Person, action: str, params: dict[str, Any]) -> Reply:
        """A loop action as the user (`POST /api/loops/{action}`); refusals are expected outcomes."""
        reply = await self.api.call(
            "POST", f"/api/loops/{action}", self.token(p), params, quiet=(403, 404, 422)
        )
        if reply.status == 403 and reply.get("code") == "refused":
            self.stats[f"paced:{str(reply.get('error', '')).removeprefix('not sent: ')}"] += 1
        return reply

    # The cohort.

    def _person(self, pid: str, role: str, rng: random.Random, **fields: Any) -> Person:
        if role == "student":
            name = f"{rng.choice(FIRST)} {rng.choice('ABCDEFGHJKLMNPRSTVW')}."
        elif role == "tutor":
            name = f"{rng.choice(('Ms.', 'Mr.', 'Dr.'))} {rng.choice(ADULT)}"
        else:
            name = f"{rng.choice(ADULT)} {rng.choice('ABCDEFGHJKLMNPRSTVW')}."
        p = Person(pid, role, name, rng.choice(self.zones), **fields)
        self.people[pid] = p
        return p

    def _student(
        self, pid: str, rng: random.Random, *, new: bool = False, subject: str | None = None
    ) -> Person:
        p = self._person(pid, "student", rng, new=new)
        subjects = rng.sample(sorted(SUBJECTS), rng.choice((1, 2, 2, 3)))
        if subject is not None and subject not in subjects:
            subjects[0] = subject
        p.subjects = subjects
        p.ability = {s: min(97.0, max(40.0, rng.gauss(72, 13))) for s in subjects}
        p.tutored = rng.random() < 0.45
        if p.tutored and self.tutors:
            p.tutor_id = rng.choice(self.tutors).id
        return p

    def _cohort(self) -> list[Person]:
        """The starting cohort: students, their parents, tutors (all existing platform accounts)."""
        rng = random.Random(f"{self.o.seed}:cohort")
        self.tutors = [
            self._person(f"demo-t{i:03d}", "tutor", rng) for i in range(max(2, self.o.students // 12))
        ]
        made: list[Person] = list(self.tutors)
        for i in range(self.o.students):
            s = self._student(f"demo-s{i:03d}", rng)
            s.minor = rng.random() < 0.35
            if s.minor or rng.random() < 0.4:
                if self.parents and rng.random() < 0.25:
                    parent = self.parents[-1]  # a sibling
                else:
                    parent = self._person(f"demo-p{len(self.parents):03d}", "parent", rng)
                    parent.timezone = s.timezone
                    self.parents.append(parent)
                    made.append(parent)
                s.parent_id = parent.id
                s.consent = s.minor and rng.random() < 0.7
            made.append(s)
            self.dormant.append(s)
        return made

    async def setup(self) -> bool:
        """Profiles, consents, experiments, backfilled streaks; False when the server refuses us."""
        now = datetime.now(UTC)
        self.zones = daytime_zones(now)
        probe = await self.api.call("GET", "/api/experiments", self.admin)
        if probe.status in (401, 403):
            log.error(
                "the server refused the demo's admin token (%s): run the demo with the server's SECRET_KEY "
                "(the same environment, or the same working directory for the development key)",
                probe.get("error"),
            )
            return False
        if probe.status == 0:
            log.error("cannot reach %s", self.o.url)
            return False
        people = self._cohort()
        await asyncio.gather(*(self._put(p) for p in people))
        consents = [s for s in self.dormant if s.consent and s.parent_id]
        await asyncio.gather(
            *(
                self.api.call(
                    "POST",
                    f"/api/users/{s.id}/consent",
                    self.token(self.people[s.parent_id or ""]),
                    {"method": "signed_form"},
                )
                for s in consents
            )
        )
        await self._experiments()
        await self._backfill(now)
        while len(self.students) < max(8, self.o.students // 5) and self.dormant:
            self.wake()
        log.info(
            "demo cohort ready: %d students (%d awake), %d parents, %d tutors; time zones %s",
            self.o.students,
            len(self.students),
            len(self.parents),
            len(self.tutors),
            ", ".join(self.zones[:4]) + ("…" if len(self.zones) > 4 else ""),
        )
        return True

    async def _put(self, p: Person) -> bool:
        return (await self.api.call("PUT", f"/api/users/{p.id}", self.admin, p.profile())).ok

    async def _experiments(self) -> None:
        for definition in EXPERIMENTS:
            await self.api.call("POST", "/api/experiments", self.admin, definition, quiet=(409,))
            await self.api.call(
                "POST", f"/api/experiments/{definition['key']}/start", self.admin, quiet=(409,)
            )

    async def _backfill(self, now: datetime) -> None:
        """Streak histories (admins may post the past): some at risk now, two children at 6 days whose
        first activity today makes 7 (a proud-parent milestone), the rest safely alive."""
        rng = random.Random(f"{self.o.seed}:backfill")
        pool = list(self.dormant)
        rng.shuffle(pool)
        holders = pool[: max(3, min(12, len(pool) // 4))]
        children = [s for s in holders if s.parent_id][:2]
        at_risk = [s for s in holders if s not in children][: max(1, len(holders) // 3)]
        batches = []
        for s in holders:
            plan = self._streak_plan(s, now, rng, seven=s in children, risk=s in at_risk)
            if plan is None:
                continue
            days, last = plan
            subject, batch = s.subjects[0], []
            for k in range(days):
                at = last - (days - 1 - k) * BACKFILL_GAP
                advance_streak(s, at)
                props = {
                    "subject": subject,
                    "topic": rng.choice(SUBJECTS[subject]),
                    "score": self.score(s, subject, rng),
                }
                batch.append(("practice_completed", s, props, at))
            batch.append(("streak_updated", s, {"days": s.streak_days}, last))
            batches.append(batch)
            s.at_risk = s in at_risk
            self.wake(s)
        self.stats["streaks"] += len(batches)
        await asyncio.gather(*(self.events(*batch) for batch in batches))

    @staticmethod
    def _streak_plan(
        s: Person, now: datetime, rng: random.Random, *, seven: bool, risk: bool
    ) -> tuple[int, datetime] | None:
        """(days of history, last activity) for the wanted streak state, checked with the server's rule."""
        tries = [(d, h / 2) for d in range(2, 13) for h in range(2, 48)]
        rng.shuffle(tries)
        for days, hours_ago in tries:
            last = now - timedelta(hours=hours_ago)
            probe = Person(s.id, s.role, s.name, s.timezone)
            for k in range(days):
                advance_streak(probe, last - (days - 1 - k) * BACKFILL_GAP)
            assert probe.streak_deadline is not None
            left = (probe.streak_deadline - now).total_seconds() / 3600
            if left <= 0.5:
                continue
            if seven and probe.streak_days == 6 and last.date() < now.date() and left > 2:
                return days, last
            if risk and probe.streak_days >= 2 and left < 5.5:
                return days, last
            if not seven and not risk and left > 7:
                return days, last
        return None

    def wake(self, s: Person | None = None) -> Person:
        """An existing student starts using the platform (again): the K-factor base grows."""
        if s is None:
            if self.dormant:
                s = self.dormant.popleft()
            else:  # everyone is awake: another existing account turns up
                rng = random.Random(f"{self.o.seed}:import:{len(self.people)}")
                s = self._student(f"demo-s{len(self.people):03d}", rng)
                self.spawn(self._put(s), "profile")
        elif s in self.dormant:
            self.dormant.remove(s)
        if s not in self.students:
            self.students.append(s)
        return s

    # The K-factor steering.

    def k_estimate(self) -> float:
        """Attributed signups over the base: the server's last numbers plus what was added since,
        counting students woken but not yet active as base already (so waking does not overshoot)."""
        if self.k_server is not None:
            signups, base = self.k_server[0] + self.k_delta[0], self.k_server[1] + self.k_delta[1]
        else:
            signups = sum(1 for p in self.people.values() if p.new and p.visitor_id)
            base = sum(1 for p in self.people.values() if p.active and not p.new)
        base += sum(1 for p in self.students if not p.active and not p.new)
        return signups / base if base else 0.0

    def p_signup(self) -> float:
        k = self.k_estimate()
        if k < self.target_k - 0.05:
            return 0.6
        if k > self.target_k + 0.1:
            return 0.05
        return 0.3

    async def population(self) -> None:
        """Every 2 s: wake a student when K runs above its target, drift the target, trim the roster,
        now and then an organic signup."""
        rng = random.Random(f"{self.o.seed}:population")
        last_walk = 0.0
        while True:
            await self.pause(2.0)
            if self.k_estimate() > self.target_k + 0.05 or len(self.students) < 4:
                self.wake()
                self.stats["woken"] += 1
            if self.elapsed() * self.speed - last_walk >= 20:
                last_walk = self.elapsed() * self.speed
                self.target_k = min(1.4, max(0.9, self.target_k + rng.uniform(-0.12, 0.12)))
            cap = max(30, 3 * self.o.students)
            if len(self.students) > cap:
                idle = [p for p in self.students if not p.online and p.sessions]
                idle.sort(key=lambda p: p.last_seen)
                for p in idle[: len(self.students) - cap]:
                    self.students.remove(p)
            if rng.random() < 0.04:
                self.spawn(self.signup(None, None, rng), "organic signup")

    # Sessions.

    def online_target(self) -> int:
        return max(2, min(16, self.o.students // 4 + 2, round(len(self.students) * 0.7)))

    async def sessions(self) -> None:
        """Keep about `online_target()` students online, picking who has been away longest of a few."""
        rng = random.Random(f"{self.o.seed}:sessions")
        while True:
            await self.pause(0.5)
            online = sum(1 for p in self.students if p.online)
            if online >= self.online_target():
                continue
            away = [p for p in self.students if not p.online]
            if not away:
                continue
            back = [p for p in away if not p.active and not p.new]  # woken: they join the base first
            p = back[0] if back else min(rng.sample(away, min(4, len(away))), key=lambda x: x.last_seen)
            p.online = True
            self.spawn(
                self.session(p, random.Random(f"{self.o.seed}:{p.id}:{p.sessions}")), f"session {p.id}"
            )

    async def connect(self, p: Person, topics: list[tuple[str, dict[str, Any]]]) -> PhxSocket | None:
        try:
            sock = await PhxSocket.connect(
                self.ws_base, self.token(p), lambda t, e, m: self.on_push(p, t, e, m)
            )
        except Exception as exc:
            self.stats["errors"] += 1
            self.api.problem(f"socket {type(exc).__name__}", f"socket for {p.id}: {exc!r}")
            return None
        self.stats["sockets"] += 1
        self.sockets[p.id] = sock
        for topic, params in topics:
            if await sock.join(topic, params) is None:
                self.stats["join_refused"] += 1
        return sock

    async def disconnect(self, p: Person, sock: PhxSocket | None) -> None:
        if sock is not None:
            if self.sockets.get(p.id) is sock:
                del self.sockets[p.id]
            await sock.close()

    async def session(self, p: Person, rng: random.Random) -> None:
        """One visit: a socket on the student's topics, a study session, loop actions, the share card."""
        subject = rng.choice(p.subjects)
        p.sessions += 1
        topics: list[tuple[str, dict[str, Any]]] = [
            (f"user:{p.id}", {}),
            (f"presence:subject:{subject}", {"status": "in_session"}),
            (f"feed:subject:{subject}", {}),
        ]
        if rng.random() < 0.5:
            topics.append((f"leaderboard:{subject}:{rng.choice(('daily', 'weekly', 'all_time'))}", {}))
        sock = await self.connect(p, topics)
        try:
            if sock is None:
                await self.pause(5.0)
                return
            self.stats["sessions"] += 1
            await self.inbox(p, rng)
            if p.at_risk:
                await self.ask_rescue(p, rng)
            await self.study(p, subject, rng)
            await self.share_card(p, rng)
            await self.pause(rng.uniform(1, 4))
        finally:
            p.online, p.last_seen = False, time.monotonic()
            await self.disconnect(p, sock)

    def score(self, p: Person, subject: str, rng: random.Random, boost: float = 0.0) -> int:
        return round(min(100.0, max(0.0, rng.gauss(p.ability.get(subject, 70.0) + boost, 9))))

    async def activity(self, p: Person, etype: str, props: dict[str, Any]) -> bool:
        """A studying event, with `streak_updated` when it starts a new streak day."""
        now = datetime.now(UTC)
        items: list[tuple[str, Person, dict[str, Any]]] = [(etype, p, props)]
        if etype != "session_started" and advance_streak(p, now) and p.streak_days > 1:
            items.append(("streak_updated", p, {"days": p.streak_days}))
        return await self.events(*items)

    async def study(self, p: Person, subject: str, rng: random.Random) -> None:
        """The studying part of a visit: a tutoring session or practice, then maybe more."""
        topic = rng.choice(SUBJECTS[subject])
        if (
            p.streak_days == 6
            and p.parent_id
            and p.streak_last
            and p.streak_last.date() < datetime.now(UTC).date()
        ):
            await self.parent_online(p)  # today makes 7 days: the parent's card is on its way
        await self.pause(rng.uniform(1, 3))
        if p.tutored or p.book_session or p.rescue_id:
            started = {"subject": subject, "topic": topic, **({"tutor_id": p.tutor_id} if p.tutor_id else {})}
            await self.events(("session_started", p, started))
            await self.pause(rng.uniform(3, 8))
            props: dict[str, Any] = {
                "subject": subject,
                "topic": topic,
                "minutes": rng.choice((20, 25, 30, 40, 45, 60)),
                "score": self.score(p, subject, rng, 15.0 if p.rescue_id else 0.0),
            }
            if p.tutor_id:
                props["tutor_id"] = p.tutor_id
            if p.rescue_id:
                props["rescue_id"], props["score"] = p.rescue_id, max(65, props["score"])
                p.rescue_id = None
                self.stats["rescue_sessions"] += 1
            p.book_session = False
            await self.activity(p, "session_completed", props)
            if rng.random() < 0.1:
                await self.pause(rng.uniform(1, 3))
                await self.challenge(p, subject, rng)
        else:
            deck = f"{subject}-{topic}-{rng.randint(1, 20)}"
            score = self.score(p, subject, rng)
            await self.activity(
                p, "practice_completed", {"subject": subject, "topic": topic, "deck_id": deck, "score": score}
            )
            await self.pause(rng.uniform(1, 3))
            if rng.random() < 0.3:
                await self.challenge(p, subject, rng, deck)
        if rng.random() < 0.35:
            await self.pause(rng.uniform(2, 5))
            await self.quiz(p, subject, rng)
        if subject not in p.diagnostics and rng.random() < 0.08:
            await self.diagnostic(p, subject, rng)
        if subject not in p.exams and rng.random() < 0.05:
            p.exams.add(subject)
            exam_at = datetime.now(UTC) + timedelta(days=rng.randint(2, 6), hours=rng.randint(0, 8))
            await self.events(("exam_scheduled", p, {"subject": subject, "exam_at": exam_at.isoformat()}))
        if rng.random() < 0.15 and self.students:
            await self.pause(rng.uniform(1, 3))
            await self.practice(p, subject, rng)

    async def practice(self, p: Person, subject: str, rng: random.Random) -> None:
        topic = rng.choice(SUBJECTS[subject])
        await self.activity(
            p,
            "practice_completed",
            {"subject": subject, "topic": topic, "score": self.score(p, subject, rng)},
        )

    async def quiz(self, p: Person, subject: str, rng: random.Random) -> None:
        boost = 0.0
        if p.parent_id and len(p.quizzes) >= 2 and rng.random() < 0.15:
            average = sum(p.quizzes[-10:]) / len(p.quizzes[-10:])
            boost = average + rng.uniform(18, 25) - p.ability.get(subject, 70.0)
            await self.parent_online(p)  # a big jump: the parent gets a card
        score = self.score(p, subject, rng, boost)
        p.quizzes.append(score)
        await self.activity(p, "quiz_result", {"subject": subject, "score": score})
        if rng.random() < 0.2 and p.can_share and p.social < SOCIAL_CAP:
            await self.pause(rng.uniform(1, 3))
            await self.start_rally(p, subject, rng)

    async def diagnostic(self, p: Person, subject: str, rng: random.Random) -> None:
        if subject in p.diagnostics:
            return
        p.diagnostics.add(subject)
        await self.activity(
            p, "diagnostic_completed", {"subject": subject, "score": self.score(p, subject, rng)}
        )

    # Loops.

    def friends(self, p: Person, subject: str, rng: random.Random, k: int, loop: str) -> list[Person]:
        """Other students to involve: online ones in the subject first, nobody opted out, nobody this
        loop prompted in the last 4 hours (the orchestrator's cooldown)."""
        now = time.monotonic()
        pool = [
            f
            for f in self.students
            if f is not p and not f.opted_out and now - f.prompted.get(loop, -1e9) > 4 * 3600
        ]
        rng.shuffle(pool)
        pool.sort(key=lambda f: (not f.online, subject not in f.subjects))
        return pool[:k]

    def note_sent(self, p: Person, loop: str, recipients: list[Person]) -> None:
        p.social += 1
        for r in recipients:
            r.prompted[loop] = time.monotonic()
            self.recipients[loop].add(r.id)
        self.shown[loop] += max(1, len(recipients))

    async def challenge(self, p: Person, subject: str, rng: random.Random, deck: str | None = None) -> None:
        """Challenge a friend, or (half the time, when allowed to share) an outside contact by link."""
        if p.opted_out or p.social >= SOCIAL_CAP or f"challenged:{p.sessions}" in p.handled:
            return
        p.handled.add(f"challenged:{p.sessions}")
        outside = p.can_share and rng.random() < 0.5
        params: dict[str, Any] = {"subject": subject, "deck_id": deck}
        friend = None
        if outside:
            params["outside"] = True
        else:
            found = self.friends(p, subject, rng, 1, "buddy_challenge")
            if not found:
                return
            friend = found[0]
            params["friend_id"] = friend.id
        p.maybe_exposed = True
        reply = await self.act(p, "challenge", params)
        if not reply.ok:
            return
        self.stats["challenges"] += 1
        self.note_sent(p, "buddy_challenge", [friend] if friend else [])
        challenge_id = str(reply.get("challenge_id"))
        if friend is not None:
            friend.inbox.append(("challenge", challenge_id, time.monotonic()))
        elif reply.get("token"):
            self.spawn(
                self.spread(Link(str(reply.get("token")), p, "buddy_challenge", challenge_id=challenge_id))
            )
        await self.learn_variant(p, CHALLENGE_EXP)
        await self.pause(rng.uniform(2, 5))
        await self.act(
            p, "submit_challenge", {"challenge_id": challenge_id, "score": self.quiz_score(p, subject, rng)}
        )

    def quiz_score(self, p: Person, subject: str, rng: random.Random, questions: int = 5) -> int:
        chance = p.ability.get(subject, 70.0) / 100
        return sum(rng.random() < chance for _ in range(questions))

    async def learn_variant(self, p: Person, key: str) -> None:
        """After the loop exposed `p`, read their variant (sticky) so behaviour can follow it."""
        if key in p.variants:
            return
        reply = await self.api.call(
            "GET", f"/api/experiments/{key}/assignment?user_id={p.id}", self.admin, quiet=(404,)
        )
        variant = reply.get("variant")
        if reply.ok and reply.get("in_experiment") and isinstance(variant, str):
            p.variants[key] = variant
            self.exposed[key][variant].add(p.id)
            if key == CHALLENGE_EXP and not p.tutored:
                p.book_session = random.Random(f"{self.o.seed}:{p.id}:book").random() < BOOK_SESSION.get(
                    variant, 0.2
                )

    async def accept_challenge(
        self, p: Person, challenge_id: str, rng: random.Random, token: str | None = None
    ) -> None:
        if challenge_id in p.handled:
            return
        p.handled.add(challenge_id)
        if rng.random() > 0.75:
            if rng.random() < 0.4:
                await self.act(p, "decline_challenge", {"challenge_id": challenge_id})
            return
        params = {"challenge_id": challenge_id, **({"token": token} if token else {})}
        reply = await self.act(p, "accept_challenge", params)
        if not reply.ok:
            return
        self.stats["challenges_accepted"] += 1
        sock = self.sockets.get(p.id)
        if sock is not None:
            await sock.join(f"challenge:{challenge_id}")
        await self.pause(rng.uniform(2, 6))
        subject = p.subjects[0]
        reply = await self.act(
            p, "submit_challenge", {"challenge_id": challenge_id, "score": self.quiz_score(p, subject, rng)}
        )
        if reply.ok and reply.get("state") == "completed":
            self.stats["challenges_completed"] += 1

    async def start_rally(self, p: Person, subject: str, rng: random.Random) -> None:
        reply = await self.act(p, "start_rally", {"subject": subject})
        if not reply.ok:
            return
        self.stats["rallies"] += 1
        p.social += 1
        rally_id = str(reply.get("rally_id"))
        sock = self.sockets.get(p.id)
        if sock is not None:
            await sock.join(f"rally:{rally_id}")
        self.spawn(self.spread(Link(str(reply.get("token")), p, "results_rally", rally_id=rally_id)))
        peers = self.friends(p, subject, rng, rng.randint(1, 3), "results_rally")
        if not peers:
            return
        reply = await self.act(
            p, "invite_to_rally", {"rally_id": rally_id, "user_ids": [f.id for f in peers]}
        )
        invited = [f for f in peers if f.id in (reply.get("invited") or [])]
        if invited:
            self.note_sent(p, "results_rally", invited)
            for f in invited:
                f.inbox.append(("rally", rally_id, time.monotonic()))

    async def join_rally(
        self, p: Person, rally_id: str, subject: str | None, rng: random.Random, token: str | None = None
    ) -> None:
        if rally_id in p.handled:
            return
        p.handled.add(rally_id)
        if token is None and rng.random() > 0.6:
            return
        subject = subject or p.subjects[0]
        if subject not in p.diagnostics:
            await self.diagnostic(p, subject, rng)
        params = {"rally_id": rally_id, **({"token": token} if token else {})}
        reply = await self.act(p, "join_rally", params)
        if reply.ok:
            self.stats["rally_joins"] += 1
            sock = self.sockets.get(p.id)
            if sock is not None:
                await sock.join(f"rally:{rally_id}")

    async def ask_rescue(self, p: Person, rng: random.Random) -> None:
        """A student whose streak is at risk asks up to 3 friends, then saves it with a good session."""
        p.at_risk = False
        friends = self.friends(p, p.subjects[0], rng, rng.randint(1, 3), "streak_rescue")
        if not friends or p.opted_out:
            return
        reply = await self.act(p, "request_rescue", {"friend_ids": [f.id for f in friends]})
        if not reply.ok:
            return
        self.stats["rescues"] += 1
        p.rescue_id = str(reply.get("rescue_id"))
        invited = [f for f in friends if f.id in (reply.get("invited") or [])]
        self.note_sent(p, "streak_rescue", invited)
        for f in invited:
            f.inbox.append(("rescue", p.rescue_id, time.monotonic()))

    async def join_rescue(self, p: Person, rescue_id: str, rng: random.Random) -> None:
        if rescue_id in p.handled:
            return
        p.handled.add(rescue_id)
        if rng.random() < 0.8 and (await self.act(p, "join_rescue", {"rescue_id": rescue_id})).ok:
            self.stats["rescue_joins"] += 1

    async def invite_buddy(self, p: Person, payload: dict[str, Any], rng: random.Random) -> None:
        nudge_id = str(payload.get("nudge_id"))
        listed = [b.get("user_id") for b in payload.get("buddies") or [] if isinstance(b, dict)]
        buddies = [str(b) for b in listed if b in self.people and not self.people[str(b)].opted_out]
        if nudge_id in p.handled or not buddies or p.social >= SOCIAL_CAP:
            return
        p.handled.add(nudge_id)
        if rng.random() > 0.7:
            return
        buddy = self.people[buddies[0]]
        if (await self.act(p, "invite_buddy", {"nudge_id": nudge_id, "buddy_id": buddy.id})).ok:
            self.stats["buddy_invites"] += 1
            self.note_sent(p, "study_buddy", [buddy])
            buddy.inbox.append(("buddy", nudge_id, time.monotonic()))

    async def accept_buddy(self, p: Person, nudge_id: str, rng: random.Random) -> None:
        if nudge_id in p.handled:
            return
        p.handled.add(nudge_id)
        if rng.random() < 0.7 and (await self.act(p, "accept_nudge", {"nudge_id": nudge_id})).ok:
            self.stats["buddy_accepts"] += 1
            sock = self.sockets.get(p.id)
            if sock is not None:
                await sock.join(f"challenge:{nudge_id}")

    async def inbox(self, p: Person, rng: random.Random) -> None:
        """What was sent to `p` while they were away (the app shows it when they come back)."""
        items, p.inbox = p.inbox, []
        for kind, item_id, at in items:
            if item_id in p.handled or time.monotonic() - at > 50 * 60:
                continue
            if kind == "challenge":
                await self.accept_challenge(p, item_id, rng)
            elif kind == "rally":
                await self.join_rally(p, item_id, None, rng)
            elif kind == "rescue":
                await self.join_rescue(p, item_id, rng)
            elif kind == "buddy":
                await self.accept_buddy(p, item_id, rng)

    def on_push(self, p: Person, topic: str, event: str, payload: Any) -> None:
        """A push on one of `p`'s sockets: count it, and react the way a person would."""
        self.stats["pushes"] += 1
        if not isinstance(payload, dict):
            return
        rng = random.Random(f"{self.o.seed}:{p.id}:{event}:{self.stats['pushes']}")
        loop = PUSH_LOOP.get(event)
        if loop is not None and topic == f"user:{p.id}":
            self.stats[f"push:{event}"] += 1
            if event in SYSTEM_PROMPTS or payload.get("kind") == "study_buddy":
                self.shown[loop] += 1  # the others were counted when the demo sent them (note_sent)
            self.recipients[loop].add(p.id)
            p.prompted[loop] = time.monotonic()
            self.spawn(self.maybe_object(p, loop, rng), "objection")
        if event == "loop_prompt" and payload.get("action") == "challenge" and rng.random() < 0.5:
            subject = payload.get("subject") if payload.get("subject") in SUBJECTS else p.subjects[0]
            self.spawn(self.challenge(p, str(subject), rng, payload.get("deck_id")), "challenge")
        elif event == "challenge_invite":
            self.spawn(self.accept_challenge(p, str(payload.get("challenge_id")), rng), "accept")
        elif event == "nudge" and payload.get("kind") == "study_buddy":
            self.stats["nudges"] += 1
            self.spawn(self.invite_buddy(p, payload, rng), "invite buddy")
        elif event == "nudge" and payload.get("kind") == "buddy_invite":
            self.spawn(self.accept_buddy(p, str(payload.get("nudge_id")), rng), "accept buddy")
        elif event == "rally_invite":
            self.spawn(
                self.join_rally(p, str(payload.get("rally_id")), payload.get("subject"), rng), "join rally"
            )
        elif event == "rescue_request" and p.rescue_id is None and not p.at_risk:
            p.at_risk = True  # asked at the start of the next visit, before any activity
        elif event == "rescue_invite":
            self.spawn(self.join_rescue(p, str(payload.get("rescue_id")), rng), "join rescue")
        elif event == "rescue_saved":
            self.stats["rescues_saved"] += 1
        elif event == "parent_card":
            self.stats["parent_cards"] += 1
            self.spawn(self.share_parent_card(p, payload, rng), "parent share")
        elif event == "challenge_result":
            self.stats["challenge_results"] += 1
        elif event == "reward":
            self.stats["rewards"] += 1
        elif event in ("insight", "tutor_insight"):
            self.stats["insights"] += 1
        elif event == "new_activity" and topic.startswith("feed:") and rng.random() < 0.03:
            offset = payload.get("offset")
            sock = self.sockets.get(p.id)
            if isinstance(offset, int) and sock is not None and not p.opted_out:
                self.spawn(sock.request(topic, "react", {"offset": offset, "kind": "cheer"}), "cheer")
                self.stats["cheers"] += 1

    async def maybe_object(self, p: Person, loop: str, rng: random.Random) -> None:
        """Now and then a recipient complains about a loop's message, more rarely opts out — within
        budgets that keep the guardrails at a warning, never a pause."""
        roll = rng.random()
        if roll < 0.05 and self.within_budget(
            p, self.complaints[loop] + 1, self.shown[loop] * COMPLAINT_SHARE
        ):
            self.complaints[loop] += 1
            self.mark_bad(p)
            reason = rng.choice(("too_many_messages", "not_relevant", "unwanted_contact"))
            if await self.events(("complaint", p, {"loop": loop, "reason": reason})):
                self.stats["complaints"] += 1
        elif roll > 0.994 and self.within_budget(
            p, self.opt_outs[loop] + 1, len(self.recipients[loop]) * OPT_OUT_SHARE
        ):
            self.opt_outs[loop] += 1
            self.mark_bad(p)
            p.opted_out = True
            reply = await self.api.call("POST", f"/api/users/{p.id}/opt-out", self.token(p))
            if reply.ok:
                self.stats["opt_outs"] += 1

    def within_budget(self, p: Person, count: int, allowed: float) -> bool:
        if p.opted_out or count > allowed:
            return False
        if p.maybe_exposed and CHALLENGE_EXP not in p.variants:
            return False  # exposed by the loop, variant unknown: it could tip that variant over
        for key, variant in p.variants.items():
            if p.id not in self.bad[key][variant]:
                if len(self.bad[key][variant]) + 1 > EXPERIMENT_BAD_SHARE * len(self.exposed[key][variant]):
                    return False
        return True

    def mark_bad(self, p: Person) -> None:
        for key, variant in p.variants.items():
            self.bad[key][variant].add(p.id)

    # Invites, clicks and conversions.

    async def share_card(self, p: Person, rng: random.Random) -> None:
        """The app's share card after a session (the `demo-share-card` experiment): maybe a link."""
        if not p.can_share:
            return
        if SHARE_EXP not in p.handled:
            p.handled.add(SHARE_EXP)
            reply = await self.api.call(
                "GET", f"/api/experiments/{SHARE_EXP}/assignment", self.token(p), quiet=(404,)
            )
            variant = reply.get("variant")
            if reply.ok and reply.get("in_experiment") and isinstance(variant, str):
                exposure = {"experiment": SHARE_EXP, "variant": variant}
                if await self.events(("experiment_exposure", p, exposure)):
                    p.variants[SHARE_EXP] = variant
                    self.exposed[SHARE_EXP][variant].add(p.id)
        if rng.random() < SHARE.get(p.variants.get(SHARE_EXP), SHARE[None]):
            await self.share(p, rng.choice(("session_share", "session_share", "direct")), rng)

    async def share(self, p: Person, source: str, rng: random.Random) -> None:
        reply = await self.api.call(
            "POST", "/api/links", self.token(p), {"source": source, "target": "/join", "campaign": "demo"}
        )
        token = reply.get("token")
        if not reply.ok or not isinstance(token, str):
            return
        if await self.events(
            (
                "invite_sent",
                p,
                {
                    "source": source,
                    "link_token": token,
                    "channel": rng.choice(("sms", "whatsapp", "email", "copy_link")),
                },
            )
        ):
            self.stats["shares"] += 1
            self.spawn(self.spread(Link(token, p, source)), "link")

    async def share_parent_card(self, parent: Person, payload: dict[str, Any], rng: random.Random) -> None:
        share = payload.get("share")
        token = share.get("token") if isinstance(share, dict) else None
        if not isinstance(token, str) or parent.opted_out or rng.random() > 0.7:
            return
        await self.pause(rng.uniform(1, 4))
        if await self.events(("invite_sent", parent, {"source": "proud_parent", "link_token": token})):
            self.stats["parent_shares"] += 1
            self.spawn(self.spread(Link(token, parent, "proud_parent")), "link")

    async def spread(self, link: Link) -> None:
        """A link travels (a chat, a group): 0-3 people click it, one now and then twice; each clicker
        may sign up. A challenge link holds one seat, so it converts once at most."""
        self.stats["links"] += 1
        rng = random.Random(f"{self.o.seed}:{link.token[:16]}")
        clickers = rng.choices((0, 1, 2, 3), (0.25, 0.45, 0.2, 0.1))[0]
        seats = 1 if link.challenge_id else clickers
        for _ in range(clickers):
            await self.pause(rng.uniform(1, 6))
            self_referral = link.referrer.visitor_id is not None and rng.random() < 0.03
            visitor = link.referrer.visitor_id if self_referral else f"{rng.getrandbits(96):024x}"
            assert visitor is not None
            if not await self.click(link, visitor, rng):
                continue
            if rng.random() < 0.15:  # opened it twice: one unique click
                await self.pause(rng.uniform(0.5, 2))
                await self.click(link, visitor, rng)
            if (
                seats > 0
                and self.may_convert(link.referrer)
                and (self_referral or rng.random() < self.p_signup())
            ):
                seats -= 1
                link.referrer.conversions.append(time.monotonic())
                link.referrer.converted += 1
                self.spawn(
                    self.signup(link, visitor, random.Random(f"{self.o.seed}:signup:{visitor}")), "signup"
                )

    def may_convert(self, referrer: Person) -> bool:
        """Keep each referrer under the fraud rules' burst and farming limits."""
        hour_ago = time.monotonic() - 3600
        while referrer.conversions and referrer.conversions[0] < hour_ago:
            referrer.conversions.popleft()
        return len(referrer.conversions) < REFERRER_PER_HOUR and referrer.converted < REFERRER_TOTAL

    async def click(self, link: Link, visitor: str, rng: random.Random) -> bool:
        address = None
        if self.api.spread:
            address = f"127.{rng.randint(1, 250)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        headers = {"cookie": f"ve_vid={visitor}", "user-agent": rng.choice(USER_AGENTS)}
        reply = await self.api.call("GET", f"/r/{link.token}", headers=headers, local_address=address)
        if reply.status == 0 and address is not None and self.stats["clicks"] == 0:
            self.api.spread = False  # binding loopback addresses failed here: click from one address
        if reply.status in (302, 303, 307):
            self.stats["clicks"] += 1
            return True
        return False

    async def signup(self, link: Link | None, visitor: str | None, rng: random.Random) -> None:
        """A new user signs up (through `link`, or organically), then perhaps reaches first value."""
        subject = None
        if link is not None and link.referrer.subjects:
            subject = rng.choice(link.referrer.subjects)
        await self.pause(rng.uniform(2, 8))
        p = self._student(self.next_id("n"), rng, new=True, subject=subject)
        p.minor = rng.random() < 0.1
        p.visitor_id = visitor
        if not await self._put(p):
            return
        props: dict[str, Any] = {"device_id": f"dev-{rng.getrandbits(64):016x}"}
        if link is not None:
            props["referral_token"] = link.token
        if visitor is not None:
            props["visitor_id"] = visitor
        if not await self.events(("signup", p, props)):
            return
        if link is not None:
            self.k_delta[0] += 1
            self.stats["signups"] += 1
        else:
            self.stats["organic_signups"] += 1
            p.visitor_id = None
        self.students.append(p)
        if link is not None and link.challenge_id:
            self.spawn(self.accept_challenge(p, link.challenge_id, rng, link.token), "accept by link")
        elif link is not None and link.rally_id:
            self.spawn(self.join_rally(p, link.rally_id, subject, rng, link.token), "join by link")
        await self.pause(rng.uniform(4, 15))
        if rng.random() < 0.75 and await self.events(("first_value", p, {})):
            self.stats["activated" if link is not None else "organic_activated"] += 1

    # Parents and tutors.

    async def parent_online(self, child: Person) -> None:
        """The child's parent has the app open for a while (so a card reaches them live)."""
        parent = self.people.get(child.parent_id or "")
        if parent is None or parent.online:
            return
        parent.online = True
        sock = await self.connect(parent, [(f"user:{parent.id}", {})])
        self.spawn(self._leave_later(parent, sock, 20.0), "parent visit")

    async def _leave_later(self, p: Person, sock: PhxSocket | None, stay: float) -> None:
        try:
            await self.pause(stay)
        finally:
            p.online = False
            await self.disconnect(p, sock)

    async def staff(self) -> None:
        """Tutors drop in (their insights arrive; now and then they share a link) and parents look in."""
        rng = random.Random(f"{self.o.seed}:staff")
        while True:
            await self.pause(rng.uniform(4, 10))
            people = [t for t in self.tutors if not t.online]
            if rng.random() < 0.4:
                people = [q for q in self.parents if not q.online]
            if not people:
                continue
            p = rng.choice(people)
            p.online = True
            topics: list[tuple[str, dict[str, Any]]] = [(f"user:{p.id}", {})]
            if p.role == "tutor":
                topics.append(("feed:global", {}))
            sock = await self.connect(p, topics)
            if p.role == "tutor" and rng.random() < 0.15:
                await self.share(p, "direct", rng)
            self.spawn(self._leave_later(p, sock, rng.uniform(15, 40)), "staff visit")

    # Reporting.

    async def watch(self) -> None:
        """Every `summary_every` s: read the 7-day K-factor (it also steers), print a summary line;
        every 30 demo seconds ask for a guardrails check."""
        last_check = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.o.summary_every)
            if self.stop.is_set():
                return
            await self.read_k()
            print(self.summary(), flush=True)
            if (self.elapsed() - last_check) * self.speed >= 30 and self.elapsed() - last_check >= 5:
                last_check = self.elapsed()
                if (await self.api.call("POST", "/api/guardrails/check", self.admin)).ok:
                    self.stats["guardrail_checks"] += 1

    async def read_k(self) -> None:
        reply = await self.api.call("GET", "/api/metrics/k-factor?days=7", self.admin)
        if reply.ok and isinstance(reply.body, dict):
            self.k_last = reply.body
            self.k_server = (int(reply.get("signups", 0)), int(reply.get("active_users", 0)))
            self.k_delta = [0, 0]

    def summary(self) -> str:
        s, k = self.stats, self.k_last
        minutes, seconds = divmod(int(self.elapsed()), 60)
        kf = f"{k['k_factor']:.2f}" if isinstance(k.get("k_factor"), (int, float)) else "-"
        online = sum(1 for p in self.students if p.online)
        parts = (
            f"demo {minutes:02d}:{seconds:02d}",
            f"online {online} of {len(self.students)} students",
            f"events {s['events']:,}",
            f"links {s['links']:,} / clicks {s['clicks']:,} / signups {s['signups']:,} "
            f"/ activated {s['activated']:,}",
            f"K(7d) {kf} (target {self.target_k:.2f}, base {k.get('active_users', '-')})",
            f"challenges {s['challenges']} / rallies {s['rallies']} / nudges {s['nudges']} "
            f"/ rescues {s['rescues']} / cards {s['parent_cards']}",
            f"complaints {s['complaints']} / opt-outs {s['opt_outs']}",
            f"requests {s['requests']:,} / refused {s['refused']} / errors {s['errors']}",
        )
        return " | ".join(parts)

    # Running.

    async def run(self) -> int:
        """Set up, then drive until `stop` is set or the duration has passed; 0, or 2 when refused."""
        if not await self.setup():
            await self.api.close()
            return 2
        for name, behaviour in (
            ("sessions", self.sessions),
            ("population", self.population),
            ("staff", self.staff),
            ("watch", self.watch),
        ):
            self.spawn(behaviour(), name)
        try:
            if self.o.duration is None:
                await self.stop.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), max(0.0, self.o.duration - self.elapsed()))
        finally:
            await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        self.stop.set()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*list(self.tasks), return_exceptions=True)
        for sock in list(self.sockets.values()):
            await sock.close()
        self.sockets.clear()
        self.api.closing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.read_k(), 3.0)
        await self.api.close()
        print(self.summary(), flush=True)


USER_AGENTS = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/124.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 Version/17.4 Safari/605.1.15",
)


def server_settings() -> Any:
    """The server's settings from the same environment (and working directory, for the development key)."""
    from .config import Settings

    return Settings.from_env()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m web.demo", description="Drive a running server with a simulated cohort."
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    parser.add_argument(
        "--students", type=int, default=60, help="students at the start (parents and tutors follow)"
    )
    parser.add_argument("--speed", type=float, default=1.0, help="pace multiplier (2 = twice as fast)")
    parser.add_argument("--seed", type=int, default=7, help="seed for every random choice")
    parser.add_argument(
        "--duration", type=float, default=None, help="stop after S seconds (default: run until stopped)"
    )
    parser.add_argument("--summary-every", type=float, default=10.0, help="seconds between summary lines")
    parser.add_argument("--log-level", default="info")
    return parser


async def _main(options: DemoOptions, secret: str) -> int:
    demo = Demo(options, secret)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, demo.stop.set)
    return await demo.run()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not is_loopback_url(args.url):
        print("error: the demo cohort only targets a server on a loopback address", file=sys.stderr)
        return 2
    if args.students < 1 or args.speed <= 0:
        print("error: --students must be at least 1 and --speed positive", file=sys.stderr)
        return 2
    try:
        settings = server_settings()
    except Exception as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if settings.env == "production":
        print(
            "error: the demo cohort writes simulated data; it never runs with ENV=production", file=sys.stderr
        )
        return 2
    options = DemoOptions(
        url=args.url,
        students=args.students,
        speed=args.speed,
        seed=args.seed,
        duration=args.duration,
        summary_every=args.summary_every,
    )
    return asyncio.run(_main(options, settings.secret_key))


if __name__ == "__main__":
    sys.exit(main())
