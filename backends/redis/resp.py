"""RESP2 on the fast path: commands packed without copying their values, and replies
parsed incrementally as the socket delivers them, large bulk strings straight into
pool buffers.

Only redis-py's public exception classes are used here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

import redis.exceptions as rex

from kvtier.core.buffers import Buffer, BufferPool

Arg: TypeAlias = "bytes | str | int | memoryview"
Command: TypeAlias = Sequence[Arg]
Reply: TypeAlias = Any
"""bytes, a pooled :class:`Buffer`, an int, None, a list of replies, or a ResponseError."""

POOLED_MIN = 64 << 10
"""Bulk replies from this size on are received into pool buffers."""
SCRATCH = 256 << 10
"""Bytes received at once outside pooled bulk replies; also the longest reply line."""
INLINE_MAX = 16 << 10
"""Values from this size on are sent as they are, never copied into the command."""

_ERRORS: dict[str, type[rex.RedisError]] = {
    "OOM": rex.OutOfMemoryError,
    "NOPERM": rex.NoPermissionError,
    "WRONGPASS": rex.AuthenticationError,
    "NOAUTH": rex.AuthenticationError,
    "NOSCRIPT": rex.NoScriptError,
    "EXECABORT": rex.ExecAbortError,
    "LOADING": rex.BusyLoadingError,
    "READONLY": rex.ReadOnlyError,
    "MASTERDOWN": rex.MasterDownError,
    "MOVED": rex.MovedError,
    "ASK": rex.AskError,
    "TRYAGAIN": rex.TryAgainError,
    "CLUSTERDOWN": rex.ClusterDownError,
    "CROSSSLOT": rex.ClusterCrossSlotError,
}
"""Error codes redis-py's parsers map to their own classes (the message then drops the
code, as theirs do); any other error reply is a plain ResponseError."""


def error_reply(line: str) -> rex.RedisError:
    """The exception redis-py's parser would give for the error reply ``line``."""
    code, _, rest = line.partition(" ")
    cls = _ERRORS.get(code)
    return rex.ResponseError(line) if cls is None else cls(rest)


def pack(commands: Iterable[Command]) -> list[bytes | memoryview]:
    """``commands`` as RESP arrays of bulk strings: small pieces joined, each value of
    ``INLINE_MAX`` bytes or more a memoryview of the caller's memory."""
    out: list[bytes | memoryview] = []
    head = bytearray()
    for args in commands:
        head += b"*%d\r\n" % len(args)
        for arg in args:
            if type(arg) is str:
                arg = arg.encode()
            elif type(arg) is int:
                arg = b"%d" % arg
            elif type(arg) is memoryview:
                if arg.nbytes >= INLINE_MAX:
                    head += b"$%d\r\n" % arg.nbytes
                    out.append(bytes(head))
                    out.append(arg)
                    head[:] = b"\r\n"
                    continue
                arg = arg.tobytes()
            elif type(arg) is not bytes:
                raise TypeError(f"cannot send a {type(arg).__name__} to the server")
            head += b"$%d\r\n" % len(arg)
            head += arg
            head += b"\r\n"
    out.append(bytes(head))
    return out


class ReplyParser:
    """Parses the replies to one pipeline of commands as their bytes arrive.

    Feed it by receiving into :meth:`buffer` and calling :meth:`received`; a bulk
    string of ``POOLED_MIN`` bytes or more is received straight into a buffer leased
    from ``pool`` (the kernel's copy is the only one). Replies owned by the parser
    (pooled buffers) pass to the caller with :meth:`take`, or back to the pool with
    :meth:`abandon`.
    """

    def __init__(self, pool: BufferPool) -> None:
        self.pool = pool
        self.scratch = bytearray(SCRATCH)
        self.view = memoryview(self.scratch)
        self.held = 0
        """Unparsed bytes at the start of ``scratch``."""
        self.left = 0
        """Top-level replies still to come."""
        self.crlf = False
        """The CRLF ending a pooled bulk string is still to come."""
        self.replies: list[Reply] = []
        self.arrays: list[list[Any]] = []
        """Arrays being filled, innermost last: ``[items, items still to come]``."""
        self.big: Buffer | None = None
        """The pooled bulk string being received."""
        self.big_filled = 0
        self.big_want = 0
        """Bytes of ``big.block`` to receive: its value, plus its CRLF where it fits."""

    def start(self, count: int) -> None:
        """Expect the replies to ``count`` commands."""
        self.left = count

    def buffer(self) -> memoryview:
        """Where the next bytes from the socket go."""
        big = self.big
        if big is None:
            return self.view[self.held :]
        return big.block[self.big_filled : self.big_want]

    def received(self, nbytes: int) -> bool:
        """``nbytes`` landed in :meth:`buffer`; ``True`` once every reply is complete.
        Raises ``InvalidResponse`` for bytes that are not RESP2."""
        big = self.big
        if big is None:
            return self._parse(self.held + nbytes)
        self.big_filled += nbytes
        if self.big_filled < self.big_want:
            return False
        self.big = None
        if self.big_want > big.nbytes:  # its CRLF came with it
            if bytes(big.block[big.nbytes : self.big_want]) != b"\r\n":
                big.release()
                raise rex.InvalidResponse("a bulk string does not end with CRLF")
        else:
            self.crlf = True
        self._add(big)
        return self._parse(0)

    def take(self) -> list[Reply]:
        """The replies, now the caller's (it releases the buffers among them)."""
        replies, self.replies = self.replies, []
        return replies

    def abandon(self) -> None:
        """Drop a pipeline cut short (its connection is closed): release every buffer."""
        big, self.big = self.big, None
        if big is not None:
            big.release()
        release_all(self.replies)
        release_all(self.arrays)
        self.replies, self.arrays = [], []
        self.held = self.left = 0
        self.crlf = False

    def _add(self, value: Reply) -> None:
        arrays = self.arrays
        while arrays:
            frame = arrays[-1]
            frame[0].append(value)
            frame[1] -= 1
            if frame[1]:
                return
            value = arrays.pop()[0]
        self.replies.append(value)
        self.left -= 1

    def _parse(self, end: int) -> bool:
        data, pos = self.scratch, 0
        while True:
            if self.crlf:
                if end - pos < 2:
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise rex.InvalidResponse("a bulk string does not end with CRLF")
                pos += 2
                self.crlf = False
            if not self.left:
                if pos != end:
                    raise rex.InvalidResponse("the server sent more replies than commands")
                self.held = 0
                return True
            eol = data.find(b"\r\n", pos, end)
            if eol < 0:
                break
            kind, line = data[pos], data[pos + 1 : eol]
            start = eol + 2
            value: Reply
            if kind == 0x24:  # $ bulk string
                length = int(line)
                if length < 0:
                    value = None
                elif length < POOLED_MIN:
                    if end < start + length + 2:
                        break
                    value = self.view[start : start + length].tobytes()
                    if data[start + length : start + length + 2] != b"\r\n":
                        raise rex.InvalidResponse("a bulk string does not end with CRLF")
                    start += length + 2
                else:
                    buf = self.pool.acquire(length)
                    have = min(length, end - start)
                    buf.view[:have] = self.view[start : start + have]
                    if have < length:
                        self.big, self.big_filled, self.held = buf, have, 0
                        self.big_want = length + 2 if buf.capacity >= length + 2 else length
                        return False
                    value, start, self.crlf = buf, start + length, True
            elif kind == 0x3A:  # : integer
                value = int(line)
            elif kind == 0x2B:  # + simple string
                value = bytes(line)
            elif kind == 0x2D:  # - error
                value = error_reply(line.decode("utf-8", "replace"))
            elif kind == 0x2A:  # * array
                count = int(line)
                pos = start
                if count > 0:
                    self.arrays.append([[], count])
                    continue
                value = [] if count == 0 else None
            else:
                raise rex.InvalidResponse(f"unknown reply type {bytes([kind])!r}")
            pos = start
            self._add(value)
        tail = end - pos
        if tail >= len(data):
            raise rex.InvalidResponse(f"a reply line longer than {len(data)} bytes")
        if pos:
            data[:tail] = data[pos:end]
        self.held = tail
        return False


def release_all(replies: Iterable[Reply]) -> None:
    """Release every pooled buffer in (nested) replies."""
    for reply in replies:
        if isinstance(reply, Buffer):
            reply.release()
        elif isinstance(reply, list):
            release_all(reply)
