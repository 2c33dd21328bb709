"""What ``data.path`` / ``data.paths`` name, resolved to images.

* a folder of images, flat or nested (walked with :func:`swavkit.data.walk_images`);
* a ``.txt`` / ``.csv`` list of image paths, relative to the list file (:mod:`swavkit.data.filelist`);
* WebDataset tar shards: a brace pattern or glob ending in ``.tar``, or a list file of ``.tar`` paths
  (:mod:`swavkit.data.shards`; streamed, never resolved to a list of images);
* several of the first two: ``data.paths: [folder_a, list_b.txt, ...]``, read as one data set in that order.
"""

from __future__ import annotations

from swavkit.errors import DataError
from swavkit.data.filelist import LIST_SUFFIXES, PathList, read_list_file
from swavkit.data.folders import find_images
from swavkit.data.names import printable_path


def data_specs(path: str, paths: list[str]) -> list[str]:
    """``data.path`` and ``data.paths`` -> the list of sources ([] = the bundled sample)."""
    if path and paths:
        raise DataError("data.path and data.paths are both set; name one source in data.path or several in "
                        "data.paths")
    return list(paths) if paths else ([path] if path else [])


def is_list_file(spec: str) -> bool:
    return spec.lower().endswith(LIST_SUFFIXES)


def resolve_images(specs: list[str]) -> PathList:
    """The image paths of folders and list files, in the order given (each folder sorted, each list in
    its own order). DataError naming the source that is missing or holds no images."""
    parts = [PathList.from_paths(read_list_file(spec) if is_list_file(spec) else find_images(spec))
             for spec in specs]
    if not parts:
        raise DataError("data.paths: empty; name at least one folder or list file")
    resolved = parts[0]
    for part in parts[1:]:
        resolved = resolved + part
    return resolved


def describe_specs(specs: list[str]) -> str:
    """The sources for the data banner, printable."""
    if len(specs) <= 2:
        return " + ".join(printable_path(s) for s in specs)
    return f"{printable_path(specs[0])} + {len(specs) - 1} more sources"
