"""Settings from the environment (SPEC §4); every variable has a safe development default."""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from presence import PresenceConfig
from realtime import SocketLimits

log = logging.getLogger(__name__)

DEV_SECRET_FILE = Path(".viral-engine-secret")
_D = SocketLimits()
_P = PresenceConfig()


class ConfigError(Exception):
    """A setting is missing or unsafe; the message says which and how to fix it."""


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def _float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


# The per-socket limits (realtime.SocketLimits field ← environment variable); /metrics reports each
# as viral_ws_limit{name=field}.
SOCKET_LIMIT_VARIABLES = {
    "max_frame_bytes": "WS_MAX_FRAME_BYTES",
    "max_topics": "WS_MAX_TOPICS",
    "rate_per_second": "WS_RATE_PER_SECOND",
    "rate_burst": "WS_RATE_BURST",
    "rate_strikes_before_close": "WS_RATE_STRIKES_BEFORE_CLOSE",
    "outbound_max_bytes": "WS_OUTBOUND_MAX_BYTES",
    "outbound_max_messages": "WS_OUTBOUND_MAX_MESSAGES",
    "idle_timeout": "WS_IDLE_TIMEOUT",
}


def _socket_limits(env: dict[str, str]) -> SocketLimits:
    """The WS_* limits; each must be a positive, finite number (0 would refuse everything, or divide by
    zero in the rate limiter's retry_after_ms)."""
    values: dict[str, float] = {}
    for name, variable in SOCKET_LIMIT_VARIABLES.items():
        default = getattr(_D, name)
        value = _float(env, variable, default) if isinstance(default, float) else _int(env, variable, default)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{variable} must be a positive number, got {env.get(variable)!r}")
        values[name] = value
    if values["rate_burst"] < 1:
        raise ConfigError(f"WS_RATE_BURST must be at least 1 (one message), got {env.get('WS_RATE_BURST')!r}")
    # Node-wide socket cap; 0 (the default) derives it from the open-files limit (realtime.endpoint).
    max_sockets = _int(env, "WS_MAX_SOCKETS", _D.max_sockets)
    if max_sockets < 0:
        raise ConfigError(f"WS_MAX_SOCKETS must be 0 (automatic) or more, got {max_sockets}")
    values["max_sockets"] = max_sockets
    return SocketLimits(**values)  # type: ignore[arg-type]


def _choice(env: dict[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = env.get(name) or choices[0]
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


MIN_SECRET_CHARS = 32


def _instant(env: dict[str, str], name: str) -> float | None:
    """An ISO 8601 timestamp with a zone (2027-01-31T00:00:00Z) or epoch seconds, as epoch seconds."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{name} must be an ISO 8601 timestamp or epoch seconds, got {raw!r}") from None
    if parsed.tzinfo is None:
        raise ConfigError(f"{name} must carry a time zone, e.g. 2027-01-31T00:00:00Z; got {raw!r}")
    return parsed.timestamp()


def _check_production_keys(secret: str, old: tuple[str, ...], old_until: float | None) -> None:
    """ENV=production: an explicit key of at least MIN_SECRET_CHARS characters (never the development key
    generated into DEV_SECRET_FILE), old keys as long, and a rotation with an end."""
    fix = "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))'"
    if not secret:
        raise ConfigError(f"SECRET_KEY is required when ENV=production (at least 32 random bytes); {fix}")
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"SECRET_KEY must be at least {MIN_SECRET_CHARS} characters when ENV=production; {fix}"
        )
    try:
        generated = DEV_SECRET_FILE.read_text().strip()
    except OSError:
        generated = ""
    if generated and secret == generated:
        raise ConfigError(
            f"SECRET_KEY is the development key generated into {DEV_SECRET_FILE.resolve()}; "
            f"ENV=production needs a key of its own; {fix}"
        )
    if any(len(k) < MIN_SECRET_CHARS for k in old):
        raise ConfigError(f"every SECRET_KEY_OLD key must be at least {MIN_SECRET_CHARS} characters")
    if old and old_until is None:
        raise ConfigError(
            "SECRET_KEY_OLD needs SECRET_KEY_OLD_UNTIL when ENV=production: the time after which the old "
            "keys stop verifying (ISO 8601 or epoch seconds), e.g. 2027-01-31T00:00:00Z"
        )


def _dev_secret() -> str:
    """In development, make a random key once and keep it in a local file (mode 600).

    One key for every process started from this directory, so tokens printed by
    `viral-engine token` work against `make run` and against every worker process.
    """
    try:
        existing = DEV_SECRET_FILE.read_text().strip()
        if existing:
            return existing
    except FileNotFoundError:
        pass
    key = secrets.token_urlsafe(48)
    try:
        fd = os.open(DEV_SECRET_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Another process started at the same moment won the race: use its key.
        for _ in range(100):
            existing = DEV_SECRET_FILE.read_text().strip()
            if existing:
                return existing
            time.sleep(0.01)
        raise ConfigError(f"{DEV_SECRET_FILE} exists but is empty; delete it or set SECRET_KEY") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return key


def _check_loops(providers: str, loops_config: str) -> None:
    """Refuse a bad AI_PROVIDERS or LOOPS_CONFIG at start-up, not at the first prompt."""
    from loops import LoopConfig
    from loops.copy import parse_providers

    try:
        parse_providers(providers)
    except ValueError as exc:
        raise ConfigError(f"AI_PROVIDERS: {exc}") from None
    try:
        LoopConfig.from_json(loops_config)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"LOOPS_CONFIG: {exc}") from None


@dataclass(frozen=True)
class Settings:
    env: str = "development"
    database_url: str = "sqlite+aiosqlite:///./viral.db"
    broker_url: str = "memory://"
    secret_key: str = ""
    secret_key_generated: bool = False
    old_secret_keys: tuple[str, ...] = ()
    old_secret_keys_until: float | None = None  # epoch seconds; None: the old keys verify until removed
    ai_providers: str = ""  # JSON list of OpenAI-compatible providers (loops.copy.parse_providers)
    ai_daily_budget_usd: float = 5.0
    loops_config: str = ""  # JSON object overriding loops.LoopConfig
    scheduler_poll: float = 1.0
    scheduler_lease: float = 30.0  # seconds a worker holds a job; a dead worker's job runs elsewhere after it
    guardrail_thresholds: str = ""  # JSON list overriding metrics.guardrails.THRESHOLDS
    guardrail_webhook_url: str = ""
    guardrail_webhook_secret: str = ""  # defaults to a key derived from SECRET_KEY
    guardrails_every: float = 60.0
    limits: SocketLimits = field(default_factory=SocketLimits)
    presence: PresenceConfig = field(default_factory=PresenceConfig)
    max_body_bytes: int = 1 << 20
    # Event pipeline upkeep: how often to relay unstreamed events and look for undelivered ones,
    # and how old an event must be before the reconciler treats it as lost by the stream.
    events_maintenance_every: float = 10.0
    events_reconcile_after: float = 30.0
    # Stream entries a worker took and did not acknowledge for this long are claimed by another worker.
    events_claim_idle: float = 30.0
    attribution_model: str = "last_touch"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        mode = env.get("ENV", "development")
        if mode not in ("development", "production", "test"):
            raise ConfigError(f"ENV must be development, test or production, got {mode!r}")
        secret = env.get("SECRET_KEY", "")
        old = tuple(k for k in env.get("SECRET_KEY_OLD", "").split(",") if k)
        old_until = _instant(env, "SECRET_KEY_OLD_UNTIL")
        if mode == "production":
            _check_production_keys(secret, old, old_until)
        generated = False
        if not secret:
            secret = _dev_secret()
            generated = True
        broker_url = env.get("BROKER_URL", "memory://")
        limits = _socket_limits(env)
        presence = PresenceConfig(
            diff_interval=_float(env, "PRESENCE_DIFF_INTERVAL", _P.diff_interval),
            heartbeat_interval=_float(env, "PRESENCE_HEARTBEAT_INTERVAL", _P.heartbeat_interval),
            node_timeout=_float(env, "PRESENCE_NODE_TIMEOUT", _P.node_timeout),
        )
        if presence.node_timeout <= 2 * presence.heartbeat_interval:
            raise ConfigError("PRESENCE_NODE_TIMEOUT must be more than twice PRESENCE_HEARTBEAT_INTERVAL")
        providers = env.get("AI_PROVIDERS", "").strip()
        loops_config = env.get("LOOPS_CONFIG", "").strip()
        _check_loops(providers, loops_config)
        thresholds = env.get("GUARDRAIL_THRESHOLDS", "").strip()
        try:
            from metrics.guardrails import thresholds_from_json

            thresholds_from_json(thresholds)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"GUARDRAIL_THRESHOLDS: {exc}") from None
        webhook = env.get("GUARDRAIL_WEBHOOK_URL", "").strip()
        if webhook and not webhook.startswith(("http://", "https://")):
            raise ConfigError("GUARDRAIL_WEBHOOK_URL must be an http(s) URL")
        return cls(
            env=mode,
            database_url=env.get("DATABASE_URL", "sqlite+aiosqlite:///./viral.db"),
            broker_url=broker_url,
            secret_key=secret,
            secret_key_generated=generated,
            old_secret_keys=old,
            old_secret_keys_until=old_until,
            ai_providers=providers,
            ai_daily_budget_usd=_float(env, "AI_DAILY_BUDGET_USD", 5.0),
            loops_config=loops_config,
            scheduler_poll=_float(env, "SCHEDULER_POLL", 1.0),
            scheduler_lease=_float(env, "SCHEDULER_LEASE", 30.0),
            guardrail_thresholds=thresholds,
            guardrail_webhook_url=webhook,
            guardrail_webhook_secret=env.get("GUARDRAIL_WEBHOOK_SECRET", ""),
            guardrails_every=_float(env, "GUARDRAILS_EVERY", 60.0),
            limits=limits,
            presence=presence,
            events_maintenance_every=_float(env, "EVENTS_MAINTENANCE_EVERY", 10.0),
            events_reconcile_after=_float(env, "EVENTS_RECONCILE_AFTER", 30.0),
            events_claim_idle=_float(env, "EVENTS_CLAIM_IDLE", 30.0),
            attribution_model=_choice(env, "ATTRIBUTION_MODEL", ("last_touch", "first_touch")),
        )

    def warn_if_unsafe(self) -> None:
        if self.old_secret_keys and self.old_secret_keys_until is None:
            log.warning(
                "SECRET_KEY_OLD is set without SECRET_KEY_OLD_UNTIL: the old keys verify until removed "
                "(ENV=production refuses this)"
            )
        elif self.old_secret_keys_until is not None and time.time() >= self.old_secret_keys_until:
            log.info("SECRET_KEY_OLD_UNTIL has passed: the old keys no longer verify anything")
        if self.secret_key_generated:
            log.warning(
                "!!! SECRET_KEY is not set: using a development key generated into %s. "
                "Tokens signed with it are worthless elsewhere; set SECRET_KEY in production. !!!",
                DEV_SECRET_FILE.resolve(),
            )
