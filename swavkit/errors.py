"""Which exceptions are the user's to fix (one line, exit code 2) and which exit code each failure gets.

Named by module rather than imported, so the command line can ask without importing torch: an error can
only be an instance of a class whose module is already loaded.
"""

from __future__ import annotations

import errno
import sys


class ConfigError(ValueError):
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

# Exceptions whose message is meant for the user as is: printed as one line, exit code 2.
USER_ERROR_NAMES = (("swavkit.errors", "ConfigError"), ("swavkit.data.errors", "DataError"),
                    ("swavkit.artifacts.pretrained", "LoadError"), ("swavkit.artifacts.checkpoint", "CheckpointError"),
                    ("swavkit.runtime.distributed", "LaunchError"), ("swavkit.training.loop", "TrainingDiverged"),
                    ("swavkit.training.loop", "DataLoaderCrashed"))
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
    if isinstance(err, (FileNotFoundError, NotADirectoryError, FileExistsError)) or is_unwritable(err):
        return True
    return any(_is_instance(err, module_name, class_name) for module_name, class_name in USER_ERROR_NAMES)


def is_stop_request(err: BaseException) -> bool:
    return _is_instance(err, "swavkit.runtime.signals", "StopRequested")


def exit_code_of(err: BaseException) -> int:
    """The process exit code for a failure: 3 stopped by a signal, 2 the user's to fix, 1 a bug."""
    if is_stop_request(err):
        return EXIT_STOPPED
    return EXIT_USER_ERROR if is_user_error(err) else 1
