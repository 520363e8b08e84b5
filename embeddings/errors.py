"""One exception root for problems the user can fix (bad input, mismatched model, missing run).

The command line maps :class:`UserError` to a one-line ``error: ...`` and exit status 2;
any other exception is a bug and keeps its traceback.  Subclasses also derive from the
builtin a caller would expect (``ValueError``, ``FileNotFoundError``), so library users
can catch either.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message names the file or knob and the remedy."""


class InputError(UserError, ValueError):
    """A bad argument, config value or dataset."""


class MissingError(UserError, FileNotFoundError):
    """A file or run the command needs does not exist."""


class FormatError(UserError, ValueError):
    """A run directory file is missing, incomplete, corrupt or of another schema version."""


class RunMismatch(UserError, RuntimeError):
    """Two things that must come from the same model or configuration do not."""


class WeightsUnavailable(UserError, RuntimeError):
    """Model weights cannot be loaded (offline, unknown tag, missing directory)."""


class Locked(UserError, RuntimeError):
    """Another live process is writing the same run directory stage."""


class UntrustedModel(UserError, PermissionError):
    """A run directory names a local model (a ``pkg:`` module, a path) nobody vouched for."""
