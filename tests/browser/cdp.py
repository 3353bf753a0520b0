"""Drive Debian's headless Chromium over the Chrome DevTools Protocol, with the `websockets` package the
project already depends on (no browser-automation library, nothing downloaded).

`Chromium.launch()` starts `/usr/bin/chromium --headless=new --remote-debugging-port=0` with a fresh
profile, reads the DevTools address from the profile's `DevToolsActivePort` file, and connects. Each
`new_page()` is a new tab (tabs share the browser's cookies) attached as a flat session; a `Page`
navigates, evaluates JavaScript, waits for a condition, types, presses keys, reads cookies, takes
screenshots, and records every uncaught exception, `console.error` and error-level log entry (CSP
violations, failed loads) in `page.errors`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import websockets

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def find_chromium() -> str | None:
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for path in CANDIDATES:
        if Path(path).exists():
            return path
    return shutil.which("chromium")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class CDPError(RuntimeError):
    pass


class Chromium:
    def __init__(self, proc: asyncio.subprocess.Process, ws: Any, profile: str) -> None:
        self.proc = proc
        self.ws = ws
        self.profile = profile
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._sessions: dict[str, Page] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def launch(cls, executable: str, width: int = 1280, height: int = 900) -> Chromium:
        profile = tempfile.mkdtemp(prefix="ve-chromium-")
        args = [
            "--headless=new",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-features=Translate,MediaRouter,OptimizationHints",
            "--lang=en-US",
            "--mute-audio",
            "--disable-breakpad",
            "--disable-crash-reporter",
            "--disable-dev-shm-usage",
            "about:blank",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(0, "--no-sandbox")  # Chromium refuses to run its sandbox as root
        proc = await asyncio.create_subprocess_exec(
            executable,
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        port_file = Path(profile) / "DevToolsActivePort"
        try:
            async with asyncio.timeout(30):
                while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
                    if proc.returncode is not None:
                        raise CDPError(f"chromium exited with {proc.returncode} before it listened")
                    await asyncio.sleep(0.05)
            port, path = port_file.read_text().splitlines()[:2]
            ws = await websockets.connect(f"ws://127.0.0.1:{port}{path}", max_size=None, ping_interval=None)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            shutil.rmtree(profile, ignore_errors=True)
            raise
        return cls(proc, ws, profile)

    async def _read(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            if "id" in message:
                future = self._waiting.pop(message["id"], None)
                if future is not None and not future.done():
                    if "error" in message:
                        future.set_exception(CDPError(f"{message['error']}"))
                    else:
                        future.set_result(message.get("result", {}))
                continue
            page = self._sessions.get(message.get("sessionId", ""))
            if page is not None:
                page._event(message["method"], message.get("params", {}))

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> Any:
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        await self.ws.send(json.dumps(message))
        async with asyncio.timeout(30):
            return await future

    async def new_page(self, width: int = 1280, height: int = 900) -> Page:
        target = (await self.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        session = (await self.send("Target.attachToTarget", {"targetId": target, "flatten": True}))[
            "sessionId"
        ]
        page = Page(self, session, target)
        self._sessions[session] = page
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        await page.viewport(width, height)
        return page

    async def cookies(self) -> list[dict[str, Any]]:
        """Every cookie the browser holds (DevTools `Storage.getCookies`: with httpOnly, sameSite...)."""
        result = await self.send("Storage.getCookies")
        cookies: list[dict[str, Any]] = result.get("cookies", [])
        return cookies

    async def allow_downloads(self, folder: Path) -> None:
        await self.send("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.send("Browser.close"), 5)
        with contextlib.suppress(Exception):
            await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader
        if self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    def __init__(self, browser: Chromium, session: str, target: str) -> None:
        self.browser = browser
        self.session = session
        self.target = target
        self.errors: list[str] = []
        self.console: list[str] = []
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []

    async def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return await self.browser.send(method, params, self.session)

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            self.errors.append(f"exception: {text}")
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"{params['type']}: {text}")
            if params["type"] in ("error", "assert"):
                self.errors.append(f"console.{params['type']}: {text}")
        elif method == "Log.entryAdded":
            entry = params["entry"]
            if entry.get("level") == "error":
                self.errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
        for listener in self._listeners:
            listener(method, params)

    async def viewport(self, width: int, height: int, mobile: bool = False) -> None:
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        )

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})
        await self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True, "userGesture": True},
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CDPError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0, what: str | None = None) -> Any:
        """Poll a JavaScript expression until it is truthy; returns its value."""
        last: Any = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    with contextlib.suppress(CDPError):  # e.g. the context went away mid-navigation
                        last = await self.evaluate(expression)
                        if last:
                            return last
                    await asyncio.sleep(0.05)
        except TimeoutError:
            url = await self.evaluate("location.href")
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or expression!r} (last {last!r}) on {url}; "
                f"errors: {self.errors}"
            ) from None

    async def text(self, selector: str) -> str | None:
        value: str | None = await self.evaluate(
            f"document.querySelector({json.dumps(selector)})?.textContent ?? null"
        )
        return value

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element (scrolled into view first)."""
        box = await self.evaluate(
            f"""(() => {{
                const el = document.querySelector({json.dumps(selector)});
                if (!el) return null;
                el.scrollIntoView({{block: 'center'}});
                const r = el.getBoundingClientRect();
                return [r.x + r.width / 2, r.y + r.height / 2];
            }})()"""
        )
        if box is None:
            raise AssertionError(f"nothing matches {selector!r} on {await self.evaluate('location.href')}")
        x, y = box
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            )

    async def type(self, selector: str, text: str, clear: bool = True) -> None:
        await self.evaluate(
            f"""(() => {{ const el = document.querySelector({json.dumps(selector)});
                el.focus(); if ({json.dumps(clear)}) {{ el.value = ''; }} }})()"""
        )
        await self.send("Input.insertText", {"text": text})

    async def select(self, selector: str, value: str) -> None:
        await self.evaluate(
            f"""(() => {{ const el = document.querySelector({json.dumps(selector)});
                el.focus(); el.value = {json.dumps(value)};
                el.dispatchEvent(new Event('input', {{bubbles: true}}));
                el.dispatchEvent(new Event('change', {{bubbles: true}})); }})()"""
        )

    async def press(self, key: str, code: str | None = None, key_code: int = 0, shift: bool = False) -> None:
        params = {
            "key": key,
            "code": code or key,
            "windowsVirtualKeyCode": key_code,
            "modifiers": 8 if shift else 0,
        }
        await self.send("Input.dispatchKeyEvent", {"type": "rawKeyDown", **params})
        await self.send("Input.dispatchKeyEvent", {"type": "keyUp", **params})

    async def tab(self, shift: bool = False) -> None:
        await self.press("Tab", "Tab", 9, shift)

    async def cookies(self) -> list[dict[str, Any]]:
        """The cookies this page's URL would be sent (DevTools `Network.getCookies`)."""
        result = await self.send("Network.getCookies")
        cookies: list[dict[str, Any]] = result.get("cookies", [])
        return cookies

    async def screenshot(self, path: Path, full_page: bool = False) -> Path:
        """A PNG of the viewport (`full_page`: of the whole page, which can be very tall)."""
        result = await self.send(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": full_page}
        )
        data = base64.b64decode(result["data"])
        await asyncio.to_thread(_write, path, data)
        return path

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.browser.send("Target.closeTarget", {"targetId": self.target})
