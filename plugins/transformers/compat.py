"""The name under which transformers passes a model's KV cache, in every 5.x release.

transformers 5.24 renamed ``past_key_values`` to ``cache`` everywhere at once: the
keyword of every model's ``forward`` and of ``generate``, and the field of the model
outputs. The old name keeps working until 5.40 but warns (a ``FutureWarning`` for the
keyword, a log message for the field); releases before 5.24 know only the old name.
kvtier uses the installed release's name, found once, here, from the fields of the
causal LM output class.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from kvtier.core.errors import ConfigError

CACHE_ARGUMENT = (
    "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"
)
"""``cache`` from transformers 5.24 on, ``past_key_values`` before."""


def output_cache(outputs: Any) -> DynamicCache:
    """The ``DynamicCache`` in what a model's ``forward`` or ``generate`` returned."""
    cache = getattr(outputs, CACHE_ARGUMENT, None)
    if not isinstance(cache, DynamicCache):
        raise ConfigError(
            f"the model returned {type(cache).__name__} as its KV cache, not a DynamicCache: "
            "call it with use_cache=True"
        )
    return cache
