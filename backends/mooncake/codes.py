"""Mooncake's result codes, what kvtier makes of them, and the retry of busy keys.

The client's batch calls return one code per key (``mooncake-store/include/types.h``):
``0`` or a byte count for success, a negative error code otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from kvtier.core.errors import BackendUnavailableError

BUFFER_OVERFLOW = -10
NO_AVAILABLE_HANDLE = -200
INVALID_PARAMS = -600
"""Also what ``batch_get_into`` returns when the buffer is smaller than the object, and
``batch_put_session_start`` when this client already holds a session for the key."""
REPLICA_IS_NOT_READY = -703
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
OBJECT_HAS_LEASE = -706
REPLICA_NOT_FOUND = -710
REPLICA_IS_GONE = -712
OBJECT_REPLICA_BUSY = -714
RPC_FAIL = -900
RPC_TIMEOUT = -901

UNREACHABLE = frozenset({RPC_FAIL, RPC_TIMEOUT})
"""The master did not answer: an outage of the whole batch."""
ABSENT = frozenset({OBJECT_NOT_FOUND, REPLICA_IS_NOT_READY, REPLICA_NOT_FOUND, REPLICA_IS_GONE})
"""A read of a key that is not (or not yet, or no longer) stored."""
FULL = frozenset({NO_AVAILABLE_HANDLE, BUFFER_OVERFLOW})
"""The store has no room for the object."""
BUSY = frozenset({REPLICA_IS_NOT_READY, OBJECT_HAS_LEASE, OBJECT_REPLICA_BUSY})
"""A write or remove that another operation on the key blocks for a moment."""
HEALTH_MASTER_UNREACHABLE = 2
"""What ``health_check()`` returns once the client's heartbeat lost the master."""

BUSY_RETRIES = 5
BUSY_BACKOFF_S = 0.01


def check_reachable(what: str, codes: Sequence[int]) -> None:
    """Raise :class:`BackendUnavailableError` if a code says the master did not answer."""
    for code in codes:
        if code in UNREACHABLE:
            raise BackendUnavailableError(
                f"mooncake: {what} failed: master unreachable (code {code})"
            )


def retry_busy(call: Callable[[list[int]], list[int]], count: int) -> list[int]:
    """Codes of ``call(indices)`` for ``range(count)``, calling again (with a short
    backoff) for indices whose code says another operation holds the key."""
    codes = [0] * count
    todo = list(range(count))
    for attempt in range(BUSY_RETRIES + 1):
        for i, code in zip(todo, call(todo), strict=True):
            codes[i] = code
        todo = [i for i in todo if codes[i] in BUSY]
        if not todo or attempt == BUSY_RETRIES:
            break
        time.sleep(BUSY_BACKOFF_S * (attempt + 1))
    return codes
