"""Batches of commands on the hot paths, sent over redis-py's connections: one packed buffer out,
the replies parsed by one hiredis Reader fed straight from the socket.

A redis-py Pipeline costs about 6 µs per command in Python (command stack, one read_response and
one response callback per reply); this costs about 1 µs. Replies come back raw (no response
callbacks: bytes, ints, lists) and an error reply is an exception instance in its place, as with
``pipeline.execute(raise_on_error=False)``. A failure of the connection itself is raised as redis-py
raises it (ConnectionError / TimeoutError), after the connection was dropped: its replies are lost.

This module knows servers, not routing: conveyor.cluster groups a batch by node and sends the
groups through ``run_on``; conveyor.packed picks the route of one batch.

It is the one place that reaches into redis-py's internals (a connection's socket and its
parser's error class, a pool's get_connection, the INFO reply parser); pyproject.toml pins
redis-py to the versions CI runs this against (the newest, and the lowest supported in .ci/run).
"""
from __future__ import annotations

import inspect
import socket
import ssl

import hiredis
import redis
from redis._parsers.helpers import parse_info

READ_BYTES = 256 * 1024
SEND_BYTES = 1024 * 1024          # a buffer sent at once (bounds the packed copy in memory)
# redis-py 5 wants a command name for get_connection (unused since), 6 and later do not.
_NAMED = inspect.signature(redis.ConnectionPool.get_connection).parameters.get(
    "command_name", inspect.Parameter("x", inspect.Parameter.KEYWORD_ONLY, default=None)
).default is inspect.Parameter.empty


def _connection(pool: redis.ConnectionPool):
    return pool.get_connection("EXEC") if _NAMED else pool.get_connection()


def run_on(batches: list[tuple[redis.Redis, list[tuple]]]) -> list[list]:
    """Several batches on several servers at once: every batch is sent before any reply is
    read, so the servers work in parallel. The replies of each batch, in order."""
    taken: list[tuple] = []
    at = 0                                   # which batch a failure belongs to (``e.batch``)
    try:
        for at, (client, commands) in enumerate(batches):
            pool = client.connection_pool
            ex = _Exchange(_connection(pool)) if commands else None
            taken.append((pool, ex))
            if ex is not None:
                ex.send(commands)
        out = []
        for at, ((_, ex), (_, cmds)) in enumerate(zip(taken, batches)):
            out.append(ex.receive(len(cmds)) if ex is not None else [])
        return out
    except BaseException as e:
        e.batch = at
        for _, ex in taken:
            if ex is not None:
                ex.conn.disconnect()         # replies may be left unread on it
        raise
    finally:
        for pool, ex in taken:
            if ex is not None:
                pool.release(ex.conn)


class _Exchange:
    """One batch on one connection: its own hiredis Reader, fed straight from the socket."""

    def __init__(self, conn) -> None:
        enc = conn.encoder
        self.conn, self.sock, self.out = conn, conn._sock, []
        self.reader = hiredis.Reader(replyError=conn._parser.parse_error,
                                     **({"encoding": enc.encoding} if enc.decode_responses else {}))
        self.buf = bytearray(READ_BYTES)

    def send(self, commands: list[tuple]) -> None:
        enc, pack = self.conn.encoder, hiredis.pack_command
        chunk: list[bytes] = []
        size = 0
        try:
            for c in commands:
                try:
                    b = pack(c)
                except TypeError:          # bytearray, bool, ...: as redis-py would take them
                    b = pack(tuple(_encoded(enc, a) for a in c))
                chunk.append(b)
                size += len(b)
                if size >= SEND_BYTES:
                    self.sock.sendall(b"".join(chunk))
                    chunk, size = [], 0
                    self._drain()          # the server's replies must not pile up meanwhile
            if chunk:
                self.sock.sendall(b"".join(chunk))
        except socket.timeout as e:
            raise redis.TimeoutError(f"Timeout writing to socket: {e}") from e
        except OSError as e:
            raise redis.ConnectionError(f"Error while writing to {self._where()}: {e}") from e

    def receive(self, n: int) -> list:
        try:
            while len(self.out) < n:
                self._feed(self.sock.recv_into(self.buf))
        except socket.timeout as e:
            raise redis.TimeoutError(f"Timeout reading from socket: {e}") from e
        except OSError as e:
            raise redis.ConnectionError(f"Error while reading from {self._where()}: {e}") from e
        return self.out

    def _feed(self, got: int) -> None:
        if not got:
            raise redis.ConnectionError("Connection closed by server.")
        self.reader.feed(self.buf, 0, got)
        while (r := self.reader.gets()) is not False:
            self.out.append(r)

    def _drain(self) -> None:
        """Read whatever replies already arrived, without waiting."""
        timeout = self.sock.gettimeout()
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    got = self.sock.recv_into(self.buf)
                except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                    return
                self._feed(got)
        finally:
            self.sock.settimeout(timeout)

    def _where(self) -> str:
        return f"{getattr(self.conn, 'host', '?')}:{getattr(self.conn, 'port', '?')}"


def _encoded(enc, a):
    if isinstance(a, (bytearray, memoryview)):  # taken as bytes (redis-py 5's encoder refuses them)
        return bytes(a)
    return enc.encode(a)                    # raises DataError for what redis-py refuses


def info_fields(raw: bytes) -> dict:
    """A raw INFO reply (as ``run_on`` returns it) as redis-py's ``info()`` gives it."""
    return parse_info(raw)
