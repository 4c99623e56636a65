"""kvtier's log records in vLLM's log: the same handlers, format (process name and
pid, level, time, file) and level, so that kvtier's lines ("tier redis skipped for
1.0s: ...", "tier redis is available again") appear among vLLM's, from every vLLM
process that runs the connector."""

from __future__ import annotations

import logging


def route_to_vllm() -> None:
    """Send the ``kvtier`` logger's records to the ``vllm`` logger's handlers, at
    vLLM's level unless the ``kvtier`` logger has a level of its own. Idempotent;
    does nothing when vLLM's logging is not configured (``VLLM_CONFIGURE_LOGGING=0``)."""
    source = logging.getLogger("vllm")
    target = logging.getLogger("kvtier")
    if not source.handlers:
        return
    for handler in source.handlers:
        if handler not in target.handlers:
            target.addHandler(handler)
    if target.level == logging.NOTSET:
        target.setLevel(source.level)
    target.propagate = False  # as vLLM's own logger: each line once
