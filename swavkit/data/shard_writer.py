"""``swavkit shard SRC OUT --images-per-shard N``: a folder or list of images -> WebDataset tar shards.

OUT gets ``shard-000000.tar``, ``shard-000001.tar`` ... (each member ``<9-digit index>.<ext>``: the
image file's bytes as they are, never re-encoded), ``shards.json`` (each shard's image count, which
pretraining reads as the epoch length) and ``skipped.txt`` (the files that could not be decoded, in the
format of a run's skipped.txt). The images are shuffled first (``--seed``; ``--keep-order`` not), since
a shard stream only mixes images within its shuffle buffer.

OUT must be new, empty, or hold only what an earlier ``swavkit shard`` wrote there; files it did not
write are never touched. The new shards are written under temporary names
(``shard-NNNNNN.tar.swavkit-new``, each atomically) and only once the whole set is written and holds at
least one image do they replace the earlier set: ``shards.json`` first names both sets (without
counts), the new shards are renamed into place, the earlier shards they do not replace are removed,
then ``skipped.txt`` and ``shards.json`` are written. A kill before that swap leaves the earlier set
untouched; a kill during it leaves a folder without counts (training asks for data.samples_per_epoch).
Either way the temporary files are recognised by their names as swavkit's own and removed by the next
``swavkit shard`` into OUT: run the same command again.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from swavkit.data.names import printable_path, skipped_report_text
from swavkit.errors import DataError
from swavkit.runtime.fileio import atomic_writer, fsync_dir, write_json_atomic, write_text_atomic

# Only the standard library at import: cli.py imports this module for every command (--help stays instant);
# torch, numpy and webdataset load when shards are written.
WRITTEN_BY = "swavkit shard"
SHARD_INDEX = "shards.json"  # = swavkit.data.shards.SHARD_INDEX (that module imports torch)
SKIPPED_NAME = "skipped.txt"
SHARD_NAME = re.compile(r"shard-\d{6}\.tar")
STAGED_SUFFIX = ".swavkit-new"  # a new shard until the whole new set is written
# What a killed `swavkit shard` leaves: staged shards, and fileio.atomic_writer's temporary files
# (".<target name>.<random>.tmp") of a shard, a staged shard, shards.json or skipped.txt.
LEFTOVER_NAME = re.compile(r"shard-\d{6}\.tar\.swavkit-new"
                           r"|\.(?:shard-\d{6}\.tar(?:\.swavkit-new)?|shards\.json|skipped\.txt)\.[A-Za-z0-9_]+\.tmp")


def _own_files(out_dir: Path) -> set[str]:
    """Names of the files an earlier ``swavkit shard`` wrote into ``out_dir`` according to its
    shards.json (empty when there is none of swavkit's)."""
    try:
        index = json.loads((out_dir / SHARD_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(index, dict) or index.get("written_by") != WRITTEN_BY:
        return set()
    named = [name for key in ("counts", "replacing")  # "replacing": both sets, while a swap is under way
             if isinstance(index.get(key), (dict, list)) for name in index[key]]
    # only plain shard names inside out_dir: a hand-edited index must never point the clean-up elsewhere
    return {SHARD_INDEX, SKIPPED_NAME, *(name for name in named if isinstance(name, str) and SHARD_NAME.fullmatch(name))}


def _leftovers(out_dir: Path) -> list[Path]:
    """The temporary files of an interrupted ``swavkit shard`` in ``out_dir`` (known by their names)."""
    if not out_dir.is_dir():
        return []
    return sorted(entry for entry in out_dir.iterdir() if LEFTOVER_NAME.fullmatch(entry.name) and entry.is_file())


def check_shard_target(out_dir: str | os.PathLike) -> set[str]:
    """Refuse (DataError, one line) an ``out_dir`` holding files ``swavkit shard`` did not write; the names
    of the files it did write there (replaced or removed by the new set)."""

    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise DataError(f"shard target {printable_path(out_dir)} exists and is not a folder; choose a new folder")
    if not out_dir.is_dir():
        return set()
    own = _own_files(out_dir) | {entry.name for entry in _leftovers(out_dir)}
    foreign = sorted(entry.name for entry in out_dir.iterdir() if entry.name not in own)
    if foreign:
        shown = ", ".join(printable_path(name) for name in foreign[:5])
        raise DataError(f"shard target {printable_path(out_dir)} holds files swavkit shard did not write ({shown}); "
                        "choose a new or empty folder")
    return own


def write_shards(source: str, out_dir: str | os.PathLike, images_per_shard: int, *, seed: int | None = 0,
                 progress: bool = True) -> dict:
    """Shard the images of ``source`` (a folder or .txt/.csv list) into ``out_dir``; returns shards.json's
    content. ``seed`` None keeps the source's order."""
    import numpy as np

    from swavkit.data.sources import resolve_images  # PIL: `swavkit --help` reads this module

    if images_per_shard < 1:
        raise DataError(f"--images-per-shard: must be >= 1, got {images_per_shard}")
    paths = list(resolve_images([source]))
    own_before = check_shard_target(out_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in _leftovers(out_dir):  # of an interrupted run into this folder
        leftover.unlink(missing_ok=True)
    order = np.arange(len(paths)) if seed is None else np.random.default_rng(seed).permutation(len(paths))
    skipped: list[tuple[str, str]] = []
    counts = _write_staged(paths, order, out_dir, images_per_shard, skipped, progress)
    if not counts:  # nothing decodable: leave the earlier index and the rest of its set alone
        raise DataError(f"{printable_path(source)}: no image could be decoded; nothing written")
    index = {"written_by": WRITTEN_BY, "source": os.path.abspath(source), "images_per_shard": images_per_shard,
             "total": sum(counts.values()), "skipped": len(skipped), "counts": counts}
    earlier = {name for name in own_before if SHARD_NAME.fullmatch(name)}
    _swap_in(out_dir, index, earlier, skipped)
    return index


def _write_staged(paths: list[str], order, out_dir: Path, images_per_shard: int, skipped: list[tuple[str, str]],
                  progress: bool) -> dict[str, int]:
    """Write the shards as ``<name>.swavkit-new`` files; {name: image count}. Appends (path, why) to
    ``skipped`` for each file that cannot be read or decoded. On any failure (or Ctrl-C) the staged
    files of this run are removed again."""
    import webdataset
    from tqdm import tqdm

    counts: dict[str, int] = {}
    position = 0
    try:
        with tqdm(total=len(paths), desc="shard", unit="img", disable=not progress, dynamic_ncols=True) as bar:
            while position < len(order):
                name = f"shard-{len(counts):06d}.tar"
                with atomic_writer(out_dir / (name + STAGED_SUFFIX)) as handle:
                    writer = webdataset.TarWriter(handle)
                    try:
                        written, position = _fill_shard(writer, paths, order, position, images_per_shard, skipped, bar)
                    finally:
                        writer.close()  # also on an interruption: a tar stream left open writes when collected
                if written:
                    counts[name] = written
                else:
                    (out_dir / (name + STAGED_SUFFIX)).unlink()
    except BaseException:
        for name in counts:
            (out_dir / (name + STAGED_SUFFIX)).unlink(missing_ok=True)
        raise
    return counts


def _fill_shard(writer, paths: list[str], order, position: int, images_per_shard: int,
                skipped: list[tuple[str, str]], bar) -> tuple[int, int]:
    """Write up to ``images_per_shard`` decodable images from ``order[position:]``; (images written, the
    new position)."""
    from swavkit.data.images import UnreadableImage, describe_failure, read_rgb_bytes  # PIL: as above

    written = 0
    while written < images_per_shard and position < len(order):
        index = int(order[position])
        path = paths[index]
        position += 1
        bar.update(1)
        try:
            data = Path(path).read_bytes()  # read once: checked from, and stored as, these bytes
            read_rgb_bytes(data, path)  # only decodable images go in: training then meets fewer surprises
        except UnreadableImage as err:
            skipped.append((path, err.reason))
            continue
        except OSError as err:
            skipped.append((path, describe_failure(err)))
            continue
        writer.write({"__key__": f"{index:09d}", os.path.splitext(path)[1].lstrip(".").lower(): data})
        written += 1
    return written, position


def _swap_in(out_dir: Path, index: dict, earlier: set[str], skipped: list[tuple[str, str]]) -> None:
    """Replace the ``earlier`` shards in ``out_dir`` by the staged ones of ``index["counts"]``, then write
    skipped.txt and shards.json. Until the last write, shards.json names both sets (so a run killed here
    leaves no file the next run would take for a foreign one) and gives no counts (so no one trains on
    the mix)."""

    new = set(index["counts"])
    write_json_atomic(out_dir / SHARD_INDEX, {"written_by": WRITTEN_BY, "replacing": sorted(earlier | new), "counts": {}})
    for name in sorted(new):
        os.replace(out_dir / (name + STAGED_SUFFIX), out_dir / name)
    fsync_dir(out_dir)
    for stale in sorted(earlier - new):
        (out_dir / stale).unlink(missing_ok=True)  # a shard of the earlier set this one does not replace
    write_text_atomic(out_dir / SKIPPED_NAME, skipped_report_text(skipped))
    write_json_atomic(out_dir / SHARD_INDEX, index)


def shard_pattern(out_dir: str | os.PathLike, n_shards: int) -> str:
    """The brace pattern naming all shards, for data.path."""
    return str(Path(out_dir) / (f"shard-{{000000..{n_shards - 1:06d}}}.tar" if n_shards > 1 else "shard-000000.tar"))


__all__ = ["write_shards", "check_shard_target", "shard_pattern", "SKIPPED_NAME"]
