"""Selecting chunks by model, namespace and tenant (``kvtier migrate`` and ``kvtier
purge``'s ``--model``, ``--namespace`` and ``--tenant``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kvtier.core.errors import ConfigError
from kvtier.core.keys import ChunkKey, model_slug, tenant_tag

_NAMESPACE_RE = re.compile(
    r"^(?P<slug>[A-Za-z0-9_-]+)-(?P<fingerprint>[0-9a-f]{16})(?:-(?P<tenant>t[0-9a-f]{12}))?$"
)
"""A namespace from :func:`~kvtier.core.keys.namespace_for`: the model slug, the
fingerprint hash, and the tenant tag if any. A tenant tag (``t`` + 12 hex digits) can
never be read as a fingerprint hash (16 hex digits), so the split is unambiguous."""


@dataclass(frozen=True)
class ChunkFilter:
    """Which chunks a migration or a purge touches: all of them when every field is empty.

    A chunk matches when its namespace is one of ``namespaces`` (exact), its model slug
    equals that of one of ``models``, and its tenant tag that of one of ``tenants``;
    an empty field accepts any chunk. A namespace records only the model's slug (the id
    with characters other than letters, digits and ``_`` turned into ``-``, at most 40
    characters), so ``org/m`` also selects ``org-m``; use ``namespaces`` to tell such
    models apart. ``tenants`` selects only chunks stored for one of those tenants.
    """

    models: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()
    _slugs: frozenset[str] = field(init=False, repr=False, compare=False)
    _tags: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for label, values in (("model", self.models), ("tenant", self.tenants)):
            if any(not value for value in values):
                raise ConfigError(f"--{label} must not be empty")
        for namespace in self.namespaces:
            try:
                ChunkKey.parse(f"{namespace}.{'0' * 32}")
            except ConfigError:
                raise ConfigError(
                    f"--namespace {namespace!r} is not a namespace: 1-80 characters of "
                    "[A-Za-z0-9_-], starting with a letter or digit (see 'kvtier stats URL')"
                ) from None
        object.__setattr__(self, "_slugs", frozenset(map(model_slug, self.models)))
        object.__setattr__(self, "_tags", frozenset(map(tenant_tag, self.tenants)))

    @property
    def prefix(self) -> str:
        """A prefix every matching key starts with, to narrow ``iter_keys``."""
        if len(self.namespaces) == 1:
            return f"{self.namespaces[0]}."
        if len(self._slugs) == 1:
            return f"{next(iter(self._slugs))}-"
        return ""

    def matches(self, key: ChunkKey) -> bool:
        """Whether the chunk ``key`` is selected."""
        if self.namespaces and key.namespace not in self.namespaces:
            return False
        if not (self._slugs or self._tags):
            return True
        parts = _NAMESPACE_RE.match(key.namespace)
        if parts is None:
            return False
        if self._slugs and parts["slug"] not in self._slugs:
            return False
        return not self._tags or parts["tenant"] in self._tags


ALL_CHUNKS = ChunkFilter()
"""The selection of every chunk."""
