"""The options of the frozen-backbone evaluations, one dataclass per concern, shared by the library
(:func:`swavkit.evaluation.knn.evaluate_knn`, :func:`swavkit.evaluation.linear_probe.evaluate_linear`) and the ``knn`` /
``linear`` commands, so each default is written once.

Imports neither torch nor timm: the CLI reads the defaults for its ``--help`` from here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from swavkit.runtime.cores import default_num_workers

# faiss's k-means wants >= 39 training points per list; fewer lists than that cannot be trained.
IVF_MIN_POINTS_PER_LIST = 39

if TYPE_CHECKING:
    import torch

INDEX_TYPES = ("exact", "ivf")
RECIPES = ("fast", "reference")
# L2 penalty (on the mean cross-entropy) tried by the fast recipe; standardised features make one grid
# fit backbones of any width. On 5,000-image CIFAR subsets the optimum lies between 1e-2 and 1 for
# pixels and convnet features alike; below 1e-4 a few thousand images are effectively unregularised
# (and L-BFGS needs its whole iteration budget), so the grid stops there. Large train sets want smaller
# values: pass your own grid.
DEFAULT_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass
class EvalOptions:
    """What every frozen-backbone evaluation shares: how the features are extracted and where the result
    record goes.

    Attributes:
        image_size_px: input side; None = the export's input_size, the checkpoint's large crop, else 224.
        batch_size: images per forward pass in each process.
        num_workers: DataLoader decoding processes.
        device: auto | cpu | cuda | cuda:N.
        precision: auto (bf16 on GPUs that support it, else fp32) | fp32 | bf16 | fp16 (GPU).
        channels_last: NHWC inputs and weights: faster convnets on GPUs.
        max_per_class: images per class in each split, a deterministic subset (0 = all).
        out_json: None = ``results/<evaluation>-<name>-<UTC time>.json``; ``""`` = write none.
        progress: tqdm bars on the main process.
        floors: auto | on | off: also evaluate random init and raw pixels.

    Example:
        ```python
        options = swavkit.EvalOptions(image_size_px=32, batch_size=128, out_json="")
        swavkit.evaluate_knn("runs/a", "train/", "val/", options)
        ```
    """
    image_size_px: int | None = None  # None: the export's input_size, the checkpoint's large crop, else 224
    batch_size: int = 256  # images per forward pass in each process
    num_workers: int = field(default_factory=default_num_workers)  # DataLoader decoding processes
    device: str | torch.device = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on GPUs that support it, else fp32) | fp32 | bf16 | fp16 (GPU)
    channels_last: bool = False  # NHWC inputs and weights: faster convnets on GPUs
    max_per_class: int = 0  # images per class in each split, a deterministic subset (0 = all)
    out_json: str | Path | None = None  # None = results/<evaluation>-<name>-<UTC time>.json; "" = write none
    progress: bool = True  # tqdm bars on the main process
    floors: str = "auto"  # auto | on | off: also evaluate random init and raw pixels (swavkit.evaluation.floors)
    # also evaluate these backbones (cached timm pretrained names, released files, other runs or exports) with
    # the same split, size and protocol (swavkit.evaluation.baselines); a "a,b" string is split at commas
    baselines: tuple[str, ...] = ()


def default_ivf_lists(n_train: int) -> int:
    """What ``n_lists=0`` means: ~4 sqrt(N) inverted lists (faiss's rule of thumb), at least
    ``IVF_MIN_POINTS_PER_LIST`` points each (``swavkit knn`` and ``swavkit neighbours``)."""
    return max(1, min(int(4 * math.sqrt(n_train)), n_train // IVF_MIN_POINTS_PER_LIST))


@dataclass
class KnnOptions:
    """The k-NN protocol: k neighbours vote with weight exp(cosine / temperature) (see swavkit.evaluation.knn).

    Attributes:
        k: neighbours that vote (DINO / InstDisc: 20).
        temperature: T of the vote weight exp(cosine / T) (0.07).
        index: exact | ivf (approximate, for train sets of millions).
        n_lists: ivf cells (0 = ~4 sqrt(N_train)).
        n_probe: ivf cells searched per query (0 = min(16, n_lists)).

    Example:
        ```python
        swavkit.evaluate_knn("runs/a", "train/", "val/", knn=swavkit.KnnOptions(k=200, temperature=0.1))
        ```
    """
    k: int = 20
    temperature: float = 0.07
    index: str = "exact"  # exact | ivf (approximate, for train sets of millions)
    n_lists: int = 0  # ivf cells (0 = ~4 sqrt(N_train))
    n_probe: int = 0  # ivf cells searched per query (0 = min(16, n_lists))


@dataclass
class LinearOptions:
    """The linear-probe protocol. ``recipe`` "fast" uses ``weight_decays``, ``holdout_fraction`` and
    ``lbfgs_iterations``; "reference" uses ``epochs``, ``lr`` (at batch 256), ``weight_decay``, ``momentum``
    and ``min_crop_scale``; both use ``seed``.

    Attributes:
        recipe: fast (L-BFGS on cached features, weight decay chosen on held-out train) | reference (the
            paper's SGD on augmented crops).
        seed: held-out split (fast) / training order and head init (reference).
        weight_decays: fast: the L2 grid searched on held-out train.
        holdout_fraction: fast: fraction of each train class held out for the choice.
        lbfgs_iterations: fast: L-BFGS iteration cap per fit.
        epochs: reference: training epochs.
        lr: reference: LR at global batch 256, scaled linearly with the batch.
        weight_decay: reference: SGD weight decay.
        momentum: reference: SGD momentum.
        min_crop_scale: reference: smallest random-resized-crop area fraction.
        checkpoint: reference: a file for the probe's training state, saved every 10 minutes, at the end and on
            SIGTERM / SIGINT; the same call again resumes from it (after a kill -9 too). "": nothing saved.

    Example:
        ```python
        swavkit.evaluate_linear("runs/a", "train/", "val/", linear=swavkit.LinearOptions(recipe="reference", epochs=100))
        ```
    """
    recipe: str = "fast"  # fast | reference
    seed: int = 0  # held-out split (fast) / training order and head init (reference)
    weight_decays: tuple[float, ...] = DEFAULT_WEIGHT_DECAYS  # fast: L2 grid searched on held-out train
    holdout_fraction: float = 0.2  # fast: fraction of each train class held out for the choice
    lbfgs_iterations: int = 300  # fast: L-BFGS iteration cap per fit
    epochs: int = 100  # reference
    lr: float = 0.3  # reference: LR at global batch 256, scaled linearly with the batch
    weight_decay: float = 1e-6  # reference: SGD weight decay
    momentum: float = 0.9  # reference: SGD momentum
    min_crop_scale: float = 0.08  # reference: smallest random-resized-crop area fraction
    checkpoint: str = ""  # reference: the probe's resumable training state ("" = none)


def apply_keywords(keywords: dict, *options) -> list:
    """Copies of the ``options`` dataclasses with each keyword set on the one that has a field of that name:
    the keyword form ``evaluate_knn(src, train, val, k=5, batch_size=64)``. An unknown name raises TypeError."""
    remaining, updated = dict(keywords), []
    for option in options:
        names = {f.name for f in dataclasses.fields(option)}
        updated.append(dataclasses.replace(option, **{name: remaining.pop(name) for name in list(remaining)
                                                      if name in names}))
    if remaining:
        known = sorted(f.name for option in options for f in dataclasses.fields(option))
        raise TypeError(f"unexpected keyword argument(s) {', '.join(sorted(remaining))}; "
                        f"options are {', '.join(known)}")
    return updated


__all__ = ["EvalOptions", "KnnOptions", "LinearOptions", "apply_keywords", "INDEX_TYPES", "RECIPES",
           "DEFAULT_WEIGHT_DECAYS", "default_ivf_lists", "IVF_MIN_POINTS_PER_LIST"]
