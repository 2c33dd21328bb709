"""Images in: finding them, decoding them safely, the datasets built on them, the multi-crop augmentation,
and how their names are written out. One concept per module:

* ``constants``: normalisation statistics, default image size, the one evaluation crop rule (stdlib only).
* ``folders``: the one folder walker of every command (symlinks followed without looping), class folders.
* ``images``: decoding. Only the formats swavkit supports (never EPS and the like, whatever the file's
  extension), one pixel limit, every mode (grey, palette, alpha, CMYK, 16-bit) to 8-bit RGB.
* ``datasets``: UnlabeledImageFolder (pretraining reads flat or nested folders, class folders ignored),
  ImageFiles / LabelledImageFolder (evaluation, cluster explorer), and ReadOrReport, the one wrapper that
  turns an unreadable file into a report instead of an exception inside a worker.
* ``names``: the printable, reversible form of file names (terminal, skipped.txt, CSV, HTML) and the
  skipped-files report.
* ``sampling``: per-sample augmentation seeds and the epoch sampler (resume and distributed runs see the
  crops of one uninterrupted process).
* ``transforms``: the evaluation transform and the Preprocessing record that builds it.
* ``multicrop``: SwAV's multi-crop augmentation (geometry in the workers, colour batched).
* ``filelist``: the compact path list (PathList) every worker shares, .txt/.csv list files, the run
  folder's cached list (``files.npz``).
* ``sources``: what data.path / data.paths name (folders, list files, shards) resolved to images.
* ``shards``: WebDataset tar shards as a stream; ``shard_writer``: ``swavkit shard`` writes them.
* ``device_decode``: data.decode_on_device, JPEGs handed over encoded and decoded + cut in batches on the
  training device.

The names below are imported on first use (PEP 562), so ``swavkit.config`` can import
``swavkit.data.constants`` without loading torch, PIL and torchvision through this package.
"""

from __future__ import annotations

import importlib

from swavkit.errors import DataError  # stdlib only; its old home data/errors.py merged into swavkit/errors.py

# public name -> the submodule that defines it
_NAMES = {
    "ImageFiles": "datasets", "LabelledImageFolder": "datasets", "ReadBatch": "datasets", "ReadOrReport": "datasets",
    "UnlabeledImageFolder": "datasets", "collate_read_or_report": "datasets", "raise_for_unreadable": "datasets",
    "PathList": "filelist", "read_list_file": "filelist",
    "BUNDLED_SAMPLE": "folders", "find_classes": "folders", "find_images": "folders", "walk_images": "folders",
    "IMAGE_EXTENSIONS": "images", "IMAGE_FORMATS": "images", "MAX_IMAGE_PIXELS": "images",
    "ImageTooLarge": "images", "UnreadableImage": "images", "check_readable": "images", "open_image": "images",
    "read_rgb": "images",
    "append_skipped_report": "names", "path_from_printable": "names", "printable_path": "names",
    "read_skipped_report": "names",
    "EpochSampler": "sampling", "sample_seed": "sampling", "eval_transform": "transforms",
}


def __getattr__(name: str):
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))


__all__ = ["DataError", *_NAMES]
