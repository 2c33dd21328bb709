"""Reading a DCP folder (an FSDP run's sharded weights, ``checkpoints/sharded-step*/``) without running code
from it.

``torch.distributed.checkpoint``'s own ``FileSystemReader`` reads the folder's ``.metadata`` with a plain
``pickle.load``, and its load planners read every non-tensor item (the optimizer's ``param_groups``, ...) with
``torch.load(weights_only=False)``: a folder handed over by someone else could run any code on load. Only
tensor items are read weights-only. :class:`SafeFileSystemReader` closes both doors:

* ``.metadata`` goes through :class:`MetadataUnpickler`, which builds only the classes DCP metadata is made
  of (the dataclasses of ``torch.distributed.checkpoint.metadata``, DCP's ``_StorageInfo``, ``torch.Size``,
  torch dtypes and layouts, the path DCP records); the result is then checked against the folder before any
  tensor is allocated: every data file a plain name inside the folder and long enough for the items it is
  said to hold, no storage transforms (swavkit writes none), and no more tensor bytes declared than the
  data files hold (a small ``.metadata`` cannot make the loader allocate terabytes).
* every non-tensor item is read with ``torch.load(weights_only=True)`` first, and the planner is handed a
  re-serialisation of what that produced, so DCP's unrestricted load only ever sees plain data.

Anything refused is a :class:`CheckpointError` naming the folder; :func:`unwrap_read_error` digs it out of
the ``CheckpointException`` DCP wraps every reader failure in.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata, StorageMeta,
                                                   TensorStorageMetadata)

from swavkit.artifacts.checkpoint import CheckpointError

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# (module, name) of every class or function a DCP .metadata pickle may name (what torch's FileSystemWriter
# writes: checked against real folders in tests/test_hostile_files.py). Each is a plain record, an enum, or a
# lookup by name (torch.serialization._get_layout): none of them touches the world when called.
ALLOWED_GLOBALS = frozenset({
    *((_DCP_METADATA, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                         "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                         "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    # StorageMeta.checkpoint_id: the path the folder was saved under (pure paths: no file access)
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib._local", "PosixPath"),
    ("pathlib._local", "PurePosixPath"),
})
# A data file a .metadata may name: a plain file inside the folder (DCP writes __<rank>_<n>.distcp).
_DATA_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle naming a class or function outside :data:`ALLOWED_GLOBALS` (not a damaged file)."""


class MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that builds only :data:`ALLOWED_GLOBALS` and torch dtypes; anything else (a
    function such as ``os.system``, any other class) is a :class:`ForbiddenGlobal` before it is called.

    What stays possible, and is undone: pickle's BUILD may set attributes on an allowed class or function
    itself (its values again only allowed objects and plain data). :func:`read_metadata_file` compares their
    attributes before and after and refuses the file, restoring them, when any changed. (The pure-Python
    unpickler could refuse such a BUILD as it happens, but reads 100x slower: tens of seconds per resume for
    the metadata of a SEER-scale run.)"""

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise ForbiddenGlobal(f"{module}.{name} is not part of DCP metadata")

    def persistent_load(self, pid):
        raise ForbiddenGlobal("persistent ids are not part of DCP metadata")


def _allowed_objects() -> list:
    """The allowed classes and functions themselves (whose attributes a pickle could try to change)."""
    import importlib

    found = []
    for module, name in ALLOWED_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # pathlib._local exists from Python 3.13 on
            pass
    return found


def _attributes(objects: list) -> list[tuple[object, dict]]:
    return [(obj, dict(vars(obj))) for obj in objects if hasattr(obj, "__dict__")]


def _restore_changed(saved: list[tuple[object, dict]]) -> list[str]:
    """Put back every attribute of ``saved`` objects that changed since; the names of those that had."""
    changed = []
    for obj, before in saved:
        now = dict(vars(obj))
        for key in set(before) | set(now):
            if key in before and key in now and now[key] is before[key]:
                continue
            changed.append(f"{getattr(obj, '__qualname__', obj)}.{key}")
            if key in before:
                setattr(obj, key, before[key])
            else:
                delattr(obj, key)
    return changed


def read_metadata_file(path: str | os.PathLike) -> Metadata:
    """The :class:`Metadata` of a DCP ``.metadata`` file, built by :class:`MetadataUnpickler` (shape not yet
    checked against the folder: :func:`check_metadata`). CheckpointError, one line, for anything else."""
    saved = _attributes(_allowed_objects())
    try:
        with open(path, "rb") as handle:
            metadata = MetadataUnpickler(handle).load()
        changed = _restore_changed(saved)
        if changed:
            raise ForbiddenGlobal(f"it sets attributes of {', '.join(changed[:3])}")
    except ForbiddenGlobal as err:
        _restore_changed(saved)
        raise CheckpointError(f"refused to read {path}: it names Python objects that DCP metadata is not made of, "
                              f"so it could run code ({str(err)[:160]}); only load checkpoints you trust") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            OSError, RecursionError, MemoryError) as err:
        _restore_changed(saved)
        first = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({first}); restore the folder from a copy") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} is not DCP metadata (it holds a {type(metadata).__name__})")
    return metadata


def _tensor_bytes(name: str, entry: TensorStorageMetadata, path: Path) -> int:
    dtype, size = getattr(entry.properties, "dtype", None), entry.size
    if not isinstance(dtype, torch.dtype) or not isinstance(size, torch.Size) or any(s < 0 for s in size):
        raise CheckpointError(f"{path}: the entry of {name[:80]} is not a tensor's dtype and shape")
    return size.numel() * dtype.itemsize


def check_metadata(metadata: Metadata, folder: Path) -> None:
    """Refuse (CheckpointError) metadata that does not describe files of ``folder``: a data file outside it or
    missing, an item past the end of its file (a truncated shard), storage transforms, or more tensor bytes
    than the data files hold."""
    path = folder / ".metadata"
    storage, entries = metadata.storage_data, metadata.state_dict_metadata
    if not isinstance(storage, dict) or not isinstance(entries, dict):
        raise CheckpointError(f"{path} is not DCP metadata (no storage or state-dict table)")
    file_bytes: dict[str, int] = {}
    for info in storage.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not isinstance(name, str) or not _DATA_FILE.match(name):
            raise CheckpointError(f"{path} names a data file outside its folder ({str(name)[:80]!r}); refused")
        if name not in file_bytes:
            try:
                file_bytes[name] = (folder / name).stat().st_size
            except OSError:
                raise CheckpointError(f"{folder}: the shard file {name} is missing; restore the folder from a "
                                      "copy") from None
        offset, length = info.offset, info.length
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0):
            raise CheckpointError(f"{path}: an item of {name} has no valid offset and length")
        if offset + length > file_bytes[name]:
            raise CheckpointError(f"{folder}: the shard file {name} is shorter than its metadata says "
                                  f"({file_bytes[name]:,} bytes, items up to {offset + length:,}): truncated; "
                                  "restore the folder from a copy")
        if info.transform_descriptors:
            raise CheckpointError(f"{path}: items stored through transforms ({info.transform_descriptors!r:.80}); "
                                  "swavkit writes and reads plain shards only")
    declared = 0
    for name, entry in entries.items():
        if isinstance(entry, TensorStorageMetadata):
            declared += _tensor_bytes(str(name), entry, path)
        elif not isinstance(entry, BytesStorageMetadata):
            raise CheckpointError(f"{path}: the entry of {str(name)[:80]} is neither a tensor nor bytes")
    # Every element of every tensor is stored (uncompressed) at least once, so a folder can never hold less.
    if declared > sum(file_bytes.values()):
        raise CheckpointError(f"{path} declares {declared:,} bytes of tensors, more than its shard files hold "
                              f"({sum(file_bytes.values()):,} bytes); refused")


class _WeightsOnlyBytes:
    """A load planner seen through a filter: every non-tensor item is read weights-only, and the planner (whose
    own ``load_bytes`` is ``torch.load(weights_only=False)``) gets a re-serialisation of the plain data read."""

    def __init__(self, planner, folder: Path):
        self._planner, self._folder = planner, folder

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            plain = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            first = str(err).splitlines()[0][:160] if str(err) else ""
            raise CheckpointError(f"refused to read {self._folder}: its item {read_item.dest_index.fqn[:80]} holds "
                                  f"Python objects a weights-only load does not allow, so it could run code "
                                  f"({first}); only load checkpoints you trust") from None
        clean = io.BytesIO()
        torch.save(plain, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)


class SafeFileSystemReader(FileSystemReader):
    """DCP's ``FileSystemReader`` for a local folder that runs no code from it (see the module docstring).

    The ``.metadata`` is read and checked when the reader is made, so a refusal is a plain CheckpointError
    raised before DCP starts (inside DCP, a failed metadata read is logged with its traceback and retried as
    rank-local metadata, which swavkit never writes); every process reading the folder reaches the same verdict.
    """

    def __init__(self, folder: str | os.PathLike):
        super().__init__(folder)
        self.folder = Path(folder)
        self.metadata = read_metadata_file(self.folder / ".metadata")
        check_metadata(self.metadata, self.folder)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self.folder}: rank-local metadata is not read (swavkit writes one .metadata)")
        if getattr(self.metadata, "storage_meta", None) is None:  # as DCP's own reader does
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata

    def read_data(self, plan, planner):
        return super().read_data(plan, _WeightsOnlyBytes(planner, self.folder))


def unwrap_read_error(err: BaseException, depth: int = 0) -> CheckpointError | None:
    """The CheckpointError a reader raised, out of DCP's ``CheckpointException`` (which holds every rank's
    failure, sometimes a CheckpointException again); None when the failure was something else."""
    if isinstance(err, CheckpointError):
        return err
    if depth > 4:
        return None
    inner = [failure[0] if isinstance(failure, tuple) else failure
             for failure in getattr(err, "failures", {}).values()]
    for candidate in [*inner, err.__cause__, err.__context__]:
        if isinstance(candidate, BaseException):
            found = unwrap_read_error(candidate, depth + 1)
            if found is not None:
                return found
    return None


__all__ = ["SafeFileSystemReader", "MetadataUnpickler", "ALLOWED_GLOBALS", "read_metadata_file", "check_metadata",
           "unwrap_read_error"]
