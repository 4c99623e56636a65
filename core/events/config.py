"""The ``events:`` section of the configuration (no optional dependency needed).

Example::

    events:
      endpoint: tcp://127.0.0.1:5557        # ZMQ PUB; binds loopback unless told otherwise
      replay_endpoint: tcp://127.0.0.1:5558 # optional ROUTER socket answering replays
      media: vllm-router                    # cpu -> host, file -> disk, others -> external
      medium: {nvme: disk}                  # per tier, by tier name
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"


class EventsConfig(BaseModel):
    """How kvtier reports chunks entering and leaving its tiers as vLLM KV events."""

    model_config = ConfigDict(extra="forbid")

    publisher: Literal["zmq", "none"] = "zmq"
    """``zmq``: kvtier's own ZMQ publisher (outside vLLM: transformers, shared tiers);
    ``none``: only collect them, for vLLM's KV-connector event API to publish (inside
    vLLM, where ``--kv-events-config`` configures vLLM's own publisher)."""
    endpoint: str = DEFAULT_ENDPOINT
    """ZMQ PUB endpoint to bind (``tcp://HOST:PORT``, ``ipc://PATH``); port 0 picks a
    free port. ``tcp://*:PORT`` listens on every interface: only when set here."""
    replay_endpoint: str | None = None
    """ZMQ ROUTER endpoint answering replay requests (a start sequence number, 8 bytes
    big-endian) with the buffered batches, ended by sequence -1."""
    topic: str | None = None
    """Topic frame of every message; default ``kv@<instance>@<model>``. ``""`` (the
    empty topic vLLM's own publisher sends) for vllm-router, which drops any other."""
    instance: str | None = None
    """This process's name in the default topic; default the host name (a pod name)."""
    buffer_steps: int = Field(default=10_000, gt=0)
    """Batches kept for replay."""
    hwm: int = Field(default=100_000, ge=0)
    """ZMQ send high-water mark of the PUB socket."""
    block_size: int | None = Field(default=None, gt=0)
    """Tokens per reported block; default ``chunk_tokens``. A divisor of
    ``chunk_tokens`` (e.g. vLLM's block size, which routers expect) splits each chunk
    into blocks of this size."""
    block_hashes: Literal["bytes", "int"] = "bytes"
    """``bytes``: the digests as they are (vLLM's default); ``int``: their first 8 bytes
    as an unsigned big-endian integer (vLLM's ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``)."""
    media: Literal["tier", "vllm-router"] = "tier"
    """``tier``: ``medium`` is the tier's name in lower case; ``vllm-router``: the names
    vllm-router's ``kv_aware`` policy credits: ``host`` for ``cpu://`` tiers, ``disk``
    for ``file://`` tiers, and for other tiers ``external`` with ``ownership`` set to
    the tier's URL (without credentials), which vllm-router reads as a shared pool."""
    medium: dict[str, str] = Field(default_factory=dict)
    """``medium`` per tier name, overriding ``media``."""
    ownership: dict[str, str] = Field(default_factory=dict)
    """``ownership`` (a shared pool's name) per tier name, overriding ``media``; an
    empty string means none."""
    journal_chunks: int = Field(default=16_384, gt=0)
    """Chunks whose token ids are remembered between a ``store`` or ``retrieve`` and the
    tier event that reports them (at most ``4 * chunk_tokens`` bytes each: 16 MiB for
    256-token chunks); a chunk a tier stores after its entry was forgotten (a late
    write-back, say) is counted as unreported."""

    @model_validator(mode="after")
    def _check(self) -> EventsConfig:
        for name, value in (("endpoint", self.endpoint), ("replay_endpoint", self.replay_endpoint)):
            if value is not None and not value.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(
                    f"events.{name} must be a ZMQ endpoint such as 'tcp://127.0.0.1:5557' "
                    f"or 'ipc:///run/kvtier.sock', got {value!r}"
                )
        same = self.replay_endpoint == self.endpoint and not self.endpoint.endswith(":0")
        if same:
            raise ValueError("events.replay_endpoint must differ from events.endpoint")
        return self
