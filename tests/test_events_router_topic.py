"""Why vllm-router's ``kv_aware`` policy credited none of kvtier's KV events: the topic.

vllm-router 0.1.17 gives every static event source (``--kv-event-source``) the topic
``""`` (its start-up line prints ``StaticKvEventSources { ..., topic: "", ... }``; no
flag changes it) and applies only messages whose topic frame is exactly that. vLLM's
publisher sends ``""`` by default; kvtier's own publisher sends
``kv@<instance>@<model>``, so the router dropped every batch, silently.

Two stand-in workers (``test_events_router``), each with a kvtier publisher: sent as
they are, the router credits nothing; relayed with an empty topic frame (the same
sequence numbers and payloads), it credits each worker's stored prefix, weighed by
tier (``--kv-penalty-host`` 0.8 for ``cpu://``, ``--kv-penalty-disk`` 0.3 for
``file://``), and sends each prompt to the worker that holds it.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from test_events import LAYOUT
from test_events_router import BLOCK, MODEL, ROUTER, Fleet, cpu, disk, prompt, serve

from kvtier.core import KVTier

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from fleet import start_router

DECISION = re.compile(r"KV prefix decision .*? worker=\"([^\"]+)\" .*?credited_prefix_tokens=(\d+)")


class Relay:
    """Republishes every message of a PUB endpoint with an empty topic frame."""

    def __init__(self, source: str) -> None:
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.connect(source)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._pub = self._ctx.socket(zmq.PUB)
        self.endpoint = f"tcp://127.0.0.1:{self._pub.bind_to_random_port('tcp://127.0.0.1')}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sub.poll(50):
                _, seq, payload = self._sub.recv_multipart()
                self._pub.send_multipart([b"", seq, payload])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sub.close(0)
        self._pub.close(0)
        self._ctx.term()


class TopicFleet(Fleet):
    """Two stand-in workers, ``w1`` (``cpu://``) and ``w2`` (``file://``), one kvtier
    publisher each, and vllm-router (``kv_aware``) fed directly or through relays
    (``store``, ``route`` and ``close`` are :class:`Fleet`'s)."""

    def __init__(self, tmp_path: Path, relay: bool) -> None:
        self.tmp_path = tmp_path
        self.servers: list[Any] = []
        self.kv: dict[str, KVTier] = {}
        self.relays: list[Relay] = []
        self.urls: dict[str, str] = {}
        args: list[str] = []
        tiers = {"w1": cpu(), "w2": disk(tmp_path / f"w2-{relay}")}
        for name, tier in tiers.items():
            server, url = serve(name)
            self.servers.append(server)
            self.urls[url] = name
            events = {"endpoint": "tcp://127.0.0.1:0", "block_size": BLOCK}
            events |= {"media": "vllm-router", "instance": name}
            cfg = {"chunk_tokens": 2 * BLOCK, "tiers": [tier], "events": events}
            kv = KVTier.open(cfg, model=MODEL, layout=LAYOUT)
            self.kv[name] = kv
            assert kv.events is not None and kv.events.publisher is not None
            endpoint = kv.events.publisher.endpoint
            if relay:
                self.relays.append(Relay(endpoint))
                endpoint = self.relays[-1].endpoint
            args += ["--kv-event-source", f"{url}={endpoint}"]
        router = start_router(
            ROUTER,
            tmp_path,
            ["--worker-urls", *self.urls, "--policy", "kv_aware",
             "--kv-event-block-size", str(BLOCK), "--kv-event-model", MODEL,
             "--log-level", "debug", *args],
            name=f"router-{'relayed' if relay else 'direct'}",
        )  # fmt: skip
        self.router, self.log = router.proc, router.log
        self.port = int(router.url.rsplit(":", 1)[1])  # type: ignore[attr-defined]
        time.sleep(1.0)  # its SUB sockets connect in the background

    def decisions(self) -> list[tuple[str, int]]:
        """``(worker name, credited prefix tokens)`` of each ``kv_aware`` decision."""
        text = re.sub(r"\x1b\[[0-9;]*m", "", self.log.read_text())
        return [(self.urls[url], int(n)) for url, n in DECISION.findall(text)]

    def close(self) -> None:
        super().close()
        for relay in self.relays:
            relay.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Any]:
    made: list[TopicFleet] = []

    def make(relay: bool) -> TopicFleet:
        made.append(TopicFleet(tmp_path, relay))
        return made[-1]

    yield make
    for one in made:
        one.close()


def routed(fleet: TopicFleet) -> list[str]:
    a, b = prompt(1000), prompt(5000)  # 128 tokens: 8 blocks, 4 chunks each
    fleet.store("w1", a)
    fleet.store("w2", b)
    time.sleep(0.5)  # the router applies batches as they arrive
    return [fleet.route(a), fleet.route(b), fleet.route(a), fleet.route(b)]


def test_kvtiers_topic_makes_the_router_drop_every_batch(fleet: Any) -> None:
    direct = fleet(relay=False)
    routed(direct)
    assert [n for _, n in direct.decisions()] == [0, 0, 0, 0]


def test_with_an_empty_topic_the_router_credits_each_tier(fleet: Any) -> None:
    relayed = fleet(relay=True)
    assert routed(relayed) == ["w1", "w2", "w1", "w2"]
    credits = relayed.decisions()
    assert [name for name, _ in credits] == ["w1", "w2", "w1", "w2"]
    # 128-token prompts held whole: credited at the tier's weight
    assert [n for _, n in credits] == [round(0.8 * 128), round(0.3 * 128)] * 2, credits
