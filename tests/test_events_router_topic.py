"""Why vllm-router's ``kv_aware`` policy credited none of kvtier's KV events: the topic.

vllm-router 0.1.17 gives every static event source (``--kv-event-source``) the topic
``""`` (its start-up line prints ``StaticKvEventSources { ..., topic: "", ... }``; no
flag changes it) and applies only messages whose topic frame is exactly that. vLLM's
publisher sends ``""`` by default; kvtier's own publisher sends
``kv@<instance>@<model>``, so the router dropped every batch, silently.

Two stand-in workers (``test_events_router``), each with a kvtier publisher: with the
default topic the router credits nothing; with ``events.topic: ""`` it credits each
worker's stored prefix, weighed by tier (``--kv-penalty-host`` 0.8 for ``cpu://``,
``--kv-penalty-disk`` 0.3 for ``file://``), and sends each prompt to the worker that
holds it.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_events import LAYOUT
from test_events_router import BLOCK, MODEL, ROUTER, Fleet, cpu, disk, prompt, serve

from kvtier.core import KVTier

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from fleet import start_router

DECISION = re.compile(r"KV prefix decision .*? worker=\"([^\"]+)\" .*?credited_prefix_tokens=(\d+)")


class TopicFleet(Fleet):
    """Two stand-in workers, ``w1`` (``cpu://``) and ``w2`` (``file://``), one kvtier
    publisher each with events ``topic`` (``None``: the default), and vllm-router
    (``kv_aware``) fed by them (``store``, ``route`` and ``close`` are :class:`Fleet`'s)."""

    def __init__(self, tmp_path: Path, topic: str | None) -> None:
        self.tmp_path = tmp_path
        self.servers: list[Any] = []
        self.kv: dict[str, KVTier] = {}
        self.urls: dict[str, str] = {}
        args: list[str] = []
        tiers = {"w1": cpu(), "w2": disk(tmp_path / f"w2-{topic is None}")}
        for name, tier in tiers.items():
            server, url = serve(name)
            self.servers.append(server)
            self.urls[url] = name
            events = {"endpoint": "tcp://127.0.0.1:0", "block_size": BLOCK}
            events |= {"media": "vllm-router", "instance": name}
            if topic is not None:
                events["topic"] = topic
            cfg = {"chunk_tokens": 2 * BLOCK, "tiers": [tier], "events": events}
            kv = KVTier.open(cfg, model=MODEL, layout=LAYOUT)
            self.kv[name] = kv
            assert kv.events is not None and kv.events.publisher is not None
            args += ["--kv-event-source", f"{url}={kv.events.publisher.endpoint}"]
        router = start_router(
            ROUTER,
            tmp_path,
            ["--worker-urls", *self.urls, "--policy", "kv_aware",
             "--kv-event-block-size", str(BLOCK), "--kv-event-model", MODEL,
             "--log-level", "debug", *args],
            name=f"router-{'default' if topic is None else 'empty'}-topic",
        )  # fmt: skip
        self.router, self.log = router.proc, router.log
        self.port = int(router.url.rsplit(":", 1)[1])  # type: ignore[attr-defined]
        time.sleep(1.0)  # its SUB sockets connect in the background

    def decisions(self) -> list[tuple[str, int]]:
        """``(worker name, credited prefix tokens)`` of each ``kv_aware`` decision."""
        text = re.sub(r"\x1b\[[0-9;]*m", "", self.log.read_text())
        return [(self.urls[url], int(n)) for url, n in DECISION.findall(text)]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Any]:
    made: list[TopicFleet] = []

    def make(topic: str | None) -> TopicFleet:
        made.append(TopicFleet(tmp_path, topic))
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


def test_the_default_topic_makes_the_router_drop_every_batch(fleet: Any) -> None:
    default = fleet(topic=None)
    routed(default)
    assert [n for _, n in default.decisions()] == [0, 0, 0, 0]


def test_with_an_empty_topic_the_router_credits_each_tier(fleet: Any) -> None:
    empty = fleet(topic="")
    assert routed(empty) == ["w1", "w2", "w1", "w2"]
    credits = empty.decisions()
    assert [name for name, _ in credits] == ["w1", "w2", "w1", "w2"]
    # 128-token prompts held whole: credited at the tier's weight
    assert [n for _, n in credits] == [round(0.8 * 128), round(0.3 * 128)] * 2, credits
