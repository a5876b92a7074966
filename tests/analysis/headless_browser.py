"""Drive headless Chromium over the DevTools protocol on a pipe (no extra Python package).

Chromium started with ``--remote-debugging-pipe`` reads JSON commands from fd 3 and writes
replies/events to fd 4, each message terminated by a NUL byte. :class:`HeadlessPage` opens a
page, collects console errors and uncaught exceptions, evaluates JavaScript and takes
screenshots (PNG bytes).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--hide-scrollbars",
    "--window-size=1200,900",
    "--remote-debugging-pipe",
]


# put the pipe ends on fds 3 and 4, then become chromium (dash cannot redirect fds above 9)
_LAUNCH = (
    "import os, sys; a, b = int(sys.argv[1]), int(sys.argv[2]); os.dup2(a, 3); os.dup2(b, 4); "
    "os.close(a); os.close(b); os.execv(sys.argv[3], sys.argv[3:])"
)


def _above(fd: int, lowest: int) -> int:
    """``fd`` moved to a descriptor >= ``lowest`` (the original is closed)."""
    import fcntl

    new = fcntl.fcntl(fd, fcntl.F_DUPFD, lowest)
    os.close(fd)
    return new


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    return None


class HeadlessPage:
    def __init__(self, binary: str | None = None, timeout: float = 60.0):
        binary = binary or chromium_path()
        if binary is None:
            raise RuntimeError("no chromium found (run `make sysdeps` or apt-get install chromium)")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="cryosip-chromium-")
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        # the child's ends above fd 4, so that `3<&a 4>&b` cannot overwrite one with the other
        cmd_r, out_w = (_above(fd, 10) for fd in (cmd_r, out_w))
        self._stderr = tempfile.TemporaryFile()
        args = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"]
        # fd 3 = commands to the browser, fd 4 = its replies
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, str(cmd_r), str(out_w), *args],
            pass_fds=(cmd_r, out_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.session = None
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")

    # -- protocol ----------------------------------------------------------------------------
    def stderr_tail(self, n: int = 3000) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-n:]

    def _send(self, msg: dict) -> None:
        data = json.dumps(msg).encode() + b"\0"
        while data:
            try:
                n = os.write(self._cmd_w, data)
            except BrokenPipeError:
                raise RuntimeError(
                    f"chromium exited ({self.proc.poll()}): {self.stderr_tail()}"
                ) from None
            data = data[n:]

    def _recv(self, deadline: float) -> dict | None:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self._out_r], [], [], min(left, 0.5))
            if r:
                chunk = os.read(self._out_r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the DevTools pipe: {self.stderr_tail()}")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, timeout: float | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if self.session is not None:
            msg["sessionId"] = self.session
        self._send(msg)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            m = self._recv(deadline)
            if m is None:
                raise TimeoutError(f"no reply to {method}")
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            if "method" in m:
                self.events.append(m)

    def pump(self, seconds: float) -> None:
        """Collect events for ``seconds``."""
        deadline = time.monotonic() + seconds
        while (m := self._recv(deadline)) is not None:
            if "method" in m:
                self.events.append(m)

    # -- page --------------------------------------------------------------------------------
    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})
        deadline = time.monotonic() + self.timeout
        while not any(e["method"] == "Page.loadEventFired" for e in self.events):
            m = self._recv(deadline)
            if m is None:
                raise TimeoutError(f"{url} did not load")
            if "method" in m:
                self.events.append(m)

    def eval(self, expr: str):
        r = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expr: str, timeout: float | None = None):
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            v = self.eval(expr)
            if v:
                return v
            self.pump(0.2)
        raise TimeoutError(f"{expr} stayed false")

    def screenshot(self, clip: dict | None = None) -> bytes:
        params = {"format": "png"}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
            params["captureBeyondViewport"] = True
        return base64.b64decode(self.call("Page.captureScreenshot", params)["data"])

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries seen so far."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(f"exception: {d.get('exception', {}).get('description') or d}")
            elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(
                    "console.error: " + " ".join(str(a.get("value", a)) for a in p.get("args", []))
                )
            elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} ({p['entry'].get('url', '')})")
        return out

    def close(self) -> None:
        try:
            self.session = None
            self._id += 1
            self._send({"id": self._id, "method": "Browser.close"})
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait(timeout=10)
        finally:
            for fd in (self._cmd_w, self._out_r):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._stderr.close()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> HeadlessPage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
