"""Weighted k-nearest-neighbour classification of frozen features (InstDisc / DINO protocol).

Features are L2-normalised, so the inner product is the cosine similarity. Each query's k most similar
training features vote for their class with weight exp(similarity / T); the class with the largest
summed weight wins (k = 20, T = 0.07 by default). The search runs in faiss (exact ``IndexFlatIP`` by
default, an inverted-file index for very large training sets); :func:`knn_classify_bruteforce` is the
plain torch reference the tests hold faiss to.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from swavkit.runtime import distributed
from swavkit.config import ConfigError
from swavkit.data import LabelledImageFolder, find_classes
from swavkit.evaluation.options import INDEX_TYPES, EvalOptions, KnnOptions, apply_keywords, default_ivf_lists
from swavkit.evaluation import setup
from swavkit.evaluation.features import (SplitFeatures, backbone_record, extract_features, extract_split_features,
                                         load_eval_backbone)
from swavkit.evaluation.metrics import topk_accuracy
from swavkit.data.constants import IMAGENET_MEAN, IMAGENET_STD
from swavkit.data.transforms import Preprocessing

def _as_faiss_array(features: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(features.detach().to("cpu", torch.float32).numpy())


def build_index(train_features: torch.Tensor, index: str = "exact", n_lists: int = 0, n_probe: int = 0):
    """A faiss inner-product index over L2-normalised train features [N, D].

    Args:
        index: "exact" (IndexFlatIP, every query against every train feature) or "ivf"
            (IndexIVFFlat: k-means into ``n_lists`` cells, search the ``n_probe`` nearest cells only;
            approximate, for train sets too large for exact search).
        n_lists: IVF cells (0 = ~4 sqrt(N)). n_probe: cells searched per query (0 = min(16, n_lists));
            n_probe = n_lists makes the IVF search exact.
    """
    import faiss  # imported here: loading its OpenMP runtime is only needed when searching

    if index not in INDEX_TYPES:
        raise ConfigError(f"index: '{index}' is not one of {', '.join(INDEX_TYPES)}")
    vectors = _as_faiss_array(train_features)
    n_train, dim = vectors.shape
    if index == "exact":
        searcher = faiss.IndexFlatIP(dim)
    else:
        n_lists = n_lists or default_ivf_lists(n_train)
        if n_lists > n_train:
            raise ConfigError(f"ivf index: {n_lists} lists for {n_train} train features; use fewer lists")
        quantizer = faiss.IndexFlatIP(dim)
        searcher = faiss.IndexIVFFlat(quantizer, dim, n_lists, faiss.METRIC_INNER_PRODUCT)
        searcher.train(vectors)
        searcher.nprobe = n_probe or min(16, n_lists)
    searcher.add(vectors)
    return searcher


def vote(similarities: torch.Tensor, neighbour_labels: torch.Tensor, temperature: float,
         n_classes: int) -> torch.Tensor:
    """Class scores [M, C] from the k neighbours of M queries.

    Args:
        similarities: [M, k] cosine similarities (-inf marks a missing neighbour, weight 0).
        neighbour_labels: [M, k] class of each neighbour.
    Returns:
        [M, C] float32: sum over neighbours of class c of exp(sim / T), divided by exp(max_sim / T) of the
        query. The per-query factor changes no ranking and keeps exp finite at small T (exp(1/0.01)
        overflows float32).
    """
    similarities = similarities.float()
    # clamp: a query whose neighbours are all missing (-inf) must not give inf - inf
    top = similarities.max(dim=1, keepdim=True).values.clamp_min(-1.0)
    weights = torch.exp((similarities - top) / temperature)
    weights = torch.where(torch.isfinite(similarities), weights, torch.zeros_like(weights))
    labels = torch.where(neighbour_labels >= 0, neighbour_labels, torch.zeros_like(neighbour_labels))
    scores = torch.zeros(similarities.shape[0], n_classes, dtype=torch.float32)
    return scores.scatter_add_(1, labels.long(), weights)


def _check_inputs(train_features, train_labels, query_features, k, temperature):
    if train_features.ndim != 2 or query_features.ndim != 2 or train_features.shape[1] != query_features.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D]; got {tuple(train_features.shape)} and "
                         f"{tuple(query_features.shape)}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels must be [{train_features.shape[0]}], got {tuple(train_labels.shape)}")
    if k < 1 or not temperature > 0:
        raise ConfigError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, n_classes: int | None = None, *,
                 index: str = "exact", n_lists: int = 0, n_probe: int = 0) -> torch.Tensor:
    """Weighted k-NN class scores of each query (faiss search).

    Args:
        train_features: [N, D] (normalised here; any float dtype, any device).
        train_labels: [N] int class indices.
        query_features: [M, D].
        k: neighbours per query (capped at N). temperature: T in exp(sim / T).
        n_classes: C (default max label + 1).
        index, n_lists, n_probe: see :func:`build_index`.
    Returns:
        scores [M, C] float32 on CPU; ``scores.argmax(1)`` is the prediction, ``scores.topk(5)`` the top 5.
    """
    _check_inputs(train_features, train_labels, query_features, k, temperature)
    train_labels = train_labels.cpu().long()
    n_classes = n_classes or int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    searcher = build_index(F.normalize(train_features.float(), dim=1), index, n_lists, n_probe)
    similarities, neighbours = searcher.search(_as_faiss_array(F.normalize(query_features.float(), dim=1)), k)
    similarities, neighbours = torch.from_numpy(similarities), torch.from_numpy(neighbours)
    missing = neighbours < 0  # an IVF search that visited fewer than k train features
    similarities[missing] = -math.inf
    neighbour_labels = torch.where(missing, torch.full_like(neighbours, -1), train_labels[neighbours.clamp_min(0)])
    return vote(similarities, neighbour_labels, temperature, n_classes)


def knn_classify_bruteforce(train_features: torch.Tensor, train_labels: torch.Tensor,
                            query_features: torch.Tensor, k: int = 20, temperature: float = 0.07,
                            n_classes: int | None = None, query_batch_size: int = 1024) -> torch.Tensor:
    """Same contract as :func:`knn_classify`, computed with a full similarity matrix in torch."""
    _check_inputs(train_features, train_labels, query_features, k, temperature)
    train_labels = train_labels.cpu().long()
    n_classes = n_classes or int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float().cpu(), dim=1)
    queries = F.normalize(query_features.float().cpu(), dim=1)
    scores = []
    for start in range(0, queries.shape[0], query_batch_size):
        similarities, neighbours = (queries[start:start + query_batch_size] @ train.T).topk(k, dim=1)
        scores.append(vote(similarities, train_labels[neighbours], temperature, n_classes))
    return torch.cat(scores) if scores else torch.zeros(0, n_classes)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                 query_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, *,
                 n_classes: int | None = None, index: str = "exact", n_lists: int = 0,
                 n_probe: int = 0) -> dict:
    """Top-1 (and top-5 when there are more than 5 classes) k-NN accuracy in percent."""
    n_classes = n_classes or int(max(train_labels.max(), query_labels.max())) + 1
    scores = knn_classify(train_features, train_labels, query_features, k, temperature, n_classes,
                          index=index, n_lists=n_lists, n_probe=n_probe)
    return topk_accuracy(scores, query_labels)


# ----------------------------------------------------------------------------------------------------
# `swavkit knn`

def knn_protocol(knn: KnnOptions, n_train: int, precision: str) -> dict:
    """The ``protocol`` section of a k-NN result record for ``n_train`` neighbours."""
    return {"k": min(knn.k, n_train), "temperature": knn.temperature,
            "similarity": "cosine (L2-normalised features, inner product)",
            "vote_weight": "exp(similarity / temperature)", "index": knn.index,
            "n_lists": (knn.n_lists or default_ivf_lists(n_train)) if knn.index == "ivf" else None,
            "n_probe": knn.n_probe or None, "precision": precision, "split_selection": "none (no tuning)"}


def evaluate_knn(backbone_source: str | Path, train_dir: str | Path, val_dir: str | Path,
                 options: EvalOptions | None = None, knn: KnnOptions | None = None, *,
                 features: SplitFeatures | None = None, **keywords) -> dict:
    """k-NN top-1/top-5 of a frozen backbone on a train/val pair of labelled folders.

    Args:
        backbone_source: exported folder, run folder, training checkpoint, released SwAV checkpoint,
            ``timm:<name>`` (random init) or ``pixels`` (raw pixels, mean-removed per image).
        train_dir: the labelled train split, a ``DIR/<class>/<image>`` tree (the neighbours' pool).
        val_dir: the labelled val split, a tree with the same class names (the queries).
        options: extraction and output (:class:`swavkit.evaluation.options.EvalOptions`).
        knn: the protocol (:class:`swavkit.evaluation.options.KnnOptions`).
        features: features already extracted from these folders with this backbone (e.g. shared with a
            linear probe); then nothing is loaded or extracted again.
        **keywords: any field of either options class, e.g. ``k=10, batch_size=64`` (they override it).

    Returns:
        the result record (see :func:`swavkit.evaluation.report.build_result`): ``metrics`` (``top1``,
        ``top5`` in percent), the ``protocol``, the floors when they ran, the backbone and data; identical on
        every process, and written to ``options.out_json`` (unless ``""``).

    Raises:
        LoadError: the backbone source cannot be loaded.
        DataError: a split is missing, holds no class folders, or their class names differ.

    Example:
        ```python
        result = swavkit.evaluate_knn("runs/a", "/data/cifar10/train", "/data/cifar10/val", k=20)
        print(result["metrics"]["top1"])
        ```
    """
    options, knn = apply_keywords(keywords, options or EvalOptions(), knn or KnnOptions())
    run = setup.start("knn", backbone_source, options)
    split = features
    if split is None:
        preprocessing = setup.preprocessing_for(backbone_source, options.image_size_px)
        split = extract_split_features(load_eval_backbone(backbone_source), train_dir, val_dir, preprocessing,
                                       replace(options, device=run.device))
    result = None
    if distributed.is_main_process():
        search_start = time.perf_counter()
        metrics = knn_accuracy(split.train_features, split.train_labels, split.val_features, split.val_labels,
                               knn.k, knn.temperature, n_classes=len(split.classes), index=knn.index,
                               n_lists=knn.n_lists, n_probe=knn.n_probe)
        result = run.record(
            metrics=metrics, protocol=knn_protocol(knn, len(split.train_labels), options.precision),
            backbone=backbone_record(backbone_source, split.backbone_name, split.feature_dim),
            data=split.data_record(train_dir, val_dir, options.max_per_class), preprocessing=split.preprocessing,
            extra={"timings_s": {"features": round(split.extraction_s, 3),
                                 "search": round(time.perf_counter() - search_start, 3)}})
    result = run.publish(result, options.out_json)
    if features is not None:  # features shared with another evaluation: its floors are that one's
        return result
    return run.beside(result, evaluate_knn, train_dir, val_dir, options, knn)


# ----------------------------------------------------------------------------------------------------
# online monitoring during pretraining

def monitor_folders(knn_data: str | Path) -> tuple[Path, Path | None]:
    """``monitor.knn_data`` -> (train folder, val folder or None).

    A folder with ``train/`` and ``val/`` gives both; a folder of class folders gives (it, None), and
    :func:`knn_monitor` then holds out a deterministic fifth of each class as queries.
    """
    root = Path(knn_data)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root / "train", root / "val"
    find_classes(root)  # raises DataError naming the folder when it is not a class-folder tree
    return root, None


def _holdout_split(labels: list[int], fraction: float) -> tuple[list[int], list[int]]:
    """Indices (kept, held out): every 1/fraction-th image of each class is held out (deterministic)."""
    step = max(2, round(1 / fraction))
    seen: dict[int, int] = {}
    kept, held = [], []
    for i, label in enumerate(labels):
        position = seen.get(label, 0)
        seen[label] = position + 1
        (held if position % step == step - 1 else kept).append(i)
    return kept, held


def knn_monitor(backbone_module: torch.nn.Module, train_dir: str | Path, val_dir: str | Path | None = None, *,
                image_size_px: int, k: int = 20, temperature: float = 0.07, device: str | torch.device = "cpu",
                max_images: int = 5000, batch_size: int = 256, num_workers: int = 0,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, precision: str = "auto") -> dict:
    """k-NN accuracy of the backbone being trained, for metrics.jsonl.

    Runs the backbone in eval mode under inference_mode and restores its previous train/eval mode, so
    the caller's training state is untouched. Works under torchrun (features are sharded and gathered;
    the search runs on rank 0 and the numbers are broadcast). Call it on the bare backbone, not a DDP
    wrapper.

    Args:
        train_dir: labelled folder of the neighbours; with ``val_dir=None`` a deterministic fifth of each
            class of ``train_dir`` becomes the queries.
        max_images: cap on neighbour images, spread evenly over classes (0 = all). Queries are capped at
            a fifth of it.
    Returns:
        {"top1": %, "top5": % (more than 5 classes), "n_train", "n_val", "seconds"}
    """
    start = time.perf_counter()
    transform = Preprocessing.for_size(image_size_px, mean, std).transform()
    n_classes = len(find_classes(train_dir))
    per_class = math.ceil(max_images / n_classes) if max_images else 0
    if val_dir is None:
        everything = LabelledImageFolder(train_dir, transform, max_per_class=math.ceil(per_class * 1.25)
                                         if per_class else 0)
        kept, held = _holdout_split(everything.targets, 0.2)
        train = torch.utils.data.Subset(everything, kept)
        val = torch.utils.data.Subset(everything, held)
    else:
        train = LabelledImageFolder(train_dir, transform, max_per_class=per_class)
        val = LabelledImageFolder(val_dir, transform, classes=train.classes,
                                  max_per_class=math.ceil(per_class / 5) if per_class else 0)
    common = dict(device=device, batch_size=batch_size, num_workers=num_workers, precision=precision,
                  progress=False)
    train_features, train_labels = extract_features(backbone_module, train, **common)
    val_features, val_labels = extract_features(backbone_module, val, **common)
    metrics = None
    if distributed.is_main_process():
        metrics = knn_accuracy(train_features, train_labels, val_features, val_labels, k, temperature,
                               n_classes=n_classes)
        metrics.update(n_train=len(train_labels), n_val=len(val_labels),
                       seconds=round(time.perf_counter() - start, 3))
    return distributed.broadcast_object(metrics)


__all__ = ["knn_classify", "knn_classify_bruteforce", "knn_accuracy", "vote", "build_index", "knn_protocol",
           "evaluate_knn", "knn_monitor", "monitor_folders"]
