"""K groups from a backbone's embeddings: spherical k-means (faiss), the choice of K, and the distance past
which a new image belongs to no group. Pure functions of explicit arrays; the command is
:func:`swavkit.clusters.groups.group_images` / :func:`swavkit.clusters.groups.assign_images`.

Embeddings are L2-normalised, so k-means on the unit sphere (centroids re-normalised after each update)
groups by cosine similarity, the similarity the backbone was trained with; the cosine distance of an image to
a group is 1 - cosine(embedding, centroid), in [0, 2].

Choosing K ("auto"). For each candidate K, k-means runs with several seeds and two numbers are measured:

* separation: the mean cosine silhouette (Rousseeuw 1987) of a fixed random sample of the images, averaged
  over the seeds: (b - a) / max(a, b) per image, a = mean distance to its own group, b = to the nearest other
  group; 1 = tight, far-apart groups, 0 = overlapping;
* stability: the mean adjusted Rand index (Hubert & Arabie 1985) between the seeds' assignments of all images:
  1 = every seed finds the same groups, 0 = agreement by chance.

K is the candidate with the highest silhouette among those at least :data:`STABLE_ARI` stable (groups that
come out differently for each seed are not groups a user can report); when none is, the most stable one.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from swavkit.runtime.cores import SINGLE_THREAD_MAX_MACS, threads_for_size

# faiss k-means iterations: the objective of a few thousand unit vectors stops moving within ~20
KMEANS_ITERATIONS = 25
# faiss starts from k random images, and one such start lands in a poor local optimum often enough that two
# seeds disagreed (ARI 0.23) on four obvious groups; k-means++ starts (Arthur & Vassilvitskii 2007, drawn
# here with the seed) found them with every seed, at the cost of one pass over the images per group.
AUTO_SEEDS = (0, 1, 2)  # seeds compared for the stability of each candidate K
STABLE_ARI = 0.8  # a K whose seeds agree less than this (mean pairwise adjusted Rand index) is unstable
SILHOUETTE_SAMPLE = 1000  # images the silhouette is measured on (one [n, n] distance matrix: 4 MB)
AUTO_MAX_K = 20  # largest K "auto" tries, unless told otherwise
MIN_IMAGES_PER_GROUP = 5  # "auto" tries at most N / 5 groups: fewer images per group is not a group
# Default "unassigned" thresholds, one per group, from the distances (1 - cosine) of the group's own images to
# its centroid: median + THRESHOLD_SPREAD x (99th percentile - median), i.e. twice as far beyond the median as
# the group's 99th percentile. Per group because groups differ in spread (one threshold for all was set by the
# widest group and then cut into its own new images); beyond the 99th percentile because with a few dozen
# images the percentile is the farthest one, and a new image of the group is farther than all of them about
# once in N+1 draws. A group of fewer than MIN_IMAGES_PER_GROUP images uses the rule over all images.
THRESHOLD_PERCENTILE = 99.0
THRESHOLD_SPREAD = 2.0
UNASSIGNED = -1  # the cluster of an image no centroid is close enough to


@dataclass
class KMeansResult:
    """``centroids`` [K, D] unit rows; ``clusters`` [N] int64 in 0..K-1; ``cosines`` [N] float32, each image's
    cosine similarity to its centroid."""
    centroids: np.ndarray
    clusters: np.ndarray
    cosines: np.ndarray


def nearest_centroid(vectors: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index [N] int64 of the most similar of ``centroids`` [K, D], that cosine [N] float32) for unit
    ``vectors`` [N, D]."""
    import faiss  # OpenMP runtime: only when searching

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    cosines, ids = index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    return ids[:, 0].astype(np.int64), cosines[:, 0]


def spherical_kmeans(vectors: np.ndarray, k: int, seed: int = 0, iterations: int = KMEANS_ITERATIONS) -> KMeansResult:
    """faiss spherical k-means of unit ``vectors`` [N, D] into ``k`` groups (k <= N)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not 1 <= k <= len(vectors):
        raise ValueError(f"k must be in 1..{len(vectors)} (the number of images), got {k}")
    # min_points_per_centroid=1: no warning for small folders; faiss trains on a seeded sample of 256 per group
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False,
                          min_points_per_centroid=1)
    with _faiss_threads(min(len(vectors), 256 * k) * k * vectors.shape[1] * iterations):
        kmeans.train(vectors, init_centroids=kmeans_plus_plus(vectors, k, seed))
        centroids = kmeans.centroids / np.maximum(np.linalg.norm(kmeans.centroids, axis=1, keepdims=True), 1e-12)
        clusters, cosines = nearest_centroid(vectors, centroids)
    return KMeansResult(centroids.astype(np.float32), clusters, cosines)


def kmeans_plus_plus(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means++ starting centroids [k, D] for unit ``vectors`` [N, D] under cosine distance: each next one an
    image drawn with probability proportional to its squared distance to the nearest one chosen so far."""
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(vectors)))]
    nearest = np.clip(1.0 - vectors @ vectors[chosen[0]], 0.0, None).astype(np.float64)
    for _ in range(1, k):
        weights = nearest ** 2
        total = weights.sum()
        pick = int(rng.choice(len(vectors), p=weights / total)) if total > 0 else int(rng.integers(len(vectors)))
        chosen.append(pick)
        nearest = np.minimum(nearest, np.clip(1.0 - vectors @ vectors[pick], 0.0, None))
    return np.ascontiguousarray(vectors[chosen], dtype=np.float32)


@contextmanager
def _faiss_threads(macs: int):
    """One faiss thread for small problems (restored after): on a busy machine its OpenMP threads mostly wait
    for each other, and a 400-image k-means took a second instead of milliseconds."""
    import faiss

    previous = faiss.omp_get_max_threads()
    if macs < SINGLE_THREAD_MAX_MACS:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def cosine_distances(vectors: np.ndarray) -> torch.Tensor:
    """[n, n] cosine distances 1 - cos of unit ``vectors`` [n, D] (computed once per sample: every K and seed
    scores against the same matrix)."""
    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    with threads_for_size(torch.device("cpu"), len(x) * len(x) * x.shape[1]):
        return (1.0 - x @ x.T).clamp_min(0.0)


def cosine_silhouette(distances: torch.Tensor, clusters: np.ndarray) -> float:
    """Mean silhouette of n images grouped by ``clusters`` [n], from their ``distances`` [n, n]
    (:func:`cosine_distances`); an image alone in its group scores 0 (the usual convention); 0 when there are
    fewer than 2 groups."""
    labels = torch.from_numpy(np.asarray(clusters, dtype=np.int64))
    groups, labels = torch.unique(labels, return_inverse=True)
    if len(groups) < 2:
        return 0.0
    one_hot = torch.nn.functional.one_hot(labels, len(groups)).float()  # [n, G]
    with threads_for_size(torch.device("cpu"), len(labels) * len(labels) * len(groups)):
        sums = distances @ one_hot  # [n, G]: summed distance of each image to each group
    sizes = one_hot.sum(0)  # [G]
    own = one_hot.bool()
    own_size = sizes[labels]
    a = sums[own] / (own_size - 1).clamp_min(1)  # itself (distance 0) excluded
    mean_to = sums / sizes
    b = mean_to.masked_fill(own, float("inf")).min(dim=1).values
    score = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    score = torch.where(own_size > 1, score, torch.zeros_like(score))
    return float(score.mean())


def adjusted_rand_index(first: np.ndarray, second: np.ndarray) -> float:
    """Adjusted Rand index of two labelings [N] of the same items: 1 identical up to renaming, ~0 chance."""
    _, a = np.unique(first, return_inverse=True)
    _, b = np.unique(second, return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(table, (a, b), 1)

    def pairs(counts):
        counts = np.asarray(counts, dtype=np.float64)
        return float((counts * (counts - 1) / 2).sum())

    index, rows, columns, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs([len(a)])
    expected = rows * columns / total if total else 0.0
    maximum = (rows + columns) / 2
    return 1.0 if maximum == expected else (index - expected) / (maximum - expected)


def auto_candidates(n_images: int, max_k: int = AUTO_MAX_K) -> list[int]:
    """The K "auto" tries: 2 .. min(max_k, n / MIN_IMAGES_PER_GROUP), at least [2]."""
    return list(range(2, max(2, min(max_k, n_images // MIN_IMAGES_PER_GROUP)) + 1))


def choose_k(vectors: np.ndarray, candidates: list[int], seeds=AUTO_SEEDS, sample: int = SILHOUETTE_SAMPLE,
             progress: bool = False) -> tuple[int, list[dict], dict[int, KMeansResult]]:
    """Measure each candidate K (module docstring) and choose one.

    Returns (K, one row per candidate {"k", "silhouette", "silhouette_per_seed", "stability_ari", "stable",
    "chosen"}, {K: the first seed's k-means}).
    """
    from itertools import combinations

    from tqdm import tqdm

    rng = np.random.default_rng(0)
    picked = np.sort(rng.choice(len(vectors), size=min(sample, len(vectors)), replace=False))
    distances = cosine_distances(vectors[picked])
    rows, runs = [], {}
    for k in tqdm(candidates, desc="choosing K", unit="K", disable=not progress):
        results = [spherical_kmeans(vectors, k, seed) for seed in seeds]
        runs[k] = results[0]
        silhouettes = [cosine_silhouette(distances, result.clusters[picked]) for result in results]
        agreements = [adjusted_rand_index(x.clusters, y.clusters) for x, y in combinations(results, 2)]
        stability = float(np.mean(agreements)) if agreements else 1.0
        rows.append({"k": k, "silhouette": round(float(np.mean(silhouettes)), 4),
                     "silhouette_per_seed": [round(s, 4) for s in silhouettes],
                     "stability_ari": round(stability, 4), "stable": stability >= STABLE_ARI, "chosen": False})
    stable = [row for row in rows if row["stable"]]
    best = (max(stable, key=lambda row: row["silhouette"]) if stable
            else max(rows, key=lambda row: row["stability_ari"]))
    best["chosen"] = True
    return best["k"], rows, runs


def spread_threshold(distances: np.ndarray) -> float:
    """median + THRESHOLD_SPREAD x (THRESHOLD_PERCENTILE-th percentile - median) of cosine ``distances``."""
    median, high = np.percentile(np.asarray(distances, dtype=np.float64), [50.0, THRESHOLD_PERCENTILE])
    return float(median + THRESHOLD_SPREAD * (high - median))


def default_thresholds(clusters: np.ndarray, cosines: np.ndarray, k: int) -> np.ndarray:
    """[k] cosine-distance thresholds, one per group (see THRESHOLD_SPREAD), from the clustered images'
    ``clusters`` [N] and ``cosines`` [N] to their own centroid."""
    distances = 1.0 - np.asarray(cosines, dtype=np.float64)
    overall = spread_threshold(distances)
    return np.array([spread_threshold(distances[clusters == g]) if (clusters == g).sum() >= MIN_IMAGES_PER_GROUP
                     else overall for g in range(k)])


def assign_to_centroids(vectors: np.ndarray, centroids: np.ndarray, thresholds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cluster [N] (UNASSIGNED where the nearest centroid is farther than its threshold in cosine distance),
    nearest centroid [N], cosine distance to it [N]) of unit ``vectors`` [N, D]; ``thresholds``: [K], one per
    centroid, or one number for all."""
    nearest, cosines = nearest_centroid(vectors, centroids)
    distances = 1.0 - cosines
    limits = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (len(centroids),))[nearest]
    return np.where(distances <= limits, nearest, UNASSIGNED), nearest, distances


__all__ = ["KMeansResult", "spherical_kmeans", "nearest_centroid", "cosine_silhouette", "adjusted_rand_index",
           "auto_candidates", "choose_k", "kmeans_plus_plus", "cosine_distances", "default_thresholds", "spread_threshold", "assign_to_centroids", "STABLE_ARI", "AUTO_SEEDS",
           "SILHOUETTE_SAMPLE", "AUTO_MAX_K", "THRESHOLD_PERCENTILE", "THRESHOLD_SPREAD", "UNASSIGNED"]
