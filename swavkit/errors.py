"""Which exceptions are the user's to fix (one line, exit code 2) and which exit code each failure gets.

Every one-line error derives from ``UserError``: raising one is how a layer says "the message is for the
user as is". The classes every layer raises live here (standard library only, so the command line and
``import swavkit.config`` can catch them without torch); a layer's own kind (``LoadError``,
``CheckpointError``, ``LaunchError``) lives beside its code and derives from ``UserError`` too.
"""

from __future__ import annotations

import errno
import sys


class UserError(Exception):
    """A failure the user can fix, described in one line that names the file, key or option and what to do.
    The command line prints the message as is and exits with code 2 (``EXIT_USER_ERROR``)."""


class ConfigError(UserError, ValueError):
    """A configuration problem, described in one line that names the key (a config key, a CLI option or a
    file). Every layer raises it; ``swavkit.config`` re-exports it where users always found it. The command
    line prints its message as one line and exits with code 2.

    Example:
        >>> import swavkit
        >>> try:
        ...     swavkit.load_config([], ["train.epoch=3"])
        ... except swavkit.ConfigError as err:
        ...     print("refused:", str(err).split(";")[0])
        refused: unknown config key 'train.epoch' (did you mean train.epochs?)
    """



class DataError(UserError, ValueError):
    """A data problem, described in one line naming the file or folder."""


class TrainingDiverged(UserError, FloatingPointError):
    """The loss became non-finite; the last good state was saved first (pretraining and the supervised loop)."""


class DataLoaderCrashed(UserError, RuntimeError):
    """A data-loading worker died; the message names the files it was reading."""


EXIT_USER_ERROR = 2
EXIT_STOPPED = 3  # stopped by a signal: resumable, run the same command again


def _is_instance(err: BaseException, module_name: str, class_name: str) -> bool:
    cls = getattr(sys.modules.get(module_name), class_name, None)
    return cls is not None and isinstance(err, cls)


# errno values that mean "this place cannot take (or give) the file": a read-only folder or mount, a full
# disk or quota. The user's to fix (another --out, free space, permissions), never a bug of swavkit's.
UNWRITABLE_ERRNOS = {errno.EACCES: "permission denied: this user may not write (or read) it; choose a folder you "
                                   "may write to, or ask its owner",
                     errno.EPERM: "operation not permitted: choose a folder you may write to, or ask its owner",
                     errno.EROFS: "read-only file system: choose a folder on a writable disk",
                     errno.ENOSPC: "no space left on the device: free some space or write somewhere else",
                     errno.EDQUOT: "disk quota exceeded: free some space or write somewhere else"}


def is_unwritable(err: BaseException) -> bool:
    """An OSError for a destination that cannot be written (see UNWRITABLE_ERRNOS)."""
    return isinstance(err, OSError) and err.errno in UNWRITABLE_ERRNOS


def is_user_error(err: BaseException) -> bool:
    """A ``UserError``, a missing or clashing path, or an unwritable destination: one line, exit code 2."""
    if isinstance(err, (UserError, FileNotFoundError, NotADirectoryError, FileExistsError)):
        return True
    return is_unwritable(err)


def is_stop_request(err: BaseException) -> bool:
    return _is_instance(err, "swavkit.runtime.signals", "StopRequested")


def exit_code_of(err: BaseException) -> int:
    """The process exit code for a failure: 3 stopped by a signal, 2 the user's to fix, 1 a bug."""
    if is_stop_request(err):
        return EXIT_STOPPED
    return EXIT_USER_ERROR if is_user_error(err) else 1
