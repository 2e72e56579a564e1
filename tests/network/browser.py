"""Headless Chromium driven over the DevTools protocol for the dashboard tests, with the standard
library only: `--remote-debugging-pipe` takes commands on fd 3 and answers on fd 4, one JSON
message per NUL-terminated line (the pipe Playwright uses), so no WebSocket client is needed.

One page is loaded once and read as it is at any moment (`evaluate`), so a test can see the page
change on its own, without a reload.
"""

import fcntl
import json
import os
import select
import shutil
import subprocess
import time

from helpers import PROCESS_S, bound

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _above_4(fd: int) -> int:
    """`fd` moved to a number above 4, so that putting pipes at 3 and 4 cannot overwrite it."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Browser:
    def __init__(self, profile, *flags):
        commands_read, self._commands = os.pipe()
        self._answers, answers_write = os.pipe()
        commands_read, answers_write = _above_4(commands_read), _above_4(answers_write)
        # The shell puts the pipes where Chromium looks for them (fds 3 and 4), then becomes Chromium.
        self.proc = subprocess.Popen(
            [
                "bash",
                "-c",
                f'exec "$0" "$@" 3<&{commands_read} 4>&{answers_write} {commands_read}<&- {answers_write}>&-',
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "--no-first-run",
                *flags,
            ],
            pass_fds=(commands_read, answers_write),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_read)
        os.close(answers_write)
        self._buffer = b""
        self._next_id = 0
        self._session = None

    def send(self, method: str, params: dict | None = None, *, timeout: float = PROCESS_S) -> dict:
        """Run one protocol command (in the open page, once there is one); its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if self._session is not None:
            message["sessionId"] = self._session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        timeout = bound(timeout)
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                line, self._buffer = self._buffer.split(b"\0", 1)
                answer = json.loads(line)
                if answer.get("id") == self._next_id:  # anything else: an event, not asked for
                    if "error" in answer:
                        raise RuntimeError(f"{method}: {answer['error']}")
                    return answer["result"]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._answers], [], [], remaining)[0]:
                raise TimeoutError(f"no answer to {method} within {timeout} s")
            chunk = os.read(self._answers, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium exited ({self.proc.wait()}) during {method}")
            self._buffer += chunk

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the open page (JSON-like values)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self._commands)
        os.close(self._answers)
