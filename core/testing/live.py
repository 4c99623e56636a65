"""The conformance suite against the backend named on pytest's command line.

Run by ``kvtier check-backend URL``, or from a test module of your own that imports
:class:`TestLiveBackend` (``from kvtier.core.testing.live import TestLiveBackend``)::

    pytest test_mine.py --kvtier-backend-url URL \\
        [--kvtier-backend-capacity 64MiB] [--kvtier-backend-option KEY=VALUE ...]

(``pytest --pyargs kvtier.core.testing.live`` works too, but pytest then imports this
module as ``core.testing.live`` with the folder above ``core/`` on ``sys.path``.)

Every test is skipped when ``--kvtier-backend-url`` is not given. The suite writes and
deletes keys in its own ``conformance-*`` namespace; use a store (or prefix) set aside
for testing, since bounded backends evict other data while the suite fills them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from kvtier.core.testing.conformance import BackendConformance
from kvtier.core.testing.plugin import LiveTarget


class TestLiveBackend(BackendConformance):
    """:class:`BackendConformance` for ``--kvtier-backend-url`` and its options."""

    @pytest.fixture
    def backend_url(self, kvtier_live_target: LiveTarget) -> str:
        return kvtier_live_target.url

    @pytest.fixture
    def backend_capacity(self, kvtier_live_target: LiveTarget) -> int | None:
        return kvtier_live_target.capacity

    @pytest.fixture
    def backend_options(self, kvtier_live_target: LiveTarget) -> Mapping[str, Any]:
        return kvtier_live_target.options
