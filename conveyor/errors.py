"""One exception tree: the CLI turns any ConveyorError into one line and an exit code."""
from __future__ import annotations


class ConveyorError(Exception):
    """Root of every error conveyor raises on purpose."""

    exit_code = 1


class ConfigError(ConveyorError):
    """Bad usage: malformed URI, conflicting options."""

    exit_code = 2


class LogError(ConveyorError):
    """The durable log cannot be reached, written or read."""


class LogUnavailable(LogError):
    """A transient log failure (buffer Redis restarting, broker down, connection reset): the
    operation that raised it can be called again unchanged once the log is back. Processes wait
    these out with backoff, for as long as it takes, and say so."""


class LogLost(LogError):
    """The log was reset or emptied under us (a buffer restarted without persistence, a topic
    deleted, a log directory removed): records appended earlier are gone. The message starts with
    LOG_LOST so users and tests can find it."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"{LOG_LOST}: {detail}")


LOG_LOST = "the log lost records"


class CodecError(ConveyorError):
    """A log record cannot be decoded."""


class SourceError(ConveyorError):
    """The source Redis is unreachable, refuses us, or misbehaves."""


class TargetError(ConveyorError):
    """The target Redis refused a write for a reason that retrying will not fix."""
