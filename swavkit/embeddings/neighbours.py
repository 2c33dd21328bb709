"""Nearest neighbours and near-duplicates in an embeddings file (``swavkit neighbours``).

Reads what ``swavkit embed`` wrote (:mod:`swavkit.embeddings.embed`: L2-normalised vectors, their image paths and a
manifest naming the backbone), searches it with faiss by cosine similarity (inner product of unit vectors)
and writes:

* ``neighbours.csv``: ``query, rank, neighbour, cosine`` (rank 1 = nearest): every embedded image is a
  query (and not its own neighbour; an identical copy is one), or with ``--query IMG`` those images,
  embedded by the backbone the manifest names (an image that was embedded too finds itself first);
* ``duplicates.csv`` (``--duplicates``): ``group, path, cosine_to_first``: connected components of the
  graph "cosine >= --threshold among each image's --k nearest", largest group first;
* ``index.html`` + ``thumbs/``: a static page of thumbnails (the cluster explorer's page code).

The index (``--index auto``): exact ``IndexFlatIP`` up to :data:`EXACT_MAX_VECTORS` vectors, IVF above.
Why, measured on one core of this 2-core machine (``benchmarks/bench_neighbours.py``, table in
``benchmarks/README.md``, 128-d): searching every image against all others exactly costs N^2 D: 45-60 s at
100k, ~80 min at 1M. IVF over 1M vectors built in ~50 s and answered ~24x the exact queries/s at nprobe 16,
with recall@10 1.000 on clustered vectors (0.08 on structureless random ones, the worst case). HNSW built
14-32 s at 100k (minutes at 1M); a ``neighbours`` run builds its index once and queries it once, so build
time dominates and IVF is the default (``--index hnsw`` and ``--index flat`` stay available).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from swavkit.artifacts.identity import weights_sha256
from swavkit.artifacts.pages import EAGER_THUMBNAILS, check_output_folder, page_head, thumbnail_figure, write_thumbnail
from swavkit.data.names import printable_path
from swavkit.embeddings.embed import load_embeddings
from swavkit.errors import ConfigError, DataError, is_user_error
from swavkit.evaluation.options import default_ivf_lists
from swavkit.runtime.fileio import atomic_writer, removed_on_failure, write_text_atomic

# Up to this many vectors `--index auto` searches exactly (see the module docstring and
# benchmarks/bench_neighbours.py): an exact all-against-all search of this many 128-d vectors took
# 45-60 s on one CPU core (4x that at 512-d), and below it an approximate index saves less than it costs.
EXACT_MAX_VECTORS = 100_000
INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
# IVF: faiss's rule of thumb for the cell count, ~4 sqrt(N) (swavkit.evaluation.options.default_ivf_lists), and k-means
# trained on a sample of IVF_TRAIN_POINTS_PER_LIST points per cell: faiss's default (256 per cell, i.e.
# every vector at 1M) took minutes on 2 cores, 40 per cell ~20 s, above faiss's 39-point minimum.
IVF_TRAIN_POINTS_PER_LIST = 40
IVF_DEFAULT_PROBE = 16  # cells searched per query (as swavkit knn); recall table: bench_neighbours.py
HNSW_NEIGHBOURS = 32  # M: graph links per vector
HNSW_EF_CONSTRUCTION = 40
HNSW_DEFAULT_EF_SEARCH = 128


def choose_index(n_vectors: int, kind: str = "auto") -> str:
    """The index kind ``auto`` means for ``n_vectors`` (flat up to EXACT_MAX_VECTORS, else ivf)."""

    if kind not in INDEX_KINDS:
        raise ConfigError(f"--index: '{kind}' is not one of {', '.join(INDEX_KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if n_vectors <= EXACT_MAX_VECTORS else "ivf"


def build_search_index(vectors: np.ndarray, kind: str = "auto", *, n_lists: int = 0, n_probe: int = 0,
                       ef_search: int = 0, seed: int = 0):
    """A faiss inner-product index over unit vectors [N, D] float32 (cosine = inner product).

    Args:
        kind: "flat" (exact), "ivf" (IndexIVFFlat, ``n_lists`` cells, 0 = ~4 sqrt(N); ``n_probe`` cells
            searched, 0 = IVF_DEFAULT_PROBE), "hnsw" (IndexHNSWFlat, ``ef_search`` 0 = the default), or
            "auto" (:func:`choose_index`).
        seed: picks the k-means training sample, so a run is repeatable.
    """
    import faiss  # its OpenMP runtime only when searching

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n_vectors, dim = vectors.shape
    kind = choose_index(n_vectors, kind)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = ef_search or HNSW_DEFAULT_EF_SEARCH
    else:
        n_lists = min(n_lists or default_ivf_lists(n_vectors), n_vectors)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, n_lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_LIST
        n_train = min(n_vectors, IVF_TRAIN_POINTS_PER_LIST * n_lists)
        sample = np.random.default_rng(seed).choice(n_vectors, n_train, replace=False) if n_train < n_vectors \
            else slice(None)
        index.train(vectors[sample])
        index.nprobe = min(n_probe or IVF_DEFAULT_PROBE, n_lists)
    index.add(vectors)
    return index


def describe_index(index) -> str:
    """"flat (exact)", "ivf 4000 cells, 64 probed" or "hnsw M=32, efSearch 128"."""
    import faiss

    if isinstance(index, faiss.IndexIVF):
        return f"ivf {index.nlist} cells, {index.nprobe} probed"
    if isinstance(index, faiss.IndexHNSW):
        return f"hnsw M={HNSW_NEIGHBOURS}, efSearch {index.hnsw.efSearch}"
    return "flat (exact)"


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found_i ∩ exact_i| / k for neighbour ids [Q, k] (found may hold -1 = none)."""
    k = exact.shape[1]
    hits = sum(len(set(row[row >= 0].tolist()) & set(truth.tolist())) for row, truth in zip(found, exact))
    return hits / (k * len(exact)) if len(exact) else math.nan


# ----------------------------------------------------------------------------------------------------
# searching

def search(index, queries: np.ndarray, k: int, *, self_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of unit vectors ``queries`` [Q, D] -> (ids [Q, k] int64, cosines [Q, k] float32), best first;
    id -1 / cosine nan where the index found fewer. ``self_ids`` [Q]: each query's own row in the index,
    left out of its result (an image is not its own neighbour; an identical copy still is one)."""
    extra = 0 if self_ids is None else 1
    cosines, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k + extra, index.ntotal))
    if self_ids is not None:
        keep = ids != self_ids[:, None]
        # rows where the index did not return the query itself: drop the last (weakest) instead
        keep[keep.all(axis=1), -1] = False
        ids = ids[keep].reshape(len(ids), -1)
        cosines = cosines[keep].reshape(len(cosines), -1)
    if ids.shape[1] < k:  # fewer vectors than k: pad
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        cosines = np.pad(cosines, ((0, 0), (0, pad)), constant_values=np.nan)
    cosines = np.where(ids >= 0, cosines, np.nan).astype(np.float32)
    return ids.astype(np.int64), cosines


def search_all(index, vectors: np.ndarray, k: int, *, batch_rows: int = 16384, progress: bool = True):
    """Every row of ``vectors`` [N, D] as a query against ``index`` (which holds them), self excluded:
    (ids [N, k], cosines [N, k]), in batches so a progress bar can show the pass."""
    from tqdm import tqdm

    ids, cosines = [], []
    for start in tqdm(range(0, len(vectors), batch_rows), desc="searching", unit="batch", disable=not progress):
        rows = np.arange(start, min(start + batch_rows, len(vectors)))
        batch_ids, batch_cosines = search(index, vectors[rows], k, self_ids=rows)
        ids.append(batch_ids)
        cosines.append(batch_cosines)
    return np.concatenate(ids), np.concatenate(cosines)


def duplicate_groups(ids: np.ndarray, cosines: np.ndarray, threshold: float) -> list[list[int]]:
    """Connected components of the graph "i - ids[i, r] when cosines[i, r] >= threshold" ([N, k] each),
    of two or more images: lists of row indices, each sorted, the largest group first (ties: first row).
    Transitive: a chain of near-copies is one group even where its ends are further apart than threshold."""
    n_rows = len(ids)
    parent = np.arange(n_rows)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps the trees flat
            i = parent[i]
        return i

    rows, ranks = np.nonzero((cosines >= threshold) & (ids >= 0))
    for i, j in zip(rows.tolist(), ids[rows, ranks].tolist()):
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in np.unique(np.concatenate([rows, ids[rows, ranks]])).tolist():
        groups.setdefault(root(i), []).append(i)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


# ----------------------------------------------------------------------------------------------------
# query images: embedded exactly as the file's images were

def embed_queries(images: list[str], manifest: dict, backbone_source: str | None = None,
                  device: str = "auto") -> np.ndarray:
    """Query image files -> [Q, D] unit vectors by the backbone and preprocessing ``manifest`` records.

    DataError, one line, before any work: an unreadable query, a query whose channel count (after the
    decoding every embedded image went through) differs from the backbone's input channels, or a backbone
    source whose weights are no longer the ones that made the file (``backbone_source`` names where it
    lives now, when it moved)."""
    import torch

    from swavkit.data.images import read_rgb  # PIL: not at `swavkit --help`
    from swavkit.data.transforms import Preprocessing  # torch: not at `swavkit --help`
    from swavkit.evaluation.features import load_eval_backbone  # torch: not at `swavkit --help`
    from swavkit.runtime.device import resolve_device  # torch: not at `swavkit --help`

    recorded, prep = manifest["backbone"], manifest["preprocessing"]
    preprocessing = Preprocessing.for_size(prep["image_size_px"], prep["mean"], prep["std"],
                                           bit_depth=prep.get("bit_depth", 8))
    transform, reader = preprocessing.transform(), preprocessing.reader() or read_rgb
    tensors = []
    for image in images:
        # decoded as the embedded images were; UnreadableImage (a DataError) names the file, and with
        # data.channels != 3 also an image of another channel count
        tensor = transform(reader(image))
        if tensor.shape[0] != recorded["in_channels"]:
            raise DataError(f"--query {printable_path(image)}: {tensor.shape[0]} channels, but the embeddings were "
                            f"made by a {recorded['in_channels']}-channel backbone; give a "
                            f"{recorded['in_channels']}-channel image")
        tensors.append(tensor)
    source = backbone_source or recorded["source"]
    try:
        backbone = load_eval_backbone(source)
    except Exception as err:
        if backbone_source is not None or not is_user_error(err):
            raise
        # the manifest's backbone moved or went: say where to point instead
        raise DataError(f"--query: cannot load the backbone {printable_path(str(source))} that made these "
                        f"embeddings ({str(err).splitlines()[0] if str(err) else type(err).__name__}); pass where it "
                        "lives now with --backbone (its weights must be the same)") from None
    if weights_sha256(backbone) != recorded["weights_sha256"]:
        raise DataError(f"--query: the backbone {printable_path(source)} is not the one that made these embeddings "
                        f"(weights sha256 {weights_sha256(backbone)[:12]} vs {recorded['weights_sha256'][:12]}); "
                        "pass the original with --backbone, or embed the images again")
    device = resolve_device(device)
    with torch.inference_mode():
        features = backbone.to(device).eval()(torch.stack(tensors).to(device)).float()
    return torch.nn.functional.normalize(features, dim=1).cpu().numpy()


# ----------------------------------------------------------------------------------------------------
# outputs

NEIGHBOURS_FILE = "neighbours.csv"
DUPLICATES_FILE = "duplicates.csv"
PAGE_FILE = "index.html"
THUMBS_DIR = "thumbs"
OUTPUT_NAMES = (NEIGHBOURS_FILE, DUPLICATES_FILE, PAGE_FILE, THUMBS_DIR)
PAGE_MARKER = '<meta name="generator" content="swavkit neighbours">'  # how a rerun knows its --out folder
DEFAULT_PAGE_ROWS = 50  # queries (or duplicate groups) shown on the page; the CSV has them all
DUPLICATES_SHOWN_PER_GROUP = 24


def write_neighbours_csv(path, query_names: list[str], neighbour_paths: list[str], ids: np.ndarray,
                         cosines: np.ndarray) -> None:
    """``query, rank, neighbour, cosine``: one row per (query, rank 1..k), names printable; atomic."""
    import csv

    with atomic_writer(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["query", "rank", "neighbour", "cosine"])
        for query, row_ids, row_cosines in zip(query_names, ids.tolist(), cosines.tolist()):
            for rank, (j, cosine) in enumerate(zip(row_ids, row_cosines), start=1):
                if j >= 0:
                    writer.writerow([printable_path(query), rank, printable_path(neighbour_paths[j]), f"{cosine:.6f}"])


def write_duplicates_csv(path, groups: list[list[int]], paths: list[str], vectors: np.ndarray) -> None:
    """``group, path, cosine_to_first``: group 1 is the largest; atomic."""
    import csv

    with atomic_writer(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["group", "path", "cosine_to_first"])
        for number, group in enumerate(groups, start=1):
            cosines = vectors[group] @ vectors[group[0]]
            for i, cosine in zip(group, cosines.tolist()):
                writer.writerow([number, printable_path(paths[i]), f"{cosine:.6f}"])


def render_page(rows: list[tuple[str, list[tuple[str, str]]]], summary: list[tuple[str, str]],
                thumbnails: dict[str, str], page_dir: str, title: str) -> str:
    """The static page: a summary table, then one grid per row (a query and its neighbours, or a
    duplicate group). ``rows``: (heading, [(image path, score text)]); ``thumbnails``: image path ->
    thumbnail path relative to the page. Built from the cluster explorer's page pieces."""
    import html

    out = [*page_head(title, PAGE_MARKER), f"<h1>{html.escape(title)}</h1>", '<table class="summary">']
    out += [f"<tr><td>{html.escape(k)}</td><td>{html.escape(printable_path(v))}</td></tr>" for k, v in summary]
    out.append("</table>")
    shown = 0
    for heading, figures in rows:
        out.append(f'<section class="cluster"><h2>{html.escape(printable_path(heading))}</h2><div class="grid">')
        for path, score in figures:
            out.append(thumbnail_figure(path, os.path.basename(path), f"{path} ({score})", score,
                                        thumbnails.get(path), page_dir=page_dir, lazy=shown >= EAGER_THUMBNAILS))
            shown += path in thumbnails
        out.append("</div></section>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def write_page(out_dir, rows, summary, title: str, progress: bool) -> str:
    """Thumbnails of every image ``rows`` shows (once each, numbered), then ``index.html`` (atomic)."""
    from tqdm import tqdm

    (out_dir / THUMBS_DIR).mkdir(parents=True, exist_ok=True)
    thumbnails: dict[str, str] = {}
    unique = list(dict.fromkeys(path for _, figures in rows for path, _ in figures))
    for number, path in enumerate(tqdm(unique, desc="thumbnails", unit="img", disable=not progress)):
        name = f"{THUMBS_DIR}/{number:06d}.jpg"  # digits only: nothing to escape, no clashes
        if os.path.isfile(path) and write_thumbnail(path, out_dir / name):  # a shard member has no file
            thumbnails[path] = name
    page = out_dir / PAGE_FILE
    write_text_atomic(page, render_page(rows, summary, thumbnails, str(out_dir), title))
    return str(page)


# ----------------------------------------------------------------------------------------------------
# the command

def neighbours(embeddings: str, out_dir: str, *, k: int = 10, queries: list[str] | None = None,
               duplicates: bool = False, threshold: float = 0.95, index: str = "auto",
               backbone: str | None = None, device: str = "auto", page_rows: int = DEFAULT_PAGE_ROWS,
               progress: bool = True) -> dict:
    """Top-``k`` neighbours (of ``queries`` image files, else of every embedded image) or, with
    ``duplicates``, the groups of images whose cosine is >= ``threshold``; written to ``out_dir`` (see the
    module docstring). Returns {"n_vectors", "index", "k" (neighbours found per query: at most ``k``, fewer
    when there are fewer images), "n_queries" | "n_groups", "csv", "page", ...}."""
    if k < 1 or not -1.0 <= threshold <= 1.0 or page_rows < 0:
        raise ConfigError(f"--k must be >= 1 and --threshold within [-1, 1] (got {k}, {threshold})")
    if duplicates and queries:
        raise ConfigError("--duplicates searches the embeddings against themselves; leave out --query")
    data = load_embeddings(embeddings)  # refuses foreign, unfinished and inconsistent files
    out = Path(out_dir)
    image_root = os.path.commonpath([os.path.dirname(p) for p in data.paths[:100_000]]) or os.sep
    check_output_folder(out, image_root, output_names=OUTPUT_NAMES, page_marker=PAGE_MARKER)
    query_vectors = embed_queries(queries, data.manifest, backbone, device) if queries else None
    searcher = build_search_index(data.vectors, index)
    result = {"n_vectors": len(data.paths), "index": describe_index(searcher), "k_asked": k}
    summary = [("embeddings", str(data.files.vectors)), ("backbone", data.manifest["backbone"]["source"]),
               ("images", f"{len(data.paths)}"), ("index", result["index"])]
    if query_vectors is not None:
        ids, cosines = search(searcher, query_vectors, k)
        names = [os.path.abspath(q) for q in queries]
    else:
        ids, cosines = search_all(searcher, data.vectors, k, progress=progress)
        names = data.paths
    # what was found, not what was asked: 100 asked among 40 images finds 39 each (an image is not its own)
    result["k"] = int((ids >= 0).sum(axis=1).max()) if len(ids) else 0
    with removed_on_failure(out):  # a new folder that could not be finished is not left to block the rerun
        _write_outputs(out, data, names, ids, cosines, result, summary, duplicates=duplicates, threshold=threshold,
                       k=k, page_rows=page_rows, progress=progress)
    return result


def _write_outputs(out, data, names: list[str], ids: np.ndarray, cosines: np.ndarray, result: dict, summary: list, *,
                   duplicates: bool, threshold: float, k: int, page_rows: int, progress: bool) -> None:
    """The CSV, thumbnails and page of :func:`neighbours` (``ids``/``cosines`` [Q, k]); fills ``result``."""
    if duplicates:
        groups = duplicate_groups(ids, cosines, threshold)
        write_duplicates_csv(out / DUPLICATES_FILE, groups, data.paths, data.vectors)
        rows = [(f"group {n}: {len(g)} images", [(data.paths[i], f"{float(data.vectors[i] @ data.vectors[g[0]]):.3f}")
                                                 for i in g[:DUPLICATES_SHOWN_PER_GROUP]])
                for n, g in enumerate(groups[:page_rows], start=1)]
        summary.append(("near-duplicates", f"{len(groups)} groups, {sum(map(len, groups))} images, cosine >= "
                                           f"{threshold:g} among each image's {k} nearest (transitive)"))
        result.update(n_groups=len(groups), groups=[[data.paths[i] for i in g] for g in groups],
                      csv=str(out / DUPLICATES_FILE))
    else:
        write_neighbours_csv(out / NEIGHBOURS_FILE, names, data.paths, ids, cosines)
        rows = [(name, [(name, "query")] + [(data.paths[j], f"{c:.3f}") for j, c in zip(row_ids, row_cos) if j >= 0])
                for name, row_ids, row_cos in zip(names[:page_rows], ids.tolist(), cosines.tolist())]
        result.update(n_queries=len(names), csv=str(out / NEIGHBOURS_FILE))
    title = "swavkit near-duplicates" if duplicates else f"swavkit {result['k']} nearest neighbours"
    result["page"] = write_page(out, rows, summary, title, progress)


__all__ = ["EXACT_MAX_VECTORS", "INDEX_KINDS", "choose_index", "build_search_index", "describe_index", "recall_at_k",
           "search", "search_all", "duplicate_groups", "embed_queries", "neighbours"]
