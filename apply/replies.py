"""What the target's replies mean for a batch: write it again later, or stop.

"Not now" (the target is down, restarting, loading, out of memory, read-only, busy, ...) is waited
for with the batch held; nothing is skipped. A refused permission or refused credentials will not
change by waiting: apply stops with one line that names what was refused.
"""
from __future__ import annotations

import redis

from conveyor.acl import is_noperm, refused_line
from conveyor.endpoints import mask_text
from conveyor.errors import TargetError
from conveyor.retry import REFUSED_REPLIES, TARGET_NOT_NOW, TARGET_NOT_NOW_REPLIES

class TargetUnavailable(Exception):
    """The batch could not be written now; it is written again later (never escapes apply)."""


def refused(text: str, command: str = "", user: str | None = None) -> TargetError | None:
    """A TargetError when ``text`` (an error reply) is a refused permission or credentials;
    a permission names the command to grant ``user``."""
    text = mask_text(text)
    line = refused_line(text, "target", user, command)
    if line:
        return TargetError(line)
    if text.startswith(("NOAUTH", "WRONGPASS")) or "invalid password" in text:
        return TargetError(f"the target refused our credentials: {text} (check --target-user "
                           "and --target-password)")
    return None


def _text(e: Exception) -> str:
    """The error reply as the server sent it (redis-py drops the NOPERM prefix)."""
    text = str(e)
    if isinstance(e, redis.exceptions.NoPermissionError) and not text.startswith("NOPERM"):
        return f"NOPERM {text}"
    if isinstance(e, redis.AuthenticationError) and not text.startswith(REFUSED_REPLIES):
        return f"NOAUTH {text}"
    return text


def raise_for_connection(e: Exception, user: str | None = None) -> None:
    """Turn an exception raised by a whole pipeline (no reply at all) into what it means."""
    if isinstance(e, (redis.AuthenticationError, redis.exceptions.NoPermissionError)):
        raise refused(_text(e), user=user) from e    # AuthenticationError: a ConnectionError
    if isinstance(e, TARGET_NOT_NOW):
        raise TargetUnavailable(f"{type(e).__name__}: {mask_text(str(e))}") from e
    raise e


def check_replies(replies: list, commands: list[tuple] | None = None,
                  user: str | None = None) -> None:
    """Raise TargetUnavailable or TargetError when any reply says so (tolerated errors such as an
    XADD of an id the target has are neither). ``commands``: what was sent, to name it; ``user``:
    the target's ACL user, named when it lacks a permission."""
    for i, r in enumerate(replies):
        if not isinstance(r, Exception):
            continue
        text = _text(r)
        if text.startswith(REFUSED_REPLIES) or is_noperm(text):
            cmd = _name(commands[i]) if commands and i < len(commands) else ""
            raise refused(text, cmd, user) or TargetError(f"the target refused {cmd}: {text}")
        if isinstance(r, TARGET_NOT_NOW) or text.startswith(TARGET_NOT_NOW_REPLIES):
            raise TargetUnavailable(text)


def _name(command: tuple) -> str:
    c = command[0]
    return (c.decode() if isinstance(c, bytes) else str(c)).upper()
