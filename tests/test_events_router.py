"""The real vllm-router with kvtier's KV event publishers as its event sources.

vllm-router (a Rust binary from PyPI) runs with its ``kv_aware`` policy in front of two
stand-in workers (HTTP servers answering the three calls the router makes: health,
``/server_info`` for the model and block size, ``/v1/completions/render`` for token
ids), each worker's KV events coming from a kvtier process's publisher
(``--kv-event-source``, ``--kv-event-replay-source``).

Set ``KVTEST_VLLM_ROUTER`` to the binary (default: ``vllm-router`` on PATH);
``KVTEST_REQUIRE_ROUTER=1`` fails instead of skipping when it is missing."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import needs
import pytest
import torch
from test_events import LAYOUT, free_port

from kvtier.core import KVTier

ROUTER = needs.router()

BLOCK = 16  # vllm-router's --kv-event-block-size (and pd default)
MODEL = "m"


class Worker(BaseHTTPRequestHandler):
    """A stand-in for a vLLM server: the router's health, identity and render calls.
    A prompt is space-separated token ids."""

    name = "?"

    def _reply(self, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.startswith("/server_info"):
            config = {"model_config": {"model": MODEL}, "cache_config": {"block_size": BLOCK}}
            return self._reply({"vllm_config": config, "vllm_env": {}, "system_env": {}})
        if self.path.startswith("/v1/models"):
            return self._reply({"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        return self._reply({})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        if self.path.endswith("/render"):
            tokens = [int(t) for t in str(body.get("prompt", "")).split()]
            return self._reply([{"request_id": "r", "token_ids": tokens}])
        choice = {"index": 0, "text": "", "finish_reason": "length"}
        return self._reply({"id": "c", "object": "text_completion", "model": MODEL,
                            "worker": self.name, "choices": [choice]})  # fmt: skip

    def log_message(self, *args: Any) -> None:
        pass


def serve(name: str) -> tuple[ThreadingHTTPServer, str]:
    handler = type(f"Worker_{name}", (Worker,), {"name": name})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except (urllib.error.URLError, OSError):
        return 0


class Fleet:
    """Two stand-in workers, one kvtier publisher each, and vllm-router in front."""

    def __init__(self, tmp_path: Path, tiers: dict[str, list[dict[str, Any]]]) -> None:
        self.servers: list[ThreadingHTTPServer] = []
        self.kv: dict[str, KVTier] = {}
        self.router: subprocess.Popen[bytes] | None = None
        self.tmp_path = tmp_path
        args = []
        for name, chain in tiers.items():
            server, url = serve(name)
            self.servers.append(server)
            cfg = {
                "chunk_tokens": 2 * BLOCK,
                "tiers": chain,
                "events": {
                    "endpoint": "tcp://127.0.0.1:0",
                    "replay_endpoint": "tcp://127.0.0.1:0",
                    "block_size": BLOCK,
                    "media": "vllm-router",
                    "instance": name,
                },
            }
            kv = KVTier.open(cfg, model=MODEL, layout=LAYOUT)
            self.kv[name] = kv
            assert kv.events is not None and kv.events.publisher is not None
            publisher = kv.events.publisher
            args += ["--kv-event-source", f"{url}={publisher.endpoint}"]
            args += ["--kv-event-replay-source", f"{url}={publisher.replay_endpoint}"]
        self.port = free_port()
        self.log = tmp_path / "router.log"
        urls = [f"http://127.0.0.1:{s.server_address[1]}" for s in self.servers]
        command = [
            ROUTER, "--host", "127.0.0.1", "--port", str(self.port),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
            "--worker-urls", *urls, "--policy", "kv_aware",
            "--kv-event-block-size", str(BLOCK), "--kv-event-model", MODEL,
            "--log-level", "debug", *args,
        ]  # fmt: skip
        with self.log.open("wb") as log:
            self.router = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while get(f"http://127.0.0.1:{self.port}/health") != 200:
            assert self.router.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "vllm-router did not start in 60 s"
            time.sleep(0.1)
        # The router's SUB sockets connect in the background; ZMQ PUB drops what is
        # sent before a subscriber is connected.
        time.sleep(1.0)

    def store(self, name: str, tokens: list[int]) -> None:
        kv = self.kv[name]
        kv.store(tokens, torch.randn(LAYOUT.chunk_shape(len(tokens))))
        kv.flush()
        assert kv.events is not None
        kv.events.flush()
        assert kv.lookup(tokens) == len(tokens)

    def route(self, tokens: list[int]) -> str:
        body = json.dumps({"model": MODEL, "prompt": " ".join(map(str, tokens)), "max_tokens": 1})
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/completions",
            body.encode(),
            {"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(json.load(response)["worker"])

    def close(self) -> None:
        if self.router is not None:
            self.router.terminate()
            try:
                self.router.wait(10)
            except subprocess.TimeoutExpired:
                self.router.kill()
                self.router.wait()
        for server in self.servers:
            server.shutdown()
            server.server_close()
        for kv in self.kv.values():
            kv.close()


@pytest.fixture
def fleet_of(tmp_path: Path) -> Iterator[Any]:
    made: list[Fleet] = []

    def make(tiers: dict[str, list[dict[str, Any]]]) -> Fleet:
        made.append(Fleet(tmp_path, tiers))
        return made[-1]

    yield make
    for fleet in made:
        fleet.close()


def cpu() -> dict[str, Any]:
    return {"url": "cpu://", "capacity": "1MiB"}


def disk(path: Path) -> dict[str, Any]:
    return {"url": f"file://{path}", "capacity": "4MiB"}


def prompt(first: int, n: int = 8 * BLOCK) -> list[int]:
    return list(range(first, first + n))


def test_router_takes_kvtier_publishers_as_kv_event_sources(tmp_path: Path, fleet_of: Any) -> None:
    """vllm-router 0.1.17 accepts kvtier's endpoints as static KV event sources,
    subscribes to each, and routes requests with its kv_aware policy (the prompt's
    token ids through render). It does not credit the stored prefix: it did not for
    vLLM 0.32's own events either (docs/events.md), so no routing choice is asserted."""
    fleet = fleet_of({"w1": [cpu()], "w2": [disk(tmp_path / "w2")]})
    a, b = prompt(1000), prompt(5000)
    fleet.store("w1", a)
    fleet.store("w2", b)
    assert {fleet.route(a), fleet.route(b)} <= {"w1", "w2"}
    log = re.sub(r"\x1b\[[0-9;]*m", "", fleet.log.read_text())  # no colours
    for kv in fleet.kv.values():
        assert kv.events is not None and kv.events.publisher is not None
        assert f"on {kv.events.publisher.endpoint}" in log  # "kv_index subscriber for ..."
    assert log.count("KV prefix decision") == 2
    assert f"input_tokens={len(a)}" in log
