"""The ``file`` tier: one file per chunk in a local folder (disk, NVMe).

URL: ``file:///absolute/path``. Layout::

    <root>/<first 2 hex digits of the key's digest>/<key>   one file per chunk
    <root>/.tmp/<pid>-<random>.tmp                           writes in progress

Guarantees:

* Atomic writes: a blob goes to a temp file that is then renamed into place
  (``OVERWRITE``) or renamed only if the key is absent (``CREATE``:
  ``RENAME_NOREPLACE``, or a hard link where the filesystem lacks it), so readers,
  crashes and cancelled writes see a key absent or complete, never partial.
  ``CREATE`` of a key this process knows costs one ``stat`` and writes nothing when
  the file is there; of an unknown key, no more syscalls than ``OVERWRITE``.
* Persistence: ``open()`` rebuilds the index from the files (sizes from ``stat``,
  eviction order from the access and modification times this tier sets on every
  write and hit), so the cache survives restarts. Temp files of dead writers are
  removed; other entries are ignored and counted as ``foreign_files``, never deleted
  (except entries of the wrong kind under the tier's own names: see below).
* Capacity (required): before each write, victims chosen by the eviction policy are
  deleted until the blob fits, counting writes in flight (a write waits while those
  of other threads hold the room it needs), so a process alone never makes the
  folder exceed ``capacity`` (several: see below). A blob larger than ``capacity``
  is rejected. A folder found over capacity at ``open()`` is trimmed.
* Byte store: blobs are returned exactly as stored, without parsing them. The tier
  chain checks integrity and deletes corrupt keys through ``delete_many``.
* Hostile entries: below the root nothing follows a link. Shard folders and ``.tmp``
  are opened relative to a descriptor of the root (``O_DIRECTORY | O_NOFOLLOW``), and
  chunk files relative to their shard's, non-blocking; so a link planted in the folder
  never leads a read, write or delete outside it, and a FIFO never blocks a thread
  (nor ``close()``). Only regular files are chunks: a link, FIFO, socket or device
  node under a chunk's name is a miss and is removed (the name only, never a link's
  target; counted as ``odd_entries_removed``) when a read, ``contains_many`` or
  ``CREATE`` meets it, like any malformed entry, so that ``CREATE`` can store the key
  again (rescans only count it as foreign); a
  folder there is a miss left alone (it may hold anything) and its key is not
  stored. A non-folder where a shard folder or ``.tmp`` belongs is replaced by a
  folder on the next write. (Links in the root's own path are followed: the root is
  the operator's choice.)
* A deleted folder: reads are misses and the index forgets every key; the next write
  makes the folder again (and ``.tmp``, and its shard), as ``open()`` does. A folder
  that another process made again, or that replaced this one, is followed at this
  process's next miss (through the link count of its kept folder descriptors, which
  ext4, xfs, btrfs and tmpfs set to 0 on deletion) or its next write there. Only a
  root that is not a folder and cannot be made one (a file in its place, no access)
  is an outage (``BackendUnavailableError``).
* Read-only (``read_only: true``): ``open()`` makes nothing and a missing folder is a
  :class:`~kvtier.core.errors.ConfigError` naming it; nothing is evicted, removed or
  touched (not even access times); ``put_many``/``delete_many`` raise ``ConfigError``.
* Parallel I/O: the chunks of a batch are read and written by up to ``threads``
  worker threads at once (default 4), which also bound the tier's I/O across
  batches; among the chunks of one batch, eviction order is the order their writes
  ended. The event loop never makes a syscall and never waits for a lock held across
  one (see :mod:`kvtier.backends.file.index`).

Several processes may share one folder. Each keeps its own index and policy:

* A key missing from a process's index is looked up on disk by ``get_many`` and
  ``contains_many`` and adopted into the index if found; an indexed key whose file
  another process deleted is a miss and leaves the index. ``contains_many`` answers
  indexed keys from memory, so it may report a chunk another process removed since.
* Capacity holds across processes, within a bound. Each process evicts from the
  chunks it knows: those found at ``open()``, written or adopted by it. Before a
  write, once ``rescan_interval`` seconds (default 2) passed since its last rescan,
  it lists the folder again, adopts the chunks other processes wrote (oldest first,
  by file time), forgets those they deleted and evicts down to ``capacity``, telling
  its eviction listener. So after a write by any process the folder holds at most
  ``capacity`` plus what other processes wrote since that process's last rescan
  began (within one ``rescan_interval`` plus one scan and one chunk write), plus
  their temp files in flight. The excess goes at the next rescanning write; a folder
  nobody writes to does not grow. Give every process the same ``capacity`` (the
  largest applies). Rescans that race may evict a little more than needed.
* A rescan lists names and ``stat``-s only files the process does not know: about
  2 us per file (40 ms for 20k files, 0.2 s for 100k, on a warm local disk). A
  known key's size is not read again (equal keys hold equal chunks); a key another
  process rewrote with another size is counted anew when read. Raise
  ``rescan_interval`` for huge folders; ``0`` turns rescans off, and then N
  processes writing different keys can fill up to N x ``capacity``.
* A temp file is removed only when no process holds its ``flock`` (a writer holds it
  until the rename) or when it is over an hour old: this works across processes and
  pid namespaces of one host. On network filesystems it relies on their lock support.
  An entry under a temp file's name that is not a regular file is nobody's write:
  removed at once.

Modules: :mod:`~kvtier.backends.file.options` (URL and options),
:mod:`~kvtier.backends.file.folder` (layout, folder descriptors, entries by name),
:mod:`~kvtier.backends.file.listing` (listing the folder, stale temp files),
:mod:`~kvtier.backends.file.index` (the index, capacity and rescans),
:mod:`~kvtier.backends.file.chunkio` (the I/O of one chunk),
:mod:`~kvtier.backends.file.batches` (batches cut over the threads),
:mod:`~kvtier.backends.file.batchio` (the blocking work of a batch, in the threads),
:mod:`~kvtier.backends.file.backend` (the backend: its hooks on the event loop).
"""

from __future__ import annotations

from kvtier.backends.file.backend import FileBackend
from kvtier.backends.file.listing import TEMP_GRACE_S
from kvtier.backends.file.options import FileOptions, root_from_url
from kvtier.core.hookspecs import hookimpl
from kvtier.core.specs import BackendSpec

__all__ = ["TEMP_GRACE_S", "FileBackend", "FileOptions", "root_from_url"]


@hookimpl
def kvtier_backends() -> list[BackendSpec]:
    return [
        BackendSpec(
            name="file",
            schemes=("file",),
            cls=FileBackend,
            options=FileOptions,
            description="one file per chunk in a local folder (disk, NVMe)",
        )
    ]
