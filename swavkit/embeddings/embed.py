"""Embeddings of every image of a data source (``swavkit embed``, ``swavkit.embeddings.embed``).

Each image is decoded as in pretraining (every mode to RGB; an unreadable file is skipped and listed,
not fatal), cut by the backbone's evaluation crop rule (:func:`swavkit.artifacts.preprocessing.resolve_preprocessing`),
run through the backbone in batches (on the GPU when there is one) and L2-normalised, so the inner
product of two rows is their cosine similarity.

Files, for ``--out emb.npy`` (``emb.parquet``: one file of (path, vector) rows instead of the first two):

* ``emb.npy``: [N, D] float32, one unit-length row per readable image;
* ``emb.paths.txt``: N lines, row i's image in swavkit's printable form (swavkit.data.path_from_printable
  gives the exact name back); a shard sample is ``<shard>/<member>``;
* ``emb.json``: the manifest: format, whether the run is complete, the backbone's identity (source, as an
  absolute path when it is one; architecture, feature dim, input channels, sha256 of its weights), the
  preprocessing, the sources, the finished chunks and, once complete, ``rows_sha256`` (of the row names in
  order, as ``emb.paths.txt`` holds them). ``swavkit neighbours`` and a resumed run refuse a file whose
  identity differs; ``neighbours`` refuses rows that are not finite or names that are not the recorded ones;
* ``emb.skipped.txt``: unreadable files, ``path<TAB>reason`` (appended line by line, as in pretraining);
* ``emb.parts/``: while the run is going, one ``.npy`` + ``.paths.txt`` per finished chunk.

Resumable: the images are cut into chunks (``chunk_images`` images of a folder or list; one shard each for
shards). A chunk is written atomically, then the manifest (also atomic) records it, so a killed run loses at
most the chunk in flight and the same command continues after the last recorded chunk. At the end the
chunks are joined into ``emb.npy`` (atomically), the manifest says complete and the parts are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from swavkit.artifacts.identity import backbone_name, backbone_record, input_channels, weights_sha256
from swavkit.runtime.fileio import atomic_writer, fsync_dir, naming_output, write_json_atomic, write_text_atomic
from swavkit.data.constants import RAW_PIXELS_SOURCE
from swavkit.data.names import (append_skipped_report, path_from_printable, printable_path, read_skipped_report,
                                skipped_report_text)
from swavkit.errors import ConfigError, DataError
from swavkit.runtime.cores import default_num_workers

# torch, numpy, PIL and the swavkit modules that import them (swavkit.data's datasets, shards and sources,
# runtime.device, evaluation.features, embeddings.reading) load inside the functions, so that the command
# line's --help, which reads add_arguments below, stays instant (tests/test_cli.py).
if TYPE_CHECKING:
    import numpy as np
    import torch

EMBEDDINGS_FORMAT = "swavkit-embeddings-v1"
# Images per resumable chunk of a folder or list: a kill loses at most this many images' work (about a
# minute of a CPU, seconds of a GPU) and a million images make ~120 chunk files, few enough to join.
DEFAULT_CHUNK_IMAGES = 8192
SUFFIXES = (".npy", ".parquet")


# ----------------------------------------------------------------------------------------------------
# the files of one embeddings output

@dataclass(frozen=True)
class EmbeddingFiles:
    """Where the files of ``--out`` go (see the module docstring)."""
    vectors: Path  # emb.npy or emb.parquet

    @classmethod
    def for_output(cls, out: str | Path) -> EmbeddingFiles:
        """``emb.npy`` / ``emb.parquet`` -> its files; ``emb.json`` (the manifest) finds the vectors it names."""

        out = Path(out)
        if out.suffix == ".json":
            vectors = _manifest_vectors(out)
            return cls(out.with_name(vectors) if vectors else out.with_suffix(".npy"))
        if out.suffix not in SUFFIXES:
            raise DataError(f"--out {printable_path(out)}: name a .npy file (vectors + a .paths.txt list) or a "
                            ".parquet file (path, vector rows; needs pyarrow)")
        return cls(out)

    @property
    def stem(self) -> Path:
        return self.vectors.with_suffix("")

    @property
    def is_parquet(self) -> bool:
        return self.vectors.suffix == ".parquet"

    @property
    def manifest(self) -> Path:
        return self.stem.with_suffix(".json")

    @property
    def paths(self) -> Path:
        return self.stem.with_name(self.stem.name + ".paths.txt")

    @property
    def skipped(self) -> Path:
        return self.stem.with_name(self.stem.name + ".skipped.txt")

    @property
    def parts(self) -> Path:
        return self.stem.with_name(self.stem.name + ".parts")

    def chunk(self, index: int) -> tuple[Path, Path]:
        """(vectors .npy, paths .txt) of chunk ``index`` inside ``parts``."""
        return self.parts / f"chunk-{index:06d}.npy", self.parts / f"chunk-{index:06d}.paths.txt"

    def outputs(self) -> list[Path]:
        """Every name this output may write, the manifest first."""
        return [self.manifest, self.vectors] + ([] if self.is_parquet else [self.paths]) + [self.skipped, self.parts]


def _manifest_vectors(path: Path) -> str | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("vectors_file")
    except (OSError, ValueError, AttributeError):
        return None


def read_manifest(files: EmbeddingFiles) -> dict | None:
    """The manifest of ``files``; None when there is none. DataError when the file is not one of ours."""

    if not files.manifest.exists():
        return None
    try:
        manifest = json.loads(files.manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        manifest = {"error": str(err)}
    if not isinstance(manifest, dict) or manifest.get("format") != EMBEDDINGS_FORMAT:
        raise DataError(f"{printable_path(files.manifest)} is not a swavkit embeddings manifest; choose another --out")
    problem = manifest_problem(manifest)
    if problem:
        raise DataError(f"{printable_path(files.manifest)} is not a swavkit embeddings manifest ({problem}): it was "
                        "edited or written by something else; embed the images again into another --out")
    return manifest


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# (section, key, test, what it must be): every field embed, neighbours and --query read from a manifest,
# so that an edited one is refused in one line here instead of failing wherever the field is first used.
# Fields that older swavkit versions did not write (None section = top level) may be absent.
_MANIFEST_FIELDS = (
    (None, "complete", lambda v: isinstance(v, bool), "true or false", True),
    (None, "vectors_file", lambda v: isinstance(v, str), "a file name", True),
    (None, "backbone", lambda v: isinstance(v, dict), "a mapping", True),
    (None, "data", lambda v: isinstance(v, dict), "a mapping", True),
    (None, "chunks", lambda v: isinstance(v, list) and all(
        isinstance(c, dict) and all(_is_int(c.get(k)) and c.get(k) >= 0 for k in ("index", "n_inputs", "n_rows",
                                                                                  "n_skipped")) for c in v),
     "a list of chunk records", True),
    (None, "preprocessing", lambda v: isinstance(v, dict), "a mapping", False),
    (None, "n_rows", lambda v: _is_int(v) and v >= 0, "a whole number", False),
    (None, "n_skipped", lambda v: _is_int(v) and v >= 0, "a whole number", False),
    (None, "rows_sha256", lambda v: v is None or isinstance(v, str), "a hex digest", False),
    ("backbone", "feature_dim", lambda v: _is_int(v) and v > 0, "a positive whole number", True),
    ("backbone", "source", lambda v: isinstance(v, str), "a path or name", False),
    ("backbone", "in_channels", lambda v: _is_int(v) and v > 0, "a positive whole number", False),
    ("backbone", "weights_sha256", lambda v: isinstance(v, str), "a hex digest", False),
    ("preprocessing", "image_size_px", lambda v: _is_int(v) and v > 0, "a positive whole number", False),
    ("preprocessing", "mean", lambda v: isinstance(v, list) and v and all(map(_is_number, v)), "a list of numbers",
     False),
    ("preprocessing", "std", lambda v: isinstance(v, list) and v and all(map(_is_number, v)), "a list of numbers",
     False),
    ("data", "n_chunks", _is_int, "a whole number", False),
)


def manifest_problem(manifest: dict) -> str:
    """"" when every field of ``manifest`` that swavkit reads has the type swavkit writes; else which one
    does not (a finished manifest must also give its row count)."""
    for section, key, sound, what, required in _MANIFEST_FIELDS:
        holder = manifest if section is None else manifest.get(section, {})
        if not isinstance(holder, dict):  # its section was checked first and is refused above
            continue
        name = key if section is None else f"{section}.{key}"
        if key not in holder:
            if required or (key == "n_rows" and manifest.get("complete") is True):
                return f"no {name}"
            continue
        if not sound(holder[key]):
            return f"{name} is not {what}"
    return ""


# ----------------------------------------------------------------------------------------------------
# identity: which backbone and preprocessing made the vectors

def nonfinite_weights(module: torch.nn.Module) -> tuple[int, list[str]]:
    """(how many NaN/inf values the floating-point parameters and buffers of ``module`` hold, the names of
    the tensors holding them, in state_dict order)."""
    import torch

    count, names = 0, []
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                count, names = count + bad, names + [name]
    return count, names


def nonfinite_cause(backbone: torch.nn.Module, precision: str) -> str:
    """The likely reason ``backbone`` gave NaN/inf features at ``precision`` (fp32 | bf16 | fp16), with
    what to do, for a one-line message."""
    count, names = nonfinite_weights(backbone)
    if count:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return (f"the backbone holds {count} non-finite weight value(s) (in {shown}): the checkpoint is corrupt "
                "or its training diverged; use an earlier checkpoint")
    if precision != "fp32":
        return f"its activations overflow in {precision}: run the same command with --precision fp32"
    return "its activations overflow even in fp32: check the backbone (does its training loss look sane?)"


def backbone_identity(source, backbone: torch.nn.Module, feature_dim: int) -> dict:
    """The manifest's ``backbone`` section (see :func:`identity_mismatch` for what must match); a source
    that is a file or folder is recorded as its absolute path, so a query from another directory finds it."""

    if str(source) != RAW_PIXELS_SOURCE and os.path.exists(source):  # a path: as found, wherever --query runs
        source = os.path.abspath(source)
    return {**backbone_record(source, backbone_name(backbone), feature_dim),
            "in_channels": input_channels(backbone), "weights_sha256": weights_sha256(backbone)}


IDENTITY_KEYS = ("architecture", "feature_dim", "in_channels", "weights_sha256")
PREPROCESSING_KEYS = ("image_size_px", "crop_fraction", "mean", "std")


def identity_mismatch(recorded: dict, current: dict) -> str:
    """"" when ``current`` (a manifest's backbone + preprocessing) may extend or query ``recorded``; else
    what differs, for a one-line message. The source path is not compared: a moved folder is the same
    backbone."""
    differences = []
    for section, keys in (("backbone", IDENTITY_KEYS), ("preprocessing", PREPROCESSING_KEYS)):
        for key in keys:
            old, new = recorded.get(section, {}).get(key), current.get(section, {}).get(key)
            if old != new:
                shown = (lambda v: str(v)[:12]) if key == "weights_sha256" else str
                differences.append(f"{key} {shown(old)} there, {shown(new)} here")
    return "; ".join(differences)


# ----------------------------------------------------------------------------------------------------
# chunks

@dataclass(frozen=True)
class Chunk:
    """One resumable unit: images ``start``..``stop`` of ``images`` (a folder/list's compact PathList,
    shared by every chunk: no per-image Python string for millions of images), or one ``shard``."""
    index: int
    images: object = None  # swavkit.data.PathList
    start: int = 0
    stop: int = 0
    shard: str | None = None

    def dataset(self, transform, reader=None):
        """``reader``: Preprocessing.reader() (None: 8-bit RGB, the only decoding of shards)."""
        from swavkit.embeddings.reading import NamedFiles, ShardSamples  # torch: this module is read by --help

        if self.shard:
            return ShardSamples(self.shard, transform)
        return NamedFiles([os.path.abspath(p) for p in self.images[self.start:self.stop]], transform, reader)


def plan_chunks(data: list[str], chunk_images: int) -> tuple[list[Chunk], dict]:
    """The chunks of the sources ``data`` (folders and list files, or shards; not both) and the manifest's
    ``data`` section, whose ``paths_sha256`` tells a resumed run whether the images are still the same."""
    from swavkit.data.shards import expand_shards, is_shard_spec, stored_count  # torch: not at `swavkit --help`
    from swavkit.data.sources import resolve_images  # PIL: not at `swavkit --help`

    if not data:
        raise DataError("embed: name at least one folder, list file or shard pattern")
    shard_specs = [spec for spec in data if is_shard_spec(spec)]
    if shard_specs and len(shard_specs) < len(data):
        raise DataError("embed: give folders and list files, or shards, not both in one run")
    digest = hashlib.sha256()
    if shard_specs:
        shards = [os.path.abspath(s) for spec in shard_specs for s in expand_shards(spec)]
        for shard in shards:
            digest.update(os.fsencode(shard) + b"\n")
        chunks = [Chunk(i, shard=shard) for i, shard in enumerate(shards)]
        n_inputs = stored_count(shards)
    else:
        paths = resolve_images(list(data))
        for path in paths:
            digest.update(os.fsencode(os.path.abspath(path)) + b"\n")
        chunks = [Chunk(i, paths, start, min(start + chunk_images, len(paths)))
                  for i, start in enumerate(range(0, len(paths), chunk_images))]
        n_inputs = len(paths)
    record = {"sources": [os.path.abspath(spec) for spec in data], "kind": "shards" if shard_specs else "images",
              "n_inputs": n_inputs, "n_chunks": len(chunks), "chunk_images": None if shard_specs else chunk_images,
              "paths_sha256": digest.hexdigest()}
    return chunks, record


# ----------------------------------------------------------------------------------------------------
# the run

@dataclass
class EmbedResult:
    """What ``embed`` wrote: ``vectors`` (.npy/.parquet), ``manifest`` (.json); ``n_rows`` images embedded,
    ``n_skipped`` unreadable files (listed in ``skipped``), ``resumed_chunks`` chunks an earlier run had
    finished, ``wall_time_s`` this call's time."""
    vectors: Path
    manifest: Path
    paths: Path | None
    skipped: Path
    n_rows: int
    n_skipped: int
    feature_dim: int
    resumed_chunks: int
    wall_time_s: float


def _embed_chunk(backbone, chunk: Chunk, transform, reader, *, device: torch.device, dtype, batch_size: int,
                 num_workers: int, bar) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """-> (vectors [n, D] float32 unit rows in input order, their n names, unreadable (path, reason))."""
    import torch

    with torch.inference_mode():
        return _embed_batches(backbone, chunk, transform, reader, device=device, dtype=dtype, batch_size=batch_size,
                              num_workers=num_workers, bar=bar)


def _embed_batches(backbone, chunk, transform, reader, *, device, dtype, batch_size, num_workers, bar):
    """The body of :func:`_embed_chunk` (under inference mode)."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from swavkit.embeddings.reading import collate_named  # torch: this module is read by `swavkit --help`

    loader = DataLoader(chunk.dataset(transform, reader), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_named, pin_memory=device.type == "cuda")
    positions, vectors, names, unreadable = [], [], [], []
    for batch_positions, images, batch_names, batch_unreadable in loader:
        unreadable += batch_unreadable
        if images is not None:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                features = backbone(images.to(device, non_blocking=True))
            vectors.append(torch.nn.functional.normalize(features.float(), dim=1).cpu().numpy())
            positions += batch_positions
            names += batch_names
        bar.update(len(batch_positions) + len(batch_unreadable))
    order = np.argsort(np.asarray(positions, dtype=np.int64), kind="stable")  # shard workers interleave
    stacked = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
    return stacked[order], [names[i] for i in order], unreadable


def _save_chunk(files: EmbeddingFiles, chunk: Chunk, vectors: np.ndarray, names: list[str]) -> None:
    import numpy as np

    vectors_path, names_path = files.chunk(chunk.index)
    files.parts.mkdir(parents=True, exist_ok=True)
    with atomic_writer(vectors_path) as handle:
        np.save(handle, vectors)
    with atomic_writer(names_path, "w") as handle:
        handle.writelines(printable_path(name) + "\n" for name in names)


def _require_pyarrow(files: EmbeddingFiles) -> None:
    if files.is_parquet:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError(f"--out {printable_path(files.vectors)}: .parquet needs pyarrow; pip install "
                              "\"swavkit[parquet]\", or name a .npy file") from None


def check_output(files: EmbeddingFiles, identity: dict, data_record: dict) -> dict | None:
    """The earlier manifest to resume (None: a new output). Refused with one line (DataError), before
    anything is written: files there that no swavkit embed run wrote (no manifest), or a manifest made by
    another backbone, preprocessing or set of images - the earlier vectors stay as they are."""

    manifest = read_manifest(files)
    if manifest is None:
        foreign = [path.name for path in files.outputs()[1:] if path.exists() or path.is_symlink()]
        if foreign:
            raise DataError(f"--out {printable_path(files.vectors)}: {', '.join(map(printable_path, foreign))} "
                            f"exist(s) without the manifest {printable_path(files.manifest.name)} that swavkit "
                            "embed writes first: not swavkit's to replace; choose another --out")
        return None
    if manifest.get("vectors_file") != files.vectors.name:
        raise DataError(f"{printable_path(files.manifest)} belongs to {printable_path(manifest.get('vectors_file'))}, "
                        f"not {printable_path(files.vectors.name)}; choose another --out")
    mismatch = identity_mismatch(manifest, identity)
    if mismatch:
        raise DataError(f"{printable_path(files.manifest)} holds embeddings from another backbone or preprocessing "
                        f"({mismatch}); nothing was changed: use the same backbone to resume, or another --out")
    if manifest.get("data", {}).get("paths_sha256") != data_record["paths_sha256"] or \
            manifest.get("data", {}).get("chunk_images") != data_record["chunk_images"]:
        raise DataError(f"{printable_path(files.manifest)} was made from other images or chunks (the sources, "
                        "their files or --chunk-images changed since); nothing was changed: choose another --out")
    return manifest


def _join_npy(files: EmbeddingFiles, chunks: list[dict], feature_dim: int) -> None:
    """The chunks' vectors -> ``files.vectors`` [N, D], streamed through a memory map (never all in RAM),
    written to a temporary sibling and renamed; the paths list likewise."""
    import numpy as np

    n_rows = sum(chunk["n_rows"] for chunk in chunks)
    tmp = files.vectors.with_name(f".{files.vectors.name}.{os.getpid()}.tmp")
    try:
        joined = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_rows, feature_dim))
        row = 0
        for chunk in chunks:
            part = np.load(files.chunk(chunk["index"])[0])
            joined[row:row + len(part)] = part
            row += len(part)
        joined.flush()
        del joined
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, files.vectors)
        fsync_dir(files.vectors.parent)
    finally:
        tmp.unlink(missing_ok=True)
    with atomic_writer(files.paths, "w") as handle:
        for chunk in chunks:
            handle.write(files.chunk(chunk["index"])[1].read_text(encoding="utf-8"))


def _join_parquet(files: EmbeddingFiles, chunks: list[dict], feature_dim: int) -> None:
    """The chunks -> one parquet file of (path: string, vector: fixed-size list of D float32), chunk by
    chunk (one row group each), written to a temporary sibling and renamed."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("path", pa.string()), ("vector", pa.list_(pa.float32(), feature_dim))])
    with atomic_writer(files.vectors) as handle:
        with pq.ParquetWriter(handle, schema) as writer:
            for chunk in chunks:
                vectors_path, names_path = files.chunk(chunk["index"])
                vectors = np.load(vectors_path).reshape(-1, feature_dim)
                names = names_path.read_text(encoding="utf-8").splitlines()
                column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), feature_dim)
                writer.write_table(pa.table({"path": pa.array(names, pa.string()), "vector": column}, schema=schema))


def _remove_parts(files: EmbeddingFiles, chunks: list[dict]) -> None:
    """Delete the chunk files this run wrote (by name: a file someone else put there stays, and so does
    the folder then)."""
    for chunk in chunks:
        for path in files.chunk(chunk["index"]):
            path.unlink(missing_ok=True)
    try:
        files.parts.rmdir()
    except OSError:
        pass


def _prepare_backbone(source, image_size_px: int | None, device: torch.device, channels_last: bool):
    """(backbone on ``device`` in eval mode, Preprocessing, identity dict, feature dim D)."""
    import torch

    from swavkit.artifacts.preprocessing import resolve_preprocessing  # torch + timm: not at `swavkit --help`
    from swavkit.evaluation.features import load_eval_backbone  # torch: not at `swavkit --help`

    preprocessing = resolve_preprocessing(source, image_size_px)
    backbone = load_eval_backbone(source)
    channels = input_channels(backbone)
    with torch.inference_mode():  # D from one forward pass: not every module records its width
        size = preprocessing.image_size_px
        probe = backbone(torch.zeros(1, channels, size, size))
    feature_dim = int(probe.shape[1])
    if not bool(torch.isfinite(probe).all()):  # e.g. one NaN weight: every row would be NaN

        raise DataError(f"{printable_path(str(source))}: the backbone's features are NaN/inf even for a blank "
                        f"image; {nonfinite_cause(backbone, 'fp32')} (nothing was written)")
    identity = {"backbone": backbone_identity(source, backbone, feature_dim),
                "preprocessing": preprocessing.as_dict()}
    backbone.to(device).eval()
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    return backbone, preprocessing, identity, feature_dim


def embed(source: str | Path, data: str | Path | list, out: str | Path, *, image_size_px: int | None = None,
          batch_size: int = 256, num_workers: int | None = None, device: str | torch.device = "auto",
          precision: str = "auto", channels_last: bool = False, chunk_images: int = DEFAULT_CHUNK_IMAGES,
          progress: bool = True) -> EmbedResult:
    """L2-normalised backbone features of every image of ``data``, written to ``out`` (see the module
    docstring for the files); resumes an unfinished run of the same backbone, preprocessing and images.

    Args:
        source: a backbone source as for :func:`swavkit.load_backbone` (run folder, export, checkpoint,
            released SwAV file), ``timm:<name>`` (random init, seeded) or ``pixels``.
        data: a folder, a .txt/.csv list of image paths, a shard pattern ending in .tar, or a list of them.
        out: ``emb.npy`` or ``emb.parquet`` (pyarrow).
        image_size_px: input side (default: the export's input size, else the checkpoint's large crop).
        batch_size: images per forward pass.
        num_workers: decoding processes (None: min(4, usable CPU cores - 1)).
        device: "auto", "cpu", "cuda", "cuda:1", or a torch.device.
        precision: "auto" (bf16 on GPUs that support it, else fp32), "fp32", "bf16" or "fp16"; the vectors are
            float32 either way.
        channels_last: NHWC inputs and weights; faster for convnets on GPUs.
        chunk_images: images per resumable chunk of a folder or list (shards: one chunk per shard).
        progress: show a tqdm bar.

    Returns:
        :class:`EmbedResult`: the files written and the counts.

    Raises:
        DataError: one line for a refused output (a file of another backbone or preprocessing, a file
            swavkit did not write) and for sources without images.
        LoadError: the backbone source cannot be loaded.

    Example:
        ```python
        result = swavkit.embed("runs/a", "/data/unlabelled", "embeddings/a.npy")   # the same call resumes
        vectors = numpy.load(result.vectors)            # [N, D] float32, unit rows
        paths = result.paths.read_text().splitlines()   # row i is paths[i]
        ```
    """
    from tqdm import tqdm

    from swavkit.runtime.device import autocast_dtype, resolve_device, resolve_precision  # torch: as above

    if chunk_images < 1 or batch_size < 1:
        raise ValueError(f"chunk_images and batch_size must be >= 1, got {chunk_images} and {batch_size}")
    start_time = time.perf_counter()
    files = EmbeddingFiles.for_output(out)
    _require_pyarrow(files)
    chunks, data_record = plan_chunks([str(d) for d in data] if isinstance(data, (list, tuple)) else [str(data)],
                                      chunk_images)
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    dtype = autocast_dtype(precision)
    backbone, preprocessing, identity, feature_dim = _prepare_backbone(source, image_size_px, device, channels_last)
    if preprocessing.reader() is not None and any(chunk.shard for chunk in chunks):
        raise DataError(f"{data}: shards are decoded as 8-bit RGB and this backbone takes {preprocessing.channels} "
                        f"channel(s) at {preprocessing.bit_depth} bits; embed a folder or a list of the image files")
    earlier = check_output(files, identity, data_record)  # all checks before the first write
    manifest = earlier or {"format": EMBEDDINGS_FORMAT, "complete": False, "vectors_file": files.vectors.name,
                           "paths_file": None if files.is_parquet else files.paths.name,
                           "skipped_file": files.skipped.name, **identity, "data": data_record,
                           "normalisation": "l2", "dtype": "float32", "chunks": []}
    done = {chunk["index"] for chunk in manifest["chunks"]}
    if not manifest["complete"]:
        write_json_atomic(files.manifest, manifest)  # first: from now on every file here is recognisably ours
        _rewind_skipped(files, sum(chunk["n_skipped"] for chunk in manifest["chunks"]))
        workers = default_num_workers() if num_workers is None else num_workers
        transform, reader = preprocessing.transform(), preprocessing.reader()
        already = sum(chunk["n_inputs"] for chunk in manifest["chunks"])
        with tqdm(total=data_record["n_inputs"], initial=already, desc="embedding", unit="img",
                  disable=not progress, dynamic_ncols=True) as bar:
            for chunk in chunks:
                if chunk.index in done:
                    continue
                vectors, names, unreadable = _embed_chunk(backbone, chunk, transform, reader, device=device, dtype=dtype,
                                                          batch_size=batch_size, num_workers=workers, bar=bar)
                _refuse_nonfinite_rows(vectors, names, chunk, backbone, precision)
                _save_chunk(files, chunk, vectors.reshape(-1, feature_dim), names)
                append_skipped_report(files.skipped, unreadable)
                manifest["chunks"].append({"index": chunk.index, "n_inputs": len(names) + len(unreadable),
                                           "n_rows": len(names), "n_skipped": len(unreadable),
                                           "precision": precision})  # a resumed run may run elsewhere
                write_json_atomic(files.manifest, manifest)  # the chunk counts as done only from here on
        _finish(files, manifest, feature_dim)
    return EmbedResult(files.vectors, files.manifest, None if files.is_parquet else files.paths, files.skipped,
                       manifest["n_rows"], manifest["n_skipped"], feature_dim, len(done),
                       time.perf_counter() - start_time)


def _refuse_nonfinite_rows(vectors: np.ndarray, names: list[str], chunk: Chunk, backbone, precision: str) -> None:
    """DataError (one line: how many, the first image, the likely cause) when any row of a chunk's vectors
    [n, D] is not finite, before the chunk is saved: the run stops unfinished (the manifest is not marked
    complete, ``neighbours`` refuses it), the chunks before it stay for a resume (e.g. with --precision fp32)."""
    import numpy as np

    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1)) if len(names) else np.zeros(0, np.int64)
    if len(bad):
        raise DataError(f"embed: {len(bad)} of the {len(names)} images of chunk {chunk.index} gave NaN/inf features "
                        f"(first {printable_path(names[bad[0]])}); {nonfinite_cause(backbone, precision)}; the run "
                        "stopped unfinished, its earlier chunks are kept")


def _rewind_skipped(files: EmbeddingFiles, n_recorded: int) -> None:
    """Keep the first ``n_recorded`` lines of the skipped list (those of the chunks the manifest records):
    a run killed after listing a chunk's unreadable files but before recording the chunk would otherwise
    list them twice once the chunk is redone - as a resumed training run takes skipped.txt back."""

    if files.skipped.exists():
        entries = read_skipped_report(files.skipped)
        if len(entries) != n_recorded:
            write_text_atomic(files.skipped, skipped_report_text(entries[:n_recorded]))


def _finish(files: EmbeddingFiles, manifest: dict, feature_dim: int) -> None:
    """Join the chunks in order, mark the manifest complete, remove the parts."""

    chunks = sorted(manifest["chunks"], key=lambda chunk: chunk["index"])
    manifest["n_rows"] = sum(chunk["n_rows"] for chunk in chunks)
    manifest["n_skipped"] = sum(chunk["n_skipped"] for chunk in chunks)
    if manifest["n_rows"] == 0:
        raise DataError(f"none of the {manifest['n_skipped']} images could be read (listed in "
                        f"{printable_path(files.skipped)})")
    with naming_output(files.vectors):  # a full disk names emb.npy, not its temporary sibling
        (_join_parquet if files.is_parquet else _join_npy)(files, chunks, feature_dim)
    rows = hashlib.sha256()  # the row names in order, as .paths.txt holds them: a swapped line is found
    for chunk in chunks:
        rows.update(files.chunk(chunk["index"])[1].read_bytes())
    manifest["rows_sha256"] = rows.hexdigest()
    manifest["complete"] = True
    manifest["chunks"] = chunks
    write_json_atomic(files.manifest, manifest)
    _remove_parts(files, chunks)


# ----------------------------------------------------------------------------------------------------
# reading a finished output

@dataclass
class Embeddings:
    """A finished embeddings output: ``vectors`` [N, D] float32 unit rows, ``paths`` [N] exact file names,
    ``manifest`` (its ``backbone`` and ``preprocessing`` say how to embed a query the same way)."""
    vectors: np.ndarray
    paths: list[str]
    manifest: dict
    files: EmbeddingFiles


def load_embeddings(path: str | Path) -> Embeddings:
    """Read what :func:`embed` wrote (``emb.npy``, ``emb.parquet`` or ``emb.json``). DataError, one line:
    no manifest (not written by swavkit embed: its backbone is unknown), an unfinished run, files that
    cannot be read (zero-byte, torn, foreign), whose rows disagree with the manifest (count, width, the
    names or their order: ``rows_sha256``), or rows that are NaN/inf."""
    import numpy as np

    files = EmbeddingFiles.for_output(path)
    manifest = read_manifest(files)
    if manifest is None:
        raise DataError(f"{printable_path(path)}: no {printable_path(files.manifest.name)} next to it; only what "
                        "swavkit embed wrote can be searched (its manifest names the backbone)")
    if not manifest.get("complete"):
        total = manifest.get("data", {}).get("n_chunks", "?")
        raise DataError(f"{printable_path(files.manifest)}: the embedding run is not finished "
                        f"({len(manifest.get('chunks', []))} of {total} chunks); run the same swavkit embed "
                        "command again to finish it")
    changed = "the files were changed after swavkit embed wrote them; embed the images again"
    try:
        dim, n_rows = int(manifest["backbone"]["feature_dim"]), int(manifest["n_rows"])
        if files.is_parquet:
            import pyarrow.parquet as pq

            table = pq.read_table(files.vectors)
            vectors = table.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, dim)
            names = table.column("path").to_pylist()
            names_bytes = "".join(f"{name}\n" for name in names).encode("utf-8")
        else:
            _refuse_other_dtype(files.vectors)  # from the header: a pickled object array is never opened
            vectors = np.load(files.vectors, mmap_mode="r", allow_pickle=False)
            names_bytes = files.paths.read_bytes()
            names = names_bytes.decode("utf-8").splitlines()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as err:  # zero-byte, torn, foreign
        raise DataError(f"{printable_path(files.vectors)}: not readable as swavkit embeddings ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'empty'}); {changed}") from None
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise DataError(f"{printable_path(files.vectors)}: an array of shape {list(vectors.shape)}, the manifest says "
                        f"rows of {dim}; {changed}")
    if n_rows < 1 or len(vectors) == 0:  # swavkit embed never finishes without a row
        raise DataError(f"{printable_path(files.vectors)}: holds no embeddings (0 rows); {changed}")
    if not len(vectors) == len(names) == n_rows:
        raise DataError(f"{printable_path(files.vectors)}: {len(vectors)} vectors and {len(names)} paths, the "
                        f"manifest says {n_rows}; {changed}")
    recorded = manifest.get("rows_sha256")  # absent in files of swavkit before it was recorded
    if recorded is not None and hashlib.sha256(names_bytes).hexdigest() != recorded:
        raise DataError(f"{printable_path(files.paths if not files.is_parquet else files.vectors)}: its image names "
                        f"are not the ones (or not in the order) swavkit embed wrote (sha256 differs from the "
                        f"manifest's rows_sha256); {changed}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    refuse_nonfinite(vectors, names, files.vectors)
    return Embeddings(vectors, [path_from_printable(name) for name in names], manifest, files)


def _refuse_other_dtype(path: Path) -> None:
    """DataError, one line, when the .npy at ``path`` does not hold float32 (what embed writes), read from
    its header alone: an object array (pickled Python objects, code when unpickled) or a complex or
    integer array never reaches np.load, whose cast to float32 would accept the latter silently."""
    import numpy as np

    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[version]
            _, _, dtype = read_header(handle)
        except (ValueError, KeyError, EOFError):
            return  # not a readable .npy header: np.load (allow_pickle=False) says what is wrong with it
    if dtype.hasobject:
        raise DataError(f"{printable_path(path)}: holds pickled Python objects, not float32 vectors (never unpickled: "
                        "such a file can run code); it is not what swavkit embed wrote - embed the images again")
    if dtype != np.float32:
        raise DataError(f"{printable_path(path)}: holds {dtype} values, not the float32 vectors swavkit embed "
                        "writes; embed the images again")


def refuse_nonfinite(vectors: np.ndarray, names: list[str], source: Path) -> None:
    """DataError, one line, when a row of ``vectors`` [N, D] (named by ``names`` [N], printable) holds NaN
    or inf: a search would silently drop
    it (faiss ranks NaN nowhere) and a duplicate search would find no groups."""
    import numpy as np

    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if len(bad):
        raise DataError(f"{printable_path(source)}: {len(bad)} of its {len(vectors)} rows are NaN/inf (first: row "
                        f"{bad[0]}, {names[bad[0]]}); they cannot be searched: the file was edited, or "
                        "made by a backbone with broken weights - embed the images again with a sound backbone")


# ----------------------------------------------------------------------------------------------------
# command line: swavkit embed


__all__ = ["EMBEDDINGS_FORMAT", "DEFAULT_CHUNK_IMAGES", "EmbeddingFiles", "EmbedResult", "Embeddings", "embed",
           "load_embeddings", "weights_sha256", "backbone_identity", "identity_mismatch"]
