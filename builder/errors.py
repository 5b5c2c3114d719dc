"""Exceptions that carry a message a person can act on.

The CLI maps `InputError` to exit code 2 and any other `BuilderError` to exit code 1, and
prints the message without a traceback.
"""

from __future__ import annotations


class BuilderError(Exception):
    """A failure with a message meant for the user."""


class InputError(BuilderError):
    """Bad input (a preset, an override, a checkpoint, an argument): one line per problem."""

    def __init__(self, lines: list[str] | str):
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


class ArtifactError(InputError, ValueError):
    """An artifact folder that does not match its manifest (a file modified, truncated or
    missing) or was built by another TVM version; the message names the file."""
