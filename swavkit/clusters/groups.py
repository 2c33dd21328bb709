"""K groups of a folder's images and which group a new image belongs to (``swavkit cluster --k``,
``swavkit assign``).

``group_images`` embeds every image with the backbone (:func:`swavkit.embeddings.embed.embed`: L2-normalised,
unreadable files skipped and listed), runs spherical k-means (:mod:`swavkit.clusters.kmeans`; K given, or
chosen by silhouette and stability over seeds) and writes to ``out_dir`` what ``swavkit cluster`` writes for
prototypes (``assignments.csv`` with confidence = cosine similarity to the group's centroid, the size
histogram, ``index.html`` + ``thumbs/``) plus:

* ``centroids.safetensors``: the [K, D] unit centroids, with the backbone's identity (sha256 of its weights),
  its preprocessing and the "unassigned" threshold of each group in the metadata;
* ``groups/cluster-<k>/``: one folder of symbolic links to the images of each group (where links cannot be
  made: ``groups/cluster-<k>.txt``, one image path per line);
* ``k_selection.csv`` / ``k_selection.json`` (``--k auto``): silhouette and stability of each candidate K;
* ``embeddings.npy`` (+ ``.paths.txt``, ``.json``, ``.skipped.txt``): the vectors, reused by a rerun with
  another K and searchable with ``swavkit neighbours``.

``assign_images`` embeds new images with the same backbone (refused when its weights hash differs from the
one the centroids record) and puts each into the group of its nearest centroid, or leaves it unassigned
(cluster -1) when its cosine distance to that centroid exceeds that group's threshold (:data:`THRESHOLD_RULE`).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import torch

from swavkit.data import find_images, printable_path, read_skipped_report
from swavkit.errors import ConfigError, DataError
from swavkit.clusters import kmeans
from swavkit.clusters.explorer import (OUTPUT_NAMES, PAGE_FILE, PAGE_MARKER, ClusterAssignments, check_output_folder,
                                       page_head, write_explorer)
from swavkit.runtime.fileio import atomic_writer, write_json_atomic, write_text_atomic
from swavkit.artifacts.identity import weights_sha256
from swavkit.embeddings.embed import embed, load_embeddings
from swavkit.evaluation.features import load_eval_backbone

CENTROIDS_FILE = "centroids.safetensors"
CENTROIDS_FORMAT = "swavkit-centroids-v1"
GROUPS_DIR = "groups"
K_SELECTION_CSV = "k_selection.csv"
K_SELECTION_JSON = "k_selection.json"
EMBEDDINGS_FILE = "embeddings.npy"
EMBEDDING_NAMES = (EMBEDDINGS_FILE, "embeddings.paths.txt", "embeddings.json", "embeddings.skipped.txt",
                   "embeddings.parts")  # swavkit.embeddings.embed.EmbeddingFiles of EMBEDDINGS_FILE
GROUP_OUTPUT_NAMES = (*OUTPUT_NAMES, CENTROIDS_FILE, GROUPS_DIR, K_SELECTION_CSV, K_SELECTION_JSON, *EMBEDDING_NAMES)
ASSIGN_FILE = "assign.json"  # the summary of `swavkit assign`; its format marks the folder as ours
ASSIGN_FORMAT = "swavkit-assign-v1"
ASSIGN_CSV = "assignments.csv"
ASSIGN_OUTPUT_NAMES = (ASSIGN_FILE, ASSIGN_CSV, GROUPS_DIR, *EMBEDDING_NAMES)
UNASSIGNED_FOLDER = "unassigned"
CONFIDENCE_TEXT = "cosine similarity to the centroid of the assigned k-means group"
THRESHOLD_RULE = (f"per group: cosine distance (1 - cosine) to its centroid above the median + "
                  f"{kmeans.THRESHOLD_SPREAD:g} x ({kmeans.THRESHOLD_PERCENTILE:g}th percentile - median) of its "
                  "clustered images' distances")


# ----------------------------------------------------------------------------------------------------
# one folder of links per group

def _group_folder_name(cluster: int, n_groups: int) -> str:
    return UNASSIGNED_FOLDER if cluster == kmeans.UNASSIGNED else f"cluster-{cluster:0{len(str(n_groups - 1))}d}"


def check_groups_folder(groups_dir: Path) -> None:
    """An earlier ``groups/`` may only hold what :func:`write_group_links` writes (folders of symbolic links,
    .txt lists); DataError naming the first other file, before anything is written."""
    if not groups_dir.exists():
        return
    for root, folders, files in os.walk(groups_dir):
        for name in files + [f for f in folders if os.path.islink(os.path.join(root, f))]:
            path = Path(root) / name
            if not (path.is_symlink() or (Path(root) == groups_dir and name.endswith(".txt"))):
                raise DataError(f"{printable_path(path)} was not written by swavkit (groups/ holds only links and "
                                "lists); move it, or choose another --out")


def _clear_groups_folder(groups_dir: Path) -> None:
    """Delete an earlier ``groups/`` (links, never what they point to; checked by :func:`check_groups_folder`)."""
    if not groups_dir.exists():
        return
    for root, folders, files in os.walk(groups_dir, topdown=False):
        for name in files + [f for f in folders if os.path.islink(os.path.join(root, f))]:
            os.unlink(os.path.join(root, name))
        for name in folders:
            if not os.path.islink(os.path.join(root, name)):
                os.rmdir(os.path.join(root, name))
    groups_dir.rmdir()


def _can_link(folder: Path) -> bool:
    probe = folder / ".swavkit-link-probe"
    try:
        os.symlink(os.path.abspath(folder), probe)
    except (OSError, NotImplementedError):  # Windows without the privilege, file systems without links
        return False
    probe.unlink()
    return True


def write_group_links(paths: list[str], clusters: np.ndarray, n_groups: int, groups_dir: Path) -> str:
    """``groups_dir/cluster-<k>/<row>-<file name>`` -> each image (``unassigned/`` for cluster -1); where
    symbolic links cannot be made, ``groups_dir/cluster-<k>.txt`` lists the images (printable paths, one a
    line). Replaces an earlier ``groups_dir``. Returns "links" or "lists"."""
    _clear_groups_folder(groups_dir)
    groups_dir.mkdir(parents=True)
    links = _can_link(groups_dir)
    width = len(str(len(paths)))
    members: dict[int, list[int]] = {}
    for row, cluster in enumerate(np.asarray(clusters).tolist()):
        members.setdefault(int(cluster), []).append(row)
    for cluster, rows in sorted(members.items()):
        name = _group_folder_name(cluster, n_groups)
        if not links:
            text = "".join(printable_path(os.path.abspath(paths[row])) + "\n" for row in rows)
            with atomic_writer(groups_dir / f"{name}.txt", "w") as handle:
                handle.write(text)
            continue
        (groups_dir / name).mkdir()
        for row in rows:  # the row number keeps two images of the same name in one group apart
            os.symlink(os.path.abspath(paths[row]), groups_dir / name / f"{row:0{width}d}-{os.path.basename(paths[row])}")
    return "links" if links else "lists"


# ----------------------------------------------------------------------------------------------------
# the centroids file

def write_centroids(path: Path, centroids: np.ndarray, metadata: dict) -> Path:
    """``centroids`` [K, D] float32 and ``metadata`` (JSON, under the key "swavkit") as safetensors, atomically."""
    from safetensors.torch import save

    data = save({"centroids": torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))},
                metadata={"swavkit": json.dumps({"format": CENTROIDS_FORMAT, **metadata})})
    with atomic_writer(path) as handle:
        handle.write(data)
    return path


def read_centroids(clusters_dir: str | Path) -> tuple[np.ndarray, dict]:
    """([K, D] centroids, metadata) from a ``swavkit cluster --k`` output folder (or its centroids file);
    DataError, one line, when there is none."""
    from safetensors import safe_open

    path = Path(clusters_dir)
    path = path / CENTROIDS_FILE if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"--clusters {printable_path(clusters_dir)}: no {CENTROIDS_FILE} there; give the --out folder "
                        "of swavkit cluster --k N|auto")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get("swavkit", "{}"))
            centroids = handle.get_tensor("centroids").numpy()
    except Exception as err:  # a torn or foreign file: say which one
        raise DataError(f"{printable_path(path)}: not a swavkit centroids file ({err})") from None
    if metadata.get("format") != CENTROIDS_FORMAT:
        raise DataError(f"{printable_path(path)}: not a swavkit centroids file (format {metadata.get('format')!r})")
    return centroids, metadata


# ----------------------------------------------------------------------------------------------------
# swavkit cluster --k N|auto

def parse_k(text: str | int) -> int | str:
    """``--k``: a whole number >= 1, or "auto"."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        value = int(str(text))
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"--k {text}: a number of groups >= 1, or auto")
    return value


def _embed_folder(source, data, out_dir: Path, *, image_size_px, batch_size, device, num_workers, progress):
    """(embeddings, skipped [(path, reason)]) of every image of ``data``, written to ``out_dir/embeddings.npy``."""

    written = embed(source, data, out_dir / EMBEDDINGS_FILE, image_size_px=image_size_px, batch_size=batch_size,
                    num_workers=num_workers, device=device, progress=progress)
    if written.n_rows == 0:
        raise DataError(f"none of the images of {printable_path(str(data))} could be read (see "
                        f"{printable_path(written.skipped)})")
    skipped = read_skipped_report(written.skipped) if written.skipped.exists() else []
    return load_embeddings(written.vectors), skipped


def _write_k_selection(out_dir: Path, rows: list[dict], chosen: int) -> None:
    write_json_atomic(out_dir / K_SELECTION_JSON, {
        "chosen_k": chosen, "rule": (f"the highest mean cosine silhouette (over seeds {list(kmeans.AUTO_SEEDS)}, on up "
                                     f"to {kmeans.SILHOUETTE_SAMPLE} images) among the K whose seeds agree "
                                     f"(mean pairwise adjusted Rand index >= {kmeans.STABLE_ARI}); if none does, "
                                     "the most stable K"), "candidates": rows})
    with atomic_writer(out_dir / K_SELECTION_CSV, "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(["k", "silhouette", "stability_ari", "stable", "chosen"])
        for row in rows:
            writer.writerow([row["k"], f"{row['silhouette']:.4f}", f"{row['stability_ari']:.4f}", int(row["stable"]),
                             int(row["chosen"])])


def group_images(backbone_source: str | Path, data_dir: str | Path, out_dir: str | Path, *, k: int | str = "auto",
                 max_k: int = kmeans.AUTO_MAX_K, seed: int = 0, top_per_cluster: int = 16, batch_size: int = 128,
                 device: str = "auto", num_workers: int = 0, image_size_px: int | None = None,
                 progress: bool = True) -> dict:
    """Spherical k-means of ``data_dir``'s images into ``k`` groups ("auto": chosen, module docstring) on the
    backbone's embeddings; writes the files of the module docstring into ``out_dir``.

    Args:
        backbone_source: anything :func:`swavkit.load_backbone` takes (run folder, export, checkpoint, released
            file, cached timm pretrained name).
        max_k: the largest K "auto" tries. seed: the k-means seed of a given K ("auto" compares seeds 0, 1, 2
            and keeps seed 0's groups).
    Returns:
        the summary of :func:`swavkit.clusters.explorer.explore_clusters`, plus "k", "threshold_cosine_distance",
        "thresholds_cosine_distance" [K], "centroids", "groups_dir", "groups_written" ("links" | "lists") and,
        for "auto", "k_selection" (rows).
    """

    k = parse_k(k)
    data_dir = os.path.abspath(data_dir)
    n_found = len(find_images(data_dir))  # DataError for a missing/empty folder, before the model loads
    if k != "auto" and k > n_found:
        raise ConfigError(f"--k {k}: more groups than the {n_found} images of {printable_path(data_dir)}")
    out_dir = Path(out_dir)
    check_output_folder(out_dir, data_dir, output_names=GROUP_OUTPUT_NAMES)
    check_groups_folder(out_dir / GROUPS_DIR)
    # the page's marker first: a run stopped while embedding leaves a folder its rerun recognises as its own
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / PAGE_FILE).exists():
        write_text_atomic(out_dir / PAGE_FILE, "\n".join([*page_head("in progress", PAGE_MARKER), "</body></html>", ""]))
    embeddings, skipped = _embed_folder(backbone_source, data_dir, out_dir, image_size_px=image_size_px,
                                        batch_size=batch_size, device=device, num_workers=num_workers,
                                        progress=progress)
    vectors, n = embeddings.vectors, len(embeddings.vectors)
    selection = None
    if k == "auto":
        k, selection, runs = kmeans.choose_k(vectors, kmeans.auto_candidates(n, max_k), progress=progress)
        grouped = runs[k]
        _write_k_selection(out_dir, selection, k)
    else:
        grouped = kmeans.spherical_kmeans(vectors, min(k, n), seed)
        for name in (K_SELECTION_CSV, K_SELECTION_JSON):  # an earlier --k auto's table no longer describes OUT
            (out_dir / name).unlink(missing_ok=True)
    thresholds = kmeans.default_thresholds(grouped.clusters, grouped.cosines, len(grouped.centroids))
    manifest = embeddings.manifest
    preprocessing = manifest["preprocessing"]
    assignments = ClusterAssignments(paths=embeddings.paths, clusters=torch.from_numpy(grouped.clusters),
                                     confidences=torch.from_numpy(grouped.cosines), n_prototypes=len(grouped.centroids),
                                     skipped=skipped)
    summary = write_explorer(assignments, out_dir, data_dir=data_dir, checkpoint=str(backbone_source),
                             top_per_cluster=top_per_cluster, progress=progress, temperature=float("nan"),
                             image_size_px=preprocessing["image_size_px"], unit="k-means group",
                             confidence_text=CONFIDENCE_TEXT)
    centroids = write_centroids(out_dir / CENTROIDS_FILE, grouped.centroids, {
        "backbone": manifest["backbone"], "preprocessing": preprocessing, "k": len(grouped.centroids),
        "seed": seed if selection is None else kmeans.AUTO_SEEDS[0], "k_chosen_by": "auto" if selection else "given",
        "thresholds_cosine_distance": [round(float(t), 6) for t in thresholds], "threshold_rule": THRESHOLD_RULE,
        "data": data_dir,
        "n_images": n})
    written = write_group_links(embeddings.paths, grouped.clusters, len(grouped.centroids), out_dir / GROUPS_DIR)
    summary.update(k=len(grouped.centroids), thresholds_cosine_distance=thresholds.tolist(), centroids=str(centroids),
                   groups_dir=str(out_dir / GROUPS_DIR), groups_written=written, k_selection=selection)
    return summary


# ----------------------------------------------------------------------------------------------------
# swavkit assign

def _check_same_backbone(source, metadata: dict) -> None:
    """DataError (one line) unless ``source``'s weights are the ones the centroids were made with."""

    recorded = metadata["backbone"]["weights_sha256"]
    current = weights_sha256(load_eval_backbone(source))
    if current != recorded:
        raise DataError(f"--backbone {printable_path(str(source))}: not the backbone these groups were made with "
                        f"(weights sha256 {current[:12]} vs {recorded[:12]}); pass the original with --backbone, or "
                        "cluster again with this one")


def assign_images(clusters_dir: str | Path, data: str | Path, out_dir: str | Path, *, backbone_source=None,
                  threshold: float | None = None, batch_size: int = 128, device: str = "auto", num_workers: int = 0,
                  progress: bool = True) -> dict:
    """Put each image of ``data`` (a folder or a list file) into the saved group of its nearest centroid, or
    leave it unassigned when its cosine distance to that centroid exceeds ``threshold`` (one number for every
    group; default: each group's own, derived and saved by ``swavkit cluster --k``, see :data:`THRESHOLD_RULE`).

    Writes ``out_dir/assignments.csv`` (path, cluster (-1 = unassigned), nearest_cluster, cosine_distance),
    ``groups/`` (links per group and ``unassigned/``), ``assign.json`` (the summary) and the embeddings.
    Returns the summary: {"n_images", "n_assigned", "n_unassigned", "n_skipped", "thresholds_cosine_distance" [K],
    "threshold_from", "cluster_sizes" [K], "assignments_csv", "groups_dir", "groups_written"}.
    """
    centroids, metadata = read_centroids(clusters_dir)
    source = str(backbone_source or metadata["backbone"]["source"])
    if threshold is not None and not 0.0 <= threshold <= 2.0:
        raise ConfigError(f"--threshold {threshold}: a cosine distance in [0, 2]")
    out_dir, data = Path(out_dir), os.path.abspath(data)
    check_output_folder(out_dir, data if os.path.isdir(data) else os.path.dirname(data),
                        output_names=ASSIGN_OUTPUT_NAMES, page_file=ASSIGN_FILE, page_marker=ASSIGN_FORMAT)
    check_groups_folder(out_dir / GROUPS_DIR)
    _check_same_backbone(source, metadata)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / ASSIGN_FILE).exists():  # the marker first, as in group_images
        write_json_atomic(out_dir / ASSIGN_FILE, {"format": ASSIGN_FORMAT, "complete": False})
    embeddings, skipped = _embed_folder(source, data, out_dir, image_size_px=metadata["preprocessing"]["image_size_px"],
                                        batch_size=batch_size, device=device, num_workers=num_workers,
                                        progress=progress)
    limits = metadata["thresholds_cosine_distance"] if threshold is None else [float(threshold)] * len(centroids)
    clusters, nearest, distances = kmeans.assign_to_centroids(embeddings.vectors, centroids, limits)
    with atomic_writer(out_dir / ASSIGN_CSV, "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "cluster", "nearest_cluster", "cosine_distance"])
        for path, cluster, near, distance in zip(embeddings.paths, clusters.tolist(), nearest.tolist(),
                                                 distances.tolist()):
            writer.writerow([printable_path(path), cluster, near, f"{distance:.6f}"])
    written = write_group_links(embeddings.paths, clusters, len(centroids), out_dir / GROUPS_DIR)
    assigned = clusters != kmeans.UNASSIGNED
    summary = {"format": ASSIGN_FORMAT, "complete": True, "clusters": str(clusters_dir), "backbone": source, "data": data,
               "n_images": len(clusters), "n_assigned": int(assigned.sum()), "n_unassigned": int((~assigned).sum()),
               "n_skipped": len(skipped), "thresholds_cosine_distance": limits,
               "threshold_from": "--threshold" if threshold is not None else metadata["threshold_rule"],
               "cluster_sizes": np.bincount(clusters[assigned], minlength=len(centroids)).tolist(),
               "assignments_csv": str(out_dir / ASSIGN_CSV), "groups_dir": str(out_dir / GROUPS_DIR),
               "groups_written": written}
    write_json_atomic(out_dir / ASSIGN_FILE, summary)
    return summary


__all__ = ["group_images", "assign_images", "parse_k", "read_centroids", "write_centroids", "write_group_links",
           "check_groups_folder", "CENTROIDS_FILE", "GROUPS_DIR", "K_SELECTION_CSV", "K_SELECTION_JSON",
           "THRESHOLD_RULE", "UNASSIGNED_FOLDER"]
