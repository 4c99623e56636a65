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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kvtier.core.errors import ConfigError
from kvtier.core.keys import ExtraKeys
from kvtier.plugins.vllm.metadata import StepPlan, Transfer


def check_chunk_size(chunk_tokens: int, block_size: int) -> None:
    """kvtier's chunks must be whole vLLM blocks, so that every hit is block aligned."""
    if chunk_tokens % block_size:
        raise ConfigError(
            f"chunk_tokens ({chunk_tokens}) must be a multiple of vLLM's block size "
            f"({block_size}), e.g. {block_size * max(1, round(chunk_tokens / block_size))}"
        )


class Lookup(Protocol):
    """The part of :class:`kvtier.core.KVTier` the scheduler side uses."""

    def lookup(self, tokens: Sequence[int], *, extra_keys: Sequence[ExtraKeys] = ()) -> int: ...


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
    stored: int = 0
    local: int = 0
    matched: int = 0
    load: tuple[int, int] | None = None
    loading: Transfer | None = None


class SchedulerSide:
    """Per-request bookkeeping and the plan of each step."""

    def __init__(self, kv: Lookup, *, chunk_tokens: int, block_size: int) -> None:
        check_chunk_size(chunk_tokens, block_size)
        self.kv = kv
        self.chunk_tokens = chunk_tokens
        self.block_size = block_size
        self._requests: dict[str, _Request] = {}

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
    ) -> int:
        """Tokens beyond ``num_computed_tokens`` (vLLM's block-aligned local hit) that
        kvtier can load: the leading whole chunks kvtier holds, never the last token
        of ``tokens``.

        Touches no store; calling it again for the same request replaces the answer.
        """
        limit = len(tokens) - 1
        hit = 0
        if limit >= self.chunk_tokens:
            hit = self.kv.lookup(tokens[:limit], extra_keys=extra_keys)
        state = self._state(req_id, tokens, extra_keys)
        state.local, state.matched = num_computed_tokens, hit
        return max(0, hit - num_computed_tokens)

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
        state.stored = max(state.stored, state.matched)
        if num_external_tokens:
            start = state.local
            end = start + num_external_tokens
            if end > state.matched:
                raise RuntimeError(
                    f"vLLM asked request {req_id} for {num_external_tokens} tokens from "
                    f"token {start}, but kvtier matched only up to token {state.matched}"
                )
            state.load = (start, end)

    def build(self, scheduled: Iterable[Scheduled]) -> StepPlan:
        """The step's loads and saves; marks them as planned."""
        plan = StepPlan(self.block_size)
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
                state.loading = self._transfer(item.req_id, state, start, end)
                plan.loads.append(state.loading)
                state.load = None
            computed = min(item.num_computed_tokens + item.num_scheduled_tokens, len(state.tokens))
            end = computed - computed % self.chunk_tokens
            if end > state.stored:
                plan.saves.append(self._transfer(item.req_id, state, state.stored, end))
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

    def step_done(self) -> None:
        """The workers reported on the step's loads; forget them."""
        for state in self._requests.values():
            state.loading = None

    def finished(self, req_id: str) -> None:
        """Drop the request's state."""
        self._requests.pop(req_id, None)

    def _state(
        self, req_id: str, tokens: Sequence[int], extra_keys: tuple[ExtraKeys, ...]
    ) -> _Request:
        state = self._requests.get(req_id)
        if state is None:
            state = self._requests[req_id] = _Request(tokens, extra_keys, [])
        return state

    def _transfer(self, req_id: str, state: _Request, start: int, end: int) -> Transfer:
        blocks = -(-end // self.block_size)
        if len(state.block_ids) < blocks:
            raise RuntimeError(
                f"request {req_id} has {len(state.block_ids)} blocks, fewer than the "
                f"{blocks} that tokens [{start}, {end}) need"
            )
        return Transfer(
            req_id=req_id,
            token_ids=list(state.tokens[:end]),
            extra_keys=state.extra_keys,
            start=start,
            end=end,
            block_ids=state.block_ids[:blocks],
        )
