"""The plugin manager: loads built-in and installed plugins and indexes what they provide.

Load order: built-ins (every backend, codec and eviction policy in this repository
is itself a plugin), then the ``kvtier`` entry-point group, then pluggy's
``check_pending()``. Names and URL schemes are unique across all plugins: a second
claim is a :class:`PluginError` naming both distributions. A plugin that fails to
import is an error naming the distribution and the fix, never silently skipped.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pluggy

from kvtier.core import hookspecs
from kvtier.core.errors import ConfigError, PluginError
from kvtier.core.specs import (
    BackendSpec,
    CodecSpec,
    EvictionPolicySpec,
    PluginInfo,
    SubcommandSpec,
    TierEvent,
)
from kvtier.core.urls import redact

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kvtier"
BUILTIN_PLUGINS: dict[str, str] = {
    "eviction": "kvtier.core.eviction",
    "codecs": "kvtier.core.codecs",
    "cpu": "kvtier.backends.memory",
    "file": "kvtier.backends.file",
    "redis": "kvtier.backends.redis",
    "s3": "kvtier.backends.s3",
    "mooncake": "kvtier.backends.mooncake",
    "nixl": "kvtier.backends.nixl",
    "vineyard": "kvtier.backends.vineyard",
}
"""Built-in plugins by name; a config can disable them like any other plugin."""

S = TypeVar("S", BackendSpec, CodecSpec, EvictionPolicySpec, SubcommandSpec)


@dataclass(frozen=True)
class _Origin:
    plugin: str
    distribution: str
    version: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} from {self.distribution} {self.version}"


def _own_version() -> str:
    try:
        return metadata.version("kvtier")
    except metadata.PackageNotFoundError:
        return "unknown"


def closest(name: str, candidates: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest candidate, or ``""``."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


class PluginRegistry:
    """Registered plugins and the backends, codecs, eviction policies and ``kvtier``
    subcommands they provide."""

    def __init__(self, disabled: Iterable[str] = (), *, entry_points: bool = True) -> None:
        self.disabled = frozenset(disabled)
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._origins: dict[str, _Origin] = {}
        self.backends: dict[str, BackendSpec] = {}
        self.schemes: dict[str, BackendSpec] = {}
        self.codecs: dict[str, CodecSpec] = {}
        self.eviction_policies: dict[str, EvictionPolicySpec] = {}
        self.subcommands: dict[str, SubcommandSpec] = {}
        self._provided_by: dict[str, list[str]] = {}
        self._spec_origin: dict[tuple[str, str], _Origin] = {}

        version = _own_version()
        for name, module_name in BUILTIN_PLUGINS.items():
            if name not in self.disabled:
                self._register(
                    importlib.import_module(module_name), _Origin(name, "kvtier", version)
                )
        if entry_points:
            self._load_entry_points()
        self.pm.check_pending()
        self._index()

    def _register(self, plugin: ModuleType | object, origin: _Origin) -> None:
        if origin.plugin in self._origins:
            raise PluginError(
                f"two plugins are named {origin.plugin!r}: {self._origins[origin.plugin]} "
                f"and {origin}; uninstall one of the distributions"
            )
        try:
            self.pm.register(plugin, name=origin.plugin)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginError(f"{origin} does not follow kvtier's hook specs: {exc}") from exc
        self._origins[origin.plugin] = origin

    def _load_entry_points(self) -> None:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self.disabled:
                continue
            dist = ep.dist.name if ep.dist is not None else "unknown distribution"
            version = ep.dist.version if ep.dist is not None else "?"
            origin = _Origin(ep.name, dist, version)
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"{origin} failed to import ({ep.value}): {type(exc).__name__}: {exc}. "
                    f"Fix: upgrade or reinstall it (pip install -U {dist}), uninstall it "
                    f"(pip uninstall {dist}), or disable it in the config with "
                    f"'plugins: {{disable: [{ep.name}]}}'"
                ) from exc
            self._register(plugin, origin)

    def _collect(self, hook_name: str, spec_type: type[S], table: dict[str, S]) -> None:
        hook = getattr(self.pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            origin = self._origins[impl.plugin_name]
            try:
                specs = list(impl.function() or ())
            except Exception as exc:
                raise PluginError(f"{origin}: hook {hook_name} raised {exc!r}") from exc
            for spec in specs:
                if not isinstance(spec, spec_type):
                    raise PluginError(
                        f"{origin}: {hook_name} must return {spec_type.__name__} objects, "
                        f"got {spec!r}"
                    )
                kind = spec_type.__name__.removesuffix("Spec").lower()
                self._claim(table, spec.name, spec, origin, f"{kind} name")
                if isinstance(spec, BackendSpec):
                    if not spec.schemes:
                        raise PluginError(f"{origin}: backend {spec.name!r} claims no URL scheme")
                    for scheme in spec.schemes:
                        self._claim(self.schemes, scheme, spec, origin, "URL scheme")
                self._provided_by.setdefault(origin.plugin, []).append(f"{kind}:{spec.name}")

    def _claim(
        self, table: dict[str, Any], name: str, spec: Any, origin: _Origin, what: str
    ) -> None:
        key = (what, name)
        if key in self._spec_origin:
            raise PluginError(
                f"{what} {name!r} is claimed twice: by {self._spec_origin[key]} and by {origin}; "
                "uninstall or disable one of them"
            )
        self._spec_origin[key] = origin
        table[name] = spec

    def _index(self) -> None:
        self._collect("kvtier_backends", BackendSpec, self.backends)
        self._collect("kvtier_codecs", CodecSpec, self.codecs)
        self._collect("kvtier_eviction_policies", EvictionPolicySpec, self.eviction_policies)
        self._collect("kvtier_subcommands", SubcommandSpec, self.subcommands)

    def backend_for_url(self, url: str) -> BackendSpec:
        """The backend registered for ``url``'s scheme; :class:`ConfigError` if none, or
        if ``url`` is not a URL at all."""
        control = next((i for i, c in enumerate(url) if ord(c) < 32 or ord(c) == 127), None)
        if control is not None:
            raise ConfigError(
                f"tier URL '{redact(url)}' has a control character at position {control}; remove it"
            )
        try:
            scheme = urlsplit(url).scheme.lower()
        except ValueError as exc:  # e.g. an unclosed '[' of an IPv6 address
            raise ConfigError(f"tier URL {redact(url)!r} is not a valid URL: {exc}") from None
        if not scheme:
            raise ConfigError(
                f"tier URL {redact(url)!r} has no scheme; write it like 'cpu://', "
                f"'file:///var/cache/kv' (known schemes: {', '.join(sorted(self.schemes))})"
            )
        try:
            return self.schemes[scheme]
        except KeyError:
            raise ConfigError(
                f"no backend handles URL scheme {scheme!r} in {redact(url)!r}"
                f"{closest(scheme, self.schemes)}; known schemes: "
                f"{', '.join(sorted(self.schemes))}. A third-party backend must be installed "
                "(it registers through the 'kvtier' entry-point group)"
            ) from None

    def codec(self, name: str) -> CodecSpec:
        """The codec registered as ``name``; :class:`ConfigError` if none."""
        return self._lookup(self.codecs, name, "codec")

    def eviction_policy(self, name: str) -> EvictionPolicySpec:
        """The eviction policy registered as ``name``; :class:`ConfigError` if none."""
        return self._lookup(self.eviction_policies, name, "eviction policy")

    @staticmethod
    def _lookup(table: dict[str, S], name: str, what: str) -> S:
        try:
            return table[name]
        except KeyError:
            available = ", ".join(sorted(table))
            raise ConfigError(
                f"unknown {what} {name!r}{closest(name, table)}; available: {available}"
            ) from None

    def plugins(self) -> list[PluginInfo]:
        """Every registered plugin with its distribution, version and what it provides."""
        infos = []
        for name, origin in self._origins.items():
            plugin = self.pm.get_plugin(name)
            hooks = tuple(caller.name for caller in self.pm.get_hookcallers(plugin) or ())
            infos.append(
                PluginInfo(
                    name=name,
                    distribution=origin.distribution,
                    version=origin.version,
                    provides=tuple(self._provided_by.get(name, ())),
                    hooks=hooks,
                )
            )
        return infos

    def emit(self, event: TierEvent) -> None:
        """Fire ``kvtier_tier_event``; an observer's exception is logged, never raised."""
        try:
            self.pm.hook.kvtier_tier_event(event=event)
        except Exception:
            log.exception("a kvtier_tier_event observer failed")


@functools.lru_cache(maxsize=8)
def get_registry(disabled: frozenset[str] = frozenset()) -> PluginRegistry:
    """The process-wide registry for a set of disabled plugins (built once, then cached)."""
    return PluginRegistry(disabled)
