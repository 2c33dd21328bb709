"""The one set-up every evaluation runs around its measurement (k-NN, linear probe, fine-tuning), in this order:

1. keywords -> options (:func:`swavkit.evaluation.options.apply_keywords`, done by the caller);
2. the output check: ``--out`` is new or an earlier swavkit result, the baselines are on disk (one line each,
   before minutes of work);
3. processes: join torchrun / srun (k-NN, linear and fine-tuning); the device;
4. preprocessing: the backbone's image size and mean/std (:func:`preprocessing_for`);
5. the result record (:meth:`Evaluation.record`: device, start time, wall time, world size filled in);
6. write it (main process) and broadcast it, so every process returns the same record (:meth:`Evaluation.publish`);
7. the floors and baselines that evaluate other backbones with the same function (:meth:`Evaluation.beside`).

DINOv2's ``eval/setup.py`` is the model. Fine-tuning runs its floor and baselines on the same labelled subset
inside its resumable run folder, so it records them itself and skips step 7.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from swavkit.artifacts.preprocessing import resolve_preprocessing
from swavkit.data.transforms import Preprocessing
from swavkit.evaluation.baselines import add_baselines, check_baselines
from swavkit.evaluation.features import SplitFeatures, init_processes
from swavkit.evaluation.floors import add_floors, floors_wanted
from swavkit.evaluation.report import (build_result, check_result_target, default_result_path, rewrite_result,
                                       utc_now, write_result)
from swavkit.runtime import distributed


@dataclass
class Evaluation:
    """One evaluation between its checks and its record: what it is, of which backbone, where it runs and
    since when. ``baseline_kinds`` is {name: kind} of the checked ``--baselines``."""
    evaluation: str
    source: str
    device: torch.device
    started_at: datetime.datetime
    start_s: float  # time.perf_counter() at the start: the record's wall time counts from here
    baseline_kinds: dict[str, str]

    def record(self, *, metrics: dict, protocol: dict, backbone: dict, data: dict, preprocessing: Preprocessing,
               extra: dict | None = None) -> dict:
        """The result record (:func:`swavkit.evaluation.report.build_result`) of this evaluation."""
        return build_result(evaluation=self.evaluation, metrics=metrics, protocol=protocol, backbone=backbone,
                            data=data, preprocessing=preprocessing.as_dict(), device=self.device,
                            started_at=self.started_at, wall_time_s=time.perf_counter() - self.start_s,
                            world_size=distributed.world_size(), extra=extra)

    def result_path(self, out_json: str | Path | None) -> Path | None:
        """Where the record goes: ``out_json``, None = ``results/<evaluation>-<name>-<time>.json``
        (:func:`swavkit.evaluation.report.default_result_path`), "" = nowhere (None)."""
        if out_json == "":
            return None
        return Path(out_json) if out_json else default_result_path(self.evaluation, self.source, self.started_at)

    def publish(self, result: dict | None, out_json: str | Path | None,
                write_beside: Callable[[Path], None] | None = None) -> dict:
        """Write ``result`` (made on the main process, None elsewhere) to :meth:`result_path` with its path
        recorded in ``result["result_path"]`` (``write_beside(path)`` first writes what belongs next to it);
        return it on every process."""
        if distributed.is_main_process():
            path = self.result_path(out_json)
            if path is not None:
                result["result_path"] = str(path)
                if write_beside is not None:
                    write_beside(path)
                write_result(result, path)
        return distributed.broadcast_object(result)

    def beside(self, result: dict, evaluate: Callable[..., dict], train_dir, val_dir, options,
               method_options) -> dict:
        """``result`` with its floors (when ``options.floors`` asks for them) and ``--baselines``, each
        evaluated by ``evaluate`` (collective under torchrun) with the same protocol; the file is rewritten."""
        if floors_wanted(options.floors, result["data"]["n_train"]):
            result = rewrite_result(add_floors(result, evaluate, train_dir, val_dir, options, method_options))
        if options.baselines:
            result = rewrite_result(add_baselines(result, evaluate, train_dir, val_dir, options, method_options))
        return result


def start(evaluation: str, source: str | Path, options, *, check_output: Callable = check_result_target) -> Evaluation:
    """Steps 2-3 for ``options`` (EvalOptions or FinetuneOptions: ``out_json``, ``baselines``, ``device``,
    ``precision``): the output and baselines checked before any work, then the processes joined (torchrun /
    srun; every evaluation runs under them).
    ``check_output(out_json)`` may check more than the record (fine-tuning: its label list too)."""
    check_output(options.out_json)  # before minutes of feature extraction or training
    baseline_kinds = check_baselines(options.baselines)  # a baseline that is not on disk: one line, before any work
    started_at, start_s = utc_now(), time.perf_counter()
    device = init_processes(options.device)
    return Evaluation(evaluation, str(source), device, started_at, start_s, baseline_kinds)


def preprocessing_for(source: str | Path, image_size_px: int | None,
                      features: SplitFeatures | None = None) -> Preprocessing:
    """Step 4: the preprocessing of precomputed ``features``, else of the backbone at ``image_size_px``
    (None = the export's / checkpoint's own)."""
    return features.preprocessing if features is not None else resolve_preprocessing(source, image_size_px)


__all__ = ["Evaluation", "start", "preprocessing_for"]
