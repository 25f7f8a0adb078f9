"""The errors diffunet raises for mistakes a user can fix.

Every such error (a bad option, config field, tensor, file or call) is a :class:`DiffunetError`
whose message says what was given, what was expected and how to fix it; the command line prints
it as one line. Each also subclasses the builtin it refines (`ValueError`, `TypeError`,
`OSError`, `RuntimeError`), so `except ValueError` around a call keeps working. Anything else
that escapes the command line is a bug in diffunet and is printed with its traceback.
"""

from __future__ import annotations


class DiffunetError(Exception):
    """A mistake the user can fix; the message names it and the fix."""


class InvalidValueError(DiffunetError, ValueError):
    """A value that cannot be used: an option, a config field, a tensor's shape or range."""


class InvalidTypeError(DiffunetError, TypeError):
    """An argument or config field of the wrong type."""


class StorageError(DiffunetError, OSError):
    """A file that could not be written or read: a full disk, a missing folder, permissions."""


class TrainingError(DiffunetError, RuntimeError):
    """A run that cannot go on as asked: diverged, or its folder is used by another process."""


__all__ = [
    "DiffunetError",
    "InvalidTypeError",
    "InvalidValueError",
    "StorageError",
    "TrainingError",
]
