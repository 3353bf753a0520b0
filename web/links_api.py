"""Invite links over HTTP: `POST /api/links` makes one, `GET /r/{token}` follows one.

A share link is an outbound social action: its maker passes the compliance gate first (a minor
without a parent's consent, or a user who opted out, is refused with 403 and the gate's reason).
The landing page never names the referrer: it redirects into the app. A click records the client's
`ip_hash` and `net_hash` (metrics.fraud.ip_hashes: keyed with the app secret, /24 or /48 network)
for the fraud signals; the address itself is never stored."""

from __future__ import annotations

import asyncio
import hashlib
import html
from datetime import timedelta

from sqlalchemy import select
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from metrics import attribution
from metrics.compliance import SocialAction, check
from metrics.fraud import ip_hashes
from metrics.links import DEFAULT_TTL, MAX_TTL, SOURCES, LinkError, LinkSigner, check_target
from store import Click, Link, LinkRejection

from .auth import claims_from_request
from .responses import ORJSONResponse, read_json

VISITOR_COOKIE = "ve_vid"
ATTRIBUTION_COOKIE = "ve_ref"
ATTRIBUTION_WINDOW = timedelta(days=7)
UNIQUE_WINDOW = timedelta(hours=24)
_CLICK_LOCKS = [asyncio.Lock() for _ in range(64)]


async def create_link(request: Request) -> Response:
    claims = claims_from_request(request)
    body = await read_json(request, 16 * 1024)
    if not isinstance(body, dict):
        raise HTTPException(422, "body must be a JSON object {source, target?, campaign?, ttl?}")
    errors: dict[str, str] = {}
    source = body.get("source")
    if not isinstance(source, str) or source not in SOURCES:
        errors["source"] = f"must be one of {sorted(SOURCES)}"
    try:
        target = check_target(body.get("target"))
    except ValueError as exc:
        errors["target"] = str(exc)
    campaign = body.get("campaign")
    if campaign is not None and (not isinstance(campaign, str) or not 1 <= len(campaign) <= 64):
        errors["campaign"] = "must be a string of 1-64 characters"
    ttl = body.get("ttl", DEFAULT_TTL)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 60 <= ttl <= MAX_TTL:
        errors["ttl"] = f"must be whole seconds from 60 to {MAX_TTL}"
    if errors:
        return ORJSONResponse({"error": "invalid link request", "fields": errors}, status_code=422)
    signer: LinkSigner = request.app.state.link_signer
    now = request.app.state.clock.now()
    async with request.app.state.database.session() as session, session.begin():
        action = SocialAction(str(source), "share_link", None, None, outside=True).by(claims)
        verdict = await check(session, action, now)
        if not verdict.allowed:
            return ORJSONResponse(
                {"error": f"no share link: {verdict.message}", "code": "refused", "refused": verdict.reason},
                status_code=403,
            )
        link = await attribution.create_link(
            session,
            signer,
            referrer=str(claims["sub"]),
            source=source,
            target=target,
            now=now,
            ttl=ttl,
            campaign=campaign,
        )
    expires_at = link.expires_at
    url = str(request.url_for("follow_link", token=link.token))
    return ORJSONResponse(
        {"url": url, "token": link.token, "expires_at": expires_at.isoformat(), "source": source},
        status_code=201,
    )


def _friendly(status: int, title: str, message: str) -> HTMLResponse:
    page = (
        "<!doctype html><html lang=en><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>{html.escape(title)}</title>"
        "<body style='font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem'>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>"
        "<p><a href='/'>Go to the app</a></p></body></html>"
    )
    return HTMLResponse(page, status_code=status)


def _visitor(request: Request) -> str:
    """The visitor: our first-party cookie when they have one, else a hash of what the request shows."""
    existing = request.cookies.get(VISITOR_COOKIE, "")
    if 16 <= len(existing) <= 64 and existing.isalnum():
        return existing
    client = request.client.host if request.client else ""
    seen = f"{client}\x00{request.headers.get('user-agent', '')}".encode()
    return hashlib.sha256(seen).hexdigest()[:32]


def _client_hashes(request: Request) -> tuple[str | None, str | None]:
    """The keyed hashes of the client's address and network (none when it has no IP address)."""
    hashes = ip_hashes(request.app.state.settings.secret_key, request.client.host) if request.client else None
    return hashes if hashes is not None else (None, None)


async def follow_link(request: Request) -> Response:
    token = request.path_params["token"]
    signer: LinkSigner = request.app.state.link_signer
    database = request.app.state.database
    now = request.app.state.clock.now()
    try:
        async with database.session() as session:
            link = await attribution.verified_link(session, signer, token, now)
        try:
            # Checked when the link was made; again here, so no stored row can send anyone off-site.
            target = check_target(link.target)
        except ValueError:
            raise LinkError(
                "target_not_allowed", "this invite link leads somewhere we do not send people."
            ) from None
    except LinkError as exc:
        async with database.session() as session, session.begin():
            session.add(LinkRejection(token=token[:200], reason=exc.reason, rejected_at=now))
        status = 410 if exc.reason == "expired" else 404 if exc.reason == "unknown" else 400
        return _friendly(
            status, "This invite link does not work", f"{exc} Ask your friend to send a new one."
        )
    visitor = _visitor(request)
    ip_hash, net_hash = _client_hashes(request)
    # A visitor's first click in the window is the unique one, also when the same click arrives many
    # times at once: clicks on one link take turns (a lock in this process; the link's row lock across
    # processes on PostgreSQL), so each sees the ones before it.
    async with (
        _CLICK_LOCKS[hash(link.nonce) % len(_CLICK_LOCKS)],
        database.session() as session,
        session.begin(),
    ):
        await session.get(Link, link.nonce, with_for_update=True)
        recent = await session.scalar(
            select(Click.id)
            .where(
                Click.nonce == link.nonce, Click.visitor == visitor, Click.clicked_at > now - UNIQUE_WINDOW
            )
            .limit(1)
        )
        session.add(
            Click(
                nonce=link.nonce,
                visitor=visitor,
                unique_click=recent is None,
                clicked_at=now,
                ip_hash=ip_hash,
                net_hash=net_hash,
            )
        )
    await request.app.state.k_factor.changed()  # clicks are in the report
    response = RedirectResponse(target, status_code=302)
    cookie = {"httponly": True, "samesite": "lax", "secure": request.url.scheme == "https", "path": "/"}
    response.set_cookie(VISITOR_COOKIE, visitor, max_age=365 * 86400, **cookie)  # type: ignore[arg-type]
    response.set_cookie(
        ATTRIBUTION_COOKIE, link.token, max_age=int(ATTRIBUTION_WINDOW.total_seconds()), **cookie
    )  # type: ignore[arg-type]
    return response


routes = [
    Route("/api/links", create_link, methods=["POST"]),
    Route("/r/{token}", follow_link, name="follow_link"),
]
