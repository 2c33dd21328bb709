"""How swavkit writes files: every file is either replaced atomically or appended to line by line.

Atomic (``atomic_writer`` and its text/JSON helpers): the new content goes to a temporary file in the
same folder, is flushed and fsynced, then renamed over the target, and the folder entry is fsynced. A
kill or a full disk at any moment leaves the previous complete file or the new complete file, never a
partial one. Used for checkpoints, config.yaml, exports, result JSON and rewritten reports.

Append-safe (``append_line``): one ``write`` of a whole line ending in a newline on a file opened for
appending. A kill can at worst leave a torn last line, which readers skip (``read_jsonl``) and which a
resume drops when it rewrites the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
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
    with open(path, "a", encoding="utf-8") as handle:
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
