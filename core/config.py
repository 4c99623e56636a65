"""The configuration file: a validated tier chain and kvtier's settings.

Example (``kvtier.yaml``)::

    chunk_tokens: 256
    tiers:
      - url: cpu://
        capacity: 20GiB
      - url: file:///nvme/kv
        capacity: 500GiB
        codec: int8+zstd
      - url: s3://bucket/prefix
        write_policy: back
    segments: {min_tokens: 64, separator: " # # "}   # reuse text at any position
    blend: {strategy: cacheblend, recompute_ratio: 0.15, check_layers: [1]}

Every key is checked: an unknown key is an error naming the closest valid one, sizes
read as ``20GiB`` / ``500 GB`` / integers, and a tier missing a setting its backend
needs is an error, never silently dropped. Environment variables ``KVTIER_<KEY>``
override keys of a config file or of the embedded default, nesting with ``__``
(``KVTIER_CHUNK_TOKENS=128``, ``KVTIER_TIERS__0__CAPACITY=1GiB``); a mapping or
``KVTierConfig`` given in code is taken as it is. ``KVTIER_CONFIG`` names the file to
load when no config is given.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, model_validator

from kvtier.core.errors import ConfigError, quote
from kvtier.core.events.config import EventsConfig
from kvtier.core.integrity import IntegrityConfig
from kvtier.core.keys import HashAlgorithm
from kvtier.core.opsconfig import OpsConfig
from kvtier.core.plugins import closest
from kvtier.core.threads import ThreadCpus
from kvtier.core.validation import validate_model

ENV_PREFIX = "KVTIER_"
CONFIG_ENV = "KVTIER_CONFIG"
NOT_OVERRIDES = frozenset({CONFIG_ENV, "KVTIER_MAC_KEYS", "KVTIER_TOKEN"})
"""``KVTIER_*`` variables that are not config overrides: the config file's path and
secrets (integrity keys, the control service's token)."""

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any) -> int:
    """Bytes from ``20GiB``, ``500 GB``, ``1.5MiB``, ``4096`` (KiB/MiB/GiB/TiB and bare
    K/M/G/T are powers of 1024; KB/MB/GB/TB powers of 1000)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like '20GiB', got {quote(value)}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must be >= 0, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match[2].lower() in _UNITS:
            return int(float(match[1]) * _UNITS[match[2].lower()])
    raise ValueError(f"expected a size like '20GiB', '500 GB' or 4096, got {quote(value)}")


ByteSize: TypeAlias = Annotated[int, BeforeValidator(parse_size)]


def _text_if_number(value: Any) -> Any:
    """YAML reads ``password: 123456`` as an int: a secret of digits is still text."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Secret: TypeAlias = Annotated[SecretStr, BeforeValidator(_text_if_number)]
"""A password or key in options: digits allowed, never shown (``SecretStr``); give the
model ``hide_input_in_errors=True`` so that validation errors do not quote it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TierConfig(_Strict):
    """One tier of the chain."""

    url: str = Field(min_length=1)
    """Backend URL; its scheme selects the backend (``cpu://``, ``file:///path``, ...)."""
    name: str | None = None
    """Name in stats and events; defaults to the scheme (``file``, ``file-2``, ...)."""
    capacity: ByteSize | None = None
    """Byte capacity; required by bounded backends (``cpu``, ``file``)."""
    codec: str | list[str | dict[str, Any]] = "raw"
    """Codec pipeline: ``raw``, ``int8+zstd``, or a list of names / ``{name: ..., opt: ...}``."""
    write_policy: Literal["through", "back"] = "through"
    """``through``: every store is written here; ``back``: chunks arrive here only when
    the tier above evicts them."""
    promote: bool = True
    """Copy chunks served by a lower tier into this tier."""
    timeout: float = Field(default=10.0, gt=0)
    """Seconds one batch operation may take before the tier counts as unavailable."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Backend-specific options, validated by the backend's options model."""


class PluginsConfig(_Strict):
    disable: list[str] = Field(default_factory=list)
    """Plugin names (as ``kvtier plugins`` lists them) not to load."""


class SegmentsConfig(_Strict):
    """Position-independent segments (see :mod:`kvtier.core.segments`)."""

    min_tokens: int = Field(default=64, ge=1)
    """Segments shorter than this are never stored or looked up (computed instead)."""
    separator: str | None = None
    """Text that splits a flat prompt into segments (e.g. ``" # # "``), tokenised once
    by the integration without special tokens; ``None``: prompts are never split."""

    @model_validator(mode="after")
    def _check_separator(self) -> SegmentsConfig:
        if self.separator is not None and not self.separator:
            raise ValueError("segments.separator must be non-empty text or null")
        return self


class BlendConfig(_Strict):
    """How reused segments are fused into one prompt: which tokens are recomputed."""

    strategy: Literal["none", "cacheblend", "epic"] = "cacheblend"
    """``none``: reused KV as it is; ``cacheblend``: recompute the tokens whose KV
    deviates most at the check layers; ``epic``: recompute each segment's first tokens."""
    recompute_ratio: float = Field(default=0.15, ge=0.0, le=1.0)
    """cacheblend: share of the reused tokens recomputed after the check layers."""
    check_layers: list[int] = Field(default_factory=lambda: [1], min_length=1)
    """cacheblend: layers (from 0) where the running tokens' fresh KV is compared with
    the reused KV; the choice narrows at each, the last keeping ``recompute_ratio``."""
    epic_k: int = Field(default=16, ge=0)
    """epic: leading tokens of each reused segment that are recomputed."""

    @model_validator(mode="after")
    def _check_layers(self) -> BlendConfig:
        if any(layer < 0 for layer in self.check_layers) or self.check_layers != sorted(
            set(self.check_layers)
        ):
            raise ValueError(
                f"blend.check_layers must be distinct layer indexes >= 0 in increasing "
                f"order, got {self.check_layers}"
            )
        return self


class KVTierConfig(_Strict):
    """Top-level configuration."""

    chunk_tokens: int = Field(default=256, gt=0)
    """Tokens per chunk; lookups and retrievals are in multiples of this."""
    hash: HashAlgorithm = "xxh3_128"
    """Chunk key algorithm: ``xxh3_128`` (fast) or ``sha256_cbor`` (vLLM-compatible)."""
    hash_seed: str = "kvtier"
    """Seed of the key chain; processes sharing a store must use the same one."""
    store_partial_chunks: bool = False
    """Also store a trailing chunk shorter than ``chunk_tokens``."""
    store_queue_bytes: ByteSize = 1 << 30
    """Bytes of stores waiting for I/O; beyond it new stores are dropped and counted."""
    prefetch_bytes: ByteSize = 256 << 20
    """Bytes of chunks being prefetched at once: a lookup asked with ``prefetch`` (the
    vLLM connector's lookups are) starts copying the leading chunks it found only in
    slower tiers into the faster tiers that promote, each chunk holding its unencoded
    size of this budget until it is written; chunks beyond it are left to the load
    (counted as dropped). ``0``: never prefetch."""
    blob_layout: Literal["chunk", "layers"] = "chunk"
    """How chunks are written: ``chunk``, each blob one section under one checksum;
    ``layers``, each layer of a chunk encoded on its own with its own digest, so that
    a reader can use a layer before the rest of the blob arrives (the vLLM connector's
    layer-by-layer loads from tiers that read ranges: docs/vllm.md). Blobs of either
    layout are read whatever this says."""
    codec_threads: int = Field(default=2, ge=1, le=64)
    """Threads that checksum, encode and decode chunks, off the callers' threads and the
    I/O loop (two use both cores of a small machine)."""
    thread_cpus: ThreadCpus = "process"
    """CPUs kvtier's threads run on: ``process``, every CPU the process may use, even
    when the thread opening kvtier is bound to fewer (vLLM binds a worker's main thread
    to one core); ``inherit``, those of that thread; or a list of CPU numbers."""
    retry_after: float = Field(default=5.0, gt=0)
    """Seconds a failing tier is skipped before it is tried again (doubles, up to 60)."""
    tenant: str | None = None
    """Tenant salt: chunks of different tenants never mix."""
    tiers: list[TierConfig] = Field(min_length=1)
    segments: SegmentsConfig = Field(default_factory=SegmentsConfig)
    blend: BlendConfig = Field(default_factory=BlendConfig)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    integrity: IntegrityConfig | None = None
    """Sign blobs with keyed MACs and refuse forged ones (see docs/security.md)."""
    ops: OpsConfig = Field(default_factory=OpsConfig)
    """Metrics and the control service (:mod:`kvtier.core.opsconfig`)."""
    events: EventsConfig | None = None
    """Report chunks entering and leaving tiers as vLLM KV events (docs/events.md)."""

    @model_validator(mode="after")
    def _name_tiers(self) -> KVTierConfig:
        seen: set[str] = set()
        for tier in self.tiers:
            base = tier.name or tier.url.split(":", 1)[0].lower() or "tier"
            name, n = base, 1
            while name in seen:
                if tier.name is not None:
                    raise ValueError(
                        f"two tiers are named {tier.name!r}; tier names must be unique"
                    )
                n += 1
                name = f"{base}-{n}"
            tier.name = name
            seen.add(name)
        if self.tiers[0].write_policy == "back":
            raise ValueError(
                "the first tier cannot use write_policy 'back' (it has no tier above to "
                "evict into it); use 'through'"
            )
        return self


def cache_dir() -> Path:
    """The user's cache folder for kvtier (``$XDG_CACHE_HOME/kvtier`` or ``~/.cache/kvtier``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvtier"


def default_config() -> dict[str, Any]:
    """The embedded default: 2 GiB of RAM in front of 20 GiB on disk in the cache folder."""
    return {
        "tiers": [
            {"name": "cpu", "url": "cpu://", "capacity": "2GiB"},
            {"name": "file", "url": f"file://{cache_dir() / 'chunks'}", "capacity": "20GiB"},
        ]
    }


def _submodel(model: type[BaseModel] | None, field: str) -> type[BaseModel] | None:
    """The model that validates ``model.field`` (or its list items), if any."""
    if model is None:
        return None
    annotation = model.model_fields[field].annotation
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _set_path(data: dict[str, Any], path: list[str], value: str, var: str) -> None:
    node: Any = data
    model: type[BaseModel] | None = KVTierConfig
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"{var}: {part!r} is not the index of an existing entry (there are "
                    f"{len(node)}); indexes count from 0"
                )
            if last:
                node[int(part)] = value
                return
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{var}: cannot set {part!r} inside a {type(node).__name__}")
        if model is not None and part not in model.model_fields:
            raise ConfigError(
                f"{var}: unknown key {part!r}{closest(part, model.model_fields)}; "
                f"valid keys: {', '.join(model.model_fields)}"
            )
        if last:
            node[part] = yaml.safe_load(value) if value.strip()[:1] in ("[", "{") else value
            return
        node = node.setdefault(part, {})
        model = _submodel(model, part)


def apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Apply ``KVTIER_*`` overrides to a raw config mapping (not :data:`NOT_OVERRIDES`,
    nor the variable the config names for its integrity keys)."""
    integrity = data.get("integrity")
    keys_env = integrity.get("keys_env") if isinstance(integrity, dict) else None
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var in NOT_OVERRIDES or var == keys_env:
            continue
        path = var[len(ENV_PREFIX) :].lower().split("__")
        _set_path(data, path, environ[var], var)
    return data


MAX_NODES = 10_000
"""Largest config a YAML file may expand to (aliases counted as often as they are used):
far above any tier chain, far below an alias bomb."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a key given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *anchor' may override keys; only explicit repeats are errors
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"key {key!r:.80} is given twice (line {line}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes ``node`` stands for once its aliases are expanded (memoised, so shared
    nodes cost nothing to count); :class:`ConfigError` for a recursive alias."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise ConfigError("an alias refers to a node that contains it (a recursive alias)")
    open_.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, sizes, open_) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(
            _expanded_size(k, sizes, open_) + _expanded_size(v, sizes, open_) for k, v in node.value
        )
    else:
        size = 1
    open_.discard(id(node))
    sizes[id(node)] = size
    return size


def _read_yaml(path: Path) -> dict[str, Any]:
    where = f"config file {str(path)!r}"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{where} is not UTF-8 text: byte {exc.start} is {raw[exc.start]:#04x}; save it "
            "as UTF-8"
        ) from None
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node, {}, set()) > MAX_NODES:
                raise ConfigError(
                    f"it expands to more than {MAX_NODES} values (YAML aliases used many "
                    "times over?); write the chain out"
                )
            data = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping at the top level")
    return data


def load_config(
    source: str | Path | Mapping[str, Any] | KVTierConfig | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> KVTierConfig:
    """Validated config from a YAML path, a mapping, a config object or ``None``.

    ``None`` loads ``$KVTIER_CONFIG`` if set, else :func:`default_config`. ``KVTIER_*``
    environment overrides apply to a YAML file and to the default, the configs an
    operator deploys; a mapping passed in code is the program's own choice and is
    taken as it is.
    """
    if isinstance(source, KVTierConfig):
        return source
    env = os.environ if environ is None else environ
    if source is None and env.get(CONFIG_ENV):
        source = env[CONFIG_ENV]
    if source is None:
        data, where = apply_env(default_config(), env), "default config"
    elif isinstance(source, (str, Path)):
        data, where = apply_env(_read_yaml(Path(source)), env), f"config file {str(source)!r}"
    else:
        data, where = copy.deepcopy(dict(source)), "config"
    return validate_model(KVTierConfig, data, where)
