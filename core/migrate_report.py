"""What a migration did: an :class:`Outcome` per chunk, counted in a
:class:`MigrationReport` (see :mod:`kvtier.core.migrate`)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_PROBLEMS = 50
"""Problems (corrupt, failed, mismatched chunks) a report keeps by key; more are counted."""


class Outcome(str, enum.Enum):
    """What happened to one chunk."""

    COPIED = "copied"
    SKIPPED = "skipped"
    MISMATCHED = "mismatched"
    CORRUPT = "corrupt"
    FAILED = "failed"


@dataclass
class MigrationReport:
    """Counts per :class:`Outcome`, bytes moved, and the first problems by key."""

    dry_run: bool = False
    copied: int = 0
    skipped: int = 0
    mismatched: int = 0
    corrupt: int = 0
    failed: int = 0
    deleted: int = 0
    """Source chunks deleted (``delete_source``)."""
    bytes_read: int = 0
    """Bytes of source blobs read."""
    bytes_written: int = 0
    seconds: float = 0.0
    problems: list[tuple[Outcome, str, str]] = field(default_factory=list)
    """``(outcome, key, reason)`` of the first :data:`MAX_PROBLEMS` problem chunks."""

    @property
    def processed(self) -> int:
        """Chunks with an outcome so far."""
        return self.copied + self.skipped + self.mismatched + self.corrupt + self.failed

    @property
    def ok(self) -> bool:
        """No chunk failed and none mismatched (corrupt source chunks are not errors:
        they are unusable wherever they are)."""
        return not (self.failed or self.mismatched)

    def record(self, key: str, outcome: Outcome, reason: str = "") -> None:
        setattr(self, outcome.value, getattr(self, outcome.value) + 1)
        if outcome not in (Outcome.COPIED, Outcome.SKIPPED) and len(self.problems) < MAX_PROBLEMS:
            self.problems.append((outcome, key, reason))


Progress = Callable[[MigrationReport], None]
"""Called with the running report after every batch."""
