"""kvtier for Hugging Face transformers causal LMs (``pip install 'kvtier[demo]'``).

::

    from kvtier.plugins.transformers import PrefixCache

    with PrefixCache.open(model, "kvtier.yaml", model_id="org/model") as kv:
        out, reused = kv.forward(input_ids)            # computes only the new tokens
        ids, reused = kv.generate(input_ids, max_new_tokens=32)

Importing this package without transformers installed raises
:class:`~kvtier.core.errors.MissingExtraError`.
"""

from __future__ import annotations

from kvtier.core.errors import MissingExtraError

try:
    import transformers  # noqa: F401
except ImportError as exc:
    raise MissingExtraError("kvtier.plugins.transformers", "demo") from exc

from kvtier.plugins.transformers.cache import Prefix, PrefixCache, layout_for
from kvtier.plugins.transformers.models import MODEL_SIZES, random_llama, random_llama_id

__all__ = ["MODEL_SIZES", "Prefix", "PrefixCache", "layout_for", "random_llama", "random_llama_id"]
