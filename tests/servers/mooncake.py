"""A real Mooncake Store on 127.0.0.1: ``mooncake_master`` plus Mooncake's HTTP metadata
server (both from ``mooncake-transfer-engine-non-cuda``).

``mooncake_server`` is one store per test session (tests use fresh keys; nothing is
flushed); ``mooncake_factory`` starts a dedicated store for fault tests. A store's
``stop()`` / ``start()`` restart its master on the same ports (the master keeps its
objects only in memory: a restart empties the store); ``pause()`` / ``resume()`` freeze
and thaw it (a slow master). Other tests may use ``.master_address`` and
``.metadata_url`` to run their own Mooncake clients against it.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ._process import ServerProcess, free_port, port_open, require


def require_client() -> None:
    """Skip the test (fail under ``KVTEST_REQUIRE_SERVERS``) unless Mooncake's native
    client loads: it needs the extra and the system library libibverbs."""
    require("mooncake.store", "'kvtier[mooncake]' and apt-get install libibverbs1")


def _master_binary() -> Path:
    require_client()
    spec = importlib.util.find_spec("mooncake")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "mooncake_master"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


class MooncakeStore:
    """A master and a metadata server on free 127.0.0.1 ports."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.rpc_port = free_port()
        self.admin_port = free_port()
        self.metadata_port = free_port()
        self.master = ServerProcess(
            [
                str(_master_binary()),
                "-rpc_address=127.0.0.1",
                f"-rpc_port={self.rpc_port}",
                "-metrics_host=127.0.0.1",
                f"-metrics_port={self.admin_port}",
            ],
            lambda: port_open(self.rpc_port) and _answers(f"{self.admin_url}/health"),
            name="mooncake_master",
            log=folder / "master.log",
        )
        self.metadata = ServerProcess(
            [
                sys.executable,
                "-m",
                "mooncake.http_metadata_server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.metadata_port),
            ],
            lambda: port_open(self.metadata_port),
            name="mooncake_http_metadata_server",
            log=folder / "metadata.log",
        )

    @property
    def master_address(self) -> str:
        """``host:port`` of the master's RPC service (Mooncake's ``master_server_addr``)."""
        return f"127.0.0.1:{self.rpc_port}"

    @property
    def metadata_url(self) -> str:
        """The metadata server as Mooncake clients name it (``metadata_server``)."""
        return f"http://127.0.0.1:{self.metadata_port}/metadata"

    @property
    def admin_url(self) -> str:
        """The master's HTTP server: ``/health``, ``/metrics``, ``/get_all_keys``."""
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def url(self) -> str:
        """The kvtier tier URL."""
        return f"mooncake://{self.master_address}"

    def options(self, **overrides: Any) -> dict[str, Any]:
        """Tier options for this store: small segments, loopback only."""
        return {
            "metadata_server": self.metadata_url,
            "admin_url": self.admin_url,
            "local_hostname": "127.0.0.1",
            "global_segment_size": "256MiB",
            **overrides,
        }

    def start(self) -> None:
        """Start (or restart) whatever is not running; the master comes back empty."""
        self.metadata.start()
        self.master.start()

    def stop(self) -> None:
        """Stop the master (clients then fail with RPC errors); the metadata server stays."""
        self.resume()
        self.master.stop()

    def close(self) -> None:
        self.stop()
        self.metadata.stop()

    def pause(self) -> None:
        """Freeze the master: its port accepts connections, its RPCs never answer."""
        assert self.master.proc is not None
        os.killpg(self.master.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.master.running:
            assert self.master.proc is not None
            os.killpg(self.master.proc.pid, signal.SIGCONT)


@pytest.fixture(scope="session")
def mooncake_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MooncakeStore]:
    store = MooncakeStore(tmp_path_factory.mktemp("mooncake"))
    try:
        store.start()
        yield store
    finally:
        store.close()


@pytest.fixture
def mooncake_server(mooncake_session: MooncakeStore) -> MooncakeStore:
    """The session's Mooncake Store, running (a fault test may have stopped it)."""
    mooncake_session.start()
    return mooncake_session


@pytest.fixture
def mooncake_factory(tmp_path: Path) -> Iterator[Callable[[], MooncakeStore]]:
    """Start a dedicated store: ``store = mooncake_factory()``; stopped after the test."""
    started: list[MooncakeStore] = []

    def make() -> MooncakeStore:
        store = MooncakeStore(tmp_path / f"mooncake{len(started)}")
        started.append(store)
        store.start()
        return store

    yield make
    for store in started:
        store.close()
