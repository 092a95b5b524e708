"""The embedded file log: segment files in a directory on local disk.

Layout of ``file:PATH``::

    PATH/00000000000000000000.log   segments, named by the number of their first record
    PATH/log-id                     the log's identity, written when the log is created
    PATH/groups/<group>.json        committed position of each consumer group
    PATH/groups/<group>.lock        held (flock) by the one reader of that group
    PATH/meta/<name>.json           small documents (capture checkpoints, apply status)
    PATH/dead-letter.jsonl          records apply could not process, and damaged log stretches
    PATH/writer.lock                held (flock) by the one writer

Records are framed as described in ``segment.py``. ``flush`` writes and fsyncs.

Damage. Only the tail of the last segment can be torn by a crash (a record half-written): the next
writer cuts the bytes after the last valid record there, and nothing else. A damaged stretch
anywhere else (a failed CRC, a flipped length) is left where it is: the writer appends after the
last valid record, the reader dead-letters the stretch (its segment file, real byte offset and
bytes), records a one-line reason in ``damaged`` and resynchronises on the next valid record.

Numbering. Offsets are record numbers: a segment's first record has the number in its name, the
next valid records count on from there, and a damaged stretch counts as no record. So lag is an
exact count of valid records not yet committed, and reaches 0 once the group read and committed
everything valid. (Records swallowed by a damaged stretch in a sealed segment leave a gap before
the next segment's number; the group's position jumps over it as it reads past the stretch, so the
gap counts in lag only until then.)

Retention (option ``retention``, e.g. ``7d``; units s, m, h, d; default 7d, 1h under
``cleanup=compact``). Whole segments are
deleted, oldest first and never the one being written, once every group has committed past them
and they are older than the retention; a log no group has read yet keeps everything. After that
``history()`` is incomplete and ``replayable()`` is False, both saying why.

Commits. ``commit`` writes the group's position at most every COMMIT_INTERVAL_S while records
keep coming (and whenever reading pauses, ``status`` is asked, or the reader closes): a crash may
replay up to that much again, which whole-state events tolerate.

Groups. One reader per group: a second one is refused (a second ``apply`` of the same group would
overwrite the first one's position). Readers of other groups are independent.

Modules: ``paths`` (the directory, its JSON documents, the log's identity), ``locks``, ``options``
(``segment_bytes``, ``cleanup``, ``retention``), ``retention`` (what is due, deleted or handed to
``compact``, the compaction process), ``segment`` (framing), ``writer``, ``reader`` (with dead
letters and group positions) and ``meta``.
"""
from __future__ import annotations

from conveyor.log.file.meta import FileMetaStore
from conveyor.log.file.paths import log_exists, remove_empty_file_log
from conveyor.log.file.reader import FileLogReader
from conveyor.log.file.writer import FileLogWriter

__all__ = ["FileLogReader", "FileLogWriter", "FileMetaStore", "log_exists", "remove_empty_file_log",
           "check_uri", "Writer", "Reader", "Meta"]

# What conveyor.log's registry opens.
Writer, Reader, Meta = FileLogWriter, FileLogReader, FileMetaStore


def check_uri(uri: str) -> None:
    """file:PATH: any path (it is created when a capture first writes)."""
