"""The feature extractor of every evaluation: a backbone loaded for evaluation (or the raw-pixel floor),
``extract_features`` and the train/val pair of features (``SplitFeatures``) that k-NN and the linear probe
share. Options: swavkit.evaluation.options; preprocessing: swavkit.artifacts.preprocessing; devices: swavkit.runtime.device.

The labelled dataset (``LabelledImageFolder``, ``DIR/<class>/<image>``) lives with the other datasets in
swavkit.data. ``extract_features`` runs a backbone over it in batches and returns ``(features [N, D], labels [N])`` in
the dataset's order, on CPU or GPU, in one process or under ``torchrun`` (every process extracts a
1/world_size share and all of them receive the full result, identical to a single-process run).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from swavkit.artifacts.identity import RANDOM_INIT_SEED, backbone_name, backbone_record, load_seeded_backbone
from swavkit.runtime import distributed
from swavkit.evaluation import report
from swavkit.runtime.cores import default_num_workers
from swavkit.data import (DataError, LabelledImageFolder, ReadOrReport, collate_read_or_report, printable_path,
                          raise_for_unreadable)
from swavkit.runtime.device import autocast_dtype, resolve_device, resolve_precision
from swavkit.evaluation.options import EvalOptions
from swavkit.data.constants import RAW_PIXELS_SOURCE
from swavkit.data.transforms import Preprocessing


# ----------------------------------------------------------------------------------------------------
# the raw-pixel "backbone" (the floor)

class RawPixels(torch.nn.Module):
    """[B, 3, H, W] -> [B, 3*H*W]: each image flattened with its own mean removed.

    Subtracting the per-image mean makes cosine similarity ignore overall brightness; feed it pixels in
    [0, 1] (mean 0, std 1 "normalisation"), so no per-channel offset is shared by all images.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(1).float()
        return flat - flat.mean(dim=1, keepdim=True)


def load_eval_backbone(source: str | Path) -> torch.nn.Module:
    """``load_backbone(source)``, plus ``"pixels"`` for the raw-pixel floor. Eval mode, on CPU.

    ``timm:<name>`` weights are drawn with seed ``RANDOM_INIT_SEED`` (without touching the caller's RNG),
    so the random-init floor is the same number on every run.
    """
    if str(source) == RAW_PIXELS_SOURCE:
        return RawPixels().eval()
    return load_seeded_backbone(source)


def init_processes(device: str | torch.device = "auto") -> torch.device:
    """Join the process group when launched by torchrun/srun (no-op otherwise); the device to use
    (see :func:`swavkit.runtime.device.resolve_device`; under a launcher "cuda" is the process's local GPU)."""
    launch = distributed.detect_launch()
    resolved = resolve_device(device, launch.local_rank)
    distributed.init(resolved.type)
    return resolved


# ----------------------------------------------------------------------------------------------------
# extraction

def _gather_in_order(features: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, n_items: int,
                     device: torch.device, chunk_rows: int = 65536):
    """Every rank's rows -> all rows, sorted by dataset index, on CPU in every process.

    Gathered in chunks of rows so a large feature matrix never has to sit on one GPU at once (NCCL
    gathers only device tensors). Every rank holds ceil(n/world) or one fewer rows, so all ranks agree on
    the number of chunks without communicating.
    """
    world = distributed.world_size()
    if world == 1:
        return features, labels
    comm_device = device if device.type == "cuda" else torch.device("cpu")
    n_chunks = math.ceil(math.ceil(n_items / world) / chunk_rows)
    parts_f, parts_l, parts_i = [], [], []
    for c in range(n_chunks):
        rows = slice(c * chunk_rows, (c + 1) * chunk_rows)
        parts_f.append(distributed.all_gather_cat(features[rows].to(comm_device)).cpu())
        parts_l.append(distributed.all_gather_cat(labels[rows].to(comm_device)).cpu())
        parts_i.append(distributed.all_gather_cat(indices[rows].to(comm_device)).cpu())
    all_indices = torch.cat(parts_i)
    order = torch.argsort(all_indices)
    if not torch.equal(all_indices[order], torch.arange(n_items)):
        raise RuntimeError(f"feature gather returned {len(all_indices)} rows for {n_items} images")
    return torch.cat(parts_f)[order], torch.cat(parts_l)[order]


def extract_features(backbone: torch.nn.Module, data: Dataset | DataLoader, device: str | torch.device = "cpu",
                     batch_size: int = 256, num_workers: int | None = None, *, precision: str = "auto",
                     channels_last: bool = False, progress: bool = True,
                     description: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled backbone features of every item, in the dataset's order.

    Args:
        backbone: maps images [B, 3, H, W] to features [B, D]. Moved to ``device`` (in place) and run in
            eval mode; its train/eval mode is restored before returning.
        data: a map-style dataset of (image [3, H, W] float, label int) items, e.g. LabelledImageFolder.
            Under torchrun each process reads every world_size-th item (no padding duplicates) and the
            results are gathered, so every process returns exactly what one process would.
            A DataLoader yielding (images, labels, ...) is also accepted; it is used as given (no sharding,
            no gathering).
        device: "auto", "cpu", "cuda", "cuda:1", or a torch.device.
        batch_size: images per forward pass in each process.
        num_workers: DataLoader decoding processes (0 = decode in this process; None =
            :func:`swavkit.runtime.cores.default_num_workers`).
        precision: "auto" (bf16 autocast on GPUs that support it, else fp32), "fp32", "bf16" or "fp16" (GPU).
            Features are returned as float32 either way.
        channels_last: NHWC inputs and weights (converts the module in place); faster for convnets on GPUs.
        progress: show a tqdm bar (on the main process only).

    Returns:
        features [N, D] float32 on CPU, labels [N] int64 on CPU.

    Raises:
        DataError: naming the file when an image cannot be decoded: dropping it silently would change the
            denominator of every reported accuracy.

    Example:
        ```python
        from swavkit.artifacts.preprocessing import resolve_preprocessing
        from swavkit.data import LabelledImageFolder

        pre = resolve_preprocessing("runs/a/backbone")
        data = LabelledImageFolder("/data/cifar10/val", pre.transform(), reader=pre.reader())
        features, labels = swavkit.extract_features(swavkit.load_backbone("runs/a/backbone"), data)
        ```
    """
    device = resolve_device(device)
    dtype = autocast_dtype(resolve_precision(precision, device))
    num_workers = default_num_workers() if num_workers is None else num_workers
    was_training = backbone.training
    backbone.to(device).eval()
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    given_loader = isinstance(data, DataLoader)
    if given_loader:
        loader, n_items = data, None
    else:
        n_items = len(data)
        if n_items < distributed.world_size():
            raise DataError(f"{printable_path(getattr(data, 'root', 'dataset'))}: {n_items} images for "
                            f"{distributed.world_size()} processes; use fewer processes")
        # Strided shards: disjoint, cover everything, sizes differ by at most one.
        shard = list(range(distributed.rank(), n_items, distributed.world_size()))
        loader = DataLoader(ReadOrReport(data), batch_size=batch_size, sampler=shard, num_workers=num_workers,
                            collate_fn=collate_read_or_report, pin_memory=device.type == "cuda",
                            persistent_workers=False)
    features, labels, indices = [], [], []
    try:
        bar = tqdm(loader, desc=description, unit="batch", leave=False, dynamic_ncols=True,
                   disable=not (progress and distributed.is_main_process()))
        for batch in bar:
            if given_loader:
                images, batch_labels = batch[0], batch[1]
            else:
                batch_indices, images, batch_labels, unreadable = batch
                raise_for_unreadable(unreadable)
                indices.append(batch_indices)
            with torch.inference_mode():
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    out = backbone(images)
                features.append(out.float().cpu())
            labels.append(torch.as_tensor(batch_labels, dtype=torch.long).cpu())
    finally:
        backbone.train(was_training)
    if not features:
        raise DataError("extract_features: the data loader yielded no batches")
    # Concatenated outside inference mode: the result is an ordinary tensor that a linear probe may
    # train on (inference tensors cannot be saved for backward).
    features_t, labels_t = torch.cat(features), torch.cat(labels)
    if given_loader:
        return features_t, labels_t
    return _gather_in_order(features_t, labels_t, torch.cat(indices), n_items, device)


# ----------------------------------------------------------------------------------------------------
# the common front half of `swavkit knn` and `swavkit linear`

@dataclass
class SplitFeatures:
    """Features of a train/val pair of labelled folders, plus what produced them (for the result JSON)."""
    train_features: torch.Tensor  # [N_train, D] float32
    train_labels: torch.Tensor  # [N_train] int64
    val_features: torch.Tensor  # [N_val, D] float32
    val_labels: torch.Tensor  # [N_val] int64
    classes: list[str]
    preprocessing: Preprocessing
    backbone_name: str
    extraction_s: float

    @property
    def feature_dim(self) -> int:
        return int(self.train_features.shape[1])

    def data_record(self, train_dir, val_dir, max_per_class: int) -> dict:
        """The ``data`` section of a result record."""
        return report.data_record(train_dir, val_dir, len(self.train_labels), len(self.val_labels), self.classes,
                           max_per_class)


def extract_split_features(backbone: torch.nn.Module, train_dir: str | Path, val_dir: str | Path,
                           preprocessing: Preprocessing, options: EvalOptions | None = None) -> SplitFeatures:
    """Read both folders (val labels follow train's class list; ``options.max_per_class`` caps both) and
    extract their features with ``options``' device, batch size, workers, precision and memory format."""
    options = options or EvalOptions()
    transform, reader = preprocessing.transform(), preprocessing.reader()  # the export's channels and bit depth
    train = LabelledImageFolder(train_dir, transform, max_per_class=options.max_per_class, reader=reader)
    val = LabelledImageFolder(val_dir, transform, classes=train.classes, max_per_class=options.max_per_class,
                              reader=reader)
    start = time.perf_counter()
    common = dict(device=options.device, batch_size=options.batch_size, num_workers=options.num_workers,
                  precision=options.precision, channels_last=options.channels_last, progress=options.progress)
    train_features, train_labels = extract_features(backbone, train, description="train features", **common)
    val_features, val_labels = extract_features(backbone, val, description="val features", **common)
    return SplitFeatures(train_features, train_labels, val_features, val_labels, train.classes, preprocessing,
                         backbone_name(backbone), time.perf_counter() - start)


__all__ = ["RawPixels", "SplitFeatures", "load_eval_backbone", "init_processes", "extract_features",
           "extract_split_features", "backbone_name", "backbone_record",
           "RANDOM_INIT_SEED"]
