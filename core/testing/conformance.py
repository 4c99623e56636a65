"""The backend conformance suite: the tests every kvtier storage backend must pass.

Modelled on zarr's ``StoreTests``: a backend's test module subclasses
:class:`BackendConformance`, says how to reach the backend, and pytest collects every
test of the suite for it. Tests are synchronous and drive the backend with
:func:`asyncio.run` (one event loop per test, the backend opened and closed inside
it), so the suite needs no asyncio plugin. Keys live in the ``NAMESPACE`` namespace
with random digests, so runs against a shared store never collide.

The tests live in one module per concern (``batches``, ``ranges``, ``lifetime``,
``capacity``, ``concurrency``, ``out_of_band``); the hooks and fixtures in ``base``;
the shared helpers in ``harness`` (re-exported here).
"""

from __future__ import annotations

from kvtier.core.testing.batches import BatchTests
from kvtier.core.testing.capacity import CapacityTests
from kvtier.core.testing.concurrency import ConcurrencyTests
from kvtier.core.testing.harness import (
    INVALID_KEYS,
    NAMESPACE,
    BackendHarness,
    assert_blob,
    collect,
    expect_error,
    require,
    require_capacity,
)
from kvtier.core.testing.lifetime import LifetimeTests
from kvtier.core.testing.out_of_band import OutOfBandTests
from kvtier.core.testing.ranges import RangeTests

__all__ = [
    "INVALID_KEYS",
    "NAMESPACE",
    "BackendConformance",
    "BackendHarness",
    "assert_blob",
    "collect",
    "expect_error",
    "require",
    "require_capacity",
]


class BackendConformance(
    BatchTests, RangeTests, LifetimeTests, CapacityTests, ConcurrencyTests, OutOfBandTests
):
    """Conformance tests for a kvtier storage backend; subclass it in a test module.

    Usage for a backend author::

        from kvtier.core.testing import BackendConformance

        class TestMyBackend(BackendConformance):
            url = "mybackend://127.0.0.1:1234/x"  # or override the `backend_url` fixture
            capacity = 64 << 20                   # for bounded backends
            options = {"eviction": "lfu"}

            def raw_write(self, backend, key, data):  # out of band: the store's own client
                ...
            def raw_read(self, backend, key):         # bytes, or None when absent
                ...
            # optional: `stop_server(self, url)` to test an unreachable server

    Fixtures ``backend_url``, ``backend_capacity`` and ``backend_options`` default to the
    class attributes; override them to use ``tmp_path`` or a server fixture. The backend
    is built with :meth:`create_backend` (by default
    :func:`kvtier.core.factory.build_backend`, so through the plugin registry). Tests
    that need a capability the backend's ``capabilities`` lack, or a hook the class does
    not override (``raw_write``, ``raw_read``, ``stop_server``), are skipped. Bounded
    backends need a capacity of at least 16 MiB so that the general tests never evict;
    the 64 MiB round trip (marked ``slow``) is skipped below 64 MiB.
    """
