"""``kvtier top``: a live terminal dashboard of a running ``kvtier serve``.

Reads ``/metrics`` (parsed with prometheus-client's parser) and ``/health`` every
interval and draws per-tier and per-tenant tables with rich.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from kvtier.core.errors import BackendUnavailableError
from kvtier.core.urls import redact

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]
"""Metric sample name -> sorted labels -> value."""


def parse(text: str) -> Samples:
    samples: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name][tuple(sorted(s.labels.items()))] = s.value
    return samples


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a cumulative histogram ``[(le, count), ...]``, interpolated
    inside its bucket as PromQL's ``histogram_quantile`` does; ``None`` when empty."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    low, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return low
            return low + (le - low) * ((rank - below) / (count - below) if count > below else 0)
        low, below = le, count
    return low


def _by(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(k).get(label, ""): v for k, v in samples.get(name, {}).items()}


def _latency(samples: Samples, kind: str, tier: str) -> str:
    buckets = [
        (float(dict(k)["le"]), v)
        for k, v in samples.get(f"kvtier_tier_{kind}_seconds_bucket", {}).items()
        if dict(k).get("tier") == tier
    ]
    p50, p99 = quantile(0.5, buckets), quantile(0.99, buckets)
    if p50 is None or p99 is None:
        return "-"
    return f"{p50 * 1000:.2f} / {p99 * 1000:.2f}"


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def _rate(hit: float, total: float) -> str:
    return f"{100 * hit / total:.1f}%" if total else "-"


def render(url: str, samples: Samples, health: dict[str, Any]) -> Group:
    """The dashboard for one scrape."""
    available = {t["name"]: t["available"] for t in health.get("tiers", [])}
    get = {
        n: _by(samples, f"kvtier_tier_{n}_total", "tier")
        for n in ("hits", "misses", "read_bytes", "written_bytes", "evictions", "errors", "stored")
    }
    used = _by(samples, "kvtier_tier_used_bytes", "tier")
    capacity = _by(samples, "kvtier_tier_capacity_bytes", "tier")
    tiers = Table(title=f"kvtier top  {redact(url)}  ({health.get('status', '?')})")
    for column in (
        "tier",
        "up",
        "hit rate",
        "hits",
        "misses",
        "stored",
        "read",
        "written",
        "used / capacity",
        "evictions",
        "errors",
        "get p50/p99 ms",
        "put p50/p99 ms",
    ):
        tiers.add_column(column, justify="left" if column == "tier" else "right")
    for tier in dict.fromkeys([*available, *get["hits"]]):
        hits, misses = get["hits"].get(tier, 0), get["misses"].get(tier, 0)
        up = available.get(tier)
        tiers.add_row(
            tier, "-" if up is None else ("yes" if up else "NO"), _rate(hits, hits + misses),
            f"{hits:.0f}", f"{misses:.0f}", f"{get['stored'].get(tier, 0):.0f}",
            _size(get["read_bytes"].get(tier)), _size(get["written_bytes"].get(tier)),
            f"{_size(used.get(tier))} / {_size(capacity.get(tier))}",
            f"{get['evictions'].get(tier, 0):.0f}", f"{get['errors'].get(tier, 0):.0f}",
            _latency(samples, "get", tier), _latency(samples, "put", tier),
        )  # fmt: skip
    tenants = Table(title="tenants")
    for column in ("model", "tenant", "lookups", "lookup hit", "retrieves", "retrieve hit",
                   "stored tokens", "dropped chunks"):  # fmt: skip
        tenants.add_column(column, justify="left" if column in ("model", "tenant") else "right")

    def value(name: str, labels: tuple[tuple[str, str], ...]) -> float:
        return samples.get(f"kvtier_{name}_total", {}).get(labels, 0.0)

    for labels in sorted(samples.get("kvtier_lookups_total", {})):
        names = dict(labels)
        tenants.add_row(
            names.get("model", ""), names.get("tenant", ""), f"{value('lookups', labels):.0f}",
            _rate(value("lookup_hit_tokens", labels), value("lookup_requested_tokens", labels)),
            f"{value('retrieves', labels):.0f}",
            _rate(value("retrieve_hit_tokens", labels),
                  value("retrieve_requested_tokens", labels)),
            f"{value('stored_tokens', labels):.0f}",
            f"{value('store_dropped_chunks', labels):.0f}",
        )  # fmt: skip
    return Group(tiers, tenants)


def fetch(client: httpx.Client, url: str) -> tuple[Samples, dict[str, Any]]:
    """One scrape of ``/metrics`` and ``/health``."""
    try:
        metrics = client.get(f"{url}/metrics")
        health = client.get(f"{url}/health")
    except httpx.HTTPError as exc:
        raise BackendUnavailableError(f"cannot reach {redact(url)}: {exc}") from None
    if metrics.status_code != 200:
        raise BackendUnavailableError(
            f"{redact(url)}/metrics answered {metrics.status_code}: {metrics.text[:200]}"
        )
    return parse(metrics.text), health.json() if health.status_code in (200, 503) else {}


def run_top(url: str, token: str | None, *, interval: float, once: bool) -> int:
    """Refresh the dashboard every ``interval`` seconds until interrupted (or once)."""
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    console = Console()
    with httpx.Client(headers=headers, timeout=max(interval, 2.0)) as client:
        if once:
            console.print(render(url, *fetch(client, url)))
            return 0
        with Live(render(url, *fetch(client, url)), console=console, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(url, *fetch(client, url)))
