"""kvtier for Hugging Face transformers causal LMs (``pip install 'kvtier[demo]'``).

::

    from kvtier.plugins.transformers import PrefixCache

    with PrefixCache.open(model, "kvtier.yaml", model_id="org/model") as kv:
        out, reused = kv.forward(input_ids)            # computes only the new tokens
        ids, reused = kv.generate(input_ids, max_new_tokens=32)

The package also gives the ``kvtier`` command its ``demo`` subcommand
(:mod:`~kvtier.plugins.transformers.plugin`), so it imports without transformers; its
names are imported on first use and need it: without transformers, importing them
raises :class:`~kvtier.core.errors.MissingExtraError`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvtier.core.errors import MissingExtraError

if TYPE_CHECKING:
    from kvtier.plugins.transformers.cache import Prefix, PrefixCache, layout_for
    from kvtier.plugins.transformers.models import MODEL_SIZES, random_llama, random_llama_id

_EXPORTS = {
    "Prefix": "cache", "PrefixCache": "cache", "layout_for": "cache",
    "MODEL_SIZES": "models", "random_llama": "models", "random_llama_id": "models",
}  # fmt: skip

__all__ = ["MODEL_SIZES", "Prefix", "PrefixCache", "layout_for", "random_llama", "random_llama_id"]


def require_extra(feature: str, *modules: str) -> None:
    """Raise :class:`MissingExtraError` for ``feature``, naming ``kvtier[demo]``, if one
    of ``modules`` is not installed. A module that is installed but fails to import
    raises its own error: reinstalling the extra would not fix it."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            raise MissingExtraError(feature, "demo") from exc


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require_extra(__name__, "transformers")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
