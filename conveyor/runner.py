"""Wiring shared by the CLI commands: connections, signals, and running the processes."""
from __future__ import annotations

import logging
import signal
import time
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator
from urllib.parse import unquote, urlsplit

import redis

from redis.cluster import ClusterNode
from redis.exceptions import RedisClusterException

from conveyor.cluster import cluster_client, cluster_enabled
from conveyor.endpoints import (CONNECT_TIMEOUT, SOCKET_TIMEOUT, ServerInfo, Tls, connect, mask_text,
                                mask_uri, same_database, server_info, uri_db)
from conveyor.errors import (ConfigError, ConveyorError, LogError, LogUnavailable, SourceError,
                             TargetError)

if TYPE_CHECKING:
    from conveyor.databases import TargetDbs

log = logging.getLogger("conveyor")


@dataclass
class Endpoint:
    """A Redis URI plus the credentials given apart from it (options or environment).

    ``cluster``: None detects it (``INFO cluster`` of the node the URI names), True forces cluster
    mode (``--source-cluster`` / ``--target-cluster``). ``connect`` then returns redis-py's
    RedisCluster, which routes by slot; ``connect_node`` always gives the plain node."""

    uri: str
    what: str                       # "source" / "target", used in messages
    username: str | None = None
    password: str | None = None
    tls: Tls = Tls()
    cluster: bool | None = None
    _checked: bool = field(default=False, repr=False, compare=False)
    # A cluster's nodes as last seen: connecting again must not depend on the URI's node alone
    # (it may have been killed and replaced by its replica since).
    _nodes: list = field(default_factory=list, repr=False, compare=False)

    @property
    def masked(self) -> str:
        return mask_uri(self.uri)

    def connect(self, db: int | None = None):
        """A client of the endpoint: redis.Redis, or RedisCluster for a cluster."""
        if self._checked and self.cluster and self._nodes:
            return self._cluster_client()
        client = self.connect_node(db)
        if not self._checked:
            self._detect(client, db)
        if not self.cluster:
            return client
        client.close()
        return self._cluster_client()

    def connect_node(self, db: int | None = None, uri: str | None = None) -> redis.Redis:
        """A plain client of the node the URI names (or of ``uri``, another node of a cluster,
        with the same credentials and TLS)."""
        kw = {} if db is None else {"db": db}
        return connect(uri or self.uri, self.what, username=self.username,
                       password=self.password, error_cls=self._error, tls=self.tls, **kw)

    @property
    def _error(self) -> type[ConveyorError]:
        return SourceError if self.what == "source" else TargetError

    def _detect(self, client: redis.Redis, db: int | None) -> None:
        self._warn_unneeded_password(db)
        enabled = cluster_enabled(client)
        if self.cluster and enabled is False:
            raise ConfigError(f"--{self.what}-cluster: {self.what} {self.masked} is not a node of "
                              "a Redis Cluster (INFO cluster says cluster_enabled:0)")
        self.cluster = bool(self.cluster or enabled)
        if self.cluster:
            refuse_unready_cluster(client, self)
        wanted = db if db is not None else (uri_db(self.uri) or 0)
        if self.cluster and wanted != 0:
            raise ConfigError(f"{self.what} {self.masked} is a Redis Cluster, which has only "
                              f"database 0 (asked for database {wanted})")
        self._checked = True

    def _warn_unneeded_password(self, db: int | None) -> None:
        """A password given to a server that takes connections without one is accepted by the
        server (and redis-py) in silence: say so, it may be the wrong server. (A named ACL user
        other than default is a choice of its own: no warning.)"""
        parts = urlsplit(self.uri)
        user = self.username or unquote(parts.username or "")
        if not (self.password or parts.password) or user not in ("", "default"):
            return
        bare = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()
        try:
            probe = connect(bare, self.what, error_cls=self._error, tls=self.tls,
                            **({} if db is None else {"db": db}))
            try:
                probe.ping()
            finally:
                probe.close()
        except (ConveyorError, redis.RedisError):
            return                                    # a password is needed: all is well
        log.warning("%s %s takes connections without a password: the password given is not "
                    "needed (is this the server you meant?)", self.what, self.masked)

    def _cluster_client(self):
        kw = dict(socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT)
        kw.update(self.tls.redis_kwargs(self.uri, self.what))
        if self.password is not None:
            kw["password"] = self.password
        if self.username is not None:
            kw["username"] = self.username
        if self._nodes:
            kw["startup_nodes"] = [ClusterNode(host, port) for host, port in self._nodes]
        try:
            client = cluster_client(self.uri, **kw)
            self._nodes = [(n.host, n.port) for n in client.get_nodes()]
            return client
        except (redis.RedisError, RedisClusterException, OSError, IndexError) as e:
            # (redis-py 8 raises IndexError for a node whose cluster has no slots yet)
            raise self._error(f"{self.what} {self.masked}: cannot read the cluster's topology: "
                              f"{mask_text(str(e), (self.password or '',))}") from e

    def info(self, client) -> ServerInfo:
        try:
            return server_info(client)
        except redis.RedisError as e:
            raise self._error(f"{self.what} {self.masked}: INFO failed: {e}") from e


def refuse_unready_cluster(node: redis.Redis, ep: Endpoint) -> None:
    """A node whose cluster was never created (no slot assigned) or is down answers nothing
    useful: say so rather than fail on the first key."""
    try:
        info = node.execute_command("CLUSTER INFO")
    except redis.RedisError:
        return                      # refused (ACL): the cluster client will tell
    if not isinstance(info, dict):               # redis-py parses it, but not in every version
        text = info.decode() if isinstance(info, bytes) else str(info)
        info = dict(line.split(":", 1) for line in text.split() if ":" in line)
    if str(info.get("cluster_slots_assigned", "1")) == "0":
        raise ConfigError(f"{ep.what} {ep.masked} is a node of a Redis Cluster that has no hash "
                          "slots assigned (cluster not created yet?)")


def target_clients(target: Endpoint, first: redis.Redis, source_db: int | None,
                   dbs: "TargetDbs | None" = None) -> Callable[[int], redis.Redis]:
    """Which target client writes events of source db N (see conveyor.databases.TargetDbs:
    ``--target-db``, else the URI's db, else the same db number as on the source)."""
    from conveyor.databases import TargetDbs

    dbs = dbs or TargetDbs(explicit=None, uri_db=uri_db(target.uri), cluster=bool(target.cluster),
                           masked=target.masked)
    clients: dict[int, redis.Redis] = {}
    pool = getattr(first, "connection_pool", None)       # None: a RedisCluster (db 0)
    first_db = (pool.connection_kwargs.get("db", 0) or 0) if pool is not None else 0
    clients[first_db] = first

    def for_db(db: int) -> redis.Redis:
        want = dbs.target_of(db)
        if want not in clients:
            clients[want] = target.connect(db=want)
        return clients[want]

    return for_db


def default_target_db(source_uri: str, target_uri: str) -> int | None:
    """Target db for commands that know both ends: the target's own, else the source's."""
    return None if uri_db(target_uri) is not None else (uri_db(source_uri) or 0)


def refuse_same_database(source: redis.Redis, target: redis.Redis, target_ep: Endpoint) -> None:
    if same_database(source, target):
        raise ConfigError(f"target {target_ep.masked} is the source itself (same server and "
                          "database): refusing to migrate a database onto itself")


def refuse_log_on(client: redis.Redis, ep: Endpoint, log_uri: str, log_opts: dict) -> None:
    """A Redis Streams log must live on a buffer Redis: on the source or the target database
    itself, conveyor would write its streams into the data it migrates."""
    from conveyor.log import split_uri

    scheme, base, opts = split_uri(log_uri, log_opts)     # bad options are reported first
    if scheme not in ("redis", "rediss"):
        return
    try:
        buffer = connect(base, "log", error_cls=ConveyorError, tls=Tls.from_options(opts))
    except ConveyorError:
        return                      # unreachable: the log backend says so in its own words
    try:
        if same_database(client, buffer, (ep.what, "log")):
            raise ConfigError(f"log {mask_uri(log_uri)} is the {ep.what} database itself: the "
                              "Redis Streams log needs a buffer Redis (another server or database)")
    except redis.RedisError:
        return
    finally:
        buffer.close()


LOG_WAIT_S = 30.0              # --log-wait: how long a log unavailable at start is waited for


def open_waiting(fn: Callable, what: str, limit_s: float = LOG_WAIT_S):
    """``fn()`` opens a log writer, reader or meta store; a log that is unavailable at start (a
    broker or buffer Redis restarting) is waited for, with backoff and a line each time, for
    ``limit_s`` seconds (--log-wait; 0: for as long as it takes; SIGINT/SIGTERM end the wait),
    then it is one line and exit 1. Waits during a run are the processes' own, and unbounded."""
    from tenacity import stop_after_delay, stop_never

    from conveyor import retry
    began = time.monotonic()
    tried = [began]

    def attempt():
        tried[0] = time.monotonic()
        return fn()

    def say(state) -> None:
        now = time.monotonic()
        log.warning("waiting for the log (%s): %s (this attempt took %.1fs; %.0fs waited%s); "
                    "trying again in %.1fs", what, state.outcome.exception(), now - tried[0],
                    now - began, f" of --log-wait {limit_s:.0f}s" if limit_s else "",
                    state.next_action.sleep)

    try:
        return retry.policy(on=LogUnavailable, reraise=True,
                            stop=stop_after_delay(limit_s) if limit_s else stop_never,
                            first_wait_s=retry.LOG_OPEN_FIRST_WAIT_S,
                            max_wait_s=retry.LOG_MAX_WAIT_S, before_sleep=say)(attempt)
    except LogUnavailable as e:
        raise LogError(f"the log could not be reached at start ({what}) in "
                       f"{time.monotonic() - began:.0f}s (--log-wait {limit_s:.0f}s): {e}; is it up and is the address right? (--log-wait 0 "
                       "waits for as long as it takes)") from e


class Interrupts:
    """SIGINT/SIGTERM call ``stop()`` on every registered process: they finish the batch at hand,
    flush and save their position. A second signal ends the process at once."""

    def __init__(self) -> None:
        self._stoppables: list = []
        self.signalled = threading.Event()

    def register(self, obj) -> None:
        self._stoppables.append(obj)
        if self.signalled.is_set():
            obj.stop()

    def _handler(self, signum, frame) -> None:
        if self.signalled.is_set():
            raise SystemExit(130)
        self.signalled.set()
        log.warning("%s received: stopping cleanly (again to abort)", signal.Signals(signum).name)
        for obj in self._stoppables:
            obj.stop()

    @contextmanager
    def installed(self) -> Iterator["Interrupts"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class Worker(threading.Thread):
    """Runs ``fn`` in a thread and keeps its result or its ConveyorError for the main thread."""

    def __init__(self, name: str, fn: Callable) -> None:
        super().__init__(name=name, daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except ConveyorError as e:
            self.error = e
        except Exception as e:  # noqa: BLE001 - reported by the main thread as one line
            log.exception("%s failed", self.name)
            self.error = ConveyorError(f"{self.name} failed: {type(e).__name__}: {e}")
