"""How swavkit writes files: every file is either replaced atomically or appended to line by line.

Atomic (``atomic_writer`` and its text/JSON helpers): the new content goes to a temporary file in the
same folder, is flushed and fsynced, then renamed over the target, and the folder entry is fsynced. A
kill or a full disk at any moment leaves the previous complete file or the new complete file, never a
partial one. Used for checkpoints, config.yaml, exports, result JSON and rewritten reports.

Append-safe (``append_line``): one ``write`` of a whole line ending in a newline on a file opened for
appending. A kill can at worst leave a torn last line, which readers skip (``read_jsonl``) and which a
resume drops when it rewrites the file.

Permissions: files and folders get the modes every other tool gives them, 0o666 / 0o777 less the umask,
so other users of a shared machine can load an export when the umask lets them (``mkstemp`` and ``mkdtemp``
alone would make every file 0600 and folder 0700).

Unwritable destinations: an OSError for a read-only folder or mount, a full disk or quota
(swavkit.errors.UNWRITABLE_ERRNOS) leaves the writers naming the file they were writing - not their
temporary sibling - after removing what they had written; the command line prints it as one line, exit 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

from swavkit.errors import is_unwritable
from swavkit.runtime.procfs import proc_field


def current_umask() -> int:
    """The process umask. Read from /proc where it is shown (Linux >= 4.7): setting it to read it back
    would, for a moment, let another thread create files with no mask at all."""
    shown = proc_field("/proc/self/status", "Umask")
    if shown is not None:
        try:
            return int(shown, 8)
        except ValueError:
            pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode open() would give a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode mkdir would give a new folder: 0o777 less the umask."""
    return 0o777 & ~current_umask()


@contextlib.contextmanager
def naming_output(path: str | Path) -> Iterator[None]:
    """Re-raise an unwritable-destination OSError (swavkit.errors.is_unwritable) as one naming ``path``,
    the file the user asked for: a buffered write's ENOSPC names no file, a temporary sibling's name means
    nothing to the user."""
    try:
        yield
    except OSError as err:
        raise naming(err, path)


def naming(err: OSError, path: str | Path) -> OSError:
    """``err`` as :func:`naming_output` re-raises it: for an unwritable destination whose error names no
    file or a temporary sibling of ``path``, a new OSError of the same errno naming ``path`` (the cause
    chained); otherwise ``err`` itself."""
    path = Path(path)
    if not is_unwritable(err) or not _names_nothing_else(err.filename, path) or err.filename == str(path):
        return err
    renamed = OSError(err.errno, err.strerror, str(path))
    renamed.__cause__ = err
    return renamed


def _names_nothing_else(name, path: Path) -> bool:
    """Whether an OSError's file ``name`` is none, ``path``, or inside or one of its temporary siblings
    ``.<path name>.*`` (a folder further up that could not be created is named as it is: that one is to fix)."""
    if name is None:
        return True
    name = Path(os.fsdecode(name))
    return name == path or any(part.parent == path.parent and part.name.startswith(f".{path.name}.")
                               for part in (name, *name.parents))


def make_temp_folder(parent: str | Path, prefix: str) -> Path:
    """A new folder ``parent/<prefix>XXXX`` to build an output in before renaming it into place, with the
    mode an ordinary folder gets (mkdtemp's is 0700: a renamed export would be private)."""
    try:
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as err:  # it names the random name it tried: the folder to fix is ``parent``
        if not is_unwritable(err):
            raise
        raise OSError(err.errno, err.strerror, str(parent)) from err
    os.chmod(folder, folder_mode())
    return folder


@contextlib.contextmanager
def removed_on_failure(folder: str | Path) -> Iterator[Path]:
    """Create ``folder`` for an output; when the body raises and the folder did not exist before, remove it
    again with everything in it (all of it written by the body), so no half-written output stays behind to
    be mistaken for a finished one or to block the rerun. An existing folder is left to its owner."""
    folder = Path(folder)
    existed = folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems refuse a directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on a clean exit it replaces ``path``.

    On an exception the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming_output(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with naming_output(path):
            with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
                os.fchmod(fd, file_mode())  # mkstemp's 0600 would make every export private
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_writer(path, "w") as handle:
        handle.write(text)
    return Path(path)


def copy_atomic(source: str | Path, target: str | Path) -> Path:
    """Copy a file so that ``target`` is either its old self or the whole copy, never part of one."""
    with open(source, "rb") as src, atomic_writer(target) as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
    return Path(target)


def write_json_atomic(path: str | Path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append one whole line (a newline is added) with a single write, so lines never interleave."""
    with naming_output(path), open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")


def jsonl_line(row: dict) -> str:
    return json.dumps(row) + "\n"


def append_jsonl(path: str | Path, row: dict) -> None:
    append_line(path, json.dumps(row))


def read_jsonl(path: str | Path) -> list[dict]:
    """The complete JSON rows of a JSON-lines file; a torn or foreign line is skipped."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
