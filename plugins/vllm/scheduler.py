"""The scheduler side: how much of a prompt kvtier holds, and what each step moves.

Free of vLLM imports: the connector turns vLLM's request and scheduler output into
the plain values used here.

Per request the scheduler side keeps the request's live token list, its extra keys,
its block ids and ``stored``, the token up to which kvtier holds (or is being sent)
every chunk. Each step it plans

* a load of the tokens kvtier matched at admission (beyond vLLM's own prefix cache),
* a save of every chunk that the step completes and kvtier does not hold yet.

State lives from the first match or allocation to ``finished``; nothing else
accumulates across requests or steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvtier.core.errors import ConfigError
from kvtier.core.keys import ExtraKeys
from kvtier.plugins.vllm.lookup import NO_HIT, Answer, Lookups, Pending
from kvtier.plugins.vllm.metadata import StepPlan, Transfer
from kvtier.plugins.vllm.roles import KV_BOTH, Role

log = logging.getLogger(__name__)


LOAD_ASYNC = ("auto", "always", "never")
"""When a load runs between engine steps (vLLM's ``load_kv_async``; the request waits
while other requests run) instead of inside the step that needs it: ``auto`` when part
of it comes from a tier outside the worker process, ``always``, ``never``."""


def check_chunk_size(chunk_tokens: int, block_size: int) -> None:
    """kvtier's chunks must be whole vLLM blocks, so that every hit is block aligned."""
    if chunk_tokens % block_size:
        raise ConfigError(
            f"chunk_tokens ({chunk_tokens}) must be a multiple of vLLM's block size "
            f"({block_size}), e.g. {block_size * max(1, round(chunk_tokens / block_size))}"
        )


@dataclass(frozen=True)
class Scheduled:
    """One request scheduled this step, as vLLM's scheduler output describes it.

    ``block_ids`` are all the request's blocks when ``replace`` (a new or resumed
    request), else the blocks added this step (possibly none).
    """

    req_id: str
    block_ids: Sequence[int]
    replace: bool
    num_computed_tokens: int
    num_scheduled_tokens: int


@dataclass
class _Request:
    tokens: Sequence[int]
    extra_keys: tuple[ExtraKeys, ...]
    block_ids: list[int]
    prompt: int = 0  # tokens of the prompt (the token list at the first call)
    stored: int = 0
    local: int = 0
    matched: int = 0
    held: int = 0  # the end of the chunks kvtier holds at the match (``matched`` or more)
    fast: int = 0  # of ``matched``, the leading tokens the workers' cpu tier holds
    load: tuple[int, int] | None = None
    loading: Transfer | None = None
    asking: _Asking | None = None
    answer: tuple[int, Answer] | None = None  # (tokens asked about, answer), the last
    load_async: bool = False  # the planned load runs between steps
    fresh: bool = False  # matched since the last allocation


@dataclass
class _Asking:
    """A lookup in flight: about the first ``tokens`` tokens, submitted at ``since``."""

    tokens: int
    pending: Pending
    since: float


class SchedulerSide:
    """Per-request bookkeeping and the plan of each step."""

    def __init__(
        self,
        lookups: Lookups,
        *,
        chunk_tokens: int,
        block_size: int,
        wait: float = 0.002,
        give_up: float = 2.0,
        load_async: str = "auto",
        role: Role = KV_BOTH,
    ) -> None:
        check_chunk_size(chunk_tokens, block_size)
        if load_async not in LOAD_ASYNC:
            raise ConfigError(f"load_async must be one of {', '.join(LOAD_ASYNC)}")
        self.load_async = load_async
        """When loads run between engine steps (see :data:`LOAD_ASYNC`)."""
        self.role = role
        """What this instance loads and saves (:mod:`.roles`)."""
        self.lookups = lookups
        self.wait = wait
        """Seconds one :meth:`match` waits for a lookup's answer."""
        self.give_up = give_up
        """Seconds after which a lookup still unanswered counts as a miss."""
        self.chunk_tokens = chunk_tokens
        self.block_size = block_size
        self._requests: dict[str, _Request] = {}
        self._async_loads: list[Transfer] = []

    @property
    def num_requests(self) -> int:
        """Requests with state (between their first match and ``finished``)."""
        return len(self._requests)

    def match(
        self,
        req_id: str,
        tokens: Sequence[int],
        extra_keys: tuple[ExtraKeys, ...],
        num_computed_tokens: int,
    ) -> int | None:
        """Tokens beyond ``num_computed_tokens`` (vLLM's block-aligned local hit) that
        kvtier can load: the leading chunks kvtier holds, but never the last token of
        ``tokens`` in a load inside a step (:meth:`Role.load_limit`; a chunk holding it
        is loaded but for that token); ``None`` when the lookup has not answered yet
        (vLLM asks again at a later step).

        Never waits more than :attr:`wait`: the first call submits the lookup, and
        calls until its answer arrives return ``None``. A later call for the same
        request answers at once with the last answer unless a fresh lookup (submitted
        then) answers within :attr:`wait`. Writes no store here (the workers' lookups
        may prefetch: :func:`~kvtier.plugins.vllm.lookup.ask`); calling it again for
        the same request replaces the answer.
        """
        state = self._state(req_id, tokens, extra_keys)
        got = NO_HIT
        if len(tokens) >= (1 if self.role.partial else self.chunk_tokens):  # partial: any
            answer = self._answer(req_id, state, tokens, num_computed_tokens)
            if answer is None:
                return None
            got = answer
        hit = min(got.hit, self.role.load_limit(len(tokens)))
        state.local, state.matched, state.held = num_computed_tokens, hit, got.hit
        state.fresh = True
        state.fast = min(got.fast, hit)
        n = max(0, hit - num_computed_tokens)
        slow = hit > max(got.fast, num_computed_tokens)
        state.load_async = n > 0 and (
            self.load_async == "always"
            or (self.load_async == "auto" and slow)
            or hit >= len(tokens)  # vLLM recomputes the last token after the load
        )
        return n

    def hit_sources(self, req_id: str, num_external_tokens: int) -> tuple[int, int]:
        """``num_external_tokens`` (what vLLM allocated for :meth:`match`'s answer)
        split into ``(from the workers' cpu tier, from slower tiers)``: a load reads the
        leading chunks the cpu tier holds from RAM and the rest from other tiers."""
        state = self._requests.get(req_id)
        if state is None:
            return 0, num_external_tokens
        host = min(max(0, state.fast - state.local), num_external_tokens)
        return host, num_external_tokens - host

    def is_async(self, req_id: str) -> bool:
        """Whether the load :meth:`match` last found for ``req_id`` runs between steps
        (vLLM's ``load_kv_async``): by default when part of it comes from a tier
        outside the worker process."""
        state = self._requests.get(req_id)
        return state is not None and state.load_async

    def _answer(
        self, req_id: str, state: _Request, tokens: Sequence[int], local: int
    ) -> Answer | None:
        """The lookup's answer for ``tokens`` (``local``: vLLM's own hit, not
        prefetched); see :meth:`match`."""
        asking = state.asking
        if asking is None or asking.tokens != len(tokens):
            if asking is not None:
                asking.pending.cancel()
            pending = self.lookups.submit(tokens, state.extra_keys, local)
            asking = state.asking = _Asking(len(tokens), pending, time.monotonic())
        hit = asking.pending.result(self.wait)
        if hit is None:
            if state.answer is not None and state.answer[0] == len(tokens):
                return state.answer[1]  # the fresh lookup answers a later call
            if time.monotonic() - asking.since < self.give_up:
                return None
            log.warning(
                "kvtier: no answer to the lookup of request %s after %.1fs; computing it",
                req_id,
                self.give_up,
            )
            asking.pending.cancel()
            hit = NO_HIT
        state.asking = None
        state.answer = (len(tokens), hit)
        return hit

    def allocated(
        self,
        req_id: str,
        tokens: Sequence[int],
        extra_keys: tuple[ExtraKeys, ...],
        block_ids: Sequence[int],
        num_external_tokens: int,
    ) -> None:
        """vLLM allocated ``block_ids`` (all the request's blocks) and will take
        ``num_external_tokens`` tokens from kvtier, after its local hit."""
        state = self._state(req_id, tokens, extra_keys)
        state.block_ids = list(block_ids)
        if state.fresh:  # kvtier holds these chunks (a failed load lowers it again)
            state.stored = max(state.stored, state.held)
            state.fresh = False
        if num_external_tokens:
            start = state.local
            end = start + num_external_tokens
            if end > state.matched:
                raise RuntimeError(
                    f"vLLM asked request {req_id} for {num_external_tokens} tokens from "
                    f"token {start}, but kvtier matched only up to token {state.matched}"
                )
            if state.load_async:  # vLLM schedules the request once the load is done
                state.loading = self._load(req_id, state, start, end)
                self._async_loads.append(state.loading)
            else:
                state.load = (start, end)

    def build(self, scheduled: Iterable[Scheduled]) -> StepPlan:
        """The step's loads and saves; marks them as planned."""
        plan = StepPlan(self.block_size, async_loads=self._async_loads)
        self._async_loads = []
        for item in scheduled:
            state = self._requests.get(item.req_id)
            if state is None:
                continue
            if item.replace:
                state.block_ids = list(item.block_ids)
            else:
                state.block_ids.extend(item.block_ids)
            if state.load is not None:
                start, end = state.load
                state.loading = self._load(item.req_id, state, start, end)
                plan.loads.append(state.loading)
                state.load = None
            computed = min(item.num_computed_tokens + item.num_scheduled_tokens, len(state.tokens))
            end = self.role.save_end(computed, state.prompt, self.chunk_tokens)
            if end > state.stored:  # from the chunk that holds token ``stored``
                start = state.stored - state.stored % self.chunk_tokens
                plan.saves.append(self._transfer(item.req_id, state, start, end))
                state.stored = end
        return plan

    def load_failed(self, block_ids: set[int]) -> None:
        """Workers could not load ``block_ids``: vLLM recomputes them, and the chunks
        from the first failed block on are saved again once recomputed."""
        for state in self._requests.values():
            transfer = state.loading
            if transfer is None:
                continue
            first = next(
                (
                    i * self.block_size
                    for i in range(transfer.start // self.block_size, len(transfer.block_ids))
                    if transfer.block_ids[i] in block_ids
                ),
                None,
            )
            if first is not None:
                state.stored = min(state.stored, first - first % self.chunk_tokens)

    def step_done(self, received: Iterable[str] = ()) -> None:
        """The workers reported on the step's loads, and finished the async loads of
        the requests ``received``; forget those loads."""
        done = set(received)
        for req_id, state in self._requests.items():
            if not state.load_async or req_id in done:
                state.loading = None
                state.load_async = state.load_async and req_id not in done

    def stored(self, req_id: str) -> int:
        """The token up to which kvtier holds (or is being sent) the request's chunks."""
        state = self._requests.get(req_id)
        return state.stored if state is not None else 0

    def finished(self, req_id: str) -> None:
        """Drop the request's state."""
        state = self._requests.pop(req_id, None)
        if state is not None and state.asking is not None:
            state.asking.pending.cancel()

    def _state(
        self, req_id: str, tokens: Sequence[int], extra_keys: tuple[ExtraKeys, ...]
    ) -> _Request:
        state = self._requests.get(req_id)
        if state is None:
            state = self._requests[req_id] = _Request(tokens, extra_keys, [], len(tokens))
        return state

    def _load(self, req_id: str, state: _Request, start: int, end: int) -> Transfer:
        """The load of tokens ``[start, end)``, keyed by the whole chunk holding token
        ``end - 1`` where kvtier holds it (a load may end inside a chunk)."""
        chunk_end = -(-end // self.chunk_tokens) * self.chunk_tokens
        return self._transfer(req_id, state, start, end, keyed=min(chunk_end, state.held))

    def _transfer(
        self, req_id: str, state: _Request, start: int, end: int, keyed: int = 0
    ) -> Transfer:
        """Tokens ``[start, end)`` of the request, its chunk keys chained over its
        first ``max(end, keyed)`` tokens."""
        blocks = -(-end // self.block_size)
        if len(state.block_ids) < blocks:
            raise RuntimeError(
                f"request {req_id} has {len(state.block_ids)} blocks, fewer than the "
                f"{blocks} that tokens [{start}, {end}) need"
            )
        return Transfer(
            req_id=req_id,
            token_ids=list(state.tokens[: max(end, keyed)]),
            extra_keys=state.extra_keys,
            start=start,
            end=end,
            block_ids=state.block_ids[:blocks],
        )
