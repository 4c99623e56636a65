"""Copy chunks from one store to another through the Backend API (``kvtier migrate``).

:func:`migrate` streams the keys of ``source`` (narrowed by a :class:`ChunkFilter`) in
batches through ``concurrency`` workers, using only ``iter_keys``, ``contains_many``,
``get_many``, ``put_many`` and ``delete_many``, so it works between any two backends,
third-party ones included. Per batch:

1. ``contains_many`` on the destination: chunks already there are skipped, so running
   an interrupted migration again copies only the rest.
2. ``get_many`` on the source. Each blob's framing, checksum and key are checked
   (:func:`~kvtier.core.blob.verify`): a corrupt or foreign blob is reported and
   never copied; a chunk gone since it was listed is a failure.
3. With ``recode``, the chunk is decoded and encoded again with that pipeline under the
   same key, dtype and shape. A blob whose codecs already are the pipeline's is copied
   unchanged, so nothing is quantised twice.
4. ``put_many`` with ``PutMode.CREATE`` (a chunk another writer stored meanwhile is
   kept), then every written chunk is read back: it must pass its checksum and equal
   what was written. One that does not is a failure and is deleted from the
   destination again, so a later run retries it.
5. ``verify`` also reads the chunks that were already present and compares them with
   the blob this migration would have written; a difference is a mismatch, reported
   and left in place.
6. ``delete_source`` deletes a source chunk only once the destination holds a verified
   copy: written and read back equal, or already present and compared equal (it
   compares present chunks as ``verify`` does).

Two blobs are equal when both pass their checksum and have the same length and the
same xxh3-64 checksum (which covers every other byte). Recoding is deterministic, so a
rerun with the same ``recode`` compares equal.

Memory does not grow with the store: keys are streamed, never collected; at most
``concurrency`` batches hold blobs at a time, each at most two per key (the source
blob and its recoded copy, or the blob read back).

``dry_run`` lists the source and asks the destination which chunks it has; it reads
no blob (except, with ``verify``, to compare present chunks) and writes and deletes
nothing. ``copied`` then counts the chunks a real run would copy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvtier.core import blob as fmt
from kvtier.core.backend import Backend, PutMode
from kvtier.core.buffers import Buffer
from kvtier.core.codecs import decode as decoding
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.errors import (
    BackendError,
    BackendUnavailableError,
    ChunkCorruptedError,
    ConfigError,
    KVTierError,
    quote,
)
from kvtier.core.keys import ChunkKey
from kvtier.core.migrate_report import MigrationReport, Outcome, Progress
from kvtier.core.selection import ALL_CHUNKS, ChunkFilter

__all__ = [
    "ChunkFilter",
    "MigrateOptions",
    "MigrationReport",
    "Outcome",
    "count_chunks",
    "migrate",
]


@dataclass(frozen=True)
class MigrateOptions:
    """How to migrate; see the module docstring for what each switch does."""

    select: ChunkFilter = ALL_CHUNKS
    recode: CodecPipeline | None = None
    batch_size: int = 8
    """Chunks per Backend call."""
    concurrency: int = 4
    """Batches in flight at once."""
    verify: bool = False
    dry_run: bool = False
    delete_source: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "concurrency"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {quote(value)}")


async def count_chunks(source: Backend, select: ChunkFilter = ALL_CHUNKS) -> int:
    """How many chunks of ``source`` ``select`` matches (one listing, nothing read)."""
    count = 0
    async for key in source.iter_keys(select.prefix):
        parsed = _parse(key)
        count += parsed is None or select.matches(parsed)
    return count


async def migrate(
    source: Backend,
    destination: Backend,
    options: MigrateOptions = MigrateOptions(),
    progress: Progress | None = None,
) -> MigrationReport:
    """Copy the selected chunks of ``source`` to ``destination`` (both open).

    Returns the report; raises :class:`BackendUnavailableError` if either store becomes
    unreachable (what was copied stays, a rerun resumes). Other backend errors fail the
    batch they hit and the migration goes on.
    """
    if source is destination:
        raise ConfigError("source and destination are the same backend")
    return await _Migration(source, destination, options, progress).run()


def _parse(key: str) -> ChunkKey | None:
    try:
        return ChunkKey.parse(key)
    except ConfigError:
        return None


@dataclass(frozen=True)
class _Identity:
    """What makes two valid blobs equal: length and stored checksum."""

    nbytes: int
    checksum: bytes

    @classmethod
    def of(cls, blob: Buffer) -> _Identity:
        return cls(blob.nbytes, bytes(blob.view[-8:]))


@dataclass(frozen=True)
class _Problem:
    outcome: Outcome
    reason: str


_Outcomes = dict[str, tuple[Outcome, str]]


class _Migration:
    def __init__(
        self,
        source: Backend,
        destination: Backend,
        options: MigrateOptions,
        progress: Progress | None,
    ) -> None:
        self.source = source
        self.destination = destination
        self.options = options
        self.progress = progress
        self.report = MigrationReport(dry_run=options.dry_run)
        self.compare_present = options.verify or (options.delete_source and not options.dry_run)

    async def run(self) -> MigrationReport:
        start = time.perf_counter()
        queue: asyncio.Queue[list[str] | None] = asyncio.Queue(self.options.concurrency)
        tasks = [asyncio.ensure_future(self._produce(queue))]
        tasks += [asyncio.ensure_future(self._work(queue)) for _ in range(self.options.concurrency)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.report.seconds = time.perf_counter() - start
        return self.report

    async def _produce(self, queue: asyncio.Queue[list[str] | None]) -> None:
        batch: list[str] = []
        async for key in self.source.iter_keys(self.options.select.prefix):
            parsed = _parse(key)
            if parsed is None:
                self.report.record(key[:200], Outcome.FAILED, "the source listed an invalid key")
                continue
            if not self.options.select.matches(parsed):
                continue
            batch.append(key)
            if len(batch) == self.options.batch_size:
                await queue.put(batch)
                batch = []
        if batch:
            await queue.put(batch)
        for _ in range(self.options.concurrency):
            await queue.put(None)

    async def _work(self, queue: asyncio.Queue[list[str] | None]) -> None:
        while (keys := await queue.get()) is not None:
            outcomes: _Outcomes = {}
            try:
                await self._batch(keys, outcomes)
            except BackendUnavailableError:
                raise
            except BackendError as exc:
                for key in keys:
                    outcomes.setdefault(key, (Outcome.FAILED, str(exc)))
            for key, (outcome, reason) in outcomes.items():
                self.report.record(key, outcome, reason)
            if self.progress is not None:
                self.progress(self.report)

    async def _batch(self, keys: list[str], out: _Outcomes) -> None:
        present = await self.destination.contains_many(keys)
        missing = [key for key, there in zip(keys, present, strict=True) if not there]
        compare = [key for key, there in zip(keys, present, strict=True) if there]
        if not self.compare_present:
            out.update((key, (Outcome.SKIPPED, "")) for key in compare)
            compare = []
        if self.options.dry_run:
            out.update((key, (Outcome.COPIED, "")) for key in missing)
            missing = []
        reads = missing + compare
        if not reads:
            return
        expected, written = await self._read_and_write(reads, missing, out)
        stored_elsewhere = set(missing) - set(written) - set(out)
        compare += [key for key in missing if key in stored_elsewhere]
        verified = await self._check(written, [k for k in compare if k in expected], expected, out)
        if self.options.delete_source and not self.options.dry_run and verified:
            deleted = await self.source.delete_many(verified)
            self.report.deleted += sum(deleted)

    async def _read_and_write(
        self, reads: list[str], missing: list[str], out: _Outcomes
    ) -> tuple[dict[str, _Identity], list[str]]:
        """Read ``reads`` from the source and write those in ``missing``; returns the
        identity of each valid blob and the keys written."""
        blobs = await self.source.get_many(reads)
        owned: list[Buffer] = [blob for blob in blobs if blob is not None]
        try:
            self.report.bytes_read += sum(blob.nbytes for blob in owned)
            prepared = await asyncio.to_thread(self._prepare_all, reads, blobs)
            ready: dict[str, Buffer] = {}
            for key, blob, item in zip(reads, blobs, prepared, strict=True):
                if isinstance(item, _Problem):
                    out[key] = (item.outcome, item.reason)
                    continue
                ready[key] = item
                if item is not blob:  # a recoded copy
                    owned.append(item)
            expected = {key: _Identity.of(blob) for key, blob in ready.items()}
            items = [(key, ready[key]) for key in missing if key in ready]
            stored = await self.destination.put_many(items, PutMode.CREATE) if items else []
        finally:
            for blob in owned:
                blob.release()
        written = [key for (key, _), ok in zip(items, stored, strict=True) if ok]
        self.report.bytes_written += sum(expected[key].nbytes for key in written)
        refused = [key for (key, _), ok in zip(items, stored, strict=True) if not ok]
        if refused:  # present now (another writer): compared by the caller; else rejected
            there = await self.destination.contains_many(refused)
            for key, found in zip(refused, there, strict=True):
                if not found:
                    out[key] = (
                        Outcome.FAILED,
                        "the destination refused it (full, or larger than its capacity)",
                    )
        return expected, written

    def _prepare_all(
        self, keys: Sequence[str], blobs: Sequence[Buffer | None]
    ) -> list[Buffer | _Problem]:
        """Validate each source blob and recode it if asked; runs in a worker thread."""
        return [self._prepare(key, blob) for key, blob in zip(keys, blobs, strict=True)]

    def _prepare(self, key: str, blob: Buffer | None) -> Buffer | _Problem:
        """The blob to write for ``key``: the source blob itself, a recoded copy the
        caller owns, or the problem that stops the chunk."""
        if blob is None:
            return _Problem(Outcome.FAILED, "gone from the source since it was listed")
        pipeline = self.options.recode
        try:
            header = fmt.verify(blob)
        except ChunkCorruptedError as exc:
            return _Problem(Outcome.CORRUPT, str(exc))
        if header.key != key:
            return _Problem(Outcome.CORRUPT, f"foreign blob: it holds key {header.key!r:.120}")
        if pipeline is None or header.pipeline == pipeline.name:
            return blob
        if header.signed:
            return _Problem(
                Outcome.FAILED,
                "the blob is signed (integrity keys) and recoding would drop its signature; "
                "migrate it without --recode",
            )
        source = fmt.Blob(blob, header, sealed=True)  # borrowed: the caller releases it
        try:
            return decoding.recode(
                source, pipeline, self.source.registry, self.destination.pool
            ).buf
        except ChunkCorruptedError as exc:
            return _Problem(Outcome.CORRUPT, str(exc))
        except KVTierError as exc:
            return _Problem(Outcome.FAILED, f"recoding to {pipeline.name} failed: {exc}")

    async def _check(
        self,
        written: list[str],
        compare: list[str],
        expected: dict[str, _Identity],
        out: _Outcomes,
    ) -> list[str]:
        """Read ``written`` and ``compare`` back from the destination and record their
        outcomes; returns the keys whose destination copy is verified."""
        keys = written + compare
        if not keys:
            return []
        blobs = await self.destination.get_many(keys)
        verified, undo = [], []
        try:
            problems = await asyncio.to_thread(
                lambda: [_difference(k, b, expected[k]) for k, b in zip(keys, blobs, strict=True)]
            )
            for i, (key, problem) in enumerate(zip(keys, problems, strict=True)):
                if i < len(written):
                    outcome = Outcome.COPIED if problem is None else Outcome.FAILED
                    if problem is not None:
                        problem = f"read back from the destination: {problem}"
                        undo.append(key)
                else:
                    outcome = Outcome.SKIPPED if problem is None else Outcome.MISMATCHED
                out[key] = (outcome, problem or "")
                if problem is None:
                    verified.append(key)
        finally:
            for blob in blobs:
                if blob is not None:
                    blob.release()
        if undo:
            await self.destination.delete_many(undo)
        return verified


def _difference(key: str, blob: Buffer | None, expected: _Identity) -> str | None:
    """Why the destination's ``blob`` is not the ``expected`` one; ``None`` if it is."""
    if blob is None:
        return "missing at the destination"
    try:
        header = fmt.verify(blob)
    except ChunkCorruptedError as exc:
        return f"corrupt at the destination: {exc}"
    if header.key != key:
        return f"the destination holds a foreign blob (key {header.key!r:.120})"
    if _Identity.of(blob) != expected:
        return "the destination's blob differs from the source's"
    return None
