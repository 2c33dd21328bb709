"""SwAV pretraining: ``train(cfg)`` sets up in stages, one banner each, then a short loop over ``train_step``.

Runs as one plain process on CPU or one GPU, or as one process per device under torchrun / srun. The
step and the state it changes (whose ``state_dict`` is the checkpoint) live in :mod:`swavkit.training.step`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from swavkit.runtime import distributed
from swavkit.training.budget import BudgetClock, BudgetPlan
from swavkit.artifacts.checkpoint import load_training_checkpoint
from swavkit.config import (Config, ConfigError, backbone_kwargs, config_differences, dump_yaml, from_dict,
                            head_hidden_dims, prototype_rows, to_dict)
from swavkit.data import printable_path
from swavkit.runtime.device import autocast_dtype, resolve_auto_flag
from swavkit.runtime.cores import training_threads
from swavkit.training.diagnosis import CollapseMonitor
from swavkit.errors import exit_code_of
from swavkit.training.loggers import MetricLoggers, build_loggers
from swavkit.core.loss import FeatureQueue
from swavkit.core.model import SwAVModel, build_model
from swavkit.core.optim import build_optimizer, resolve_optimizer_name
from swavkit.artifacts.rundir import RunFolder
from swavkit.artifacts.pretrained import load_initial_backbone_state
from swavkit.core.schedule import build_lr_schedule, explain_peak_lr
from swavkit.runtime.signals import StopRequest as _StopRequest, StopRequested
from swavkit.training.step import StepSettings, TrainState
from swavkit.training.collapse import CollapsePolicy
from swavkit.training.deepcluster_epoch import build_deepcluster, describe_bank
from swavkit.training.diagnosis import DEEPCLUSTER_LEVERS
from swavkit.training.channels import adopt_saved_mean_std
from swavkit.training.data_setup import TrainingData, build_data, cache_file_list
from swavkit.training.loop import (UNPLANNED_TOTAL_STEPS, DataLoaderCrashed, Loop, TrainingDiverged, export,
                                   planned_settings, pretraining_checkpointer, save_budget_with_checkpoints,
                                   train_epochs)
from swavkit.training.processes import Processes, start_processes
from swavkit.core.activation_checkpointing import apply_activation_checkpointing
from swavkit.artifacts.checkpointer import Checkpointer
from swavkit.training.meta_init import build_on_meta, check_replayable
from swavkit.training.sharding import parallelize
from swavkit.training.speed import measured_step_seconds
from swavkit.training.memory_plan import check_memory, out_of_memory


@dataclass
class TrainResult:
    """What a pretraining run returns (:func:`swavkit.train`, :func:`swavkit.pretrain`).

    Attributes:
        out_dir: the run folder.
        checkpoint: its ``checkpoints/last.pt`` (full training state; the same command resumes from it).
        backbone_dir: the exported backbone (``out_dir/backbone``), None when the run stopped before the end.
        step: the last global step done.
        final_loss: the loss of the last logged step.
        completed: False when the run stopped early (a signal, or ``stop_after_steps``); it is resumable.

    Example:
        ```python
        result = swavkit.pretrain("imgs/", "runs/a", epochs=50)
        if result.completed:
            backbone = swavkit.load_backbone(result.backbone_dir)
        ```
    """

    out_dir: Path
    checkpoint: Path
    backbone_dir: Path | None
    step: int
    final_loss: float
    completed: bool  # False when stopped early (signal or stop_after_steps)


def train(cfg: Config, *, restart: bool = False, stop_after_steps: int | None = None,
          progress: bool = True) -> TrainResult:
    """Pretrain with SwAV as described by ``cfg``; resume from ``out_dir/checkpoints/last.pt`` if present.

    Nothing is written into ``out_dir`` before every check has passed (config, backbone name, run folder,
    data folder, model build); a failure or a SIGTERM on any process ends every process of the job.

    Args:
        cfg: the run's configuration (:func:`swavkit.load_config`).
        restart: discard an existing run in ``out_dir`` (its own files only) and start over.
        stop_after_steps: stop (with a checkpoint, like a preemption) once this global step is reached.
        progress: show a tqdm progress bar (rank 0 only); ``metrics.jsonl`` is written either way.

    Returns:
        A :class:`TrainResult`: the run folder, checkpoint, exported backbone, last step and loss, and whether
        the run completed.

    Raises:
        ConfigError: an invalid or contradictory config, or a changed config in an existing run folder
            without ``restart``.
        DataError: the data path is missing, holds no images, or only unreadable ones.
        LoadError: ``model.init`` does not fit ``model.backbone``.
        TrainingDiverged: the loss or a gradient became non-finite (the last good state is saved).

    Example:
        ```python
        cfg = swavkit.load_config(["cifar10_resnet18"], ["data.path=/data/imgs", "out_dir=runs/c"])
        result = swavkit.train(cfg)          # the same call again resumes runs/c
        ```
    """
    # ================================================================================================
    # 1. processes, device, precision
    # ================================================================================================
    started_s = time.monotonic()  # a time budget counts from here
    procs = start_processes(cfg)
    with (distributed.fail_together(exit_code_of), _StopRequest() as stop_request,
          training_threads(procs.device, procs.local_world_size)):
        # ============================================================================================
        # 2. run folder: checked, and the checkpoint to resume from (nothing written yet)
        # ============================================================================================
        files, checkpoint = _open_run_folder(cfg, restart)
        # ============================================================================================
        # 3. data: unlabeled folder -> multi-crop -> per-rank batches
        # ============================================================================================
        data = build_data(cfg, procs, files, resuming=checkpoint is not None)
        # the memory plan: a step that would not fit stops here, before the model is built or a file written
        check_memory(cfg, procs.device, procs.world, procs.local_world_size, procs.precision, procs.colour_on_device)
        # ============================================================================================
        # 4. model: timm backbone (model.init weights) -> projection head -> L2 norm -> prototypes
        # ============================================================================================
        core, model, memory_format = _build_model(cfg, procs, fresh=checkpoint is None)
        # ============================================================================================
        # 5. optimiser, LR schedule, queue, prototype freezing; 6. resume
        # ============================================================================================
        state, settings = _build_state(cfg, procs, data, core, model)
        checkpointer = pretraining_checkpointer(cfg, procs, files, state, data.steps_per_epoch, stop_request,
                                                stop_after_steps)
        resumed_at_step = _resume(checkpointer, checkpoint, procs, data) if checkpoint is not None else None
        budget_clock = _budget_clock(cfg, procs, state, started_s)  # after the resume: it reads the minutes used
        if budget_clock is not None:
            save_budget_with_checkpoints(checkpointer, state, budget_clock)
        if not cfg.swav.prevent_collapse:  # switched off on resume: the configured epsilon and queue again
            state.epsilon, state.queue_dropped_at_step = cfg.swav.epsilon, -1
        # ============================================================================================
        # 7. the first write: --restart cleanup, config.yaml, metrics back to the checkpoint, loggers
        # ============================================================================================
        loggers = _start_run_folder(cfg, procs, files, restart, resumed_at_step, state)
        cache_file_list(data, procs, files)
        # ============================================================================================
        # 8. training loop
        # ============================================================================================
        loop = Loop(cfg, procs, files, data, planned_settings(settings, state.budget), state.lr_schedule,
                     memory_format, checkpointer, loggers,
                     CollapsePolicy.from_config(cfg.swav) if cfg.method == "swav" else None, budget_clock)
        try:
            stopped_by = train_epochs(loop, state, show_progress=progress)
        except torch.cuda.OutOfMemoryError:  # the pre-flight check's one line, with the plan's numbers
            raise out_of_memory(cfg, procs.device, procs.world, procs.precision, state.step) from None
        finally:
            if loggers is not None:
                loggers.close()
        if stopped_by is not None:
            procs.say(f"stopped at step {state.step}/{data.total_steps} ({stopped_by}); checkpoint saved to "
                      f"{printable_path(files.checkpoint)}. Run the same command again to resume.")
            return TrainResult(files.path, files.checkpoint, None, state.step, state.last_loss, completed=False)
        # ============================================================================================
        # 9. final checkpoint and backbone export (with its model card)
        # ============================================================================================
        if resumed_at_step != state.step and checkpointer.saved_step != state.step:
            checkpointer.save(state.step)
        backbone_dir = export(loop, state)
        distributed.barrier()
        if loop.budget_clock is not None:
            procs.say(f"budget: {state.step} steps, {loop.budget_clock.elapsed_s() / 60:.1f} of "
                      f"{cfg.train.budget_minutes:g} min used, export included")
    return TrainResult(files.path, files.checkpoint, backbone_dir, state.step, state.last_loss, completed=True)


def _budget_clock(cfg: Config, procs: Processes, state: TrainState, started_s: float) -> BudgetClock | None:
    """train.budget_minutes: this attempt's clock, with the seconds per step --auto measured for this very run in
    this process (swavkit.training.speed), from which the first plan is made before the first step. One
    process only: several would each have timed themselves while sharing the machine."""
    if state.budget is None:
        return None
    measured = measured_step_seconds(cfg, procs.device, procs.world, procs.precision) if procs.world == 1 else None
    return BudgetClock(state.budget, started_s, measured_step_s=measured)


def _open_run_folder(cfg: Config, restart: bool) -> tuple[RunFolder, dict | None]:
    """Stage 2: ``out_dir`` checked (RunFolder refuses a folder that is not a run) and, unless restarting, the
    checkpoint to resume from, whose config must match. Reads only."""
    files = RunFolder(cfg.out_dir)
    if restart or not files.checkpoint.exists():
        return files, None
    checkpoint = load_training_checkpoint(files.checkpoint)
    adopt_saved_mean_std(cfg, checkpoint["config"])  # mean/std computed from the data: the run's own numbers
    diffs = config_differences(_with_defaults(checkpoint["config"]), to_dict(cfg))
    if diffs:
        raise ConfigError(f"{printable_path(files.path)} holds a run with a different config ({', '.join(diffs[:6])}); "
                          "use another out_dir, or --restart to discard that run")
    return files, checkpoint


def _with_defaults(saved: dict) -> dict:
    """A saved config with the keys added since it was written at their defaults (so they count as unchanged)."""
    try:
        return to_dict(from_dict(saved))
    except ConfigError:  # a key that no longer exists: config_differences names it
        return saved


def _resume(checkpointer: Checkpointer, checkpoint: dict, procs: Processes, data: TrainingData) -> int:
    """Stage 6: weights, optimiser, step, queue, RNG and LR schedule from the checkpoint; its step."""
    state = checkpointer.stateful
    for note in checkpointer.restore(checkpoint):
        procs.say(f"resume: {note}")
    if state.budget is not None:  # the budget's plan (when made) decides the length, not train.epochs
        if state.budget.planned:
            data.total_steps = state.budget.total_steps
        procs.say(f"resume: {state.budget.used_s / 60:.1f} of {state.budget.budget_s / 60:g} budget minutes used")
    else:
        note = state.lr_schedule.change_total_steps(data.total_steps, state.step, data.steps_per_epoch)
        if note:
            procs.say(f"resume: {note}")
    procs.say(f"resume: {printable_path(checkpointer.path)} at step {state.step}/{data.total_steps}")
    return state.step


def _start_run_folder(cfg: Config, procs: Processes, files: RunFolder, restart: bool,
                      resumed_at_step: int | None, state: TrainState) -> MetricLoggers | None:
    """Stage 7, on the main process: the old run discarded (--restart), config.yaml written, metrics and
    skipped.txt taken back to the checkpoint (resume); the metric loggers it returns (None elsewhere)."""
    loggers = None
    if procs.is_main:
        files.start(dump_yaml(cfg), restart=restart, resume_step=resumed_at_step,
                    skipped_at_resume=state.skipped_files)
        loggers = build_loggers(cfg.train.loggers, files.path, to_dict(cfg), resume_step=resumed_at_step)
    distributed.barrier()
    return loggers


def _build_model(cfg: Config, procs: Processes, fresh: bool) -> tuple[SwAVModel, torch.nn.Module,
                                                                       torch.memory_format]:
    """(core SwAVModel, what the forward runs: core or DDP around it, the crops' memory format). A ``fresh``
    run (no checkpoint) starts its backbone from ``model.init`` when set.

    Under ``dist.strategy=fsdp`` no process ever holds the whole model: it is built on the meta device, sharded,
    then each process materialises and initialises its shards with the values of the unsharded build
    (:mod:`swavkit.training.meta_init`), and ``model.init`` weights reach the shards from rank 0 one tensor at a
    time."""
    device, m = procs.device, cfg.model
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    deepcluster = cfg.method == "deepclusterv2"
    build = partial(build_model, m.backbone, prototype_rows(cfg), head_hidden_dims(m), m.output_dim, backbone_kwargs(cfg),
                    zero_init_last=m.zero_init_last, head_bn=m.head_bn)
    initial = m.init if m.init and fresh else ""
    recording = None
    if procs.sharded:
        core, recording = build_on_meta(build)
        check_replayable(recording, core, skip=("prototypes.",))
    else:
        core = build()
        if initial:
            core.backbone.load_state_dict(_initial_backbone_state(cfg), strict=True)
    if deepcluster:  # the heads' k-means centroids, never trained (the reference freezes them past its last step)
        core.prototypes.weight.requires_grad_(False)
    checkpointing = apply_activation_checkpointing(core.backbone, m.activation_checkpointing, m.backbone)
    memory_format = torch.channels_last if resolve_auto_flag(m.channels_last, device) else torch.contiguous_format
    core = distributed.convert_sync_batchnorm(core, m.sync_batchnorm, procs.local_world_size)
    if m.compile:
        # Static shapes: the backbone sees one fixed shape per crop resolution. Left automatic, the second
        # resolution makes dynamo recompile a dynamic-shape graph: twice the compile time on a CPU (19 vs
        # 39 s for resnet18, same speed after), and on an H100 still compiling after 170 s.
        core.backbone.compile(dynamic=False)
    model = parallelize(core, cfg, procs, memory_format, recording,
                        partial(_initial_backbone_state, cfg) if initial and procs.sharded else None)
    if initial:
        procs.say(f"model: backbone weights from model.init={printable_path(m.init)} (head and prototypes fresh)")
    procs.say(f"model: {m.backbone} ({core.backbone.num_features}-d features) -> head "
              f"{' -> '.join(map(str, head_hidden_dims(m))) or '-'}{'' if m.head_bn else ' (no BN)'} -> {m.output_dim}-d"
              f" -> {m.n_prototypes} prototypes"
              + (f" x {cfg.deepcluster.n_heads} k-means heads" if deepcluster else "")
              + f"; precision {procs.precision} on {device}"
              + (" (channels_last)" if memory_format == torch.channels_last else "")
              + (f" ({torch.get_num_threads()} compute thread(s) beside {cfg.data.num_workers} data worker(s); "
                 "OMP_NUM_THREADS overrides)" if device.type == "cpu" else "")
              + (f"; {checkpointing}" if checkpointing else "")
              + (f"; FSDP over {procs.world} processes, built on the meta device" if procs.sharded else ""))
    return core, model, memory_format


def _initial_backbone_state(cfg: Config) -> dict:
    """The ``model.init`` weights, whole (strictly checked against the backbone)."""
    return load_initial_backbone_state(cfg.model.init, cfg.model.backbone, backbone_kwargs(cfg))


def _build_state(cfg: Config, procs: Processes, data: TrainingData, core: SwAVModel,
                 model: torch.nn.Module) -> tuple[TrainState, StepSettings]:
    """(fresh TrainState with its LR schedule, the step's settings)"""
    optimizer_name = resolve_optimizer_name(cfg.optim.optimizer, core.backbone)
    lr_schedule = build_lr_schedule(cfg, data.steps_per_epoch, optimizer_name)
    optimizer = build_optimizer(core, optimizer_name, lr=lr_schedule.peak_lr, weight_decay=cfg.optim.weight_decay,
                                momentum=cfg.optim.momentum, trust_coefficient=cfg.optim.lars_trust_coefficient,
                                lars_exclude=cfg.optim.lars_exclude)
    queue = None
    if cfg.swav.queue_length:
        queue = FeatureQueue(len(cfg.swav.assignment_crops), cfg.swav.queue_length // procs.world,
                             cfg.model.output_dim).to(procs.device)
    deepcluster = cfg.method == "deepclusterv2"
    levers = {"levers": DEEPCLUSTER_LEVERS} if deepcluster else {}
    state = TrainState(core, optimizer, torch.amp.GradScaler(procs.device.type, enabled=procs.precision == "fp16"),
                       queue, CollapseMonitor(cfg.model.n_prototypes, cfg.train.collapse_patience_steps, **levers), model,
                       lr_schedule=lr_schedule, epsilon=cfg.swav.epsilon,
                       budget=BudgetPlan(60.0 * cfg.train.budget_minutes) if cfg.train.budget_minutes > 0 else None)
    state.sharded = procs.sharded
    if deepcluster:
        state.deepcluster = build_deepcluster(cfg, data.steps_per_epoch * data.per_rank_batch, procs.device)
    if state.budget is not None:  # until the first plan, the run cannot end by train.epochs
        data.total_steps = UNPLANNED_TOTAL_STEPS
    settings = StepSettings.from_config(cfg, data.steps_per_epoch, autocast_dtype(procs.precision))
    frozen = ("prototypes = k-means centroids, never trained" if deepcluster
              else f"prototypes frozen for {settings.freeze_prototype_steps} steps")
    procs.say(f"optimiser: {optimizer_name}, {lr_schedule.describe()} ({explain_peak_lr(cfg, optimizer_name)}); "
              f"{frozen}"
              + (f"; queue {cfg.swav.queue_length} from epoch {cfg.swav.queue_start_epoch}" if queue is not None else ""))
    s = cfg.swav
    if deepcluster:
        procs.say(f"targets: deepclusterv2, {cfg.deepcluster.kmeans_iterations}-iteration spherical k-means at every "
                  f"epoch start, temperature {s.temperature:g}; {describe_bank(state.deepcluster)}")
        return state, settings
    procs.say(codes_banner(s))
    return state, settings


def codes_banner(swav) -> str:
    """The start-up line on the Sinkhorn epsilon: what is in force, then how to change it (``swav``: the config's
    SwAVConfig). Never "(key=value: ...)", which reads as if both held."""
    if swav.prevent_collapse:
        return (f"codes: Sinkhorn epsilon starts at {swav.epsilon:g} and is lowered towards {swav.min_epsilon:g} while "
                f"the codes' entropy is above {swav.code_entropy_target:g} ln K (swav.prevent_collapse=true; to keep it "
                f"fixed at {swav.epsilon:g} as in the paper, set swav.prevent_collapse=false)")
    return (f"codes: Sinkhorn epsilon fixed at {swav.epsilon:g}, as in the paper (swav.prevent_collapse=false; to "
            "lower it while the codes' entropy is high, set swav.prevent_collapse=true)")


__all__ = ["train", "TrainResult", "TrainingDiverged", "DataLoaderCrashed", "StopRequested"]
