"""Lists of image paths: the compact form every dataset holds, list files, and the run folder's cache.

A Python list of 10M ``str`` is 10M objects whose reference counts every DataLoader worker touches as it
indexes them, so copy-on-write gives each worker a private copy of the pages (RSS grows with workers x
images). :class:`PathList` holds the same paths as two numpy arrays (the UTF-8 bytes of all paths, one
after the other, and the offsets of each), which no worker writes to: the forked pages stay shared.

List files (``data.path`` ending in ``.txt`` or ``.csv``) name one image per line, relative to the list
file's folder unless absolute:

* ``.txt``: one path per line; empty lines are ignored.
* ``.csv``: the ``path`` column when the first row names one (a header), else the first column of every
  row (no header).

A listed file that does not exist or cannot be decoded is skipped and reported in ``skipped.txt`` like
an unreadable image of a folder (checking 10M files at start would take as long as the walk the list
avoids).

The resolved list is cached in the run folder (``files.npz``) so that a resume does not walk again.
"""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from swavkit.data.errors import DataError
from swavkit.data.names import printable_path
from swavkit.fileio import atomic_writer

LIST_SUFFIXES = (".txt", ".csv")
CACHE_NAME = "files.npz"


class PathList:
    """Paths held as one byte buffer + offsets; ``paths[i]`` -> str, ``paths[a:b]`` -> list of str.

    Attributes: ``buffer`` (uint8 [total bytes]), ``offsets`` (int64 [n + 1], path i is
    ``buffer[offsets[i]:offsets[i + 1]]``, encoded with os.fsencode so any file name round-trips).
    """

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray):
        self.buffer = buffer
        self.offsets = offsets

    @classmethod
    def from_paths(cls, paths: Iterable[str | os.PathLike]) -> "PathList":
        encoded = [os.fsencode(p) for p in paths]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in encoded], out=offsets[1:])
        buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        return cls(buffer, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return os.fsdecode(self.buffer[start:end].tobytes())

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __add__(self, other: "PathList") -> "PathList":
        offsets = np.concatenate([self.offsets, other.offsets[1:] + self.offsets[-1]])
        return PathList(np.concatenate([self.buffer, other.buffer]), offsets)

    def is_consistent(self) -> bool:
        """Offsets start at 0, never decrease and end at the buffer's length (a sound cache)."""
        o = self.offsets
        return (o.ndim == 1 and len(o) >= 1 and o[0] == 0 and o[-1] == len(self.buffer)
                and bool(np.all(o[1:] >= o[:-1])))


# ----------------------------------------------------------------------------------------------------
# list files

def read_list_file(list_path: str | os.PathLike) -> list[str]:
    """Paths named by a ``.txt`` or ``.csv`` list (see the module docstring), relative ones joined to the
    list file's folder. DataError for a missing list or one that names nothing."""
    list_path = Path(list_path)
    if not list_path.is_file():
        raise DataError(f"data.path: list file {printable_path(list_path)} does not exist")
    text = list_path.read_bytes().decode("utf-8", "surrogateescape")
    if list_path.suffix.lower() == ".csv":
        names = _csv_paths(text, list_path)
    else:
        names = [line.rstrip("\r") for line in text.split("\n")]
    names = [name for name in names if name.strip()]
    if not names:
        raise DataError(f"data.path: list file {printable_path(list_path)} names no files")
    folder = list_path.parent
    return [name if os.path.isabs(name) else os.path.join(folder, name) for name in names]


def _csv_paths(text: str, list_path: Path) -> list[str]:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return []
    header = [cell.strip().lower() for cell in rows[0]]
    if "path" in header:
        column = header.index("path")
        body = rows[1:]
    else:
        column, body = 0, rows
    short = [i for i, row in enumerate(body) if row and len(row) <= column]  # an empty row is a blank line
    if short:
        row_number = short[0] + 1 + (len(body) < len(rows))  # counted from 1, the header included
        raise DataError(f"data.path: {printable_path(list_path)} row {row_number} has no column {column + 1} ('path')")
    return [row[column] for row in body if len(row) > column]


# ----------------------------------------------------------------------------------------------------
# the run folder's cache

def save_path_cache(run_folder: str | os.PathLike, paths: PathList, source: str) -> Path:
    """Write ``run_folder/files.npz`` atomically: the paths and the ``source`` (data.path / data.paths as
    JSON) they were resolved from, so a resume of another data source is never served this list."""
    target = Path(run_folder) / CACHE_NAME
    with atomic_writer(target) as handle:
        np.savez(handle, buffer=paths.buffer, offsets=paths.offsets, source=np.array(source))
    return target


def load_path_cache(run_folder: str | os.PathLike, source: str) -> tuple[PathList | None, str]:
    """(the cached list, "") when ``run_folder/files.npz`` holds a sound list of ``source``; else (None,
    why not) - missing, unreadable or from another source - and the caller walks again."""
    target = Path(run_folder) / CACHE_NAME
    if not target.is_file():
        return None, "no cached file list"
    try:
        with np.load(target, allow_pickle=False) as cached:
            paths = PathList(cached["buffer"], cached["offsets"])
            cached_source = str(cached["source"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        return None, f"cached file list {printable_path(target)} unreadable ({type(err).__name__})"
    if cached_source != source:
        return None, "cached file list is of another data source"
    if paths.buffer.dtype != np.uint8 or paths.offsets.dtype != np.int64 or not paths.is_consistent():
        return None, f"cached file list {printable_path(target)} is corrupt"
    return paths, ""


def source_key(specs: list[str]) -> str:
    """The cache's record of which data source a list was resolved from."""
    return json.dumps([os.path.abspath(os.path.expanduser(s)) for s in specs])
