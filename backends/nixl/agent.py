"""A NIXL agent (UCX backend) that exposes a buffer pool's memory and reads peers'.

:class:`PeerAgent` is a :class:`~kvtier.core.buffers.MemoryRegistrar`: added to a
pool, it registers every block the pool maps, so blobs stored in pool buffers can be
read by peers and peer reads land in pool buffers, with no copy. Every method may
block (NIXL takes locks, transfers move bytes): call them from worker threads. The
agent runs in NIXL's reader-writer thread mode with one UCX worker per transferring
thread, so transfers from several threads proceed together while registrations wait
for them.

Peers read this agent's memory one-sidedly (CMA on one host, RDMA across hosts), but
setting up a connection needs this side to answer. By default a light poller thread
does that every :data:`RESPOND_S`; TCP transfers (peers on other hosts without RDMA)
need this side for every fragment and want ``progress_thread``: NIXL's own thread,
made event driven here, which answers at once but slowed this agent's own reads by
about 20% in our loopback measurements.

Each registration bumps the agent's metadata generation; a reader needs the owner's
metadata of at least the generation that covered a block before it can read it.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import nixl_cu12._bindings as nixl_bindings
from nixl_cu12._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

from kvtier.core.buffers import Buffer, address_of
from kvtier.core.errors import BackendUnavailableError

log = logging.getLogger(__name__)

SPIN_POLLS = 64
"""Status polls without sleeping before a transfer that is still running backs off."""
POLL_S = 0.0002
RESPOND_S = 0.02
"""Interval of the poller that answers peers when there is no progress thread."""
PROGRESS_POLL_US = 100_000
"""Longest sleep of the progress thread between UCX events (it wakes on events)."""
_create_lock = threading.Lock()


class Outcome(enum.Enum):
    """How a transfer ended. ``STUCK``: it timed out and could not be cancelled, so
    the destination memory may still be written and must never be reused."""

    DONE = "done"
    FAILED = "failed"
    STUCK = "stuck"


def _config_class(base: Any) -> Any:
    """``nixl_agent`` builds its binding config itself and sets the progress thread's
    poll timeout (``pthrDelay``) to 0, which makes the thread busy-poll a core. This
    subclass keeps :data:`PROGRESS_POLL_US` instead: the thread then sleeps in
    ``poll()`` on UCX's event fd and wakes for incoming messages (connection set-up,
    TCP transfers) at no idle cost."""

    class Config(base):  # type: ignore[misc]
        @property
        def pthrDelay(self) -> int:
            return int(base.pthrDelay.__get__(self))

        @pthrDelay.setter
        def pthrDelay(self, _: int) -> None:
            base.pthrDelay.__set__(self, PROGRESS_POLL_US)

    return Config


def _create(name: str, net_devices: str, workers: int, progress_thread: bool) -> Any:
    config = nixl_agent_config(
        enable_prog_thread=progress_thread,
        enable_listen_thread=False,  # metadata travels through the index, no listener
        backends=[],
        sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_RW,
    )
    # UCX reads the device list when the backend is created; both patches are
    # process-wide, hence the lock and the restore.
    with _create_lock:
        previous = os.environ.get("UCX_NET_DEVICES")
        os.environ["UCX_NET_DEVICES"] = net_devices
        binding_config = nixl_bindings.nixlAgentConfig
        nixl_bindings.nixlAgentConfig = _config_class(binding_config)
        try:
            agent = nixl_agent(name, config)
            # One UCX worker per transferring thread: threads sharing one take turns.
            params = {"num_workers": str(workers), "ucx_error_handling_mode": "peer"}
            agent.create_backend("UCX", params)
            return agent
        finally:
            nixl_bindings.nixlAgentConfig = binding_config
            if previous is None:
                del os.environ["UCX_NET_DEVICES"]
            else:
                os.environ["UCX_NET_DEVICES"] = previous


class PeerAgent:
    """A named NIXL agent with the UCX backend; see the module docstring."""

    def __init__(
        self, name: str, *, net_devices: str, workers: int, progress_thread: bool = False
    ) -> None:
        try:
            self._agent = _create(name, net_devices, workers, progress_thread)
        except Exception as exc:  # NIXL raises plain RuntimeErrors and its own types
            raise BackendUnavailableError(
                f"cannot create NIXL agent {name!r} with the UCX backend: {exc}"
            ) from exc
        self.name = name
        self._lock = threading.Lock()
        self._regions: dict[int, tuple[int, int, Any]] = {}
        """Registered block address -> (bytes, generation, NIXL registration)."""
        self._gen = 0
        self._peers: dict[str, int] = {}
        """Loaded peer agent -> generation of its metadata we loaded."""
        self._stop = threading.Event()
        self._responder: threading.Thread | None = None
        if not progress_thread:
            self._responder = threading.Thread(
                target=self._respond, name=f"{name}-responder", daemon=True
            )
            self._responder.start()

    def _respond(self) -> None:
        """Progress UCX (answer peers' connection set-up) until :meth:`close`."""
        while not self._stop.wait(RESPOND_S):
            try:
                self._agent.get_new_notifs()  # progresses every worker, then returns
            except Exception:
                log.warning("NIXL progress failed", exc_info=True)

    # -- MemoryRegistrar ---------------------------------------------------------------

    def register(self, address: int, nbytes: int) -> None:
        """Register a pool block. A failure is logged, not raised: the pool must keep
        working, and chunks in an unregistered block are copied before they are shared."""
        try:
            registration = self._agent.register_memory([(address, nbytes, 0, "")], "DRAM")
        except Exception:
            log.warning("NIXL could not register %d bytes at %#x", nbytes, address, exc_info=True)
            return
        with self._lock:
            self._gen += 1
            self._regions[address] = (nbytes, self._gen, registration)

    def deregister(self, address: int, nbytes: int) -> None:
        with self._lock:
            region = self._regions.pop(address, None)
        if region is not None:
            try:
                self._agent.deregister_memory(region[2])
            except Exception:
                log.warning("NIXL could not deregister %#x", address, exc_info=True)

    # -- this agent's memory -----------------------------------------------------------

    def region_of(self, buf: Buffer) -> tuple[int, int] | None:
        """``(generation, address)`` of the registered block ``buf`` starts, or ``None``
        when peers cannot read it in place (not a registered pool block)."""
        try:
            address = address_of(buf.block)
        except (TypeError, ValueError):  # read-only or empty: not a pool block
            return None
        with self._lock:
            region = self._regions.get(address)
        if region is None or region[0] < buf.nbytes:
            return None
        return region[1], address

    def metadata(self) -> tuple[int, bytes]:
        """``(generation, metadata)``: the metadata covers every block registered up to
        that generation."""
        with self._lock:
            gen = self._gen
        return gen, bytes(self._agent.get_agent_metadata())

    # -- peers -------------------------------------------------------------------------

    def peer_gen(self, peer: str) -> int:
        """Generation of ``peer``'s metadata loaded here; -1 if none."""
        with self._lock:
            return self._peers.get(peer, -1)

    def load_peer(self, peer: str, gen: int, metadata: bytes) -> bool:
        """Load (or refresh) ``peer``'s metadata; ``False`` if NIXL rejects it or it
        names another agent."""
        try:
            loaded = self._agent.add_remote_agent(metadata)
        except Exception as exc:
            log.info("NIXL could not load the metadata of %s: %s", peer, exc)
            return False
        name = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        if name != peer:
            log.warning("metadata published for agent %s names agent %s", peer, name)
            self.forget_peer(name)
            return False
        with self._lock:
            self._peers[peer] = max(gen, self._peers.get(peer, -1))
        return True

    def forget_peer(self, peer: str) -> None:
        """Drop ``peer``'s metadata and connection (after a failure, or it is gone)."""
        with self._lock:
            self._peers.pop(peer, None)
        try:
            self._agent.remove_remote_agent(peer)
        except Exception:
            log.debug("removing NIXL peer %s failed", peer, exc_info=True)

    def read(self, peer: str, pairs: Sequence[tuple[int, int, int]], deadline: float) -> Outcome:
        """One READ of ``(local address, peer address, nbytes)`` descriptors from
        ``peer``, polled until done, failed, or ``deadline`` (``time.monotonic``)."""
        local = self._agent.get_xfer_descs([(dst, n, 0) for dst, _, n in pairs], "DRAM")
        remote = self._agent.get_xfer_descs([(src, n, 0) for _, src, n in pairs], "DRAM")
        try:
            handle = self._agent.initialize_xfer("READ", local, remote, peer)
        except Exception as exc:
            log.info("NIXL read from %s could not start: %s", peer, exc)
            return Outcome.FAILED
        outcome = Outcome.FAILED
        try:
            status = self._agent.transfer(handle)
            polls = 0
            while status == "PROC" and time.monotonic() < deadline:
                time.sleep(0 if polls < SPIN_POLLS else POLL_S)
                polls += 1
                status = self._agent.check_xfer_state(handle)
            outcome = Outcome.DONE if status == "DONE" else Outcome.FAILED
            if status == "PROC":
                log.info("NIXL read from %s timed out", peer)
        except Exception as exc:
            log.info("NIXL read from %s failed: %s", peer, exc)
        try:
            handle.release()  # cancels a transfer still running
        except Exception:
            log.warning("NIXL read from %s could not be cancelled", peer, exc_info=True)
            return Outcome.STUCK
        return outcome

    def close(self) -> None:
        """Stop answering peers and disconnect from them. Deregister the pool first
        (``pool.remove_registrar``); the agent goes when the last reference does."""
        self._stop.set()
        if self._responder is not None:
            self._responder.join(timeout=5)
        with self._lock:
            peers = list(self._peers)
        for peer in peers:
            self.forget_peer(peer)
