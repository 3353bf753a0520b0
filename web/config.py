"""Settings from the environment (SPEC §4); every variable has a safe development default."""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, field
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


def _choice(env: dict[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = env.get(name) or choices[0]
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


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
    ai_providers: str = ""  # JSON list of OpenAI-compatible providers (loops.copy.parse_providers)
    ai_daily_budget_usd: float = 5.0
    loops_config: str = ""  # JSON object overriding loops.LoopConfig
    scheduler_poll: float = 1.0
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
    attribution_model: str = "last_touch"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        mode = env.get("ENV", "development")
        if mode not in ("development", "production", "test"):
            raise ConfigError(f"ENV must be development, test or production, got {mode!r}")
        secret = env.get("SECRET_KEY", "")
        generated = False
        if not secret:
            if mode == "production":
                raise ConfigError("SECRET_KEY is required when ENV=production (at least 32 random bytes)")
            secret = _dev_secret()
            generated = True
        elif mode == "production" and len(secret) < 32:
            raise ConfigError("SECRET_KEY must be at least 32 characters when ENV=production")
        broker_url = env.get("BROKER_URL", "memory://")
        limits = SocketLimits(
            max_frame_bytes=_int(env, "WS_MAX_FRAME_BYTES", _D.max_frame_bytes),
            max_topics=_int(env, "WS_MAX_TOPICS", _D.max_topics),
            rate_per_second=_float(env, "WS_RATE_PER_SECOND", _D.rate_per_second),
            rate_burst=_float(env, "WS_RATE_BURST", _D.rate_burst),
            outbound_max_bytes=_int(env, "WS_OUTBOUND_MAX_BYTES", _D.outbound_max_bytes),
            outbound_max_messages=_int(env, "WS_OUTBOUND_MAX_MESSAGES", _D.outbound_max_messages),
            idle_timeout=_float(env, "WS_IDLE_TIMEOUT", _D.idle_timeout),
        )
        presence = PresenceConfig(
            diff_interval=_float(env, "PRESENCE_DIFF_INTERVAL", _P.diff_interval),
            heartbeat_interval=_float(env, "PRESENCE_HEARTBEAT_INTERVAL", _P.heartbeat_interval),
            node_timeout=_float(env, "PRESENCE_NODE_TIMEOUT", _P.node_timeout),
        )
        if presence.node_timeout <= 2 * presence.heartbeat_interval:
            raise ConfigError("PRESENCE_NODE_TIMEOUT must be more than twice PRESENCE_HEARTBEAT_INTERVAL")
        old = tuple(k for k in env.get("SECRET_KEY_OLD", "").split(",") if k)
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
            ai_providers=providers,
            ai_daily_budget_usd=_float(env, "AI_DAILY_BUDGET_USD", 5.0),
            loops_config=loops_config,
            scheduler_poll=_float(env, "SCHEDULER_POLL", 1.0),
            guardrail_thresholds=thresholds,
            guardrail_webhook_url=webhook,
            guardrail_webhook_secret=env.get("GUARDRAIL_WEBHOOK_SECRET", ""),
            guardrails_every=_float(env, "GUARDRAILS_EVERY", 60.0),
            limits=limits,
            presence=presence,
            events_maintenance_every=_float(env, "EVENTS_MAINTENANCE_EVERY", 10.0),
            events_reconcile_after=_float(env, "EVENTS_RECONCILE_AFTER", 30.0),
            attribution_model=_choice(env, "ATTRIBUTION_MODEL", ("last_touch", "first_touch")),
        )

    def warn_if_unsafe(self) -> None:
        if self.secret_key_generated:
            log.warning(
                "!!! SECRET_KEY is not set: using a development key generated into %s. "
                "Tokens signed with it are worthless elsewhere; set SECRET_KEY in production. !!!",
                DEV_SECRET_FILE.resolve(),
            )
