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


class CodecError(ConveyorError):
    """A log record cannot be decoded."""


class SourceError(ConveyorError):
    """The source Redis is unreachable, refuses us, or misbehaves."""


class TargetError(ConveyorError):
    """The target Redis refused a write for a reason that retrying will not fix."""
