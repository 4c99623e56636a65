"""The hooks and fixtures of :class:`~kvtier.core.testing.BackendConformance`.

The suite's test groups (``batches``, ``ranges``, ``lifetime``, ``capacity``,
``concurrency``, ``out_of_band``) derive from :class:`SuiteBase`;
``BackendConformance`` joins them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import pytest

from kvtier.core.backend import Backend
from kvtier.core.buffers import BufferPool
from kvtier.core.factory import build_backend
from kvtier.core.testing.harness import BackendHarness


class SuiteBase:
    """How the suite reaches the backend under test; a test class overrides what it needs."""

    url: ClassVar[str | None] = None
    capacity: ClassVar[int | None] = None
    options: ClassVar[Mapping[str, Any]] = {}

    # -- hooks ---------------------------------------------------------------------------

    def create_backend(
        self, url: str, *, capacity: int | None, options: Mapping[str, Any], pool: BufferPool
    ) -> Backend:
        """Build the (unopened) backend under test."""
        return build_backend(url, capacity=capacity, options=options, pool=pool)

    def stop_server(self, url: str) -> None:
        """Make the store at ``url`` unreachable (e.g. terminate its server process).

        Override it to enable ``test_stopped_server_is_unavailable``; the server it
        stops must be that test's own (a function-scoped server fixture).
        """
        raise NotImplementedError

    def raw_write(self, backend: Backend, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` without going through ``backend``'s put path.

        Use the store's own client or files (for an in-process store, its internal
        mapping), laid out exactly as ``backend`` lays out its values. With
        :meth:`raw_read` it lets the suite check writes and reads independently, so a
        backend that mangles bytes on the way in and unmangles them on the way out
        fails. Tests that need it are skipped when it is not overridden (as in
        ``kvtier check-backend`` against a live store).
        """
        raise NotImplementedError

    def raw_read(self, backend: Backend, key: str) -> bytes | None:
        """The bytes stored under ``key`` (``None`` if absent), read without ``backend``'s
        get path; see :meth:`raw_write`."""
        raise NotImplementedError

    def require_hooks(self, *names: str, why: str = "") -> None:
        """Skip the test unless the test class overrides each hook in ``names``."""
        missing = [name for name in names if getattr(type(self), name) is getattr(SuiteBase, name)]
        if missing:
            pytest.skip(
                f"the test class {type(self).__name__} does not override "
                f"{' and '.join(missing)}{why}"
            )

    # -- fixtures ------------------------------------------------------------------------

    @pytest.fixture
    def backend_url(self) -> str:
        """URL of the backend under test; defaults to the ``url`` class attribute."""
        if self.url is None:
            pytest.fail(f"{type(self).__name__}: set `url = ...` or override `backend_url`")
        return self.url

    @pytest.fixture
    def backend_capacity(self) -> int | None:
        """Byte capacity passed to the backend; defaults to ``capacity``."""
        return self.capacity

    @pytest.fixture
    def backend_options(self) -> Mapping[str, Any]:
        """Backend options (validated by the spec's model); defaults to ``options``."""
        return dict(self.options)

    @pytest.fixture
    def backend_harness(
        self, backend_url: str, backend_capacity: int | None, backend_options: Mapping[str, Any]
    ) -> BackendHarness:
        """The test's harness: builds the backend, keys and blobs."""
        return BackendHarness(self, backend_url, backend_capacity, backend_options)
