"""The admin dashboards in a real headless Chromium (issue 10): `/dashboard/k-factor`,
`/dashboard/experiments` (and one experiment's page), `/dashboard/guardrails`, and the login gate.

The app is the production one, served in-process on a real port with a hand-moved clock
(`tests/loop_kit.py`); the browser is Debian's `/usr/bin/chromium` (installed by
`scripts/install-chromium.sh`, or $CHROMIUM), driven by Playwright for Python (`playwright.async_api`,
launched with `executable_path`: Playwright's own browser downloads are never used). Events are
posted through the HTTP API while a page is open, and the page must change without a reload (each page
sets `window.__noReload` first and it must survive). Every page must run without a console error,
an uncaught exception or a CSP violation.

Signing in follows issue 10's contract: `?token=<admin JWT>` on a dashboard URL redirects to the clean
URL with an HttpOnly, SameSite=Strict `ve_admin` cookie (checked through the browser context's
cookies), and no script on the pages ever holds the token.

Without Chromium the module is skipped, except under REQUIRE_SERVICES=1 (CI), where that fails.
Screenshots (viewport-sized PNGs) go to $DASHBOARD_SCREENSHOTS when set (e.g.
`DASHBOARD_SCREENSHOTS=docs/screenshots`, the README's), else to the test's tmp directory.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from loop_kit import LoopWorld, loop_world
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Playwright,
    async_playwright,
)
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import TimeoutError as PlaywrightTimeout
from servers import SECRET, make_token

from metrics.events import client_event_id
from realtime import TokenVerifier

REQUIRE_SERVICES = os.environ.get("REQUIRE_SERVICES") == "1"
H = timedelta(hours=1)

pytestmark = pytest.mark.timeout(90)

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
VIEWPORT: Any = {"width": 1280, "height": 900}
_ERRORS: dict[Page, list[str]] = {}  # each page's exceptions, console errors and error log entries


def find_chromium() -> str | None:
    """$CHROMIUM when set (and present), else Debian's Chromium (or a Chrome) on the usual paths."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for path in CANDIDATES:
        if Path(path).exists():
            return path
    return shutil.which("chromium")


class Chromium:
    """One headless browser context (its tabs share cookies) whose pages record every uncaught
    exception, `console.error`/`console.assert` and error-level log entry (CSP violations, failed
    loads: Chromium reports those as console errors), read by `page_errors(page)`."""

    def __init__(self, browser: Browser, context: BrowserContext) -> None:
        self.browser = browser
        self.context = context

    async def new_page(self) -> Page:
        page = await self.context.new_page()
        errors: list[str] = []
        _ERRORS[page] = errors

        def on_console(message: ConsoleMessage) -> None:
            if message.type in ("error", "assert"):
                url = (message.location or {}).get("url", "")
                errors.append(f"console.{message.type}: {message.text} {url}")

        def on_page_error(error: PlaywrightError) -> None:
            errors.append(f"exception: {error}")

        page.on("console", on_console)
        page.on("pageerror", on_page_error)
        return page


@pytest.fixture
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        message = (
            "Chromium is not installed (run scripts/install-chromium.sh, or set CHROMIUM=/path/to/chromium)"
        )
        if REQUIRE_SERVICES:
            pytest.fail(f"{message}; REQUIRE_SERVICES=1 makes this a failure")
        pytest.skip(message)
    return path


@pytest.fixture
async def browser(chromium_path: str) -> AsyncIterator[Chromium]:
    """Headless Chromium through Playwright, in the test's own event loop (the server's too)."""
    async with async_playwright() as playwright:
        chrome = await launch(playwright, chromium_path)
        try:
            context = await chrome.new_context(viewport=VIEWPORT, accept_downloads=True, locale="en-US")
            yield Chromium(chrome, context)
        finally:
            await chrome.close()


async def launch(playwright: Playwright, executable: str) -> Browser:
    return await playwright.chromium.launch(
        executable_path=executable,
        headless=True,
        args=["--disable-gpu", "--disable-quic", "--disable-dev-shm-usage", "--lang=en-US"],
    )


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("DASHBOARD_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def admin_token() -> str:
    return make_token("ops", "admin")


def admin(world: LoopWorld) -> dict[str, str]:
    return world.headers("ops", "admin")


async def post(world: LoopWorld, etype: str, user: str, ts: datetime | None = None, **props: Any) -> None:
    """One event through the API (stamped with the world's clock unless `ts`), consumed by every consumer."""
    world._n += 1
    event_id = f"dash{world._n}-{etype}-{user}"
    body = [
        {
            "id": event_id,
            "type": etype,
            "user_id": user,
            "ts": (ts or world.clock.now()).isoformat(),
            "props": props,
        }
    ]
    response = await world.http.post("/api/events", json=body, headers=admin(world))
    assert response.status_code == 202, response.text
    await world.consumed(client_event_id("ops", event_id))


def as_number(cell: str) -> float | str:
    try:
        return float(cell)
    except ValueError:
        return cell


async def catch_up_clock(world: LoopWorld) -> None:
    """Bring the world's clock (10 days back) to a few minutes ago: the K-factor windows end at the
    real now, so live events must be recent."""
    target = datetime.now(UTC) - timedelta(minutes=5)
    await world.advance(target - world.clock.now())


async def values(page: Page) -> dict[str, float | str]:
    """Every headline number on the page: data-metric → data-value (outside tables)."""
    found: dict[str, Any] = await page.evaluate(
        """(() => { const out = {};
            for (const el of document.querySelectorAll('[data-metric][data-value]')) {
              if (el.closest('table')) continue;
              const v = el.dataset.value; out[el.dataset.metric] = v === '' ? null : (isNaN(+v) ? v : +v);
            }
            return out; })()"""
    )
    return found


async def open_as_admin(page: Page, world: LoopWorld, path: str, ready: str) -> None:
    """Open `path` with `?token=<admin>`: the server answers with the cookie and the clean URL."""
    sep = "&" if "?" in path else "?"
    await page.goto(f"http://127.0.0.1:{world.port}{path}{sep}token={admin_token()}")
    await wait_for(page, ready, what=f"{path} rendered")
    assert await page.evaluate("location.pathname + location.search") == path
    await page.evaluate("window.__noReload = true")


async def session_cookie(page: Page) -> dict[str, Any] | None:
    """The `ve_admin` cookie as the browser context holds it (httpOnly, sameSite, expires...), or None."""
    found = [dict(c) for c in await page.context.cookies() if c.get("name") == "ve_admin"]
    return found[0] if found else None


async def wait_for(page: Page, expression: str, timeout: float = 10.0, what: str | None = None) -> Any:
    """Wait until a JavaScript expression is truthy (polled every 50 ms); returns its value."""
    try:
        # As a function, not a string: Playwright would eval() a string, which the pages' CSP forbids.
        handle = await page.wait_for_function(f"() => ({expression})", timeout=timeout * 1000, polling=50)
    except PlaywrightTimeout:
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what or expression!r} on {page.url}; "
            f"errors: {page_errors(page)}"
        ) from None
    return await handle.json_value()


async def text(page: Page, selector: str) -> str | None:
    value: str | None = await page.evaluate(
        f"document.querySelector({json.dumps(selector)})?.textContent ?? null"
    )
    return value


async def phone_width(page: Page) -> None:
    await page.set_viewport_size({"width": 390, "height": 844})


async def snap(page: Page, path: Path) -> None:
    """A viewport-sized screenshot from the top of the page (for the README: docs/screenshots)."""
    await page.evaluate(
        "document.activeElement?.blur(); window.scrollTo(0, 0);"
        " document.getElementById('toast')?.classList.remove('show')"
    )
    await asyncio.sleep(0.4)  # the toast fades out
    await page.screenshot(path=path)


async def still_same_document(page: Page) -> None:
    assert await page.evaluate("window.__noReload === true"), "the page reloaded"


async def cell(page: Page, table: str, row: str, name: str) -> str | None:
    """The raw value (data-value) of one number in a table row."""
    value: str | None = await page.evaluate(f"{cell_js(table, row, name)} ?? null")
    return value


def cell_js(table: str, row: str, name: str) -> str:
    return f"document.querySelector(\"#{table} [data-row='{row}'] [data-metric='{name}']\")?.dataset.value"


async def unlabelled(page: Page) -> list[str]:
    """Form controls and buttons a screen reader could not name."""
    found: list[str] = await page.evaluate(
        """[...document.querySelectorAll('input:not([type=hidden]), select, textarea, button')]
            .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                            && !(el.tagName === 'BUTTON' && el.textContent.trim()))
            .map((el) => el.outerHTML.slice(0, 80))"""
    )
    return found


def page_errors(page: Page) -> list[str]:
    return _ERRORS.get(page, [])


def no_errors(page: Page, *expected: str) -> None:
    """No exception, console error or CSP violation; `expected` are the failed requests the test
    provoked on purpose (Chromium logs every non-2xx response as an error)."""
    errors = page_errors(page)
    unexpected = [e for e in errors if not any(x in e for x in expected)]
    assert unexpected == [], errors


# ---------------------------------------------------------------- login gate


async def test_login_gate_refuses_non_admins_and_shows_no_data(
    server_database, browser: Chromium, shots: Path
):
    async with loop_world(server_database) as world:
        base = f"http://127.0.0.1:{world.port}"
        page = await browser.new_page()

        # No cookie: the login page, carrying no numbers at all, remembering where we were going.
        await page.goto(f"{base}/dashboard/k-factor?days=30")
        await wait_for(page, "location.pathname === '/dashboard/login' && document.readyState === 'complete'")
        assert await page.evaluate("new URLSearchParams(location.search).get('next')") == (
            "/dashboard/k-factor?days=30"
        )
        assert await page.evaluate("document.querySelectorAll('[data-metric]').length") == 0
        assert await page.evaluate("document.activeElement.id") == "token"
        await snap(page, shots / "login.png")

        # An empty form is caught on the page.
        await page.click("#login-form button[type=submit]")
        await wait_for(page, "document.getElementById('login-error').textContent === 'Enter a token.'")

        # A student's token in the form: a clear refusal (403), no cookie, still the login page.
        await page.fill("#token", make_token("ann", "student"))
        await page.click("#login-form button[type=submit]")
        await wait_for(
            page,
            "document.getElementById('main')?.dataset.errorStatus === '403'"
            " && document.readyState === 'complete'",
        )
        error = await text(page, "#login-error")
        assert error and "admin" in error and "student" in error
        assert await session_cookie(page) is None
        assert await page.evaluate("location.pathname") == "/dashboard/login"
        assert await page.evaluate("document.querySelectorAll('[data-metric]').length") == 0
        await snap(page, shots / "login-refused.png")

        # A student's token in the URL: 403 and the login page, never the dashboard, and the token
        # leaves the address bar.
        await page.goto(f"{base}/dashboard/guardrails?token={make_token('ann', 'student')}")
        assert await page.evaluate("document.getElementById('main').dataset.errorStatus") == "403"
        assert await page.evaluate("location.href") == f"{base}/dashboard/guardrails"
        assert await page.evaluate("document.querySelectorAll('[data-metric]').length") == 0
        assert await session_cookie(page) is None
        response = await world.http.get(f"/dashboard/guardrails?token={make_token('ann', 'student')}")
        assert response.status_code == 403
        assert "admins only" in response.text and "data-metric" not in response.text
        assert (await world.http.get("/dashboard/guardrails?token=forged.token.x")).status_code == 401
        # The dashboards' APIs refuse the student too (the pages only ever read through them).
        session = await world.http.get("/dashboard/session", headers=world.headers("ann"))
        assert session.status_code == 403 and "admins only" in session.json()["error"]
        assert (await world.http.get("/dashboard/session")).status_code == 401

        # Headers: a restrictive CSP on pages and files; only the known static files are served.
        page_response = await world.http.get("/dashboard/login")
        csp = page_response.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert page_response.headers["x-content-type-options"] == "nosniff"
        js = await world.http.get("/dashboard/static/phoenix.js")
        assert (
            js.headers["content-type"].startswith("text/javascript")
            and "content-security-policy" in js.headers
        )
        css = await world.http.get("/dashboard/static/style.css")
        assert css.headers["content-type"].startswith("text/css")
        for bad in ("/dashboard/static/..%2Fdashboards.py", "/dashboard/static/nope.js"):
            assert (await world.http.get(bad)).status_code == 404

        # An admin's token in the form: on to the page asked for, with the 30-day window, signed in
        # by an HttpOnly, SameSite=Strict cookie that no script can read.
        await page.goto(f"{base}/dashboard/login?next=%2Fdashboard%2Fk-factor%3Fdays%3D30")
        await page.fill("#token", admin_token())
        await page.click("#login-form button[type=submit]")
        await wait_for(
            page, "location.pathname === '/dashboard/k-factor' && document.readyState === 'complete'"
        )
        await wait_for(page, "document.getElementById('window-days')?.dataset.value === '30'")
        assert await page.evaluate("document.getElementById('period').value") == "30"
        cookie = await session_cookie(page)
        assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie
        # Not a session cookie (Playwright reports those with expires == -1): it lasts an hour.
        assert cookie["path"] == "/" and not cookie["secure"] and cookie["expires"] != -1
        assert 3500 < cookie["expires"] - time.time() <= 3600
        assert "ve_admin" not in await page.evaluate("document.cookie")
        assert await page.evaluate("sessionStorage.length + localStorage.length") == 0

        # Signing out clears the cookie and goes back to the login page; the pages are closed again.
        await page.click("#signout")
        await wait_for(page, "location.pathname === '/dashboard/login' && document.readyState === 'complete'")
        assert await session_cookie(page) is None
        assert "signed out" in (await text(page, "#login-error") or "")
        await page.goto(f"{base}/dashboard/experiments")
        assert await page.evaluate("location.pathname") == "/dashboard/login"
        no_errors(
            page,
            f"status of 403 (Forbidden) {base}/dashboard/login",
            f"status of 403 (Forbidden) {base}/dashboard/guardrails",
        )


# ---------------------------------------------------------------- K-factor


async def test_k_factor_page_matches_the_api_changes_live_and_filters_by_period(
    server_database, browser: Chromium, shots: Path, tmp_path: Path
):
    async with loop_world(server_database) as world:
        await catch_up_clock(world)
        ten_days_ago = world.clock.now() - timedelta(days=10)
        for user in ("old1", "old2", "old3"):  # active users inside 14/30/90 days, not inside 7
            await post(world, "session_started", user, ts=ten_days_ago, subject="algebra")
        for user in ("ann", "bob", "cat", "dan"):
            await post(world, "session_started", user, subject="algebra")

        page = await browser.new_page()
        await open_as_admin(
            page, world, "/dashboard/k-factor", "!!document.querySelector('[data-metric=k_factor]')"
        )
        # The token left the address bar for an HttpOnly, SameSite=Strict cookie; no script holds it.
        assert "token=" not in await page.evaluate("location.href")
        cookie = await session_cookie(page)
        assert cookie is not None, "no session cookie"
        claims = TokenVerifier(SECRET).verify(cookie["value"])  # the admin token itself
        assert (claims["sub"], claims["role"]) == ("ops", "admin")
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
        assert (
            await page.evaluate("sessionStorage.length + localStorage.length + document.cookie.length") == 0
        )
        # The default window is 7 days.
        assert await page.evaluate("document.getElementById('period').value") == "7"

        async def api(days: int) -> dict[str, Any]:
            response = await world.http.get(f"/api/metrics/k-factor?days={days}", headers=admin(world))
            return response.json()

        def same_numbers(shown: dict[str, Any], report: dict[str, Any]) -> None:
            for key in (
                "days",
                "k_factor",
                "invites_sent",
                "invites_per_user",
                "conversion_rate",
                "signups",
                "activated",
                "active_users",
                "referrers",
                "clicks",
                "k_per_referrer",
            ):
                assert shown[key] == pytest.approx(report[key]), (key, shown, report)
            assert shown["median_hours"] == (report["cycle_time"]["median_hours"])
            if "k_factor_filtered" in report:  # shown once the fraud filter reports it
                assert shown["k_factor_filtered"] == pytest.approx(report["k_factor_filtered"])

        shown = await values(page)
        same_numbers(shown, await api(7))
        assert shown["invites_sent"] == 0 and shown["active_users"] == 4

        # Live: an invite sent, then a signup through the invite link, change the page within seconds.
        link = (
            await world.http.post("/api/links", json={"source": "study_buddy"}, headers=world.headers("ann"))
        ).json()
        await post(world, "invite_sent", "ann", source="study_buddy", link_token=link["token"])
        await wait_for(
            page,
            "document.querySelector('[data-metric=invites_sent]').dataset.value === '1'",
            timeout=5,
            what="invites sent to show 1",
        )
        assert (await world.http.get(f"/r/{link['token']}")).status_code in (302, 303, 307)
        started = time.monotonic()
        await post(world, "signup", "newbie", referral_token=link["token"])
        await wait_for(
            page,
            "document.querySelector('[data-metric=signups]').dataset.value === '1'"
            " && +document.querySelector('[data-metric=k_factor]').dataset.value > 0",
            timeout=5,
            what="the signup to raise K",
        )
        latency = time.monotonic() - started
        print(f"signup posted → K-factor page updated in {latency:.2f}s")
        assert latency < 3.0, f"the dashboard took {latency:.2f}s to show the signup"
        await still_same_document(page)
        report = await api(7)
        shown = await values(page)
        same_numbers(shown, report)
        assert shown["k_factor"] == pytest.approx(0.25)  # 1 invite / 4 active users x 1 signup / 1 invite
        assert await page.evaluate("document.querySelector('[data-status=k_factor]').textContent") == (
            "Far below target"
        )
        # Tables: K by source, the funnel, top referrers and loop efficiency (REST, refreshed on each push).
        await wait_for(page, "!!document.querySelector('#loops-table [data-row=study_buddy]')")
        assert await cell(page, "referrers-table", "ann", "conversions") == "1"
        assert await cell(page, "funnel-table", "signed_up", "count") == "1"
        assert (
            await page.evaluate(
                "document.querySelector('#loops-table [data-row=study_buddy] [data-metric=recommendation]')"
                ".dataset.value"
            )
            == "deprioritise"
        )
        assert await page.evaluate("document.querySelectorAll('#timeline-svg polyline').length") == 3
        await snap(page, shots / "k-factor-1280.png")
        assert await unlabelled(page) == []

        # Keyboard: Tab from the top of the page reaches the period filter.
        await page.evaluate("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0)")
        reached = []
        for _ in range(12):
            await page.keyboard.press("Tab")
            reached.append(await page.evaluate("document.activeElement.id || document.activeElement.tagName"))
            if reached[-1] == "period":
                break
        assert reached[-1] == "period", reached
        assert await page.evaluate("document.querySelector('label[for=period]').textContent") == "Period"

        # The period filter joins again with another window: the older users count in 30 days.
        await page.select_option("#period", "30")
        await wait_for(page, "document.getElementById('window-days').dataset.value === '30'", timeout=5)
        await wait_for(
            page, "document.querySelector('[data-metric=active_users]').dataset.value === '7'", timeout=5
        )
        same_numbers(await values(page), await api(30))
        assert await page.evaluate("new URLSearchParams(location.search).get('days')") == "30"
        # ...and the live pushes that follow are the 30-day report's.
        await post(world, "invite_sent", "bob", source="buddy_challenge")
        await wait_for(
            page, "document.querySelector('[data-metric=invites_sent]').dataset.value === '2'", timeout=5
        )
        same_numbers(await values(page), await api(30))
        await still_same_document(page)

        # CSV export of a table, built in the browser from the JSON.
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        async with page.expect_download(timeout=5000) as download_info:
            await page.click("button[data-csv='top-referrers-30d']")
        download = await download_info.value
        assert download.suggested_filename == "top-referrers-30d.csv"
        await download.save_as(downloads / download.suggested_filename)
        rows = (downloads / "top-referrers-30d.csv").read_text().splitlines()
        assert rows[0].startswith("user_id,conversions")
        assert rows[1].startswith("ann,1,")

        # An invite's source is whatever its client sent: exported, a formula reads as text, in the
        # browser's CSV cell for cell as in the server's (one rule); numbers stay numbers.
        formula = "-1+1|cmd"
        await post(world, "invite_sent", "bob", source=formula)
        await wait_for(
            page, "document.querySelector('[data-metric=invites_sent]').dataset.value === '3'", timeout=5
        )
        async with page.expect_download(timeout=5000) as download_info:
            await page.click("button[data-csv='k-by-source-30d']")
        download = await download_info.value
        await download.save_as(downloads / download.suggested_filename)
        exported = list(csv.DictReader(io.StringIO((downloads / "k-by-source-30d.csv").read_text())))
        served = await world.http.get("/api/metrics/k-factor?days=30&format=csv", headers=admin(world))
        lines = list(csv.reader(io.StringIO(served.text)))
        section = lines.index(["by_source"])
        header, end = lines[section + 1], lines.index([], section)
        by_source = {row[0]: dict(zip(header, row, strict=True)) for row in lines[section + 2 : end]}
        assert {r["source"] for r in exported} == set(by_source) and f"'{formula}" in by_source
        for row in exported:  # a number may be written 0 or 0.0: the same number to a spreadsheet
            served_row = by_source[row["source"]]
            assert {k: as_number(v) for k, v in row.items()} == {k: as_number(served_row[k]) for k in row}
        assert by_source[f"'{formula}"]["invites_sent"] == "1"

        # Phone width: the page fits (wide tables scroll inside their own box).
        await phone_width(page)
        await asyncio.sleep(0.2)
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        await snap(page, shots / "k-factor-390.png")
        no_errors(page)


# ---------------------------------------------------------------- experiments


async def test_experiments_list_form_buttons_and_live_results(
    server_database, browser: Chromium, shots: Path
):
    async with loop_world(server_database) as world:
        body = {
            "key": "exp-api",
            "name": "Challenge copy",
            "variants": [{"key": "control", "weight": 0.5}, {"key": "bold", "weight": 0.5}],
            "target_metric": "first_value",
        }
        assert (await world.http.post("/api/experiments", json=body, headers=admin(world))).status_code == 201

        page = await browser.new_page()
        await open_as_admin(
            page, world, "/dashboard/experiments", "!!document.querySelector('[data-row=exp-api]')"
        )
        status = "document.querySelector('[data-row={}] [data-metric=status]').dataset.value"
        assert await page.evaluate(status.format("exp-api")) == "draft"

        # The form creates a draft with the chosen target and guardrail metrics.
        await page.fill("#f-key", "exp-form")
        await page.fill("#f-name", "Form made")
        await page.select_option("#f-target", "signup")
        await page.click("#g-opt_out")
        await page.fill("[data-variant-row] [data-v=key]", "plain")
        await page.click("#save")
        await wait_for(
            page, "!!document.querySelector('[data-row=exp-form]')", what="the new experiment listed"
        )
        made = (await world.http.get("/api/experiments/exp-form", headers=admin(world))).json()
        assert (made["status"], made["target_metric"], made["guardrail_metrics"]) == (
            "draft",
            "signup",
            ["opt_out"],
        )
        assert [v["key"] for v in made["variants"]] == ["plain", "treatment"]
        # Edit the draft: the form fills in from the list, saves with PATCH.
        await page.click("button[data-action=edit][data-key=exp-form]")
        assert await page.evaluate("document.getElementById('f-key').disabled") is True
        await page.fill("#f-name", "Form made, renamed")
        await page.click("#save")
        await wait_for(
            page, "document.querySelector('[data-row=exp-form]').textContent.includes('renamed')", timeout=5
        )
        renamed = (await world.http.get("/api/experiments/exp-form", headers=admin(world))).json()
        assert renamed["name"] == "Form made, renamed" and renamed["guardrail_metrics"] == ["opt_out"]
        # A bad definition shows the server's per-field errors next to the form.
        await page.fill("#f-key", "bad key!")
        await page.click("#save")
        await wait_for(page, "document.getElementById('e-key').textContent.length > 0")

        # Start, pause and resume with the buttons; the list follows.
        for action, expected in (("start", "running"), ("pause", "paused"), ("start", "running")):
            await page.click(f"button[data-action={action}][data-key=exp-api]")
            await wait_for(page, f"{status.format('exp-api')} === '{expected}'", timeout=5)
            got = (await world.http.get("/api/experiments/exp-api", headers=admin(world))).json()["status"]
            assert got == expected
        await snap(page, shots / "experiments-1280.png")
        assert await unlabelled(page) == []
        no_errors(page, f"status of 422 (Unprocessable Entity) http://127.0.0.1:{world.port}/api/experiments")

        # One experiment's page: sample sizes move live as exposures and conversions arrive.
        detail = await browser.new_page()
        await open_as_admin(
            detail, world, "/dashboard/experiments/exp-api", "!!document.querySelector('#results-table')"
        )
        exposures = (
            "document.querySelector('#results-table [data-row={}] [data-metric=exposures]').dataset.value"
        )
        assert await detail.evaluate(exposures.format("control")) == "0"
        users = [(f"c{i}", "control") for i in range(6)] + [(f"b{i}", "bold") for i in range(6)]
        for user, variant in users:
            await post(world, "experiment_exposure", user, experiment="exp-api", variant=variant)
        await world.advance(timedelta(minutes=5))
        for user in ("c0", "c1", "b0", "b1", "b2", "b3"):
            await post(world, "first_value", user)
        await wait_for(
            detail, f"{exposures.format('control')} === '6' && {exposures.format('bold')} === '6'", timeout=5
        )
        await wait_for(
            detail,
            cell_js("results-table", "bold", "conversions") + " === '4'",
            timeout=5,
        )
        await still_same_document(detail)
        results = (await world.http.get("/api/experiments/exp-api/results", headers=admin(world))).json()
        bold = results["variants"][1]
        shown_lift = await detail.evaluate(
            "+document.querySelector('#results-table [data-row=bold] [data-metric=lift]').dataset.value"
        )
        assert shown_lift == pytest.approx(bold["lift"])
        # The lift's interval drawn as a bar, with its point estimate.
        assert await detail.evaluate("document.querySelectorAll('#intervals-svg [data-ci=bar]').length") == 1
        assert await detail.evaluate("document.querySelectorAll('#intervals-svg circle.point').length") == 1
        assert (
            await detail.evaluate("document.getElementById('recommendation').dataset.value")
            == (results["recommendation"]["action"])
        )
        assert (
            await detail.evaluate("document.querySelector('[data-metric=sequential]').dataset.value")
            == "false"
        )
        await snap(detail, shots / "experiment-1280.png")
        assert await unlabelled(detail) == []

        # Declare the winner (with its confirmation): stopped, with that winner.
        await detail.select_option("#winner-variant", "bold")
        await detail.click("#exp-actions [data-action=winner]")
        await detail.click("[data-confirm=yes]")
        await wait_for(detail, "document.getElementById('exp-status').dataset.value === 'stopped'", timeout=5)
        final = (await world.http.get("/api/experiments/exp-api", headers=admin(world))).json()
        assert (final["status"], final["winner"]) == ("stopped", "bold")
        no_errors(detail)


# ---------------------------------------------------------------- guardrails


def guardrail_env() -> dict[str, str]:
    thresholds = [
        {"metric": "opt_out_rate", "scope": "loop", "warn": 0.2, "critical": 0.4},
        {"metric": "opt_out_rate", "scope": "experiment", "warn": 0.2, "critical": 0.4},
        {"metric": "k_factor", "scope": "global", "warn": 1.0, "critical": 0.5, "direction": "below"},
    ]
    return {"GUARDRAIL_THRESHOLDS": json.dumps(thresholds), "GUARDRAILS_EVERY": "3600"}


async def test_guardrails_page_shows_the_alert_live_and_unpauses(
    server_database, browser: Chromium, shots: Path
):
    async with loop_world(server_database, **guardrail_env()) as world:
        page = await browser.new_page()
        await open_as_admin(page, world, "/dashboard/guardrails", "!!document.querySelector('#loop-health')")
        assert await page.evaluate("document.querySelectorAll('[data-unpause]').length") == 0

        # Half the recipients of the buddy-challenge prompt opt out: critical (0.5 >= 0.4).
        for user in ("ann", "bob"):
            await post(world, "practice_completed", user, subject="algebra", score=80)
        await world.advance(H)
        await post(world, "opt_out", "bob")
        await world.advance(timedelta(minutes=1))
        checked = await world.http.post("/api/guardrails/check", headers=admin(world))
        assert checked.status_code == 200

        alert = "#alerts-table [data-row='opt_out_rate:loop:buddy_challenge']"
        await wait_for(page, f'!!document.querySelector("{alert}")', timeout=5, what="the alert pushed live")
        assert await page.evaluate(
            f'document.querySelector("{alert} [data-metric=level]").dataset.value'
        ) == ("critical")
        opt_out = "#loop-health [data-row=buddy_challenge] [data-metric=opt_out_rate]"
        assert await page.evaluate(f"document.querySelector('{opt_out}').dataset.level") == "critical"
        assert await page.evaluate(f"+document.querySelector('{opt_out}').dataset.value") == 0.5
        await still_same_document(page)
        # While paused, the loop refuses; the refusal shows by reason after the next check.
        refused = await world.act("ann", "challenge", subject="algebra", friend_id="cat")
        assert refused.status_code == 403
        await page.click("#check-now")
        await wait_for(
            page,
            "!!document.querySelector('#refusals-table [data-row=loop_paused]')",
            timeout=5,
            what="refusals",
        )
        assert await page.evaluate("document.querySelector('[data-metric=flagged]').dataset.value") == "0"
        await snap(page, shots / "guardrails-1280.png")
        assert await unlabelled(page) == []

        # Unpause from the page: the paused row goes, and the server agrees.
        await page.click("button[data-unpause='loop:buddy_challenge']")
        await wait_for(page, "!document.querySelector(\"[data-unpause='loop:buddy_challenge']\")", timeout=5)
        report = (await world.http.get("/api/guardrails", headers=admin(world))).json()
        assert report["paused"]["loops"] == []
        await asyncio.sleep(1.2)  # the push that follows the unpause keeps it gone
        assert await page.evaluate("document.querySelectorAll('[data-unpause]').length") == 0
        assert (await world.act("ann", "challenge", subject="algebra", friend_id="cat")).status_code == 200

        await phone_width(page)
        await asyncio.sleep(0.2)
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        await snap(page, shots / "guardrails-390.png")
        no_errors(page)


# ---------------------------------------------------------------- our Phoenix client


CLIENT_CHECK = """(async () => {
  const { Socket } = await import('/dashboard/static/phoenix.js');
  const statuses = [];
  const socket = new Socket('/socket/websocket', {  // signed in by the session cookie
    heartbeatMs: 150, backoffMs: [50, 100], onStatus: (s) => statuses.push(s),
  });
  let beats = 0, beatReplies = 0;
  const send = socket.send.bind(socket);
  socket.send = (frame) => { if (frame[3] === 'heartbeat') beats += 1; return send(frame); };
  const dispatch = socket.dispatch.bind(socket);
  socket.dispatch = (frame) => {
    if (frame[2] === 'phoenix' && frame[3] === 'phx_reply' && frame[4].status === 'ok') beatReplies += 1;
    return dispatch(frame);
  };
  const wait = (ms) => new Promise((r) => setTimeout(r, ms));
  socket.connect();
  while (socket.status !== 'open') await wait(10);
  const channel = socket.channel('dashboard:guardrails', {});
  const joined = await channel.join({});
  const firstJoin = channel.joinRef;
  await wait(800);
  const unknown = await channel.push('no_such_event', {});
  const stillOpen = socket.status === 'open' && channel.joined;
  socket.ws.close();  // the connection drops: reconnect with backoff, then rejoin
  await wait(5);
  const dropped = socket.status;
  while (!(socket.status === 'open' && channel.joined)) await wait(10);
  const refused = await socket.channel('dashboard:nope', {}).join({});
  const out = {
    joined: joined.status, alerts: Array.isArray(joined.response.alerts), beats, beatReplies,
    unknown: unknown.status, stillOpen, dropped, statuses: [...statuses],
    rejoinedWithNewRef: channel.joinRef !== firstJoin,
    refused: refused.status, pending: socket.pending.size,
  };
  socket.disconnect();
  return out;
})()"""


async def test_our_phoenix_client_heartbeats_matches_replies_and_rejoins(server_database, browser: Chromium):
    async with loop_world(server_database) as world:
        page = await browser.new_page()
        await open_as_admin(page, world, "/dashboard/guardrails", "!!document.querySelector('#loop-health')")
        result = await page.evaluate(CLIENT_CHECK)
        assert result["joined"] == "ok" and result["alerts"], result
        # Heartbeats every 150 ms here (30 s in the pages), each answered, none missed: no reconnect.
        assert result["beats"] >= 3 and result["beatReplies"] >= result["beats"] - 1, result
        assert result["stillOpen"], result
        # A push gets its own reply, matched by ref (an unknown event is an error reply, not a hang).
        assert result["unknown"] == "error", result
        # A dropped connection: reconnecting, then open again and the channel joined once more.
        assert result["dropped"] == "reconnecting", result
        assert result["statuses"][-1] == "open" and result["rejoinedWithNewRef"], result
        assert result["refused"] == "error" and result["pending"] == 0, result
        no_errors(page)
