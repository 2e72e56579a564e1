"""Real server and client processes on 127.0.0.1 for the deployment tests."""

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from helpers import PROCESS_S, bound, wait_exit, wait_for_line

from fedforge.network.auth import enroll, write_secret

HERE = Path(__file__).parent
BASE = [
    "--dataset",
    "synthetic",
    "--num-clients",
    "3",
    "--clients-per-round",
    "3",
    "--model",
    "logreg",
    "--batch-size",
    "10",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, argv, log: Path, cwd: Path):
        self.log = log
        self.handle = log.open("w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(argv, stdout=self.handle, stderr=subprocess.STDOUT, cwd=cwd, env=env)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = PROCESS_S) -> re.Match:
        return wait_for_line(self.log, pattern, timeout, self.popen)

    def wait(self, timeout: float = PROCESS_S) -> int:
        return wait_exit(self.popen, timeout, self.log)

    def kill(self):
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()


class Cluster:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[Proc] = []
        for i in range(4):  # what `fedforge enroll` does, without starting a process each
            write_secret(tmp / f"client-{i}.token", enroll(tmp / "tokens.json", i))

    def fedforge(self, *argv):
        subprocess.run(
            [sys.executable, "-m", "fedforge", *argv],
            cwd=self.tmp,
            check=True,
            capture_output=True,
            timeout=bound(PROCESS_S),
        )

    def start(self, name, argv) -> Proc:
        proc = Proc(argv, self.tmp / f"{name}.log", self.tmp)
        self.procs.append(proc)
        return proc

    def server(self, *flags, port=0, name="server") -> tuple[Proc, int]:
        proc = self.start(
            name,
            [
                sys.executable,
                "-m",
                "fedforge",
                "server",
                "-q",
                "--threads",
                "1",
                "--tokens",
                "tokens.json",
                "--address",
                f"127.0.0.1:{port}",
                "--out-dir",
                "runs",
                "--name",
                "net",
                *flags,
            ],
        )
        return proc, int(proc.wait_for(r"listening on port (\d+)").group(1))

    def client(self, i, port, *flags, token=None, name=None, part=None, dataset="synthetic") -> Proc:
        security = [] if "--root-cert" in flags else ["--insecure"]
        part = i if part is None else part
        return self.start(
            name or f"client-{i}",
            [
                sys.executable,
                "-m",
                "fedforge",
                "client",
                "--threads",
                "1",
                "--server",
                f"127.0.0.1:{port}",
                "--client-id",
                str(i),
                "--token-file",
                token or f"client-{i}.token",
                "--partition-of",
                f"{dataset}:{part}/3",
                *security,
                *flags,
            ],
        )

    def app_client(self, i, port, app) -> Proc:
        """Client `i` running the ClientApp `app` (package.module:object), plaintext, as `app-{i}`."""
        return self.start(
            f"app-{i}",
            [
                sys.executable,
                "-m",
                "fedforge",
                "client",
                "--threads",
                "1",
                "--insecure",
                "--server",
                f"127.0.0.1:{port}",
                "--client-id",
                str(i),
                "--token-file",
                f"client-{i}.token",
                "--app",
                app,
            ],
        )

    def stub(self, i, port, modes, name=None) -> Proc:
        return self.start(
            name or f"stub-{i}",
            [sys.executable, str(HERE / "stub_client.py"), str(port), str(i), f"client-{i}.token", modes],
        )

    def close(self):
        for proc in self.procs:
            proc.kill()
            proc.handle.close()
