"""Attribution: which referrer's link brought a new user, and whether they reached first value.

A `signup` event (its `user_id` is the new user) carries `referral_token` — the invite link's token,
from the attribution cookie `/r/{token}` set or given explicitly — and optionally `visitor_id`
(the `ve_vid` cookie). Rules:

- the touch must be at most 7 days before the signup: the last click on that link before the
  signup (by this visitor when known), or, for a link passed on without a click, its creation;
- **last touch** (default): the link in `referral_token` wins. **First touch**
  (`ATTRIBUTION_MODEL=first_touch`): the visitor's earliest click on any link in the window wins;
- one conversion per new user (a second signup changes nothing), never to oneself, and only for
  links whose signature still verifies (a tampered token converts nobody);
- `first_value` marks the conversion activated (the first one counts);
- an `invite_sent` whose `link_token` is the sender's own valid link records when the link was first
  sent (`links.sent_at`): cycle time runs from there (from the link's creation when never sent);
- every conversion is assessed by the fraud signals (metrics.fraud) and recorded as `ok`, `pending`
  or `flagged` with its reasons; only an `ok` one pays the referral rewards (a held one when an admin
  approves it, `metrics.fraud.review`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from store import Click, Conversion, Link

from .fraud import OK, Candidate, FraudRules, assess, pay_referral
from .links import DEFAULT_TTL, LinkError, LinkSigner, check_target
from .rewards import Paid, pay

WINDOW = timedelta(days=7)


async def create_link(
    session: AsyncSession,
    signer: LinkSigner,
    *,
    referrer: str,
    source: str,
    target: str,
    now: datetime,
    ttl: int = DEFAULT_TTL,
    campaign: str | None = None,
) -> Link:
    """Sign and record an invite link (`POST /api/links` and the loops both make links here).
    `source` must already be checked (SOURCES); a `target` off the allow-list raises ValueError, so no
    caller can make a link that leads off-site (check_target)."""
    target = check_target(target)
    link = signer.issue(referrer, int(now.timestamp()), ttl)
    row = Link(
        nonce=link.nonce,
        token=link.token,
        referrer_id=referrer,
        source=source,
        target=target,
        campaign=campaign,
        created_at=now,
        expires_at=datetime.fromtimestamp(link.expires, UTC),
    )
    session.add(row)
    await session.flush()
    return row


async def verified_link(session: AsyncSession, signer: LinkSigner, token: str, at: datetime) -> Link:
    """The link `token` names, if the whole token verifies at `at`: its form, our record of it, its key,
    its signature for the recorded referrer, its expiry. LinkError says why not."""
    parsed = signer.parse(token)
    link = await session.get(Link, parsed.nonce)
    if link is None:
        raise LinkError("unknown", "we could not find this invite link")
    signer.verify(parsed, link.referrer_id, int(at.timestamp()))
    return link


MODELS = ("last_touch", "first_touch")


class AttributionConsumer:
    name = "attribution"

    def __init__(
        self,
        signer: LinkSigner,
        model: str = "last_touch",
        notify: Callable[[], Awaitable[None]] | None = None,
        reward: Callable[[Paid], Awaitable[None]] | None = None,
        rules: FraudRules | None = None,
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"attribution model must be one of {MODELS}")
        self.signer = signer
        self.model = model
        self.notify = notify  # told after every batch: the growth numbers' inputs moved
        self.reward = reward  # tells a referrer what they earned (a `reward` push on user:{id})
        self.rules = rules or FraudRules()

    async def handle(
        self, events: list[dict[str, Any]], session: AsyncSession
    ) -> Callable[[], Awaitable[None]] | None:
        paid: list[Paid | None] = []
        for event in events:
            at = datetime.fromisoformat(event["ts"])
            if event["type"] == "signup":
                conversion = await self._signup(event, session)
                if conversion is not None:  # held or flagged ones pay nothing (pay_referral checks)
                    paid.extend(await pay_referral(session, conversion, at))
            elif event["type"] == "invite_sent":
                await self._invite_sent(event, session, at)
            elif event["type"] == "first_value":
                conversion = await session.get(Conversion, event["user_id"])
                if conversion is not None and conversion.activated_at is None:
                    conversion.activated_at = at
                    if conversion.status == OK:  # a held one is paid this when approved
                        paid.append(
                            await pay(
                                session, conversion.referrer_id, "referral_activated", conversion.user_id, at
                            )
                        )
        rewards = [p for p in paid if p is not None]

        async def after() -> None:
            if self.reward is not None:
                for reward in rewards:
                    await self.reward(reward)
            if self.notify is not None:
                await self.notify()

        return after

    async def _invite_sent(self, event: dict[str, Any], session: AsyncSession, at: datetime) -> None:
        """An invite naming its link (`link_token`) dates the link's sending: the earliest such event by
        the link's own referrer, with a signature that verifies, sets `sent_at`. Others change nothing
        (the invite still counts as sent in the metrics)."""
        token = event["props"].get("link_token")
        if not isinstance(token, str):
            return
        link = await self._verified_link(token, session, at)
        if link is not None and link.referrer_id == event["user_id"]:
            if link.sent_at is None or at < link.sent_at:
                link.sent_at = at

    async def _signup(self, event: dict[str, Any], session: AsyncSession) -> Conversion | None:
        new_user = event["user_id"]
        props = event["props"]
        token = props.get("referral_token")
        visitor = props.get("visitor_id") if isinstance(props.get("visitor_id"), str) else None
        signup_at = datetime.fromisoformat(event["ts"])
        if not isinstance(token, str) or await session.get(Conversion, new_user) is not None:
            return None
        link = await self._verified_link(token, session, signup_at)
        if link is None:
            return None
        touch = await self._touch(link, visitor, signup_at, session)
        if touch is None:
            return None
        touched_at, click = touch
        if self.model == "first_touch" and visitor is not None:
            first = (
                await session.execute(
                    select(Link, Click)
                    .join(Click, Click.nonce == Link.nonce)
                    .where(
                        Click.visitor == visitor,
                        Click.clicked_at <= signup_at,
                        Click.clicked_at >= signup_at - WINDOW,
                    )
                    .order_by(Click.clicked_at)
                    .limit(1)
                )
            ).first()
            if first is not None:
                link, click = first
                touched_at = click.clicked_at
        if link.referrer_id == new_user:
            return None  # nobody refers themselves
        status, reasons = await assess(
            session,
            Candidate(
                user_id=new_user,
                referrer_id=link.referrer_id,
                nonce=link.nonce,
                signup_at=signup_at,
                props=props,
                # The touch click is the new user's own when the signup names its visitor.
                touch_ip_hash=click.ip_hash if click is not None and visitor is not None else None,
                touch_net_hash=click.net_hash if click is not None else None,
            ),
            self.rules,
        )
        conversion = Conversion(
            user_id=new_user,
            referrer_id=link.referrer_id,
            nonce=link.nonce,
            source=link.source,
            model=self.model,
            touched_at=touched_at,
            signup_at=signup_at,
            signup_event_id=event["id"],
            status=status,
            fraud_reasons=reasons,
        )
        session.add(conversion)
        await session.flush()
        return conversion

    async def _verified_link(self, token: str, session: AsyncSession, at: datetime) -> Link | None:
        try:
            # Checked at the moment of signup: a link that expired afterwards still counts.
            return await verified_link(session, self.signer, token, at)
        except LinkError:
            return None

    @staticmethod
    async def _touch(
        link: Link, visitor: str | None, signup_at: datetime, session: AsyncSession
    ) -> tuple[datetime, Click | None] | None:
        """The touch and its click (none when the link was passed on without one), if in the window."""
        query = select(Click).where(Click.nonce == link.nonce, Click.clicked_at <= signup_at)
        if visitor is not None:
            query = query.where(Click.visitor == visitor)
        click = await session.scalar(query.order_by(Click.clicked_at.desc()).limit(1))
        touched = click.clicked_at if click is not None else link.created_at
        return (touched, click) if signup_at - WINDOW <= touched <= signup_at else None
