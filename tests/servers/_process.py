"""Starting and stopping server processes for test fixtures."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import pytest

REQUIRE_ENV = "KVTEST_REQUIRE_SERVERS"


def require(module: str, install: str) -> ModuleType:
    """Import ``module``; skip the test if it is missing (fail under ``KVTEST_REQUIRE_SERVERS``)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = f"{module} cannot be imported ({exc}): pip install {install}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(ready: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``ready`` every 50 ms until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    pytest.fail(f"{what} was not ready after {timeout:.0f} s")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class ServerProcess:
    """One server process: ``start()`` runs ``argv`` and waits for ``ready``; ``stop()``
    ends it by PID (SIGTERM, then SIGKILL after ``grace`` seconds). Restartable, so fault
    tests can stop a server mid-workload and bring it back on the same ports."""

    def __init__(
        self,
        argv: Sequence[str],
        ready: Callable[[], bool],
        *,
        name: str,
        log: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        grace: float = 5.0,
        start_timeout: float = 30.0,
    ) -> None:
        self.argv = list(argv)
        self.ready = ready
        self.name = name
        self.log = log
        self.cwd = cwd
        self.env = env
        self.grace = grace
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=None if self.env is None else {**os.environ, **self.env},
                start_new_session=True,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
            return self.ready()

        wait_for(ready, self.name, self.start_timeout)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(self.grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
