"""Fraud and abuse signals on attribution: which conversions are rewarded, held or refused.

Each signup that attribution would convert is assessed first (`assess`); the conversion is recorded
either way, with `status` and the `fraud_reasons` that fired:

- `ok`: no signal; the referral rewards are paid (AttributionConsumer);
- `flagged`: a strong signal; never rewarded unless an admin approves it (`review`);
- `pending`: only soft signals; held, unrewarded, until an admin approves or rejects it (`review`).

The K-factor report counts every conversion (raw) and, as `*_filtered`, only the `ok` ones.

Signals (thresholds: `FraudRules`, one field each; "more than N" counts this signup in):

- `self_referral:visitor|device|email|ip` — the new user shares an identifier with their referrer.
  The new user's: the signup's props `visitor_id`, `device_id`, `email_hash`, `ip_hash`, and the
  `ip_hash` of their touch click (when the signup names its visitor, the touch is theirs). The
  referrer's: the same props on their own `signup` events, the `ip_hash` of their clicks on this link
  (by the visitor ids of their signups) and of their own touch, when they were referred themselves.
  Visitor, device and email flag; a shared IP only holds (`pending`): families and schools share one.
- `click_flood:rate` — the link got more than `click_flood_max` (50) clicks in the
  `click_flood_window` (10 min) up to the signup; `click_flood:ip` — more than `click_flood_per_ip`
  (10) of its clicks in `click_flood_ip_window` (24 h) came from one `ip_hash`. Both flag.
- `ip_range` — more than `ip_range_max` (5) attributed signups, for any referrers, in the
  `ip_range_window` (24 h) up to this one had their touch click from the same network (`net_hash`,
  the /24 or /48). Flags.
- `conversion_burst` — more than `burst_max` (5) conversions for one referrer in the `burst_window`
  (1 h) up to this one. Holds.
- `reward_farming` — the referrer was already paid `referral_signup` `farming_cap` (30) times in
  the `farming_window` (30 days) before this signup. Holds.

Which reasons flag is `FraudRules.flagging`; any other reason holds. Signals are read at the signup:
the earlier conversions of a burst or a range stay as they were (their rewards are not taken back).

The contract with the app (all optional `signup` props; missing ones simply match nothing):

- `visitor_id`: the `ve_vid` cookie `/r/{token}` set;
- `device_id`: the app's stable device identifier (any opaque string up to 128 characters);
- `ip_hash`: `ip_hashes(SECRET_KEY, client_ip)[0]`, i.e. the first 32 hex digits of
  HMAC-SHA256(key=SECRET_KEY, msg="ip\\0" + the address in its compressed text form, an IPv4-mapped
  IPv6 address as IPv4) — the same as `/r/{token}` records on the click, so the two compare;
- `email_hash`: `email_hash(SECRET_KEY, address)`: HMAC-SHA256(key=SECRET_KEY, msg="email\\0" +
  `normalise_email(address)`), 32 hex digits. Normalised: trimmed and lowercased, any `+tag` dropped
  from the local part; for gmail.com and googlemail.com also the dots, and the domain is gmail.com —
  so `Maya.Lee+2@GoogleMail.com` and `mayalee@gmail.com` are the same address.

Clicks (`/r/{token}`) record `ip_hash` and `net_hash`, the latter over "net\\0" + the network in CIDR
form (`203.0.113.0/24`, `2001:db8:1::/48`). The hashes are keyed: nobody reads an address back.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import distinct, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from store import AuditLog, Click, Conversion, Event, Reward

from .rewards import Paid, pay

OK, PENDING, FLAGGED = "ok", "pending", "flagged"
IDENTIFIERS = ("visitor_id", "device_id", "email_hash", "ip_hash")  # signup props compared
MAX_IDENTIFIER = 128


@dataclass(frozen=True, slots=True)
class FraudRules:
    """Every threshold of the signals; the defaults are the production ones."""

    click_flood_max: int = 50
    click_flood_window: timedelta = timedelta(minutes=10)
    click_flood_per_ip: int = 10
    click_flood_ip_window: timedelta = timedelta(hours=24)
    ip_range_max: int = 5
    ip_range_window: timedelta = timedelta(hours=24)
    burst_max: int = 5
    burst_window: timedelta = timedelta(hours=1)
    farming_cap: int = 30
    farming_window: timedelta = timedelta(days=30)
    referrer_signups: int = 5  # how many of the referrer's own signup events are compared
    flagging: frozenset[str] = field(
        default_factory=lambda: frozenset(
            {
                "self_referral:visitor",
                "self_referral:device",
                "self_referral:email",
                "click_flood:rate",
                "click_flood:ip",
                "ip_range",
            }
        )
    )

    def outcome(self, reasons: Iterable[str]) -> str:
        found = list(reasons)
        if not found:
            return OK
        return FLAGGED if any(r in self.flagging for r in found) else PENDING


@dataclass(frozen=True, slots=True)
class Candidate:
    """A signup about to convert: who, for whom, through which link, and what it showed of itself."""

    user_id: str
    referrer_id: str
    nonce: str
    signup_at: datetime
    props: dict[str, Any]  # the signup's props (identifiers in IDENTIFIERS)
    touch_ip_hash: str | None = None  # the touch click's, when the click is this new user's
    touch_net_hash: str | None = None  # the touch click's (ip_range counts by the touch)

    def identifier(self, name: str) -> str | None:
        return _identifier(self.props, name)


def _identifier(props: Any, name: str) -> str | None:
    value = props.get(name) if isinstance(props, dict) else None
    return value if isinstance(value, str) and 0 < len(value) <= MAX_IDENTIFIER else None


# --- hashes (what /r/{token} records, and what the app must send) ---


def _keyed(secret: str, domain: str, value: str) -> str:
    message = domain.encode() + b"\x00" + value.encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()[:32]


def ip_hashes(secret: str, host: str) -> tuple[str, str] | None:
    """(ip_hash, net_hash) of a client address (/24 for IPv4, /48 for IPv6); None when `host` is no
    IP address (a Unix socket, a test client)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    net = ipaddress.ip_network(f"{ip}/{24 if ip.version == 4 else 48}", strict=False)
    return _keyed(secret, "ip", ip.compressed), _keyed(secret, "net", net.with_prefixlen)


def normalise_email(address: str) -> str:
    """Lowercased and trimmed, without a `+tag`; Gmail's dots dropped and googlemail.com → gmail.com."""
    local, _, domain = address.strip().lower().rpartition("@")
    if not local:
        return address.strip().lower()
    local = local.split("+", 1)[0]
    if domain in ("gmail.com", "googlemail.com"):
        local, domain = local.replace(".", ""), "gmail.com"
    return f"{local}@{domain}"


def email_hash(secret: str, address: str) -> str:
    return _keyed(secret, "email", normalise_email(address))


# --- the signals: each reads what it needs and returns the reasons that fired ---

Signal = Callable[[AsyncSession, Candidate, FraudRules], Awaitable[list[str]]]


async def self_referral(session: AsyncSession, c: Candidate, rules: FraudRules) -> list[str]:
    """The new user shares a visitor, device, email or IP with their referrer."""
    theirs: dict[str, set[str]] = {name: set() for name in IDENTIFIERS}
    for props in (
        await session.scalars(
            select(Event.props)
            .where(Event.user_id == c.referrer_id, Event.type == "signup")
            .order_by(Event.ts)
            .limit(rules.referrer_signups)
        )
    ).all():
        for name in IDENTIFIERS:
            if (value := _identifier(props, name)) is not None:
                theirs[name].add(value)
    # The referrer's clicks: on this link by their own browsers, and their touch when referred.
    clicks = select(Click.ip_hash).where(Click.ip_hash.is_not(None), Click.clicked_at <= c.signup_at)
    if theirs["visitor_id"]:
        own = clicks.where(Click.nonce == c.nonce, Click.visitor.in_(sorted(theirs["visitor_id"])))
        theirs["ip_hash"].update(h for h in (await session.scalars(own.distinct().limit(50))) if h)
    referred = await session.get(Conversion, c.referrer_id)
    if referred is not None:
        touch = clicks.where(Click.nonce == referred.nonce, Click.clicked_at == referred.touched_at)
        theirs["ip_hash"].update(h for h in (await session.scalars(touch.limit(5))) if h)

    mine = {name: c.identifier(name) for name in IDENTIFIERS}
    new_ips = {h for h in (mine["ip_hash"], c.touch_ip_hash) if h}
    reasons = [
        f"self_referral:{name.removesuffix('_id').removesuffix('_hash')}"
        for name in ("visitor_id", "device_id", "email_hash")
        if mine[name] is not None and mine[name] in theirs[name]
    ]
    if new_ips & theirs["ip_hash"]:
        reasons.append("self_referral:ip")
    return reasons


async def click_flood(session: AsyncSession, c: Candidate, rules: FraudRules) -> list[str]:
    """The link was clicked too fast, or too often from one address, up to the signup."""
    reasons = []
    recent = await session.scalar(
        select(func.count()).where(
            Click.nonce == c.nonce,
            Click.clicked_at > c.signup_at - rules.click_flood_window,
            Click.clicked_at <= c.signup_at,
        )
    )
    if int(recent or 0) > rules.click_flood_max:
        reasons.append("click_flood:rate")
    one_ip = await session.scalar(
        select(Click.ip_hash)
        .where(
            Click.nonce == c.nonce,
            Click.ip_hash.is_not(None),
            Click.clicked_at > c.signup_at - rules.click_flood_ip_window,
            Click.clicked_at <= c.signup_at,
        )
        .group_by(Click.ip_hash)
        .having(func.count() > rules.click_flood_per_ip)
        .limit(1)
    )
    if one_ip is not None:
        reasons.append("click_flood:ip")
    return reasons


async def ip_range(session: AsyncSession, c: Candidate, rules: FraudRules) -> list[str]:
    """Too many recent attributed signups came through clicks from this signup's network."""
    if c.touch_net_hash is None:
        return []
    earlier = await session.scalar(
        select(func.count(distinct(Conversion.user_id)))
        .join(Click, (Click.nonce == Conversion.nonce) & (Click.clicked_at == Conversion.touched_at))
        .where(
            Click.net_hash == c.touch_net_hash,
            Conversion.signup_at > c.signup_at - rules.ip_range_window,
            Conversion.signup_at <= c.signup_at,
        )
    )
    return ["ip_range"] if int(earlier or 0) + 1 > rules.ip_range_max else []


async def conversion_burst(session: AsyncSession, c: Candidate, rules: FraudRules) -> list[str]:
    """Too many conversions for this referrer within the burst window."""
    earlier = await session.scalar(
        select(func.count()).where(
            Conversion.referrer_id == c.referrer_id,
            Conversion.signup_at > c.signup_at - rules.burst_window,
            Conversion.signup_at <= c.signup_at,
        )
    )
    return ["conversion_burst"] if int(earlier or 0) + 1 > rules.burst_max else []


async def reward_farming(session: AsyncSession, c: Candidate, rules: FraudRules) -> list[str]:
    """The referrer has already been paid for as many referrals as the window allows."""
    paid = await session.scalar(
        select(func.count()).where(
            Reward.user_id == c.referrer_id,
            Reward.reason == "referral_signup",
            Reward.created_at > c.signup_at - rules.farming_window,
            Reward.created_at <= c.signup_at,
        )
    )
    return ["reward_farming"] if int(paid or 0) >= rules.farming_cap else []


SIGNALS: tuple[Signal, ...] = (self_referral, click_flood, ip_range, conversion_burst, reward_farming)


async def assess(session: AsyncSession, c: Candidate, rules: FraudRules) -> tuple[str, list[str]]:
    """Run every signal: the conversion's status and the reasons, in signal order."""
    reasons: list[str] = []
    for signal in SIGNALS:
        reasons.extend(await signal(session, c, rules))
    return rules.outcome(reasons), reasons


# --- rewards and review ---


async def pay_referral(session: AsyncSession, conversion: Conversion, at: datetime) -> list[Paid]:
    """What an `ok` conversion earns: `referral_signup`, `parent_referral` to both families for a
    proud-parent referral, and `referral_activated` once activated. The ledger pays each once."""
    if conversion.status != OK:
        return []
    due = [(conversion.referrer_id, "referral_signup")]
    if conversion.source == "proud_parent":  # both families get a free session
        due += [(conversion.referrer_id, "parent_referral"), (conversion.user_id, "parent_referral")]
    if conversion.activated_at is not None:
        due.append((conversion.referrer_id, "referral_activated"))
    paid = [await pay(session, user, reason, conversion.user_id, at) for user, reason in due]
    return [p for p in paid if p is not None]


@dataclass(frozen=True, slots=True)
class Reviewed:
    user_id: str
    referrer_id: str
    status: str
    reasons: list[str]
    paid: list[Paid]  # to push as `reward` to the users


async def review(session: AsyncSession, user_id: str, approve: bool, actor: str, now: datetime) -> Reviewed:
    """An admin's decision on the conversion of `user_id`: approved, it becomes `ok` and the referral
    rewards are paid now (once: the ledger); rejected, it becomes `flagged`. Rejecting a conversion
    already paid keeps its rewards (the ledger is not reversed) but drops it from the filtered K.
    The reasons stay as the signals found them; the decision is in the audit log. Raises LookupError
    when the user has no conversion."""
    conversion = await session.get(Conversion, user_id)
    if conversion is None:
        raise LookupError(f"no conversion for {user_id!r}")
    was = conversion.status
    conversion.status = OK if approve else FLAGGED
    session.add(
        AuditLog(
            actor=actor,
            action="conversion_approved" if approve else "conversion_rejected",
            subject=f"conversion:{user_id}",
            details={
                "referrer": conversion.referrer_id,
                "was": was,
                "reasons": list(conversion.fraud_reasons),
            },
            at=now,
        )
    )
    await session.flush()
    paid = await pay_referral(session, conversion, now) if approve else []
    return Reviewed(user_id, conversion.referrer_id, conversion.status, list(conversion.fraud_reasons), paid)


__all__ = [
    "FLAGGED",
    "OK",
    "PENDING",
    "SIGNALS",
    "Candidate",
    "FraudRules",
    "Reviewed",
    "assess",
    "click_flood",
    "conversion_burst",
    "email_hash",
    "ip_hashes",
    "ip_range",
    "normalise_email",
    "pay_referral",
    "review",
    "reward_farming",
    "self_referral",
]
