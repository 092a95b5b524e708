"""What the Redis Streams log's writer and reader share: the client, error conversion (a buffer
that is restarting or loading is LogUnavailable), entry ids, and the log's identity: a random id
in ``{stream}:id``, checked on every new connection (redis-py reconnects silently) and after an
outage, so that a buffer that came back empty, flushed or from older data is LogLost."""
from __future__ import annotations

import uuid
from contextlib import contextmanager
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from conveyor.acl import is_noperm, refused_line, user_of
from conveyor.endpoints import Tls, connect, mask_uri
from conveyor.errors import ConfigError, ConveyorError, LogError, LogLost, LogUnavailable
from conveyor.log.options import duration_s
from conveyor.retry import LOG_NOT_READY
from conveyor.words import text

MAX_SEQ = 18446744073709551615
PIPELINE_CHUNK = 1000
# Partition streams of a new log, for the same reasons as Kafka's default (conveyor/log/kafka/):
# a key's events stay in order within one stream, so the count caps how many apply processes of
# a group share the work, and it cannot change once records are written; 6 divides among 1, 2,
# 3 or 6 members. The count is stored with the log ({stream}:partitions) when it is created, and
# a log is always read with the count it was created with.
DEFAULT_PARTITIONS = 6
LEGACY_PARTITIONS = 1       # a log made before the count was stored: its streams are counted
# redis-py retries a command this often on a dropped connection before we say LogUnavailable: the
# processes wait out longer outages themselves (one retry policy, theirs).
CLIENT_RETRIES = 1
CLIENT_BACKOFF = ExponentialBackoff(cap=0.5, base=0.1)
# Replies meaning "not now": the buffer is loading its data, a replica, or a failover is under way.


@contextmanager
def converted(what: str, user: str | None = None):
    """Driver errors as ours; a refused permission names the command to grant ``user``."""
    try:
        yield
    except ConveyorError:
        raise
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        raise LogUnavailable(f"Redis Streams log: {what}: the buffer Redis is unavailable: {e}") from e
    except redis.ResponseError as e:
        msg = str(e)
        line = refused_line(e, "log", user)
        if line:
            raise LogError(line) from e
        if isinstance(e, redis.ReadOnlyError) or msg.startswith(LOG_NOT_READY):
            raise LogUnavailable(f"Redis Streams log: {what}: the buffer Redis is not ready: {e}") from e
        if msg.startswith("NOGROUP"):
            raise LogLost(f"the consumer group is gone from the buffer Redis ({msg}): it was "
                          "restarted without persistence, flushed, or the streams were deleted") from e
        raise LogError(f"Redis Streams log: {what} failed: {e}") from e
    except redis.RedisError as e:
        raise LogError(f"Redis Streams log: {what} failed: {e}") from e


def client(uri: str, opts: dict[str, str], on_connect=None) -> redis.Redis:
    """``on_connect(connection)`` runs for every new connection, reconnections included."""
    try:
        return connect(uri, "log", error_cls=LogError, retry=Retry(CLIENT_BACKOFF, CLIENT_RETRIES),
                       tls=Tls.from_options(opts),
                       **({"redis_connect_func": on_connect} if on_connect else {}))
    except ConveyorError as e:
        if isinstance(e, LogError):
            raise
        raise LogError(str(e)) from e


def check_uri(uri: str) -> None:
    """redis[s]://host:port/db: a port, when given, is a number."""
    try:
        urlsplit(uri).port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise ConfigError(f"log URI {mask_uri(uri)!r} is malformed: {e}") from e


def log_exists(uri: str, opts: dict[str, str]) -> bool:
    r = client(uri, opts)
    try:
        with converted("looking for the log's streams", user_of(r)):
            return bool(r.exists(*stream_names(opts)))
    finally:
        r.close()


def asked_partitions(opts: dict[str, str]) -> int | None:
    """The ``partitions`` option, checked; None when not given."""
    if "partitions" not in opts:
        return None
    try:
        n = int(opts["partitions"])
    except ValueError:
        raise LogError(f"partitions={opts['partitions']!r} is not a number") from None
    if n < 1:
        raise LogError("partitions must be at least 1")
    return n


def stream_names(opts: dict[str, str], n: int | None = None) -> list[str]:
    prefix = opts.get("stream", "conveyor")
    n = n or asked_partitions(opts) or DEFAULT_PARTITIONS
    return [f"{prefix}:{i}" for i in range(n)]


def log_partitions(r: redis.Redis, opts: dict[str, str], *, create: bool) -> int:
    """How many partition streams the log has: the count stored when it was created; for a log
    older than that, the streams it has; for a new log, ``partitions`` or the default (stored
    now when ``create``, first writer or reader wins). An explicit ``partitions`` that differs
    from an existing log's is refused: keys would move to other streams and lose their order."""
    prefix = opts.get("stream", "conveyor")
    key, asked = f"{prefix}:partitions", asked_partitions(opts)
    stored = r.get(key)
    if stored is None and r.exists(f"{prefix}:id"):
        n = 0
        while r.exists(f"{prefix}:{n}"):
            n += 1
        stored = asked or n or LEGACY_PARTITIONS
        if create:                      # a log created meanwhile stored its count first
            r.set(key, stored, nx=True)
            stored = r.get(key)
    elif stored is None:
        if not create:
            return asked or DEFAULT_PARTITIONS
        r.set(key, asked or DEFAULT_PARTITIONS, nx=True)
        stored = r.get(key)
    n = int(stored)
    if asked is not None and asked != n:
        raise LogError(f"the Redis Streams log {prefix!r} was created with {n} partition streams; "
                       f"partitions={asked} cannot change that (keys would lose their order): "
                       f"drop the option, or use a new log (option stream=NAME)")
    return n


def duration_ms(text: str, name: str = "retention") -> int:
    return int(duration_s(text, name) * 1000)


def id_ms(entry_id: bytes | str) -> int:
    s = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(s.split("-")[0])


def next_id(entry_id: str) -> str:
    ms, seq = (int(x) for x in entry_id.split("-"))
    return f"{ms}-{seq + 1}" if seq < MAX_SEQ else f"{ms + 1}-0"


def previous_id(entry_id: str) -> str:
    ms, seq = (int(x) for x in entry_id.split("-"))
    return f"{ms}-{seq - 1}" if seq else (f"{ms - 1}-{MAX_SEQ}" if ms else "0-0")


def field_map(fields) -> dict:
    return fields if isinstance(fields, dict) else dict(zip(fields[::2], fields[1::2]))


def persistence_warning(r: redis.Redis) -> str | None:
    """A buffer Redis that keeps nothing across a restart loses every record not yet applied."""
    try:
        aof = text(next(iter(r.config_get("appendonly").values()), ""))
        save = text(next(iter(r.config_get("save").values()), ""))
    except redis.ResponseError:                 # CONFIG renamed or not permitted
        try:
            if int(r.info("persistence").get("aof_enabled", 0)):
                return None
        except redis.ResponseError:
            return None
        return ("the buffer Redis of the log does not use AOF and its save points cannot be read "
                "(CONFIG refused): a restart of it may lose records not yet applied")
    if aof == "yes" or save.strip():
        return None
    return ("the buffer Redis of the log has no persistence (appendonly no, no save points): a "
            "restart of it loses every record not yet applied; use appendonly yes")


def trimmed_why(r: redis.Redis, streams: list[str]) -> list[str]:
    """Why the streams no longer hold every entry ever added (empty: they do)."""
    why = []
    for s in streams:
        if not r.exists(s):
            continue
        info = info_map(r.execute_command("XINFO", "STREAM", s))
        added, length = info.get("entries-added"), int(info.get("length", 0))
        length += int(r.get(f"{s}:compacted") or 0)     # deleted as superseded (compact.py)
        if added is None and text(info.get("last-generated-id", b"0-0")) == "0-0":
            continue                            # nothing was ever added to it
        if added is None:
            why.append(f"{s}: the buffer Redis is older than 7.0 and cannot tell whether entries "
                       "were trimmed")
        elif int(added) != length:
            why.append(f"{s}: {int(added) - length} entries were trimmed (trim=acked, or "
                       "trim=retention and older than the retention)")
    return why


class StreamLog:
    """What the writer and the reader share: the client, the log's id, recovery after an outage."""

    r: redis.Redis
    log_id: str
    warnings: list[str]

    def _open(self, uri: str, opts: dict[str, str], *, create: bool = True) -> None:
        self._ready = False
        self.r = client(uri, opts, self._connected)
        self.uri = mask_uri(uri)
        self.user = user_of(self.r)
        self.refused = False                # the buffer refused a permission (ACL)
        self.prefix = opts.get("stream", "conveyor")
        self.id_key = f"{self.prefix}:id"
        self._down = False
        self.warnings = []
        with converted("opening the log", self.user):
            self.streams = stream_names(opts, log_partitions(self.r, opts, create=create))
            if create:
                self.r.set(self.id_key, uuid.uuid4().hex, nx=True)
            self.log_id = text(self.r.get(self.id_key) or b"")
            if create:
                warning = persistence_warning(self.r)
                if warning:
                    self.warnings.append(warning)

    def _connected(self, connection) -> None:
        """Every new connection: redis-py reconnects by itself, so a buffer that restarted between
        two calls is only seen here. Its data are checked on that connection before the call
        that needed it is sent (a call sent first could hide the loss: a new XADD moves the
        stream's end past the records that were lost)."""
        # The handshake without redis-py's health check: a PING from inside the connect hook
        # would reconnect through this hook again, for ever, if the socket died meanwhile.
        handshake = getattr(connection, "on_connect_check_health", None)
        handshake(check_health=False) if handshake else connection.on_connect()
        if not self._ready:
            return
        self._reconnected()

        def run(*args):
            connection.send_command(*args)
            return connection.read_response()
        try:
            self._verify(run)
        except LogLost:
            self._down = True               # lost until adopt_new_log()
            raise

    @contextmanager
    def _op(self, what: str):
        """One operation on the buffer; after an outage (or a LogLost) the log is checked first."""
        if self._down:
            self.check_identity()
            self._down = False
        try:
            with converted(what, self.user):
                yield
        except LogUnavailable:
            self._down = True
            raise
        except LogLost:
            self._down = True
            raise
        except LogError as e:
            # A refused permission stays refused: close() must not repeat the same line.
            self.refused = self.refused or is_noperm(e.__cause__ or "")
            raise

    def check_identity(self) -> None:
        with converted("checking the log's identity", self.user):
            self._verify(self.r.execute_command)

    def _verify(self, run) -> None:
        """LogLost unless the buffer still holds our log; ``run(*command)`` asks it."""
        now = run("GET", self.id_key)
        if now is None:
            raise LogLost(f"{self.id_key} is gone from the buffer Redis {self.uri}: it was "
                          "restarted without persistence, flushed, or the log's keys deleted")
        if text(now) != self.log_id:
            raise LogLost(f"the buffer Redis {self.uri} now holds another log (id {text(now)}, "
                          f"ours was {self.log_id})")
        self._check_streams(run)

    def _check_streams(self, run) -> None:
        """Backend part of _verify."""

    def _reconnected(self) -> None:
        """Backend hook: a new connection replaced one that was cut (replies may be lost)."""

    def adopt_new_log(self) -> None:
        with converted("adopting the log as it is now", self.user):
            self._ready = False
            self.r.set(self.id_key, uuid.uuid4().hex, nx=True)
            self.r.set(f"{self.prefix}:partitions", len(self.streams), nx=True)
            self.log_id = text(self.r.get(self.id_key))
            self._adopted()
            self._ready = True
        self._down = False

    def _adopted(self) -> None:
        """Backend part of adopt_new_log (inside converted)."""


def info_map(reply) -> dict:
    if isinstance(reply, dict):
        return {text(k): v for k, v in reply.items()}
    return {text(reply[i]): reply[i + 1] for i in range(0, len(reply), 2)}
