"""The naming scheme of a ``vineyard`` tier: which vineyardd names mean what.

Vineyard cannot name a blob, only an object; each chunk is an object holding one blob
(:mod:`~kvtier.backends.vineyard.objects`). With ``P`` the tier's ``key_prefix``::

    P k/<key>               the chunk stored under <key>. Named only once its blob is
                            sealed and its object persisted, so a reader never sees a
                            half-written chunk; put_name replaces a name atomically.
    P pin/<object>/<holder> a process holds a zero-copy view of <object>: it is not freed
                            while such a name exists (:mod:`~kvtier.backends.vineyard.leases`)
    P gc/<object>           <object> was deleted or replaced: freed once it has no pins

``<object>`` is vineyard's object ID in hex (IDs begin with their creation time in
milliseconds: sorting them sorts by age). ``<holder>`` names one backend instance:
``<pid namespace>.<pid>.<process start time>.<random>``, so a sweep on the same host can
tell whether its process is still alive.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass

from kvtier.core.keys import is_valid_key


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").partition("[")[2].rstrip("]") or "0"
    except OSError:
        return "0"


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks after boot), ``None`` if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rpartition(b")")[2].split()[19].decode()


def new_holder() -> str:
    """A holder name for this process: unique, and checkable by :func:`holder_alive`."""
    pid = os.getpid()
    return f"{_pid_namespace()}.{pid}.{_start_time(pid) or 0}.{secrets.token_hex(4)}"


def holder_alive(holder: str) -> bool | None:
    """Whether the process of ``holder`` still runs: ``None`` when this process cannot
    tell (another host's or container's process)."""
    namespace, pid, started, _ = [*holder.split("."), "", "", ""][:4]
    if namespace != _pid_namespace() or not pid.isdigit():
        return None
    return _start_time(int(pid)) == started


def object_hex(object_id: int) -> str:
    return f"{object_id:016x}"


@dataclass(frozen=True)
class Names:
    """Names under one ``key_prefix`` (which :class:`VineyardOptions` keeps free of
    wildcard characters)."""

    prefix: str

    def key(self, key: str) -> str:
        return f"{self.prefix}k/{key}"

    def keys_pattern(self, key_prefix: str = "") -> str:
        """A wildcard pattern (``fnmatch``) for the names of keys starting with ``key_prefix``."""
        return f"{self.prefix}k/{_glob_escape(key_prefix)}*"

    def key_of(self, name: str) -> str | None:
        """The chunk key a listed name stands for, ``None`` for other names."""
        key = name[len(self.prefix) + 2 :]
        head = name[: len(self.prefix) + 2]
        return key if head == f"{self.prefix}k/" and is_valid_key(key) else None

    def kept(self, key: str) -> str:
        """The name saying chunk ``key`` is pinned (kept: never evicted nor expired)."""
        return f"{self.prefix}keep/{key}"

    def kept_pattern(self) -> str:
        return f"{self.prefix}keep/*"

    def kept_key(self, name: str) -> str | None:
        """The chunk key a listed keep name stands for."""
        head = f"{self.prefix}keep/"
        key = name[len(head) :]
        return key if name.startswith(head) and is_valid_key(key) else None

    def pin(self, object_id: int, holder: str) -> str:
        return f"{self.prefix}pin/{object_hex(object_id)}/{holder}"

    def pins_pattern(self, object_id: int | None = None) -> str:
        """The pins of one object, or of every object."""
        return f"{self.prefix}pin/{'*' if object_id is None else object_hex(object_id)}/*"

    def parse_pin(self, name: str) -> tuple[int, str] | None:
        """``(object, holder)`` of a pin name."""
        rest = name[len(self.prefix) :]
        match = _PIN_RE.fullmatch(rest) if name.startswith(self.prefix) else None
        return None if match is None else (int(match[1], 16), match[2])

    def gc(self, object_id: int) -> str:
        return f"{self.prefix}gc/{object_hex(object_id)}"

    def gc_pattern(self) -> str:
        return f"{self.prefix}gc/*"

    def parse_gc(self, name: str) -> int | None:
        rest = name[len(self.prefix) :]
        match = _GC_RE.fullmatch(rest) if name.startswith(self.prefix) else None
        return None if match is None else int(match[1], 16)


_PIN_RE = re.compile(r"pin/([0-9a-f]{16})/(.+)")
_GC_RE = re.compile(r"gc/([0-9a-f]{16})")
_GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")


def _glob_escape(text: str) -> str:
    return _GLOB_SPECIAL.sub(r"\\\1", text)
