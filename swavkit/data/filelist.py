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
import itertools
import json
import os
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from swavkit.errors import DataError
from swavkit.data.names import printable_path
from swavkit.runtime.fileio import atomic_writer

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
    list file's folder. DataError for a missing list, one that names nothing, or an unreadable CSV row."""
    list_path = Path(list_path)
    names = _list_names(list_path, limit=None)
    if not names:
        raise DataError(f"data.path: list file {printable_path(list_path)} names no files")
    return names


def first_list_entry(list_path: str | os.PathLike) -> str | None:
    """The first path a list file names (as :func:`read_list_file` gives it), reading only up to it; None
    when it names nothing. DataError as read_list_file's for what it reads."""
    names = _list_names(Path(list_path), limit=1)
    return names[0] if names else None


def _list_names(list_path: Path, limit: int | None) -> list[str]:
    """The non-empty entries of a list file, joined to its folder; only the first ``limit`` when given,
    and then the file is read only as far as they are."""
    if not list_path.is_file():
        raise DataError(f"data.path: list file {printable_path(list_path)} does not exist")
    is_csv = list_path.suffix.lower() == ".csv"
    with open(list_path, "rb") as handle:
        # split at b"\n" only and decoded with surrogateescape: any file name round-trips. The whole list
        # is decoded at once (10M lines); only a few first entries are read line by line.
        if limit is None:
            text = handle.read().decode("utf-8", "surrogateescape")
            lines = io.StringIO(text, newline="\n") if is_csv else text.split("\n")
        else:
            lines = (raw.decode("utf-8", "surrogateescape") for raw in handle)
        names = _csv_paths(lines, list_path, limit) if is_csv else _txt_paths(lines, limit)
    folder = list_path.parent
    return [name if os.path.isabs(name) else os.path.join(folder, name) for name in names]


def _txt_paths(lines: Iterable[str], limit: int | None = None) -> list[str]:
    """The non-empty lines of a .txt list (line ends dropped); the first ``limit`` only when given."""
    names = []
    for line in lines:
        name = line.rstrip("\n").rstrip("\r")
        if name.strip():
            names.append(name)
            if len(names) == limit:
                break
    return names


def _csv_rows(lines: Iterable[str], list_path: Path) -> Iterator[list[str]]:
    """The rows of a CSV list; DataError (one line, naming the file and the line where the row starts)
    for a row the csv module refuses, e.g. a field over ``csv.field_size_limit()`` (an unclosed quote
    runs a field to the end of the file)."""
    reader = csv.reader(lines)
    while True:
        start_line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(f"data.path: {printable_path(list_path)} line {start_line}: unreadable CSV ({err}); "
                            "fix that line (an unclosed quote?)") from None
        yield row


def _csv_paths(lines: Iterable[str], list_path: Path, limit: int | None = None) -> list[str]:
    """The path column of a CSV list (see the module docstring); only the first ``limit`` non-empty
    paths when given, reading no further than they need."""
    rows = _csv_rows(lines, list_path)
    first = next(rows, None)
    if first is None:
        return []
    header = [cell.strip().lower() for cell in first]
    if "path" in header:
        column, row_number, body = header.index("path"), 1, rows
    else:
        column, row_number, body = 0, 0, itertools.chain([first], rows)
    names = []
    for row in body:
        row_number += 1  # counted from 1, the header included
        if not row:  # an empty row is a blank line
            continue
        if len(row) <= column:
            raise DataError(f"data.path: {printable_path(list_path)} row {row_number} has no column {column + 1} ('path')")
        if row[column].strip():
            names.append(row[column])
            if len(names) == limit:
                break
    return names


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
