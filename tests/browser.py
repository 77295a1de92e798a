"""Headless Chromium driven over the DevTools protocol (aiohttp's websocket client, no extra
package): open a page, wait for text, type, press keys, click, screenshot."""
from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest


def find_chromium(require_env: str = "ECGSEARCH_REQUIRE_BROWSER") -> str:
    import os

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        reason = ("Debian's chromium is not installed; `make test` installs it when run as root "
                  "(apt-get install -y chromium)")
        if os.environ.get(require_env):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


class Page:
    """One tab of a fresh headless Chromium (its own profile in `profile`)."""

    def __init__(self, binary: str, profile: Path, size: str = "1600,1000") -> None:
        self.proc = subprocess.Popen([binary, "--headless=new", "--no-sandbox", "--disable-gpu",
                                      "--disable-dev-shm-usage", "--hide-scrollbars", f"--window-size={size}",
                                      "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                                      f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited ({self.proc.returncode})")
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            port = int(m.group(1)) if m else None
        if port is None:
            self.proc.kill()
            raise RuntimeError("chromium did not open its DevTools port within 60 s")
        # Keep draining its log, or a full pipe would stall the browser.
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            target = next(t for t in json.load(resp) if t["type"] == "page")
        self.loop = asyncio.new_event_loop()
        self._id = 0
        self.ws = self.loop.run_until_complete(self._connect(target["webSocketDebuggerUrl"]))

    async def _connect(self, url: str):
        import aiohttp

        self.session = aiohttp.ClientSession()
        return await self.session.ws_connect(url, max_msg_size=0)

    async def _call(self, method: str, params: dict) -> dict:
        self._id += 1
        await self.ws.send_str(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def call(self, method: str, **params) -> dict:
        return self.loop.run_until_complete(self._call(method, params))

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]}: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def wait_for(self, predicate_js: str, timeout_s: float = 60, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        guarded = f"(() => {{ try {{ return !!({predicate_js}); }} catch (e) {{ return false; }} }})()"
        while time.monotonic() < deadline:
            if self.js(guarded):
                return
            time.sleep(0.5)
        raise AssertionError(f"page never showed {what or predicate_js} within {timeout_s:.0f} s; its text:\n"
                             f"{self.text()[-3000:]}")

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def type_into(self, selector: str, text: str) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      **({"text": "\r"} if kind == "keyDown" else {}))

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.loop.run_until_complete(self.ws.close())
            self.loop.run_until_complete(self.session.close())
            self.loop.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self.proc.stderr.close()
