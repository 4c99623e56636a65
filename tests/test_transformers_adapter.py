"""kvtier.plugins.transformers: a real transformers model reusing KV from real tiers."""

from __future__ import annotations

import inspect
import logging
import sys

import pytest
import torch

pytest.importorskip("transformers")

import transformers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kvtier.core import ConfigError, MissingExtraError
from kvtier.plugins.transformers import PrefixCache, layout_for, random_llama
from kvtier.plugins.transformers.compat import CACHE_ARGUMENT, output_cache

CHUNK = 32
SHAPE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
)  # fmt: skip
"""A small GQA model: 4 query heads share 2 KV heads of 16."""


def chain(url: str = "cpu://", codec: str = "raw", **extra: object) -> dict[str, object]:
    return {"chunk_tokens": CHUNK, "tiers": [{"url": url, "capacity": "256MiB", "codec": codec}],
            **extra}  # fmt: skip


def prompt(n: int, seed: int = 0, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return random_llama("tiny", seed=1)


@pytest.fixture(autouse=True)
def no_grad():
    with torch.inference_mode():
        yield


@pytest.fixture
def transformers_log(caplog, monkeypatch):
    """What transformers logs: its logger does not propagate to the root logger, and
    it logs a ``warning_once`` message only the first time in a process."""
    monkeypatch.setattr(logging.Logger, "warning_once", logging.Logger.warning)
    logger = logging.getLogger("transformers")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_the_cache_argument_is_the_installed_releases():
    """transformers 5.24 renamed past_key_values to cache in forward, generate and the
    model outputs; kvtier passes the cache under the installed release's name."""
    renamed = tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (5, 24)
    expected = "cache" if renamed else "past_key_values"
    assert expected == CACHE_ARGUMENT
    assert CACHE_ARGUMENT in inspect.signature(LlamaForCausalLM.forward).parameters


@pytest.mark.filterwarnings("error")
def test_forward_and_generate_warn_nothing(llama, transformers_log):
    """No deprecation warning and no log message from transformers, with reuse and without."""
    ids = prompt(100)
    with PrefixCache.open(llama, chain(), model_id="m") as kv:
        for _ in range(2):  # the second time reuses the first's chunks
            out, reused = kv.forward(ids)
            assert output_cache(out).get_seq_length() == 100
            kv.kv.flush()
        assert reused == 96
        out, reused = kv.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert reused == 96 and out.shape == (1, 104)
        prefix = kv.prefix(ids)
        llama(ids[:, prefix.tokens :], **prefix.model_kwargs())
    assert [r.getMessage() for r in transformers_log.records if r.levelno >= logging.WARNING] == []


def test_layout_follows_the_model_config(llama):
    layout = layout_for(llama)
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim) == (2, 2, 16)
    assert layout.dtype == torch.float32


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("length", [200, 7 * CHUNK])
def test_raw_reuse_gives_the_logits_of_a_full_prefill(arch, length):
    """The prompt reuses every stored whole chunk; logits equal a full prefill's."""
    torch.manual_seed(0)
    model = (LlamaForCausalLM(LlamaConfig(**SHAPE)) if arch == "llama"
             else Qwen2ForCausalLM(Qwen2Config(**SHAPE))).eval()  # fmt: skip
    ids = prompt(length)
    full = model(ids).logits
    with PrefixCache.open(model, chain(), model_id=arch) as kv:
        out, reused = kv.forward(ids[:, :150])  # 150 is not a multiple of the chunk size
        assert reused == 0 and torch.allclose(out.logits, full[:, :150], atol=1e-5)
        kv.kv.flush()
        out, reused = kv.forward(ids)
    assert reused == 128  # whole chunks of the first 150 tokens
    assert out.logits.shape[1] == length - reused
    assert (out.logits - full[:, reused:]).abs().max() <= 1e-5
    assert output_cache(out).get_seq_length() == length


def test_a_fully_stored_prompt_still_computes_its_last_token(llama):
    ids = prompt(4 * CHUNK)
    full = llama(ids).logits
    with PrefixCache.open(llama, chain(), model_id="m") as kv:
        kv.forward(ids)
        kv.kv.flush()
        assert kv.kv.lookup(ids[0]) == 4 * CHUNK
        out, reused = kv.forward(ids)
    assert reused == 3 * CHUNK  # the last chunk is recomputed: it holds the last token
    assert (out.logits[:, -1] - full[:, -1]).abs().max() <= 1e-5


def test_short_prompts_store_nothing_and_reuse_nothing(llama):
    with PrefixCache.open(llama, chain(), model_id="m") as kv:
        out, reused = kv.forward(prompt(CHUNK - 1))
        assert reused == 0 and kv.store(prompt(CHUNK - 1), output_cache(out)) == 0
        assert kv.prefix(prompt(1)).tokens == 0
        kv.kv.flush()
        assert kv.kv.stats().tiers[0].stored == 0


def test_int8_reuse_keeps_the_top1_token(tmp_path):
    """Over 384 positions of a 4-layer GQA model, int8 KV (per-token scales) from a
    file tier changes the greedy next token at fewer than 1% of them."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    agree = total = 0
    with PrefixCache.open(model, chain(f"file://{tmp_path}", "int8"), model_id="m") as kv:
        for seed in range(3):
            ids = prompt(384, seed, vocab=2048)
            full = model(ids).logits[0]
            kv.forward(ids[:, :256])
            kv.kv.flush()
            out, reused = kv.forward(ids, store=False)
            assert reused == 256
            agree += int((out.logits[0].argmax(-1) == full[reused:].argmax(-1)).sum())
            total += out.logits.shape[1]
            assert (out.logits[0] - full[reused:]).abs().max() > 0  # int8 is lossy
    assert total == 384
    assert agree / total >= 0.99


def test_generate_reuses_prompt_and_reply(llama):
    ids = prompt(100)
    expected = llama.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
    with PrefixCache.open(llama, chain(), model_id="m") as kv:
        out, reused = kv.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
        assert reused == 0 and torch.equal(out, expected)
        kv.kv.flush()
        assert kv.kv.lookup(out[0]) == 128  # prompt and reply: 139 tokens with KV
        follow_up = torch.cat([out, prompt(20, seed=5)], dim=1)
        again, reused = kv.generate(follow_up, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert reused == 128
    assert torch.equal(again, llama.generate(follow_up, max_new_tokens=8, do_sample=False,
                                             pad_token_id=0))  # fmt: skip


def test_a_restarted_process_reuses_the_file_tier(llama, tmp_path):
    ids = prompt(300)
    full = llama(ids).logits
    with PrefixCache.open(llama, chain(f"file://{tmp_path}"), model_id="m") as kv:
        kv.forward(ids)
    with PrefixCache.open(llama, chain(f"file://{tmp_path}"), model_id="m") as kv:
        out, reused = kv.forward(ids)
    assert reused == 288
    assert (out.logits - full[:, reused:]).abs().max() <= 1e-5


def test_other_weights_and_tenants_never_share_kv(llama, tmp_path):
    ids = prompt(200)
    cfg = chain(f"file://{tmp_path}")
    with PrefixCache.open(llama, cfg, model_id="m") as kv:
        kv.forward(ids)
    for model_id, tenant, reused in (("m", None, 192), ("m2", None, 0), ("m", "t1", 0)):
        with PrefixCache.open(llama, cfg, model_id=model_id, tenant=tenant) as kv:
            assert kv.prefix(ids).tokens == reused, (model_id, tenant)


def test_a_lent_cache_is_never_overwritten(llama):
    """A prefix not yet run through the model views the reuse buffer; the next prefix
    must not write over it."""
    a, b = prompt(200, seed=1), prompt(200, seed=2)
    with PrefixCache.open(llama, chain(), model_id="m") as kv:
        for ids in (a, b):
            kv.forward(ids)
        kv.kv.flush()
        first = kv.prefix(a)
        keys = first.cache.layers[0].keys.clone()
        second = kv.prefix(b)
        assert first.tokens == second.tokens == 192
        assert torch.equal(first.cache.layers[0].keys, keys)
        assert not torch.equal(second.cache.layers[0].keys, keys)
        out = llama(a[:, first.tokens :], **first.model_kwargs())
    assert (out.logits - llama(a).logits[:, 192:]).abs().max() <= 1e-5


def test_reuse_works_without_inference_mode(llama):
    ids = prompt(100)
    with torch.inference_mode(False), torch.no_grad():
        full = llama(ids).logits
        with PrefixCache.open(llama, chain(codec="int8"), model_id="m") as kv:
            kv.forward(ids)
            kv.kv.flush()
            out, reused = kv.forward(ids)
    assert reused == 96 and out.logits.shape[1] == 4
    assert torch.equal(out.logits.argmax(-1), full[:, 96:].argmax(-1))


def test_bad_use_is_a_clear_error(llama):
    with PrefixCache.open(llama, chain(), model_id="m") as kv:
        with pytest.raises(ConfigError, match="batch of one"):
            kv.forward(prompt(64).repeat(2, 1))
        for name in ("cache", "past_key_values"):
            with pytest.raises(ConfigError, match=f"do not pass {name}:"):
                kv.forward(prompt(64), **{name: kv.new_cache()})
            with pytest.raises(ConfigError, match=f"do not pass {name}:"):
                kv.generate(prompt(64), **{name: kv.new_cache()})
        out = llama(prompt(64))
        with pytest.raises(ConfigError, match="holds 64 tokens"):
            kv.store(prompt(10), output_cache(out))
    with pytest.raises(ConfigError, match="model_id"):
        PrefixCache.open(llama, chain())


def test_sliding_window_models_are_refused():
    config = MistralConfig(**SHAPE, sliding_window=32)
    model = MistralForCausalLM(config).eval()
    with pytest.raises(ConfigError, match="DynamicSlidingWindowLayer"):
        PrefixCache.open(model, chain(), model_id="m")


def test_missing_transformers_names_the_extra(monkeypatch):
    for name in list(sys.modules):
        if name == "transformers" or name.startswith(("transformers.", "kvtier.plugins.transf")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    import kvtier.plugins.transformers.plugin  # noqa: F401  (the CLI's plugin needs none)

    with pytest.raises(MissingExtraError, match=r"pip install 'kvtier\[demo\]'"):
        from kvtier.plugins.transformers import PrefixCache  # noqa: F401
