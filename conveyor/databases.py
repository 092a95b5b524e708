"""Several databases of a standalone source: which ones (``--db all|N,M``) and where each goes on
the target (the same number, or ``--target-db N`` for all of them).

``--db all`` means every database the server is configured with (CONFIG GET databases), not only
those holding keys now: in live modes a key created later in an empty database must not be
missed. When CONFIG is refused (managed services) the databases holding keys now (INFO keyspace)
are taken instead, and a line says what that leaves out.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import redis

from conveyor.errors import ConfigError, ConveyorError
from conveyor.events import Kind
from conveyor.keys import quoted

log = logging.getLogger("conveyor")

ALL = "all"


def parse_dbs(text: str | None) -> list[int] | str | None:
    """``--db``: None (the URI's database), ``"all"``, or sorted distinct numbers."""
    if text is None:
        return None
    text = text.strip().lower()
    if text == ALL:
        return ALL
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(re.fullmatch(r"\d{1,6}", p) for p in parts):
        raise ConfigError(f"--db {text!r}: expected 'all' or database numbers such as 0,3,5")
    return sorted({int(p) for p in parts})


def refuse_uri_and_option(uri_db: int | None, option: str, value) -> None:
    """The database named twice (in the URI and with an option) is refused, whatever the values:
    one place decides."""
    if uri_db is not None and value is not None:
        raise ConfigError(f"{option} and a database in the URI (/{uri_db}): give the database "
                          f"one way (drop /{uri_db} from the URI, or {option})")


def configured(client: redis.Redis) -> int | None:
    """CONFIG GET databases, or None when CONFIG is refused."""
    try:
        value = client.config_get("databases").get("databases")
    except redis.ResponseError:
        return None
    return int(value) if value not in (None, "") else None


def with_keys(client: redis.Redis) -> list[int]:
    """The databases holding keys now (INFO keyspace: db0, db3, ...)."""
    return sorted(int(name[2:]) for name in client.info("keyspace") if name.startswith("db"))


@dataclass
class Selection:
    dbs: list[int]
    note: str = ""               # a line for the user: how "all" was decided, what it misses


def resolve(client: redis.Redis, wanted: list[int] | str, connect=None, *,
            what: str = "source") -> Selection:
    """The databases ``--db`` names, checked against the server's ``databases`` (or, with CONFIG
    refused, by SELECTing each through ``connect(db)``)."""
    count = configured(client)
    if wanted == ALL:
        if count is not None:
            return Selection(list(range(count)), f"{what} databases: all {count} configured "
                                                 "(CONFIG GET databases)")
        try:
            found = with_keys(client) or [0]
        except redis.ResponseError as e:
            raise ConfigError(f"--db all: the {what} refuses both CONFIG GET databases and INFO "
                              f"keyspace ({e}): name the databases, e.g. --db 0,3") from e
        return Selection(found, f"{what} databases: CONFIG GET databases refused: taking those "
                                f"holding keys now ({', '.join(map(str, found))}); keys created "
                                "later in another database are NOT captured (name them with --db)")
    if count is None:
        if connect is not None:
            check_selectable(connect, wanted, what)
        return Selection(list(wanted))
    beyond = [d for d in wanted if d >= count]
    if beyond:
        raise ConfigError(f"--db {beyond[0]}: the {what} has {count} databases "
                          f"(0-{count - 1}, CONFIG GET databases)")
    return Selection(list(wanted))


def check_selectable(connect, dbs: list[int], what: str = "source") -> None:
    """With CONFIG refused, a number beyond ``databases`` shows when SELECTed (connect pings)."""
    for db in dbs:
        try:
            connect(db).close()
        except ConveyorError as e:
            if "DB index" not in str(e):
                raise
            raise ConfigError(f"--db {db}: the {what} refuses database {db} (DB index is out "
                              "of range)") from e


# -- target side ---------------------------------------------------------------------------------
MAX_TRACKED_KEYS = 5_000_000     # key names (as 64-bit hashes) kept to find collisions
MAX_NAMED = 20                   # collisions named in the final lines


@dataclass
class Collisions:
    """The same key name written from two source databases into one target database: the later
    write wins, so the target cannot equal the source. Tracked only when several source
    databases map to one target database (``--target-db``): key hash -> source db that last
    wrote it; bounded by ``limit`` names, beyond which detection stops (and says so)."""

    limit: int = MAX_TRACKED_KEYS
    owner: dict[int, int] = field(default_factory=dict)
    collided: set[int] = field(default_factory=set)
    named: list[str] = field(default_factory=list)
    stopped: bool = False

    @property
    def count(self) -> int:
        return len(self.collided)

    def see(self, db: int, key: bytes, delete: bool) -> None:
        h = hash(key)
        was = self.owner.get(h)
        if was is not None and was != db:
            self._collide(h, key, was, db)
        if delete:
            if was == db:
                del self.owner[h]
            return
        if self.stopped:
            return
        self.owner[h] = db
        if len(self.owner) > self.limit:
            self.stopped = True
            self.owner.clear()          # a partial table would miss collisions anyway
            log.warning("more than %d keys written into one target database: key collisions "
                        "between source databases are no longer detected", self.limit)

    def _collide(self, h: int, key: bytes, first: int, then: int) -> None:
        if h in self.collided:
            return
        self.collided.add(h)
        if len(self.named) < MAX_NAMED:
            self.named.append(f"{quoted(key)} (source db {first} and db {then})")
        log.warning("key collision: %s comes from source db %d and db %d", quoted(key), first, then)


class TargetDbs:
    """Which target database takes events of source database N: ``--target-db`` for all, else
    the target URI's database for a log of one source database, else N itself. Into a Redis
    Cluster (database 0 only) another database needs an explicit ``--target-db 0``."""

    def __init__(self, *, explicit: int | None, uri_db: int | None, cluster: bool,
                 masked: str, track: bool = True) -> None:
        self.explicit, self.uri_db, self.cluster, self.masked = explicit, uri_db, cluster, masked
        self.collisions = Collisions() if explicit is not None and track else None
        self._sources: set[int] = set()

    def target_of(self, db: int) -> int:
        if self.explicit is not None:
            return self.explicit
        if self.uri_db is not None:
            self._sources.add(db)
            if len(self._sources) > 1:
                dbs = " and ".join(map(str, sorted(self._sources)))
                raise ConfigError(
                    f"events of source databases {dbs} would all go into database {self.uri_db} "
                    f"named by the target URI: pass --target-db {self.uri_db} (instead of /"
                    f"{self.uri_db} in the URI) to write them all into it, with key collisions "
                    "counted, or drop it from the URI to keep each in its own database")
            return self.uri_db
        if self.cluster and db != 0:
            raise ConfigError(
                f"events of source database {db}: the target {self.masked} is a Redis Cluster "
                "(database 0 only): pass --target-db 0 to write every source database into it "
                "(key collisions between databases are then counted)")
        return db

    def see(self, db: int, items) -> None:
        """The events of source db ``db`` about to be written (items of (Event, Record))."""
        if self.collisions is None:
            return
        for ev, _rec in items:
            self.collisions.see(db, ev.key, ev.kind is Kind.DELETE)
