"""Prefill/decode disaggregation: what each ``kv_role`` loads and stores, and the
hand-off of a prompt's KV from the prefill instance to the decode instance.

* ``kv_producer`` (a prefill instance) never loads from kvtier and stores every
  computed prompt chunk, the last partial one included, so that the decode instance
  computes nothing of the prompt but its last token (which vLLM always recomputes to
  sample the next one). It stores no chunk past the prompt.
* ``kv_consumer`` (a decode instance) loads, the partial last chunk included, and
  stores nothing.
* ``kv_both``: loads and stores whole chunks, prompt and output alike; with
  ``store_partial_chunks`` in the config also the prompt's last partial chunk (so that
  the same prompt again computes only its last token), and once decoding completes
  that chunk, the whole chunk too.

The hand-off: the producer's response returns as soon as the prompt is computed, when
its chunks may still be on their way to the shared tier (the worker copied them out
of the paged cache during the step, so no block needs to be held; the writes finish
in the background). The producer's ``request_finished`` therefore returns transfer
params ``{"kvtier": {"tokens": N}}`` (vLLM puts them in the response; a prefill/decode
proxy passes them on in the decode request's ``kv_transfer_params``), and an instance
that loads treats a request that carries them as a hand-off: its lookup is repeated
(vLLM asks again at each step) until kvtier holds ``N`` tokens, for at most
``handoff_wait_ms``. After that it loads what is there and computes the rest: a
prefill that never happened, or a producer that died mid-store, costs at most the
wait, never a hang and never different tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvtier.core.config import KVTierConfig
from kvtier.core.errors import ConfigError

log = logging.getLogger(__name__)

ROLES = ("kv_producer", "kv_consumer", "kv_both")
PARAMS_KEY = "kvtier"
"""The key of kvtier's entry in ``kv_transfer_params``."""


@dataclass(frozen=True)
class Role:
    """One of :data:`ROLES` (:func:`role_for` checks the name); ``partial_chunks``: the
    config's ``store_partial_chunks``, which only ``kv_both`` leaves to the config."""

    name: str
    partial_chunks: bool = False

    @property
    def loads(self) -> bool:
        return self.name != "kv_producer"

    @property
    def saves(self) -> bool:
        return self.name != "kv_consumer"

    @property
    def partial(self) -> bool:
        """Whether the last partial prompt chunk moves (stored by a producer or by
        ``kv_both`` with ``partial_chunks``, loaded by a consumer or by the latter)."""
        return self.name != "kv_both" or self.partial_chunks

    def kvtier_config(self, config: KVTierConfig) -> KVTierConfig:
        """The worker's kvtier config: producers and consumers key partial chunks."""
        if self.name == "kv_both":
            return config
        return config.model_copy(update={"store_partial_chunks": True})

    def save_end(self, computed: int, prompt: int, chunk_tokens: int) -> int:
        """Where the saves of a request with ``computed`` tokens computed, ``prompt``
        of them its prompt, end (they start at the chunk holding the first token not
        yet stored)."""
        if not self.saves:
            return 0
        whole = computed - computed % chunk_tokens
        if not self.partial or computed < prompt:
            return whole
        if self.name == "kv_producer":
            return prompt  # the whole prompt, its partial last chunk included
        return max(whole, prompt)

    def load_limit(self, num_tokens: int) -> int:
        """How many of a request's ``num_tokens`` tokens a load may cover: all of them
        for a consumer (its load runs between steps, and vLLM then recomputes the last
        token), all but the last otherwise (a load inside a step must leave one to
        compute, so a chunk holding the last token is loaded but for that token)."""
        return num_tokens if self.name == "kv_consumer" else num_tokens - 1

    def loadable(self, num_tokens: int, chunk_tokens: int) -> int:
        """The most tokens of a request of ``num_tokens`` tokens this role can load:
        for ``kv_both``, whose chunks are whole, those of its whole chunks."""
        whole = num_tokens if self.partial else num_tokens - num_tokens % chunk_tokens
        return min(whole, self.load_limit(num_tokens))

    def finished_params(self, stored: int) -> dict[str, Any] | None:
        """The transfer params a finished request returns: a producer says how many
        tokens of the prompt it stored."""
        if self.name != "kv_producer" or not stored:
            return None
        return {PARAMS_KEY: {"tokens": stored}}


KV_BOTH = Role("kv_both")


def role_for(kv_role: Any, partial_chunks: bool = False) -> Role:
    """The :class:`Role` of vLLM's ``kv_role`` (``partial_chunks``: the config's
    ``store_partial_chunks``); :class:`ConfigError` for any other role."""
    if kv_role not in ROLES:
        raise ConfigError(
            f"kvtier's vLLM connector: kv_role must be one of {', '.join(ROLES)}, got {kv_role!r}"
        )
    return Role(kv_role, partial_chunks)


def handed_off(params: Mapping[str, Any] | None) -> int:
    """Tokens a producer said it stored, from a request's ``kv_transfer_params`` (0
    when there are none, or they are not kvtier's). Malformed params are ignored with
    a warning: the request is then computed as usual."""
    if not params or PARAMS_KEY not in params:
        return 0
    entry = params[PARAMS_KEY]
    tokens = entry.get("tokens") if isinstance(entry, Mapping) else None
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        log.warning("kvtier: ignoring malformed kv_transfer_params %r", entry)
        return 0
    return tokens


class Handoff:
    """The loading side of hand-offs: how long each request has waited for chunks its
    producer announced."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        """Seconds a request waits, at most, for the announced chunks."""
        self._since: dict[str, float] = {}
        self.waited: list[float] = []
        """Seconds each finished wait took (the last 1000)."""
        self.timeouts = 0
        """Hand-offs whose chunks did not all arrive within :attr:`wait`."""

    def ready(
        self, req_id: str, params: Mapping[str, Any] | None, held: int, loadable: int
    ) -> bool:
        """Whether a request whose prompt kvtier holds up to token ``held`` may be
        scheduled now: not a hand-off, all announced tokens this instance can load
        (``loadable`` at most) are held, or it waited :attr:`wait` (it then computes
        what is missing)."""
        expected = min(handed_off(params), loadable)
        if held >= expected:
            self._done(req_id)
            return True
        now = time.monotonic()
        since = self._since.setdefault(req_id, now)
        if now - since < self.wait:
            return False
        self.timeouts += 1
        log.warning(
            "kvtier: request %s: its prefill announced %d tokens, %d arrived within %.1fs; "
            "computing the rest",
            req_id,
            expected,
            held,
            self.wait,
        )
        self._done(req_id)
        return True

    def _done(self, req_id: str) -> None:
        since = self._since.pop(req_id, None)
        if since is not None:
            self.waited = [*self.waited[-999:], time.monotonic() - since]

    def forget(self, req_id: str) -> None:
        """The request finished (or was aborted) while waiting."""
        self._since.pop(req_id, None)
