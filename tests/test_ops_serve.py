"""``kvtier serve``: started as a subprocess and driven over HTTP (auth, health,
metrics, lookup, admin purge), plus bad input through starlette's test client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families
from servers._process import free_port, port_open, wait_for
from starlette.testclient import TestClient

from kvtier.core import KVLayout, KVTier, load_config
from kvtier.plugins.ops.service import Service

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16)
CHUNK = 16
TOKEN = "s3cret-token-0123456789abcdef"
KVTIER = Path(sys.executable).with_name("kvtier")


def config(tmp_path: Path) -> dict:
    return {
        "chunk_tokens": CHUNK,
        "tiers": [
            {"url": "cpu://", "capacity": "1MiB"},
            {"url": f"file://{tmp_path}/kv", "capacity": "64MiB"},
        ],
        "ops": {
            "serve": {
                "max_body_bytes": "64KiB",
                "models": {"m": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16}},
            }
        },
    }


def tokens_of(seed: int, n: int = 4 * CHUNK) -> list[int]:
    return torch.randint(0, 50_000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def fill(cfg: dict) -> None:
    """Chunks of tenants alice (seed 1) and bob (seed 2) in the file tier."""
    for tenant, seed in (("alice", 1), ("bob", 2)):
        with KVTier.open(cfg, model="m", layout=LAYOUT, tenant=tenant) as kv:
            tokens = tokens_of(seed)
            kv.store(tokens, torch.ones(LAYOUT.chunk_shape(len(tokens)), dtype=LAYOUT.dtype))


@pytest.fixture(params=["--token-file", "KVTIER_TOKEN"])
def served(request, tmp_path):
    """``kvtier serve`` with a token from a file or the environment (which is then no
    config override), on a free port; yields (base URL, the process)."""
    cfg = config(tmp_path)
    fill(cfg)
    (tmp_path / "kvtier.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "token").write_text(TOKEN + "\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "KVTIER_TOKEN"}
    argv = [str(KVTIER), "serve", "--config", str(tmp_path / "kvtier.yaml"), "--port", str(port)]
    if request.param == "KVTIER_TOKEN":
        env["KVTIER_TOKEN"] = TOKEN
    else:
        argv += ["--token-file", str(tmp_path / "token")]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, "kvtier serve", 60)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        proc.wait(30)


def lookup(client, tenant: str, seed: int, **kw) -> httpx.Response:
    return client.post("/lookup", json={"model": "m", "tenant": tenant,
                                        "tokens": tokens_of(seed)}, **kw)  # fmt: skip


def test_serve_over_http(served):
    url, proc = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, timeout=30) as client:
        health = client.get("/health")
        assert health.status_code == 200
        assert [t["name"] for t in health.json()["tiers"]] == ["cpu", "file"]

        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 403
        scraped = client.get("/metrics", headers=auth)
        assert scraped.status_code == 200
        names = {f.name for f in text_string_to_metric_families(scraped.text)}
        assert {"kvtier_tier_hits", "kvtier_tier_get_seconds", "kvtier_lookups"} <= names

        found = lookup(client, "alice", 1, headers=auth).json()
        assert found["matched_tokens"] == {"cpu": 0, "file": 4 * CHUNK}
        assert found["chain_matched_tokens"] == 4 * CHUNK
        assert lookup(client, "bob", 1, headers=auth).json()["chain_matched_tokens"] == 0

        purge = {"tenants": ["alice"]}
        assert client.post("/admin/purge", json=purge).status_code == 401
        wrong = {"Authorization": "Bearer " + TOKEN[:-1] + "x"}
        assert client.post("/admin/purge", json=purge, headers=wrong).status_code == 403
        assert lookup(client, "alice", 1, headers=auth).json()["chain_matched_tokens"] == 64

        refused = client.post("/admin/purge", json={}, headers=auth)
        assert refused.status_code == 422 and "selection" in refused.json()["error"]
        dry = client.post("/admin/purge", json={**purge, "dry_run": True}, headers=auth).json()
        assert dry["tiers"]["file"] == {"matched": 4, "deleted": 0}
        aged = {"older_than_seconds": 3600, "dry_run": True}
        old = client.post("/admin/purge", json=aged, headers=auth).json()["tiers"]
        assert old == {t: {"matched": 0, "deleted": 0} for t in ("cpu", "file")}  # all young
        done = client.post("/admin/purge", json=purge, headers=auth).json()
        assert done["tiers"]["file"] == {"matched": 4, "deleted": 4}
        assert lookup(client, "alice", 1, headers=auth).json()["chain_matched_tokens"] == 0
        assert lookup(client, "bob", 2, headers=auth).json()["chain_matched_tokens"] == 64

        schema = client.get("/openapi.json", headers=auth).json()
        assert {"/health", "/lookup", "/admin/purge"} <= set(schema["paths"])
    env = {**os.environ, "KVTIER_TOKEN": TOKEN, "COLUMNS": "200"}
    top = subprocess.run([str(KVTIER), "top", url, "--once"], capture_output=True, text=True,
                         env=env, timeout=60)  # fmt: skip
    assert top.returncode == 0, top.stderr
    rows = {line.split("│")[1].strip() for line in top.stdout.splitlines() if "│" in line}
    assert {"cpu", "file"} <= rows
    no_token = {**env, "KVTIER_TOKEN": ""}
    denied = subprocess.run([str(KVTIER), "top", url, "--once"], capture_output=True,
                            text=True, env=no_token, timeout=60)  # fmt: skip
    assert denied.returncode == 1 and "answered 401" in denied.stderr
    proc.terminate()
    output = proc.communicate(timeout=30)[0]
    assert TOKEN not in output


def test_bind_beyond_loopback_needs_a_token(tmp_path):
    (tmp_path / "kvtier.yaml").write_text(yaml.safe_dump(config(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k != "KVTIER_TOKEN"}
    result = subprocess.run(
        [str(KVTIER), "serve", "--config", str(tmp_path / "kvtier.yaml"), "--host", "0.0.0.0"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "refusing to listen on '0.0.0.0' without a token" in result.stderr
    (tmp_path / "short").write_text("abc")
    result = subprocess.run(
        [str(KVTIER), "serve", "--config", str(tmp_path / "kvtier.yaml"),
         "--token-file", str(tmp_path / "short")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "too short" in result.stderr and "abc" not in result.stderr


@pytest.fixture
def client(tmp_path):
    cfg = config(tmp_path)
    fill(cfg)
    with TestClient(Service(load_config(cfg), TOKEN).app) as test_client:
        test_client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield test_client


def test_bad_bodies_are_422_naming_the_field(client):
    bad = client.post("/lookup", json={"model": "m", "tokens": [1, "x"]})
    assert bad.status_code == 422
    assert bad.json()["error"].startswith("field 'tokens.1'")
    extra = client.post("/lookup", json={"model": "m", "tokens": [], "colour": 1})
    assert extra.status_code == 422 and "colour" in extra.json()["error"]
    missing = client.post("/lookup", json={"tokens": [1]})
    assert missing.status_code == 422 and "'model'" in missing.json()["error"]
    assert client.post("/lookup", content=b"{not json").status_code == 422
    unknown = client.post("/lookup", json={"model": "other", "tokens": [1]})
    assert unknown.status_code == 404 and unknown.json()["error"].endswith("has: m")


def test_oversize_bodies_are_refused(client):
    huge = json.dumps({"model": "m", "tokens": list(range(20_000))}).encode()
    assert len(huge) > 64 << 10
    assert client.post("/lookup", content=huge).status_code == 413

    def chunks():  # no Content-Length: refused while reading
        for i in range(0, len(huge), 4096):
            yield huge[i : i + 4096]

    assert client.post("/lookup", content=chunks()).status_code == 413


def test_admin_is_off_without_a_token(tmp_path):
    with TestClient(Service(load_config(config(tmp_path)), None).app) as open_client:
        assert open_client.get("/stats").status_code == 200
        denied = open_client.post("/admin/purge", json={"tenants": ["alice"]})
        assert denied.status_code == 403 and "token" in denied.json()["error"]


def test_stats_never_return_chunk_bytes(client):
    body = client.get("/stats").json()
    assert [t["name"] for t in body["tiers"]] == ["cpu", "file"]
    assert body["tiers"][1]["keys"] == 8


def test_admin_quotas_and_pins_act_on_the_process_caches(tmp_path):
    cfg = config(tmp_path)
    cfg["tiers"][0]["options"] = {"pinned_bytes": "64KiB"}
    service = Service(load_config(cfg), TOKEN)
    tokens = tokens_of(7)
    with (
        TestClient(service.app) as client,
        KVTier.open(cfg, model="m", layout=LAYOUT, tenant="alice") as kv,
    ):
        auth = {"Authorization": f"Bearer {TOKEN}"}
        quota = {"tier": "file", "tenant": "alice", "quota": "9KiB"}
        assert client.put("/admin/quotas", json=quota).status_code == 401
        assert client.get("/admin/quotas", headers=auth).json() == {"tiers": {}}
        done = client.put("/admin/quotas", json=quota, headers=auth)
        assert done.status_code == 200 and done.json()["deleted_chunks"] == 0

        kv.store(tokens, torch.ones(LAYOUT.chunk_shape(len(tokens)), dtype=LAYOUT.dtype))
        kv.flush()  # four chunks of 4 KiB (and a header): two fit in 9 KiB
        assert kv.stats().tier("file").evictions == 2
        held = client.get("/admin/quotas", headers=auth).json()["tiers"]["file"]["alice"]
        assert held["quota_bytes"] == 9 << 10 and 8 << 10 < held["used_bytes"] <= 9 << 10
        lower = client.put("/admin/quotas", json={**quota, "quota": "5KiB"}, headers=auth)
        assert lower.json()["deleted_chunks"] == 1

        prefix = {"model": "m", "tenant": "alice", "tokens": tokens[:CHUNK]}
        pinned = client.post("/admin/pin", json=prefix, headers=auth)
        assert pinned.json() == {"pinned": {"cpu": 1}}
        nobody = client.post("/admin/pin", json={"model": "x"}, headers=auth)
        assert nobody.status_code == 404 and "no open cache" in nobody.json()["error"]

        bad = client.put("/admin/quotas", json={**quota, "tier": "disk"}, headers=auth)
        assert bad.status_code == 404 and "unknown tier 'disk'" in bad.json()["error"]
        big = client.put("/admin/quotas", json={**quota, "quota": "1GiB"}, headers=auth)
        assert big.status_code == 422 and "capacity" in big.json()["error"]
        gone = client.request("DELETE", "/admin/quotas", headers=auth,
                              json={"tier": "file", "tenant": "bob"})  # fmt: skip
        assert gone.status_code == 404
        assert (
            gone.json()["error"]
            == "tenant 'bob' has no quota in tier 'file'; tenants with one there: ['alice']"
        )
        removed = client.request("DELETE", "/admin/quotas", headers=auth,
                                 json={"tier": "file", "tenant": "alice"})  # fmt: skip
        assert removed.status_code == 200
        assert client.get("/admin/quotas", headers=auth).json() == {"tiers": {"file": {}}}
