"""Least-privilege ACL rules for each process, and a refused permission as one line to act on.

The rules are the ones the README states, taken from what each process sends to Redis 7.0 (INFO
commandstats). tests/test_acl.py runs every process as users with exactly these rules (nothing may
be refused) and checks that every command they grant is sent (none can go). They are for Redis 7.0
and later (``%R~`` read-only keys).
"""
from __future__ import annotations

import re

# Commands every process sends on connecting and while watching its server.
_COMMON = ("ping", "info")
# Capture (source): SCAN + one read script per batch (DUMP, absolute expiry, MEMORY USAGE, TYPE),
# big keys read in pages, typed reads for --type struct, stream metadata, DBSIZE for progress,
# CONFIG GET and PSUBSCRIBE for the live modes. Keys are ``~*``, not read-only ``%R~*``: EVALSHA
# declares its keys read-write. The user still cannot write: every command it may run (in a script
# too) is a read.
CAPTURE_COMMANDS = _COMMON + (
    "dbsize", "scan", "type", "dump", "pexpiretime", "memory|usage", "script|load", "evalsha",
    "get", "getrange", "lrange", "hgetall", "hscan", "smembers", "sscan", "zrange", "zscan",
    "xrange", "xinfo|stream", "xinfo|groups", "xinfo|consumers", "xpending",
    "config|get", "psubscribe")
# Apply (target): RESTORE and DEL, typed writes into temporary keys renamed over the key, the
# script that applies a big key's parts (it reads the temporary key's GET/STRLEN/LLEN/XLEN), stream
# groups and their pending entries, INFO + DBSIZE for the target watch; SCAN + OBJECT IDLETIME find
# leftover temporary keys.
APPLY_COMMANDS = _COMMON + (
    "dbsize", "scan", "exists", "object|idletime", "restore", "del", "rename", "eval",
    "get", "strlen", "llen", "xlen", "pexpireat", "persist", "set", "append", "hset", "rpush",
    "sadd", "zadd", "xadd", "xsetid", "xclaim", "xgroup|create", "xgroup|createconsumer")
# Verify (both sides, read-only): TYPE + DUMP + expiry per key, typed reads where DUMPs differ.
VERIFY_COMMANDS = _COMMON + (
    "dbsize", "scan", "exists", "type", "dump", "pexpiretime", "get", "lrange", "hscan",
    "sscan", "zscan", "xrange", "xinfo|groups")
# The Redis Streams log (buffer Redis): its streams, group, id key, meta hash and leases.
LOG_COMMANDS = _COMMON + (
    "config|get", "exists", "get", "set", "hget", "hgetall", "hset", "hdel", "xadd", "xrange", "xtrim",
    "xdel", "xlen", "incrby", "del", "memory|usage", "xreadgroup", "xack", "xautoclaim", "xpending", "xinfo|stream", "xinfo|groups",
    "xgroup|create", "xgroup|destroy", "script|load", "evalsha", "time", "zadd", "zrange",
    "zrem", "zremrangebyscore")

KEYSPACE_CHANNEL = "__keyspace@{db}__:*"     # PSUBSCRIBE patterns match ACL patterns literally


def _commands(*groups: tuple[str, ...]) -> str:
    seen: dict[str, None] = {}
    for g in groups:
        seen.update(dict.fromkeys(g))
    return " ".join(f"+{c}" for c in seen)


def rules(db: int = 0, stream: str = "conveyor") -> dict[str, str]:
    """The rule of each user, as given after ``ACL SETUSER NAME reset on >PASSWORD``
    (``reset``: no commands, keys or channels but those that follow; ``resetchannels`` again in
    case the server's acl-pubsub-default is allchannels), for database ``db``: another than 0
    needs SELECT (redis-py selects it on connecting) and its own keyspace channel."""
    channel = "&" + KEYSPACE_CHANNEL.format(db=db)
    select = ("select",) if db else ()
    return {
        "capture": f"resetchannels {channel} ~* {_commands(CAPTURE_COMMANDS, select)}",
        "apply": f"resetchannels ~* {_commands(APPLY_COMMANDS, select)}",
        "verify": f"resetchannels %R~* {_commands(VERIFY_COMMANDS, select)}",
        "log": f"resetchannels ~{stream}:* {_commands(LOG_COMMANDS, select)}",
        # replicate runs capture + verify on the source and apply + verify on the target
        "replicate-source": (f"resetchannels {channel} ~* "
                             f"{_commands(CAPTURE_COMMANDS, VERIFY_COMMANDS, select)}"),
        "replicate-target": f"resetchannels ~* {_commands(APPLY_COMMANDS, VERIFY_COMMANDS, select)}",
    }


# How redis-py words a NOPERM reply (it drops the NOPERM prefix itself), and how Redis words a
# command refused inside a script (without naming it: ACL LOG on the server does).
_COMMAND_RE = re.compile(r"no permissions to run the '([^']+)' command", re.I)
_KEY_RE = re.compile(r"no permissions to access (a|one of the) key", re.I)
_CHANNEL_RE = re.compile(r"no permissions to access (a|one of the) channel", re.I)
_SCRIPT_RE = re.compile(r"user executing the script can't run this command", re.I)
_ANY = (_COMMAND_RE, _KEY_RE, _CHANNEL_RE, _SCRIPT_RE)


def is_noperm(e: BaseException | str) -> bool:
    """Whether an error is a refused ACL permission (which waiting will not cure)."""
    text = str(e)
    return "NOPERM" in text or any(r.search(text) for r in _ANY)


def in_script(e: BaseException | str) -> bool:
    """A command refused inside a script (the reply does not say which)."""
    return bool(_SCRIPT_RE.search(str(e)))


def refused_line(e: BaseException | str, side: str, user: str | None,
                 command: str = "", grant: str = "") -> str | None:
    """``target refused RESTORE for user 'apply' (NOPERM): grant it with ACL SETUSER apply
    +restore`` for a refused permission, None for any other error. ``side`` names the server
    (source, target, log); ``command`` is what was sent, for refusals that do not name it;
    ``grant`` the key or channel pattern to grant when a key or channel is refused."""
    text = str(e)
    if not is_noperm(text):
        return None
    user = user or "default"
    m = _COMMAND_RE.search(text)
    if m:
        name = m.group(1).lower()
        return (f"{side} refused {name.upper().replace('|', ' ')} for user '{user}' (NOPERM): "
                f"grant it with ACL SETUSER {user} +{name}")
    sent = f"{command.upper()} " if command else ""
    if _SCRIPT_RE.search(text) and command and not command.upper().startswith("EVAL"):
        command = command.lower()              # a command the script ran by name (pcall)
        return (f"{side} refused {command.upper()} for user '{user}' (NOPERM): grant it with "
                f"ACL SETUSER {user} +{command}")
    if _SCRIPT_RE.search(text):
        return (f"{side} refused a command inside the script of {sent or 'a script '}for user "
                f"'{user}' (NOPERM; ACL LOG on the {side} names it): grant it with ACL SETUSER "
                f"{user} +<command> (the README lists every command of each user)")
    what, pattern = (("a channel", "&<channel pattern>") if _CHANNEL_RE.search(text)
                     else ("a key", "~<key pattern>"))
    return (f"{side} refused {sent}on {what} for user '{user}' (NOPERM): grant it with "
            f"ACL SETUSER {user} {grant or pattern} (the README lists each user's patterns)")


def user_of(client) -> str | None:
    """The ACL user a redis-py client (or pipeline) authenticates as; None when it names none."""
    pool = getattr(client, "connection_pool", None)
    # a RedisCluster keeps what every node's connection gets in its nodes manager
    pool = pool or getattr(client, "nodes_manager", None)
    kwargs = getattr(pool, "connection_kwargs", None) or {}
    return kwargs.get("username") or None
