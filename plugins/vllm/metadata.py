"""What the scheduler side tells the workers each step: which KV to load and save.

Plain dataclasses of ints and lists, so vLLM can ship them to worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvtier.core.keys import ExtraKeys


@dataclass(frozen=True)
class Transfer:
    """Tokens ``[start, end)`` of one request, copied between kvtier and the paged
    cache (a load, or a save).

    ``token_ids`` is the request's token prefix up to ``end`` or, for a load that ends
    inside a chunk, to that chunk's end (chunk keys chain over it; the load writes
    only tokens before ``end``), ``extra_keys`` the per-chunk extra keys (cache salt,
    LoRA, multimodal inputs) and ``block_ids`` the request's blocks, in order, covering
    ``[0, end)``.
    """

    req_id: str
    token_ids: list[int]
    extra_keys: tuple[ExtraKeys, ...]
    start: int
    end: int
    block_ids: list[int]

    def slot_mapping(self, block_size: int) -> torch.Tensor:
        """The paged-cache slot of each token in ``[start, end)``."""
        tokens = torch.arange(self.start, self.end, dtype=torch.int64)
        blocks = torch.tensor(self.block_ids, dtype=torch.int64)
        return blocks[tokens // block_size] * block_size + tokens % block_size

    def blocks_from(self, token: int, block_size: int) -> set[int]:
        """Ids of the blocks holding tokens ``[max(token, start), end)``."""
        first = max(token, self.start) // block_size
        last = -(-self.end // block_size)
        return set(self.block_ids[first:last])


@dataclass
class StepPlan:
    """One step's transfers; ``block_size`` is the scheduler's tokens per block.
    ``loads`` complete inside the step, before the layers that read them."""

    block_size: int
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)
    async_loads: list[Transfer] = field(default_factory=list)
    """Loads the workers run in the background, reported when done (``get_finished``)."""
