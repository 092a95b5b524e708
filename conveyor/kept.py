"""``--on-existing skip``: the keys a target held before a group's first apply are left alone.

When a group first applies into a target that already holds keys, their names are read (SCAN of
every database, or every primary of a cluster) and stored as 64-bit digests of (target database,
name) in the log's metadata, next to the group's position: a restarted apply, another member of
the group or a later run keeps the same keys, and never a key this migration wrote itself. Events
of those keys (writes and deletes) are counted as kept and not written.
"""
from __future__ import annotations

import base64
import hashlib
import logging
from array import array
from typing import Iterable

import redis

from conveyor.errors import ConfigError
from conveyor.log.base import MetaStore

log = logging.getLogger("conveyor.apply")

MAX_KEPT = 1_000_000          # digests held in memory and in metadata (8 MB)
CHUNK = 32_768                # digests per metadata document (well under a Kafka record's 1 MB)
SCAN_COUNT = 1000


def digest(db: int, key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8, person=db.to_bytes(8, "big"))
                          .digest(), "big")


def index_name(group: str) -> str:
    return f"kept-{group}"


def _chunk_name(group: str, i: int) -> str:
    return f"kept-{group}:{i}"


class KeptKeys:
    """The digests of the keys to leave alone."""

    def __init__(self, digests: Iterable[int] = ()) -> None:
        self._set = set(digests)

    def __len__(self) -> int:
        return len(self._set)

    def holds(self, db: int, key: bytes) -> bool:
        return digest(db, key) in self._set

    @classmethod
    def of_target(cls, clients: dict[int, list[redis.Redis]]) -> "KeptKeys":
        """The keys ``clients`` (target database -> its clients: one, or a cluster's primaries)
        hold now."""
        out: set[int] = set()
        for db, nodes in clients.items():
            for node in nodes:
                for key in node.scan_iter(count=SCAN_COUNT):
                    out.add(digest(db, key))
                    if len(out) > MAX_KEPT:
                        raise ConfigError(
                            f"--on-existing skip keeps at most {MAX_KEPT:,} keys the target held "
                            "before; this target holds more: use --on-existing overwrite or fail, "
                            "or migrate into an empty target")
        return cls(out)

    # -- stored in the log's metadata -----------------------------------------------------------
    def save(self, meta: MetaStore, group: str) -> None:
        """Chunks first, the index last: an index names only chunks that are all stored."""
        ordered = array("Q", sorted(self._set))
        chunks = [ordered[i:i + CHUNK] for i in range(0, len(ordered), CHUNK)]
        for i, part in enumerate(chunks):
            meta.put(_chunk_name(group, i), {"digests": base64.b64encode(part.tobytes()).decode()})
        meta.put(index_name(group), {"keys": len(ordered), "chunks": len(chunks)})

    @classmethod
    def load(cls, docs: dict[str, dict], group: str) -> "KeptKeys | None":
        """The stored set of ``group`` (``docs``: the metadata's documents), None when none was
        stored."""
        get = docs.get
        index = get(index_name(group))
        if index is None:
            return None
        out = array("Q")
        for i in range(int(index["chunks"])):
            doc = get(_chunk_name(group, i))
            if doc is None:
                raise ConfigError(f"the log's metadata lost part {i} of the keys --on-existing "
                                  f"skip keeps for group {group!r}: cannot tell which keys to "
                                  "leave alone")
            out.frombytes(base64.b64decode(doc["digests"]))
        kept = cls(out)
        if len(kept) != int(index["keys"]):
            raise ConfigError(f"the keys --on-existing skip keeps for group {group!r} are "
                              f"incomplete in the log's metadata ({len(kept):,} of "
                              f"{int(index['keys']):,})")
        return kept
