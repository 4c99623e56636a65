"""kv_role and the prefill -> decode hand-off without vLLM: what each role plans to
load and save over a real KVTier, the transfer params, and the bounded wait.
``test_vllm_fleet.py`` runs them in real vLLM engines."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvtier.core import KVLayout, KVTier
from kvtier.core.config import KVTierConfig
from kvtier.core.errors import ConfigError
from kvtier.plugins.vllm.lookup import LocalLookups
from kvtier.plugins.vllm.roles import ROLES, Handoff, handed_off, role_for
from kvtier.plugins.vllm.scheduler import Scheduled, SchedulerSide
from kvtier.plugins.vllm.settings import load_settings

BS = 16
CHUNK = 2 * BS
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32)


def open_kv(folder: Path, role: str) -> KVTier:
    config = KVTierConfig.model_validate(
        {"chunk_tokens": CHUNK, "tiers": [{"url": f"file://{folder}", "capacity": "16MiB"}]}
    )
    return KVTier.open(role_for(role).kvtier_config(config), model="tiny", layout=LAYOUT)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[KVTier, KVTier]]:
    """A producer's and a consumer's KVTier over one shared file tier."""
    producer, consumer = open_kv(tmp_path, "kv_producer"), open_kv(tmp_path, "kv_consumer")
    try:
        yield producer, consumer
    finally:
        producer.close()
        consumer.close()


def scheduler(kv: KVTier, role: str) -> SchedulerSide:
    return SchedulerSide(
        LocalLookups(kv), chunk_tokens=CHUNK, block_size=BS, wait=10.0, role=role_for(role)
    )


def tokens(n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 30_000, (n,), generator=gen).tolist()


def test_a_wrong_kv_role_is_a_clear_error():
    for bad in ("kv_prod", None, "", "KV_BOTH"):
        with pytest.raises(ConfigError, match="kv_role must be one of kv_producer, kv_consumer"):
            role_for(bad)
    assert [role_for(r).name for r in ROLES] == list(ROLES)


def test_the_producer_saves_the_whole_prompt_and_the_consumer_loads_it(pair):
    producer_kv, consumer_kv = pair
    prompt = tokens(3 * CHUNK + 5)
    producer = scheduler(producer_kv, "kv_producer")
    blocks = list(range(1, 9))  # 3 * CHUNK + 5 tokens (and 1 decoded) in 8 blocks of 16
    producer.allocated("r", prompt, (), blocks, 0)
    (save,) = producer.build([Scheduled("r", blocks, True, 0, len(prompt))]).saves
    assert (save.start, save.end) == (0, len(prompt)), "the partial last chunk too"
    live = [*prompt, 7]  # decoding goes on: nothing past the prompt is saved
    producer._requests["r"].tokens = live
    assert producer.build([Scheduled("r", [], False, len(prompt), 1)]).saves == []
    assert producer.stored("r") == len(prompt)
    producer.finished("r")
    assert role_for("kv_producer").finished_params(len(prompt)) == {
        "kvtier": {"tokens": len(prompt)}
    }

    producer_kv.store(save.token_ids, torch.randn(LAYOUT.chunk_shape(len(prompt))))
    producer_kv.flush()
    consumer = scheduler(consumer_kv, "kv_consumer")
    assert consumer.match("d", prompt, (), 0) == len(prompt), "every token, loaded async"
    assert consumer.is_async("d")
    consumer.allocated("d", prompt, (), blocks[:7], len(prompt))
    plan = consumer.build([Scheduled("d", blocks[:7], True, len(prompt), 0)])
    (load,) = plan.async_loads
    assert (load.start, load.end) == (0, len(prompt))
    assert plan.saves == [], "a consumer never saves"
    assert consumer.build([Scheduled("d", [8], False, len(prompt), 1)]).saves == []
    assert role_for("kv_consumer").finished_params(0) is None


def test_a_prompt_shorter_than_a_chunk_is_handed_off_too(pair):
    producer_kv, consumer_kv = pair
    prompt = tokens(BS + 3, seed=2)
    producer = scheduler(producer_kv, "kv_producer")
    producer.allocated("r", prompt, (), [1, 2], 0)
    (save,) = producer.build([Scheduled("r", [1, 2], True, 0, len(prompt))]).saves
    assert (save.start, save.end) == (0, len(prompt))
    producer_kv.store(prompt, torch.randn(LAYOUT.chunk_shape(len(prompt))))
    producer_kv.flush()
    consumer = scheduler(consumer_kv, "kv_consumer")
    assert consumer.match("d", prompt, (), 0) == len(prompt) and consumer.is_async("d")
    assert scheduler(consumer_kv, "kv_both").match("e", prompt, (), 0) == 0


def test_kv_both_moves_whole_chunks_only(pair, tmp_path: Path):
    producer_kv, _ = pair
    prompt = tokens(3 * CHUNK + 5, seed=1)
    with open_kv(tmp_path, "kv_both") as both_kv:
        both = scheduler(both_kv, "kv_both")
        blocks = list(range(1, 9))
        both.allocated("r", prompt, (), blocks, 0)
        (save,) = both.build([Scheduled("r", blocks, True, 0, len(prompt))]).saves
        assert (save.start, save.end) == (0, 3 * CHUNK)
        producer_kv.store(prompt, torch.randn(LAYOUT.chunk_shape(len(prompt))))
        producer_kv.flush()
        assert both.match("s", prompt, (), 0) == 3 * CHUNK, "not the producer's partial chunk"
        both_kv.store(prompt, torch.randn(LAYOUT.chunk_shape(len(prompt))))
        both_kv.flush()
        whole = prompt[: 3 * CHUNK]
        assert both.match("t", whole, (), 0) == 3 * CHUNK - 1, "all but the last token"
    assert role_for("kv_both").finished_params(3 * CHUNK) is None
    assert role_for("kv_both").loadable(len(prompt), CHUNK) == 3 * CHUNK
    assert role_for("kv_both").loadable(3 * CHUNK, CHUNK) == 3 * CHUNK - 1
    assert role_for("kv_consumer").loadable(len(prompt), CHUNK) == len(prompt)


def test_kv_both_with_partial_chunks_stores_the_prompt_tail_then_its_whole_chunk(tmp_path):
    config = KVTierConfig.model_validate(
        {
            "chunk_tokens": CHUNK,
            "store_partial_chunks": True,
            "tiers": [{"url": f"file://{tmp_path}", "capacity": "16MiB"}],
        }
    )
    role = role_for("kv_both", config.store_partial_chunks)
    assert role.kvtier_config(config).store_partial_chunks
    prompt = tokens(3 * CHUNK + 5, seed=3)
    blocks = list(range(1, 9))
    with KVTier.open(config, model="tiny", layout=LAYOUT) as kv:
        both = SchedulerSide(LocalLookups(kv), chunk_tokens=CHUNK, block_size=BS, role=role)
        both.allocated("r", prompt, (), blocks, 0)
        (save,) = both.build([Scheduled("r", blocks, True, 0, len(prompt))]).saves
        assert (save.start, save.end) == (0, len(prompt)), "the partial last chunk too"
        live = [*prompt, *tokens(CHUNK, seed=4)]
        both._requests["r"].tokens = live
        assert both.build([Scheduled("r", [], False, len(prompt), 1)]).saves == []
        decoded = 4 * CHUNK - 1  # this step's token completes chunk 3
        (whole,) = both.build([Scheduled("r", [], False, decoded, 1)]).saves
        assert (whole.start, whole.end) == (3 * CHUNK, 4 * CHUNK), "the whole chunk, again"
        assert whole.token_ids == live[: 4 * CHUNK]
        assert role_for("kv_both", True).finished_params(len(prompt)) is None

        kv.store(prompt, torch.randn(LAYOUT.chunk_shape(len(prompt))))
        kv.flush()
        again = SchedulerSide(LocalLookups(kv), chunk_tokens=CHUNK, block_size=BS, role=role)
        assert again.match("s", prompt, (), 0) == len(prompt) - 1, "all but the last token"
        assert again.is_async("s"), "from the file tier: between steps"
        again.allocated("s", prompt, (), blocks[:7], len(prompt) - 1)
        plan = again.build([Scheduled("s", blocks[:7], True, len(prompt) - 1, 1)])
        (load,) = plan.async_loads
        assert (load.start, load.end, load.token_ids) == (0, len(prompt) - 1, prompt)
        assert plan.saves == [], "the prompt's chunks are held"


def test_the_handoff_waits_for_announced_chunks_at_most_its_wait():
    handoff = Handoff(wait=0.2)
    params = {"kvtier": {"tokens": 100}, "do_remote_decode": False}
    assert handoff.ready("plain", None, 0, 100), "no params: never waits"
    assert handoff.ready("other", {"remote_engine_id": "x"}, 0, 100), "not kvtier's"
    assert not handoff.ready("r", params, 64, 100)
    assert handoff.ready("r", params, 100, 100), "all arrived"
    assert handoff.ready("capped", params, 64, 64), "kv_both loads whole chunks only"
    start = time.monotonic()
    while not handoff.ready("never", params, 0, 100):
        time.sleep(0.01)
    assert 0.2 <= time.monotonic() - start < 1.0
    assert handoff.timeouts == 1
    assert not handoff.ready("gone", params, 0, 100)
    handoff.forget("gone")
    assert handoff._since == {}


def test_malformed_transfer_params_are_ignored(caplog):
    for bad in ({"kvtier": "x"}, {"kvtier": {"tokens": -1}}, {"kvtier": {"tokens": True}}):
        assert handed_off(bad) == 0
    assert "malformed kv_transfer_params" in caplog.text
    assert handed_off({"kvtier": {"tokens": 7}}) == 7


def test_handoff_wait_is_a_connector_setting():
    assert load_settings({}).lookup.handoff_wait == 5.0
    assert load_settings({"handoff_wait_ms": 250}).lookup.handoff_wait == 0.25
    with pytest.raises(ConfigError, match="'handoff_wait_ms' must be a positive number"):
        load_settings({"handoff_wait_ms": 0})
