"""Redis endpoints: URL validation, masking, connections with errors turned into one clear line."""
from __future__ import annotations

import os
import re
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis
from redis.cluster import RedisCluster

from conveyor.acl import refused_line, user_of
from conveyor.cluster import primary_clients
from conveyor.errors import ConfigError, ConveyorError, SourceError

REDIS_SCHEMES = ("redis", "rediss", "unix")
SOCKET_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 5.0          # a TLS server answers a ClientHello at once; a plain port never


def mask_uri(uri: str) -> str:
    """The URI with any password replaced by ``***`` (safe to print and log).

    The user info ends at the LAST ``@``: a password may hold ``@`` or ``/`` (``redis://:p@ss@h``,
    ``redis://:pa/ss@h``), which a URL parser splits elsewhere. Masking too much is safe; too little
    is not."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    at = rest.rfind("@")
    if at < 0 or ":" not in rest[:at]:
        return uri
    user = rest[:at].split(":", 1)[0]
    return f"{scheme}://{user}:***@{rest[at + 1:]}"


def mask_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Mask URIs with passwords, and any given secret, inside free text (driver messages)."""
    text = re.sub(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):\S*@", r"\1:***@", text)
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


ENCODE_HINT = ("a password holding '/', '@' or ':' must be percent-encoded in the URI, or given "
               "with --{what}-password or CONVEYOR_{WHAT}_PASSWORD")


def validate_redis_uri(uri: str, what: str) -> None:
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        # The parser's own words may quote part of a password ("... as 'pa'"): never shown.
        detail = ENCODE_HINT.format(what=what, WHAT=what.upper()) if mask_uri(uri) != uri else e
        raise ConfigError(f"{what} URI {mask_uri(uri)!r} is malformed: {detail}") from None
    if "@" in parts.path:
        raise ConfigError(f"{what} URI {mask_uri(uri)!r} is malformed: "
                          + ENCODE_HINT.format(what=what, WHAT=what.upper()))
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError(
            f"{what} URI {mask_uri(uri)!r} must start with redis://, rediss:// or unix://")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"{what} URI {mask_uri(uri)!r} has no host")
    path = parts.path.strip("/")
    if parts.scheme != "unix" and path and not path.isdigit():
        raise ConfigError(f"{what} URI {mask_uri(uri)!r}: the path must be a database number")


def uri_db(uri: str) -> int | None:
    """The database number named in the URI's path, or None when it names none."""
    path = urlsplit(uri).path.strip("/")
    return int(path) if path.isdigit() else None


@dataclass(slots=True)
class ServerInfo:
    version: tuple[int, ...]
    version_text: str
    flavor: str              # "redis" or "valkey"
    run_id: str
    db: int

    @property
    def has_pexpiretime(self) -> bool:
        return self.version >= (7, 0)


@dataclass(frozen=True, slots=True)
class Tls:
    """TLS settings named as redis-cli names them (--cacert, --cert, --key, --insecure)."""

    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    insecure: bool = False

    @classmethod
    def from_options(cls, opts: dict[str, str]) -> "Tls":
        """A buffer Redis's TLS settings from log options named the same way
        (``--log-opt cacert=... cert=... key=... insecure=1``, with a rediss:// log URI)."""
        insecure = opts.get("insecure", "").lower() in ("1", "true", "yes")
        return cls(opts.get("cacert"), opts.get("cert"), opts.get("key"), insecure)

    @property
    def given(self) -> bool:
        return bool(self.cacert or self.cert or self.key or self.insecure)

    def redis_kwargs(self, uri: str, what: str) -> dict:
        """redis-py's own SSL settings; verification (CA and host name) stays on unless
        ``insecure``."""
        if not self.given:
            return {}
        if not uri.lower().startswith("rediss://"):
            raise ConfigError(f"TLS options for the {what} need a rediss:// URI "
                              f"(got {mask_uri(uri)})")
        if bool(self.cert) != bool(self.key):
            raise ConfigError(f"{tls_flag(what, 'cert')} and {tls_flag(what, 'key')} go together "
                              "(a client certificate and its private key)")
        for path in (self.cacert, self.cert, self.key):
            if path and not os.path.isfile(path):
                raise ConfigError(f"{what} TLS file {path!r} does not exist")
        kw: dict = {}
        if self.cacert:
            kw["ssl_ca_certs"] = self.cacert
        if self.cert:
            kw.update(ssl_certfile=self.cert, ssl_keyfile=self.key)
        if self.insecure:
            kw.update(ssl_cert_reqs="none", ssl_check_hostname=False)
        return kw


# What a failed TLS handshake says, and the cause named in our one line.
TLS_CAUSES = (
    ("certificate has expired", "the server's certificate has expired"),
    ("Hostname mismatch", "the server's certificate is not for this host name"),
    ("IP address mismatch", "the server's certificate is not for this address"),
    ("unable to get local issuer certificate", "the server's certificate is signed by a CA we do "
     "not trust (give it with {cacert})"),
    ("self-signed certificate in certificate chain", "the server's certificate is signed by a CA "
     "we do not trust (give it with {cacert})"),
    ("self-signed certificate", "the server's certificate is self-signed and not trusted (give "
     "its CA with {cacert})"),
    ("certificate verify failed", "the server's certificate could not be verified"),
    ("certificate required", "the server requires a client certificate ({cert} and {key})"),
    ("unknown ca", "the server does not trust our client certificate"),
    ("wrong version number", "the server does not speak TLS on this port (use redis://)"),
)


def tls_flag(what: str, name: str) -> str:
    """How the user gives a TLS setting: --source-cacert, or a log option for a buffer Redis."""
    return f"--log-opt {name}=..." if what == "log" else f"--{what}-{name}"


def tls_cause(message: str, what: str, tls: Tls | None, uri: str) -> str | None:
    flags = {n: tls_flag(what, n) for n in ("cacert", "cert", "key")}
    for needle, cause in TLS_CAUSES:
        if needle.lower() in message.lower():
            return cause.format(**flags)
    # With TLS 1.3 a server that wants a client certificate completes the handshake and then
    # closes the connection: all we see is an EOF.
    if (uri.lower().startswith("rediss://") and not (tls and tls.cert)
            and "EOF occurred in violation of protocol" in message):
        return (f"the server closed the connection; it most likely requires a client "
                f"certificate ({flags['cert']} and {flags['key']})")
    return None


def connect(uri: str, what: str, *, password: str | None = None, username: str | None = None,
            error_cls: type[ConveyorError] = SourceError, tls: Tls | None = None,
            **kwargs) -> redis.Redis:
    """A checked connection (PING answered) to the Redis at ``uri``; ``what`` names it in errors."""
    validate_redis_uri(uri, what)
    opts = dict(socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT,
                health_check_interval=30)
    opts.update((tls or Tls()).redis_kwargs(uri, what))
    if password is not None:
        opts["password"] = password
    if username is not None:
        opts["username"] = username
    opts.update(kwargs)
    _probe_handshake(uri, what, error_cls)
    try:
        r = redis.Redis.from_url(uri, **opts)
        r.ping()
    except redis.AuthenticationError as e:
        raise error_cls(f"{what} {mask_uri(uri)}: authentication failed "
                        f"(wrong user or password): {mask_text(str(e), (password or '',))}") from e
    except redis.ResponseError as e:
        msg = str(e)
        line = refused_line(e, what, username or urlsplit(uri).username, "PING")
        if line:                                    # a user that may not even PING
            raise error_cls(line) from e
        if "NOAUTH" in msg or "WRONGPASS" in msg:
            raise error_cls(f"{what} {mask_uri(uri)}: authentication failed: {msg}") from e
        raise error_cls(f"{what} {mask_uri(uri)}: {msg}") from e
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        text = mask_text(str(e), (password or '',))
        cause = tls_cause(text, what, tls, uri)
        if cause:
            raise error_cls(f"{what} {mask_uri(uri)}: TLS handshake failed: {cause} "
                            f"({text.strip()})") from e
        raise error_cls(f"{what} {mask_uri(uri)}: cannot connect: {text}") from e
    except ValueError as e:
        raise ConfigError(f"{what} URI {mask_uri(uri)!r} is malformed: "
                          f"{mask_text(str(e), (password or '',))}") from e
    except redis.RedisError as e:
        # e.g. InvalidResponse: the port answers, but not in the Redis protocol (HTTP, TLS...).
        raise error_cls(f"{what} {mask_uri(uri)}: does not answer as a Redis server "
                        f"({type(e).__name__}: {mask_text(str(e), (password or '',))}); "
                        "check the host, port and scheme (rediss:// for TLS)") from e
    return r


def _probe_handshake(uri: str, what: str, error_cls: type[ConveyorError]) -> None:
    """A rediss:// URI pointed at a plain port would wait out the whole socket timeout (30 s)
    in the handshake: find that out in seconds. Only the silence is judged here; anything else
    (refused, certificates) is left to the real connection, which words it."""
    if not uri.lower().startswith("rediss://"):
        return
    parts = urlsplit(uri)
    try:
        raw = socket.create_connection((parts.hostname, parts.port or 6379), CONNECT_TIMEOUT)
    except (OSError, ValueError):
        return
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
    try:
        raw.settimeout(HANDSHAKE_TIMEOUT)
        with probe.wrap_socket(raw, server_hostname=parts.hostname):
            pass
    except (socket.timeout, TimeoutError):
        raise error_cls(f"{what} {mask_uri(uri)}: TLS handshake failed: no answer within "
                        f"{HANDSHAKE_TIMEOUT:.0f}s; is the port a plain (non-TLS) one? (use "
                        "redis:// for it)") from None
    except (OSError, ssl.SSLError):
        pass
    finally:
        raw.close()


def server_info(r) -> ServerInfo:
    """The server's facts; for a Redis Cluster client, its primaries': the oldest version (what
    a DUMP payload must suit) and every primary's run_id, comma-separated and sorted."""
    if isinstance(r, RedisCluster):
        return _cluster_info(r)
    info = r.info("server")
    text = str(info.get("valkey_version") or info.get("redis_version"))
    flavor = "valkey" if "valkey_version" in info or info.get("server_name") == "valkey" else "redis"
    version = tuple(int(x) for x in re.findall(r"\d+", text)[:3])
    db = r.connection_pool.connection_kwargs.get("db", 0) or 0
    return ServerInfo(version, text, flavor, str(info.get("run_id", "")), int(db))


def _cluster_info(r: RedisCluster) -> ServerInfo:
    infos = [server_info(node) for node in primary_clients(r)]
    oldest = min(infos, key=lambda i: i.version)
    run_ids = ",".join(sorted(i.run_id for i in infos))
    return ServerInfo(oldest.version, oldest.version_text, oldest.flavor, run_ids, 0)


def _checked_info(r: redis.Redis, what: str) -> ServerInfo:
    try:
        return server_info(r)
    except redis.ResponseError as e:
        line = refused_line(e, what, user_of(r))
        if line:
            raise ConveyorError(line) from e
        raise


def same_database(a: redis.Redis, b: redis.Redis, names: tuple[str, str] = ("source", "target")
                  ) -> bool:
    """True when both clients talk to the same database of the same server process; ``names``
    name the two servers in a refused permission."""
    ia, ib = _checked_info(a, names[0]), _checked_info(b, names[1])
    shared = set(ia.run_id.split(",")) & set(ib.run_id.split(","))   # a cluster has several
    return bool(shared) and ia.db == ib.db


