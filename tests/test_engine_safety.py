"""The engine never loses data for a caller's mistake, and the data path does its
work once: one checksum per hop, one round trip per tier, bugs told from outages."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_engine import CHUNK, LAYOUT, config, prompt

from kvtier.core import KVTier, PutMode
from kvtier.core import blob as fmt
from kvtier.core import tier as tier_module
from kvtier.core.backend import Backend
from kvtier.core.chain import FETCH_PARTS
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.codecs.raw import RawCodec
from kvtier.core.errors import ConfigError


@pytest.fixture
def stored(tmp_path: Path) -> Iterator[tuple[KVTier, torch.Tensor, torch.Tensor]]:
    """A chain holding 3 chunks of one prompt in both tiers."""
    tokens, kv = prompt(3 * CHUNK)
    with KVTier.open(config(tmp_path), model="m", layout=LAYOUT) as cache:
        cache.store(tokens, kv)
        cache.flush()
        yield cache, tokens, kv


def _out(**change: Any) -> torch.Tensor:
    shape = dict(zip("LKTHD", LAYOUT.chunk_shape(3 * CHUNK), strict=True)) | change
    return torch.zeros(tuple(shape.values()), dtype=LAYOUT.dtype)


BAD_RETRIEVES: dict[str, Callable[[torch.Tensor], dict[str, Any]]] = {
    "out with a wrong head count": lambda t: {"out": _out(H=LAYOUT.num_kv_heads + 1)},
    "out with a wrong head_dim": lambda t: {"out": _out(D=LAYOUT.head_dim // 2)},
    "out with a wrong layer count": lambda t: {"out": _out(L=1)},
    "out too short": lambda t: {"out": _out(T=2 * CHUNK)},
    "out of another dtype": lambda t: {"out": _out().float()},
    "out of 4 dimensions": lambda t: {"out": _out()[0]},
    "out that is not a tensor": lambda t: {"out": bytearray(10)},
    "start inside a chunk": lambda t: {"start": CHUNK // 2},
    "start past the end": lambda t: {"start": 4 * CHUNK},
    "start that is not an int": lambda t: {"start": 16.0},
    "float tokens": lambda t: {"tokens": t.double()},
    "2-D tokens": lambda t: {"tokens": t[None]},
    "extra keys CBOR cannot encode": lambda t: {"extra_keys": [(object(),)]},
}


@pytest.mark.parametrize("case", BAD_RETRIEVES)
def test_a_bad_retrieve_argument_is_an_error_and_deletes_nothing(stored: Any, case: str) -> None:
    cache, tokens, kv = stored
    args = {"tokens": tokens} | BAD_RETRIEVES[case](tokens)
    with pytest.raises(ConfigError):
        cache.retrieve(args.pop("tokens"), **args)
    assert [t.corrupt for t in cache.stats().tiers] == [0, 0]
    assert cache.lookup(tokens) == 3 * CHUNK
    n, got = cache.retrieve(tokens)
    assert n == 3 * CHUNK and torch.equal(got, kv)


def test_an_inference_tensor_outside_inference_mode_is_the_callers_error(stored: Any) -> None:
    cache, tokens, kv = stored
    with torch.inference_mode():
        out = _out()
    with pytest.raises(ConfigError, match="inference"):
        cache.retrieve(tokens, out=out)
    assert cache.lookup(tokens) == 3 * CHUNK
    with torch.inference_mode():
        n, got = cache.retrieve(tokens, out=out)
    assert n == 3 * CHUNK and torch.equal(got, kv)


@pytest.mark.parametrize(
    "case",
    ["kv of another shape", "kv of another dtype", "kv that is not a tensor", "bad start"],
)
def test_a_bad_store_argument_is_an_error_and_deletes_nothing(stored: Any, case: str) -> None:
    cache, tokens, kv = stored
    bad: dict[str, Any] = {
        "kv of another shape": {"kv": kv[:, :, :CHUNK]},
        "kv of another dtype": {"kv": kv.float()},
        "kv that is not a tensor": {"kv": kv.numpy()},
        "bad start": {"start": 1},
    }[case]
    with pytest.raises(ConfigError):
        cache.store(tokens, **({"kv": kv} | bad))
    cache.flush()
    assert cache.stats().stores_queued == 3  # the fixture's 3 chunks only
    assert cache.lookup(tokens) == 3 * CHUNK


# -- one checksum per hop -------------------------------------------------------------


class Counting:
    """Counts calls of the blob format's checksum functions."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = {"seal": 0, "verify": 0}
        for name in self.calls:
            original = getattr(fmt, name)
            monkeypatch.setattr(fmt, name, self._counted(name, original))

    def _counted(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return original(*args, **kwargs)

        return call

    def take(self) -> dict[str, int]:
        calls, self.calls = self.calls, dict.fromkeys(self.calls, 0)
        return calls


def test_one_checksum_per_chunk_on_the_way_in_and_none_for_ram_hits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens, kv = prompt(4 * CHUNK)
    counting = Counting(monkeypatch)
    with KVTier.open(config(tmp_path), model="m", layout=LAYOUT) as cache:
        counting.take()  # the codec probes of open()
        cache.store(tokens, kv)
        cache.flush()
        assert counting.take() == {"seal": 4, "verify": 0}, "cpu and file share one seal"
        assert cache.retrieve(tokens)[0] == 4 * CHUNK
        assert counting.take() == {"seal": 0, "verify": 0}, "RAM hits are trusted"
    with KVTier.open(config(tmp_path), model="m", layout=LAYOUT) as cache:
        counting.take()
        assert cache.retrieve(tokens)[0] == 4 * CHUNK
        cache.flush()  # the promotion into RAM passes the verified checksum along
        assert counting.take() == {"seal": 0, "verify": 4}, "disk bytes are verified once"
        assert cache.retrieve(tokens)[0] == 4 * CHUNK
        assert counting.take() == {"seal": 0, "verify": 0}
        assert cache.stats().tier("cpu").hits == 4


def test_a_tier_with_another_codec_gets_its_own_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens, kv = prompt(2 * CHUNK)
    cfg = config(tmp_path)
    cfg["tiers"][1]["codec"] = "int8"
    counting = Counting(monkeypatch)
    with KVTier.open(cfg, model="m", layout=LAYOUT) as cache:
        counting.take()
        cache.store(tokens, kv)
        cache.flush()
        assert counting.take()["seal"] == 2  # the int8 blobs; raw ones stay in RAM unsealed
    blobs = [p for p in (tmp_path / "kv").rglob("*") if p.is_file() and p.parent.name != ".tmp"]
    assert {fmt.verify(p.read_bytes()).pipeline for p in blobs} == {"int8"}


def test_chunks_that_never_leave_the_process_are_never_checksummed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cpu tier keeps blobs unsealed; one evicted into a write-back disk tier is
    sealed on its way out, and its bytes verify after a restart."""
    tokens, kv = prompt(4 * CHUNK)
    chunk_bytes = CHUNK * LAYOUT.bytes_per_token()  # plus < 512 bytes of framing a blob
    cfg = config(tmp_path)
    cfg["tiers"][0]["capacity"] = 2 * chunk_bytes + 1024  # room for 2 chunks
    cfg["tiers"][1]["write_policy"] = "back"
    counting = Counting(monkeypatch)
    with KVTier.open(cfg, model="m", layout=LAYOUT) as cache:
        counting.take()
        cache.store(tokens[: 2 * CHUNK], kv[:, :, : 2 * CHUNK])
        cache.flush()
        assert counting.take()["seal"] == 0, "RAM-only chunks were checksummed"
        cache.store(tokens, kv)
        cache.flush()
        evicted = cache.stats().tier("cpu").evictions
        assert evicted > 0 and counting.take()["seal"] == evicted
    with KVTier.open(config(tmp_path), model="m", layout=LAYOUT) as cache:
        counting.take()
        n, got = cache.retrieve(tokens)
        assert n >= CHUNK and torch.equal(got, kv[:, :, :n])
        assert counting.take()["verify"] == n // CHUNK
        assert cache.stats().tier("file").corrupt == 0


# -- one round trip per tier ------------------------------------------------------------


def spy(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Record each batch call made to ``backend``: (method, put mode or None)."""
    calls: list[tuple[str, Any]] = []
    for name in ("get_many", "put_many", "contains_many", "delete_many"):
        original = getattr(backend, name)

        def call(*args: Any, _name: str = name, _original: Any = original) -> Any:
            mode = args[1] if _name == "put_many" and len(args) > 1 else None
            calls.append((_name, mode))
            return _original(*args)

        monkeypatch.setattr(backend, name, call)
    return calls


def test_each_tier_gets_one_request_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens, kv = prompt(4 * CHUNK)
    with KVTier.open(config(tmp_path), model="m", layout=LAYOUT) as cache:
        cpu, disk = (spy(t.backend, monkeypatch) for t in cache.chain.tiers)
        cache.store(tokens, kv)
        cache.flush()
        assert cpu == disk == [("put_many", PutMode.CREATE)], "no contains_many before a write"
    with KVTier.open(config(tmp_path), model="m", layout=LAYOUT) as cache:
        cpu, disk = (spy(t.backend, monkeypatch) for t in cache.chain.tiers)
        assert cache.retrieve(tokens)[0] == 4 * CHUNK
        cache.flush()
        # Reads only (no contains_many first), in at most FETCH_PARTS concurrent parts.
        assert set(disk) == {("get_many", None)} and len(disk) <= FETCH_PARTS
        assert cpu == [("get_many", None), ("put_many", PutMode.CREATE)]  # miss, promotion


def test_flush_waits_for_promotions(tmp_path: Path) -> None:
    tokens, kv = prompt(3 * CHUNK)
    with KVTier.open(config(tmp_path), model="m", layout=LAYOUT) as cache:
        cache.store(tokens, kv)
    with KVTier.open(config(tmp_path), model="m", layout=LAYOUT) as cache:
        assert cache.retrieve(tokens)[0] == 3 * CHUNK
        cache.flush()
        assert cache.stats().tier("cpu").stored == 3


# -- a codec this process lacks ---------------------------------------------------------


class Lz4(RawCodec):
    name = "lz4"


def test_a_blob_of_a_codec_this_process_lacks_is_a_miss_and_is_kept(tmp_path: Path) -> None:
    tokens, kv = prompt(CHUNK)
    cfg = {"chunk_tokens": CHUNK, "tiers": [config(tmp_path)["tiers"][1]]}
    with KVTier.open(cfg, model="m", layout=LAYOUT) as cache:
        key = str(cache.hasher.keys(tokens)[0])
        written = CodecPipeline([Lz4()]).encode(key, kv, cache.pool)
        with written:
            backend = cache.chain.tiers[0].backend
            assert cache._io.run(backend.put_many([(key, written.buf)])) == [True]
        assert cache.retrieve(tokens)[0] == 0
        assert cache.stats().tier("file").corrupt == 0
        assert cache.lookup(tokens) == CHUNK, "the blob was deleted"


# -- bugs are not outages -----------------------------------------------------------------


def broken_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KVTier:
    """A chain whose file tier has a bug in get_many (a TypeError, not a kvtier error)."""
    cache = KVTier.open(config(tmp_path), model="m", layout=LAYOUT)
    backend = cache.chain.tiers[1].backend

    async def buggy(keys: Any) -> Any:
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(backend, "get_many", buggy)
    return cache


def test_a_backend_bug_is_raised_in_strict_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens, _ = prompt(CHUNK)
    with broken_chain(tmp_path, monkeypatch) as cache, pytest.raises(TypeError):
        cache.retrieve(tokens)


def test_a_backend_bug_skips_the_tier_and_is_logged_as_a_bug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tier_module, "STRICT", False)
    tokens, _ = prompt(CHUNK)
    with broken_chain(tmp_path, monkeypatch) as cache:
        with caplog.at_level(logging.ERROR, logger="kvtier.core.tier"):
            assert cache.retrieve(tokens)[0] == 0
        stats = cache.stats().tier("file")
        assert stats.errors == 1 and not stats.available
    bug = [r for r in caplog.records if "bug in backend" in r.getMessage()]
    assert bug and bug[0].exc_info is not None, "the traceback was not logged"


@pytest.mark.parametrize("kind", ["plain", "inference", "requires_grad"])
def test_a_big_store_is_copied_by_the_codec_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    from kvtier.core import store_queue

    monkeypatch.setattr(store_queue, "PARALLEL_COPY_BYTES", 0)  # any store of 2+ chunks
    copiers: list[str] = []
    copy = store_queue.StoreQueue._copy

    def recording(self: store_queue.StoreQueue, *chunk: Any) -> Any:
        copiers.append(threading.current_thread().name)
        return copy(self, *chunk)

    monkeypatch.setattr(store_queue.StoreQueue, "_copy", recording)
    tokens, kv = prompt(4 * CHUNK)
    if kind == "inference":
        with torch.inference_mode():
            kv = kv.clone()
    elif kind == "requires_grad":
        kv = kv.float().requires_grad_().half()
    with KVTier.open(config(tmp_path), model="m", layout=LAYOUT) as cache:
        with torch.inference_mode(kind == "inference"):
            assert cache.store(tokens, kv) == 4 * CHUNK
        cache.flush()
        n, got = cache.retrieve(tokens)
    assert n == 4 * CHUNK and torch.equal(got, kv.detach()) and not got.requires_grad
    assert len(copiers) == 4 and all(name.startswith("kvtier-codec") for name in copiers)


def test_failures_of_one_outage_open_the_breaker_once() -> None:
    """Calls in flight when a tier fails (a burst of lookups against a hung tier) count
    as one failure: the wait doubles only when a try after the wait fails too."""
    now = [100.0]
    breaker = tier_module.CircuitBreaker(5.0, clock=lambda: now[0])
    in_flight = [now[0]] * 8  # eight calls began while the tier was fine
    now[0] += 10  # ... and all time out
    for began in in_flight:
        breaker.failure(began)
    assert (breaker.delay, breaker.open_until) == (5.0, 115.0)
    assert not breaker.allow()
    now[0] = 115.0
    assert breaker.allow()
    probes = [now[0], now[0]]
    now[0] += 10
    for began in probes:  # the first try after the wait fails: doubled once
        breaker.failure(began)
    assert (breaker.delay, breaker.open_until) == (10.0, 135.0)
    breaker.success()
    assert breaker.closed and breaker.delay == 5.0
