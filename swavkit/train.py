"""SwAV pretraining: ``train(cfg)`` sets up in stages, one banner each, then a short loop over ``train_step``.

Runs as one plain process on CPU or one GPU, or as one process per device under torchrun / srun. The
step and the state it changes (whose ``state_dict`` is the checkpoint) live in :mod:`swavkit.step`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from swavkit import distributed
from swavkit.budget import BudgetClock, BudgetPlan, fit_total_steps, share_of_run, worth_changing
from swavkit.checkpoint import backbone_state, export_backbone, load_training_checkpoint, save_atomic
from swavkit.config import Config, ConfigError, config_differences, dump_yaml, from_dict, to_dict, validate
from swavkit.data import (BUNDLED_SAMPLE, EpochSampler, UnlabeledImageFolder, append_skipped_report, check_readable,
                          printable_path)
from swavkit.data.filelist import CACHE_NAME, PathList, load_path_cache, save_path_cache, source_key
from swavkit.data.device_decode import (EncodedCrops, collate_encoded, decode_batch, encoded_or_rgb, read_encoded,
                                       resolve_decode_on_device)
from swavkit.data.errors import DataError
from swavkit.data.shards import (SHARD_INDEX, ShardStream, check_decodable, expand_shards, is_shard_spec, pass_batch,
                                  stored_count)
from swavkit.data.sources import data_specs, describe_specs, resolve_images
from swavkit.device import autocast_dtype, resolve_auto_flag, resolve_device, resolve_precision, training_threads
from swavkit.diagnosis import CollapseMonitor, code_statistics
from swavkit.errors import exit_code_of
from swavkit.loggers import MetricLoggers, build_loggers
from swavkit.loss import FeatureQueue
from swavkit.model import SwAVModel, build_model, create_backbone
from swavkit.modelcard import card_for_training
from swavkit.multicrop import MultiCropTransform
from swavkit.optim import build_optimizer, resolve_optimizer_name
from swavkit.presets import typical_side_px
from swavkit.rundir import RunFolder
from swavkit.schedule import LRSchedule, build_lr_schedule, explain_peak_lr
from swavkit.activation_checkpointing import apply_activation_checkpointing
from swavkit.sharded_checkpoint import (SHARDED_KEY, load_sharded_into, load_whole_into_sharded, remove_shard_folders,
                                        save_sharded_checkpoint)
from swavkit.sharding import check_processes, full_model_state, shard_model
from swavkit.sharpness import EpsilonControl, queue_should_stop, row_entropy
from swavkit.signals import StopRequest as _StopRequest, StopRequested
from swavkit.step import StepResult, StepSettings, TrainState, train_step


class TrainingDiverged(FloatingPointError):
    """The loss became non-finite; the last good state was saved first."""


class DataLoaderCrashed(RuntimeError):
    """A data-loading worker died; the message names the files it was reading."""


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    backbone_dir: Path | None
    step: int
    final_loss: float
    completed: bool  # False when stopped early (signal or stop_after_steps)


# ----------------------------------------------------------------------------------------------------
# what the setup stages decide, and the loop reads

UNPLANNED_TOTAL_STEPS = 2 ** 62  # a budget run before its first plan: it ends when the plan says

@dataclass
class _Processes:
    """Stage 1: where this process runs, among how many, in which precision."""
    device: torch.device
    world: int
    rank: int
    is_main: bool
    local_world_size: int
    precision: str  # fp32 | bf16 | fp16
    colour_on_device: bool  # colour ops in the training loop (True) or in the data workers
    decode_on_device: bool = False  # JPEGs decoded and cut in the training loop (implies colour_on_device)

    def say(self, *args, **kwargs) -> None:
        """print on the main process only"""
        if self.is_main:
            print(*args, **kwargs)

    def say_progress(self, text: str) -> None:
        """A line on the main process while a progress bar is showing."""
        if self.is_main:
            tqdm.write(text)


@dataclass
class _Data:
    """Stage 3: the per-rank batches and how many steps they make."""
    transform: MultiCropTransform
    dataset: UnlabeledImageFolder | ShardStream
    sampler: EpochSampler | ShardStream  # set_epoch(epoch, start=samples this rank already used)
    loader: DataLoader
    per_rank_batch: int
    steps_per_epoch: int
    total_steps: int
    file_list: PathList | None = None  # folders and list files: what the run folder caches for a resume
    file_list_source: str = ""


@dataclass
class _Loop:
    """Everything the training loop reads, built by ``train``'s setup stages. Only a time budget's plan
    changes it (``settings``, ``lr_schedule``: swavkit/budget.py)."""
    cfg: Config
    procs: _Processes
    files: RunFolder
    data: _Data
    settings: StepSettings
    lr_schedule: LRSchedule
    memory_format: torch.memory_format
    stop_after_steps: int | None
    loggers: MetricLoggers | None  # the main process's metric backends; None on the others
    epsilon_control: EpsilonControl | None  # None: the configured epsilon throughout (swav.prevent_collapse=false)
    budget_clock: BudgetClock | None  # train.budget_minutes: this attempt's clock (the plan is in the state)
    monitor_floors: dict = field(default_factory=dict)  # monitor.floors: k-NN of random init / raw pixels, once


@dataclass
class LogWindow:
    """Sums over the steps since the last metrics row (the loss stays on the device until logged)."""
    loss_sum: torch.Tensor  # 0-d fp32
    row_entropy_sum: torch.Tensor  # 0-d fp32: sum over steps of the codes' mean per-sample entropy (nats)
    steps: int = 0
    wait_s: float = 0.0  # time blocked on the data loader
    start_s: float = field(default_factory=time.perf_counter)

    @classmethod
    def open(cls, device: torch.device) -> "LogWindow":
        return cls(torch.zeros((), device=device), torch.zeros((), device=device))


@dataclass
class _Progress:
    """What the loop changes besides the TrainState."""
    bar: tqdm
    stop_request: "_StopRequest"
    window: LogWindow
    last_save_s: float  # time.monotonic() of the last checkpoint
    save_duration_s: float = 0.0  # how long the last checkpoint took to write (the budget's reserve)


# ----------------------------------------------------------------------------------------------------
# train(): setup stages, then the loop

def train(cfg: Config, *, restart: bool = False, stop_after_steps: int | None = None,
          progress: bool = True) -> TrainResult:
    """Pretrain with SwAV as described by ``cfg``; resume from ``out_dir/checkpoints/last.pt`` if present.

    Nothing is written into ``out_dir`` before every check has passed (config, backbone name, run folder,
    data folder, model build); a failure or a SIGTERM on any process ends every process of the job.

    Args:
        restart: discard an existing run in ``out_dir`` (its own files only) and start over.
        stop_after_steps: stop (with a checkpoint, like a preemption) once this global step is reached.
    """
    # ================================================================================================
    # 1. processes, device, precision
    # ================================================================================================
    started_s = time.monotonic()  # a time budget counts from here
    procs = _start_processes(cfg)
    with (distributed.fail_together(exit_code_of), _StopRequest() as stop_request,
          training_threads(procs.device, cfg.data.num_workers, procs.local_world_size)):
        # ============================================================================================
        # 2. run folder: checked, and the checkpoint to resume from (nothing written yet)
        # ============================================================================================
        files, checkpoint = _open_run_folder(cfg, restart)
        # ============================================================================================
        # 3. data: unlabeled folder -> multi-crop -> per-rank batches
        # ============================================================================================
        data = _build_data(cfg, procs, files, resuming=checkpoint is not None)
        # ============================================================================================
        # 4. model: timm backbone (model.init weights) -> projection head -> L2 norm -> prototypes
        # ============================================================================================
        core, model, memory_format = _build_model(cfg, procs, fresh=checkpoint is None)
        # ============================================================================================
        # 5. optimiser, LR schedule, queue, prototype freezing; 6. resume
        # ============================================================================================
        state, settings = _build_state(cfg, procs, data, core, model)
        resumed_at_step = _resume(state, checkpoint, procs, data, files) if checkpoint is not None else None
        if not cfg.swav.prevent_collapse:  # switched off on resume: the configured epsilon and queue again
            state.epsilon, state.queue_dropped_at_step = cfg.swav.epsilon, -1
        # ============================================================================================
        # 7. the first write: --restart cleanup, config.yaml, metrics back to the checkpoint, loggers
        # ============================================================================================
        loggers = _start_run_folder(cfg, procs, files, restart, resumed_at_step, state)
        _cache_file_list(data, procs, files)
        # ============================================================================================
        # 8. training loop
        # ============================================================================================
        loop = _Loop(cfg, procs, files, data, _planned_settings(settings, state.budget), state.lr_schedule,
                     memory_format, stop_after_steps, loggers, _epsilon_control(cfg),
                     BudgetClock(state.budget, started_s) if state.budget is not None else None)
        try:
            stopped_by = _train_epochs(loop, state, stop_request, show_progress=progress)
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
        if resumed_at_step != state.step:
            _save_checkpoint(loop, state)
        backbone_dir = _export(loop, state)
        distributed.barrier()
        if loop.budget_clock is not None:
            procs.say(f"budget: {state.step} steps, {loop.budget_clock.elapsed_s() / 60:.1f} of "
                      f"{cfg.train.budget_minutes:g} min used, export included")
    return TrainResult(files.path, files.checkpoint, backbone_dir, state.step, state.last_loss, completed=True)


def _start_processes(cfg: Config) -> _Processes:
    launch = distributed.detect_launch()
    device = resolve_device(cfg.train.device, launch.local_rank)
    launch = distributed.init(device.type)
    world = distributed.world_size()
    validate(cfg, world_size=world)
    check_processes(cfg.dist.strategy, world, device.type)
    decode = resolve_decode_on_device(cfg.data.decode_on_device, device)
    return _Processes(device, world, distributed.rank(), distributed.is_main_process(), launch.local_world_size,
                      resolve_precision(cfg.train.precision, device),
                      resolve_auto_flag(cfg.data.colour_on_device, device) or decode, decode)


def _open_run_folder(cfg: Config, restart: bool) -> tuple[RunFolder, dict | None]:
    """Stage 2: ``out_dir`` checked (RunFolder refuses a folder that is not a run) and, unless restarting, the
    checkpoint to resume from, whose config must match. Reads only."""
    files = RunFolder(cfg.out_dir)
    if restart or not files.checkpoint.exists():
        return files, None
    checkpoint = load_training_checkpoint(files.checkpoint)
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


def _resume(state: TrainState, checkpoint: dict, procs: _Processes, data: _Data, files: RunFolder) -> int:
    """Stage 6: weights, optimiser, step, queue, RNG and LR schedule from the checkpoint; its step."""
    if SHARDED_KEY in checkpoint:  # an FSDP run's weights and optimiser: DCP shards, re-sharded to this run
        load_sharded_into(state, files.checkpoint, checkpoint)
    elif state.sharded:  # a DDP run's whole checkpoint, continued with dist.strategy=fsdp
        load_whole_into_sharded(state, checkpoint)
        checkpoint = {k: v for k, v in checkpoint.items() if k not in ("model", "optimizer")}
    for note in state.load_state_dict(checkpoint):
        procs.say(f"resume: {note}")
    if state.budget is not None:  # the budget's plan (when made) decides the length, not train.epochs
        if state.budget.planned:
            data.total_steps = state.budget.total_steps
        procs.say(f"resume: {state.budget.used_s / 60:.1f} of {state.budget.budget_s / 60:g} budget minutes used")
    else:
        note = state.lr_schedule.change_total_steps(data.total_steps, state.step, data.steps_per_epoch)
        if note:
            procs.say(f"resume: {note}")
    procs.say(f"resume: {printable_path(files.checkpoint)} at step {state.step}/{data.total_steps}")
    return state.step


def _start_run_folder(cfg: Config, procs: _Processes, files: RunFolder, restart: bool,
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


def _build_data(cfg: Config, procs: _Processes, files: RunFolder, resuming: bool) -> _Data:
    named = data_specs(cfg.data.path, cfg.data.paths)
    specs = named or [str(BUNDLED_SAMPLE / "train")]
    if any(is_shard_spec(spec) for spec in specs):
        return _build_shard_data(cfg, procs, specs, files, resuming)
    shown = describe_specs(specs)
    paths, from_cache = _resolve_file_list(specs, procs, files, resuming)
    check_readable(paths, shown)
    per_rank_batch = cfg.train.batch_size // procs.world
    if len(paths) < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size: the global batch {cfg.train.batch_size} is larger than the "
                          f"{len(paths)} images in {shown}; lower it")
    if cfg.monitor.knn_data:
        _monitor_folders(cfg)  # a wrong monitoring folder should fail now, not after the first epoch
    transform = MultiCropTransform.from_config(cfg.crops)
    if procs.decode_on_device:  # workers keep JPEGs encoded; _next_batch decodes them (swavkit.data.device_decode)
        dataset = UnlabeledImageFolder(shown, EncodedCrops(transform), paths=paths, reader=read_encoded)
    else:
        dataset = UnlabeledImageFolder(shown, transform, paths=paths)
    sampler = EpochSampler(len(paths), procs.rank, procs.world, cfg.seed)
    workers, on_gpu = cfg.data.num_workers, procs.device.type == "cuda"
    loader = DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler, drop_last=True, num_workers=workers,
                        collate_fn=_worker_collate(transform, procs),
                        pin_memory=cfg.data.pin_memory and on_gpu, persistent_workers=workers > 0,
                        prefetch_factor=cfg.data.prefetch_factor if workers else None)
    _warn_about_crops(cfg, procs, typical_side_px(paths, sample=50))
    steps_per_epoch = len(sampler) // per_rank_batch
    n_crops = sum(cfg.crops.counts)
    procs.say(f"data: {len(paths)} images in {shown}"
              + (" (bundled Fashion-MNIST sample, MIT licence)" if not named else "")
              + f"; {n_crops} crops each ({' + '.join(f'{c}x{s}px' for c, s in zip(cfg.crops.counts, cfg.crops.sizes_px))}); "
              f"{steps_per_epoch} steps/epoch at global batch {cfg.train.batch_size} ({procs.world} process(es)); colour ops "
              + _colour_where(procs))
    return _Data(transform, dataset, sampler, loader, per_rank_batch, steps_per_epoch,
                 steps_per_epoch * cfg.train.epochs, file_list=None if from_cache else paths,
                 file_list_source=source_key(specs))


def _build_shard_data(cfg: Config, procs: _Processes, specs: list[str], files: RunFolder, resuming: bool) -> _Data:
    """Stage 3 for WebDataset shards: a stream of per-rank batches (swavkit.data.shards), an epoch of
    data.samples_per_epoch images."""
    if len(specs) > 1:
        raise DataError("data.paths: shards cannot be mixed with other sources; name all shards in one brace "
                        "pattern, glob or list of .tar files in data.path")
    if resuming:
        _say_if_stream_layout_changed(cfg, procs, files)
    # a set with no decodable image fails here, in one line, rather than in a stream that never makes a batch
    shards = distributed.broadcast_object(check_decodable(expand_shards(specs[0]), specs[0]) if procs.is_main else None)
    samples_per_epoch = cfg.data.samples_per_epoch or stored_count(shards)
    if not samples_per_epoch:
        raise ConfigError(f"data.samples_per_epoch: {printable_path(specs[0])} has no image count ({SHARD_INDEX} "
                          "next to the shards, written by swavkit shard); set data.samples_per_epoch")
    workers, slots = cfg.data.num_workers, procs.world * max(1, cfg.data.num_workers)
    if len(shards) < slots:
        raise ConfigError(f"data.num_workers: {len(shards)} shard(s) for {procs.world} process(es) x "
                          f"{max(1, workers)} reader(s); each reader needs shards of its own: lower "
                          "data.num_workers or shard with fewer --images-per-shard")
    per_rank_batch = cfg.train.batch_size // procs.world
    steps_per_epoch = samples_per_epoch // procs.world // per_rank_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"train.batch_size: the global batch {cfg.train.batch_size} is larger than the "
                          f"{samples_per_epoch} images of an epoch; lower it")
    if cfg.monitor.knn_data:
        _monitor_folders(cfg)
    transform = MultiCropTransform.from_config(cfg.crops)
    decode = dict(decode=encoded_or_rgb) if procs.decode_on_device else {}
    stream = ShardStream(shards, EncodedCrops(transform) if procs.decode_on_device else transform,
                         _worker_collate(transform, procs), per_rank_batch, rank=procs.rank, world=procs.world,
                         seed=cfg.seed, shuffle_buffer=cfg.data.shuffle_buffer, samples_per_epoch=samples_per_epoch,
                         **decode)
    # Workers restart each epoch (not persistent): they take the epoch and resume position from the stream.
    loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=pass_batch,
                        pin_memory=cfg.data.pin_memory and procs.device.type == "cuda",
                        prefetch_factor=cfg.data.prefetch_factor if workers else None)
    procs.say(f"data: {len(shards)} shard(s) {printable_path(specs[0])}, {samples_per_epoch} images/epoch, shuffle "
              f"buffer {cfg.data.shuffle_buffer}; {steps_per_epoch} steps/epoch at global batch {cfg.train.batch_size} "
              f"({procs.world} process(es)); colour ops "
              + _colour_where(procs))
    return _Data(transform, stream, stream, loader, per_rank_batch, steps_per_epoch, steps_per_epoch * cfg.train.epochs)


def _worker_collate(transform: MultiCropTransform, procs: _Processes):
    """What the data workers hand over per batch: encoded JPEGs, uint8 crops, or finished views."""
    if procs.decode_on_device:
        return collate_encoded
    return transform.collate_pixels if procs.colour_on_device else transform.collate


def _colour_where(procs: _Processes) -> str:
    """The data banner's last words: where decoding and the colour ops run."""
    if procs.decode_on_device:
        return f"on {procs.device.type}, JPEGs decoded there too (data.decode_on_device)"
    return f"on {procs.device.type} (data.colour_on_device)" if procs.colour_on_device else "in the data workers"


def _say_if_stream_layout_changed(cfg: Config, procs: _Processes, files: RunFolder) -> None:
    """A shard stream resumes exactly only with the data.num_workers of the interrupted run (swavkit.data.shards);
    its config.yaml, not yet rewritten at this stage, says which that was."""
    try:
        before = (yaml.safe_load(files.config.read_text(encoding="utf-8")) or {}).get("data", {}).get("num_workers")
    except (OSError, yaml.YAMLError, AttributeError):
        return
    if isinstance(before, int) and before != cfg.data.num_workers:
        procs.say(f"resume: data.num_workers changed from {before} to {cfg.data.num_workers}: the rest of the "
                  "interrupted epoch is read by other shard readers, so some of its images may repeat or be left "
                  "out; the following epochs are exact again")


def _resolve_file_list(specs: list[str], procs: _Processes, files: RunFolder,
                       resuming: bool) -> tuple[PathList, bool]:
    """(the images of folders / list files, compact; whether they came from the cache). Rank 0 resolves
    them (a resume reads the run folder's cache instead of walking again) and every rank takes its list: files added or removed between two
    walks would otherwise give the ranks different epochs (and a hang at the first mismatched collective)."""
    paths, from_cache = None, False
    if procs.is_main:
        if resuming:
            paths, why = load_path_cache(files.path, source_key(specs))
            from_cache = paths is not None
        if from_cache:
            procs.say(f"data: file list read from {printable_path(files.path / CACHE_NAME)} (no walk)")
        else:
            if resuming:
                procs.say(f"data: {why}; finding the images again")
            paths = resolve_images(specs)
    paths = distributed.broadcast_object(paths)
    return paths, distributed.broadcast_object(from_cache)


def _cache_file_list(data: _Data, procs: _Processes, files: RunFolder) -> None:
    """After the run folder is started (stage 7): rank 0 keeps the resolved file list for a resume (not
    rewritten when it was read from there)."""
    if procs.is_main and data.file_list is not None:
        save_path_cache(files.path, data.file_list, data.file_list_source)


def _warn_about_crops(cfg: Config, procs: _Processes, typical_side: int) -> None:
    if cfg.crops.sizes_px[0] > 2 * typical_side:
        procs.say(f"warning: crops.sizes_px[0]={cfg.crops.sizes_px[0]} is over twice the typical image side "
                  f"({typical_side} px): crops are upsampled and small crops hold almost nothing; use smaller "
                  "crops or --auto")
    if procs.device.type == "cpu" and procs.precision == "bf16" and min(cfg.crops.sizes_px) < 32:
        # Measured with torch 2.14.1: the CPU bf16 weight gradient of a stride-2 3x3 convolution whose input
        # is 1x1 (a ResNet's last stage on crops under 32 px) is garbage or NaN in most calls.
        procs.say(f"warning: train.precision=bf16 on CPU with {min(cfg.crops.sizes_px)} px crops: torch's CPU bf16 "
                  "convolutions return corrupt gradients on 1x1 feature maps; use train.precision=fp32 (bad steps "
                  "are detected and skipped, see train.skip_nonfinite_steps)")


def _build_model(cfg: Config, procs: _Processes, fresh: bool) -> tuple[SwAVModel, torch.nn.Module,
                                                                       torch.memory_format]:
    """(core SwAVModel, what the forward runs: core or DDP around it, the crops' memory format). A ``fresh``
    run (no checkpoint) starts its backbone from ``model.init`` when set."""
    device, m = procs.device, cfg.model
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    core = build_model(m.backbone, m.n_prototypes, m.hidden_dim, m.output_dim, m.backbone_kwargs,
                       zero_init_last=m.zero_init_last)
    if m.init and fresh:
        from swavkit.pretrained import load_initial_backbone_state

        core.backbone.load_state_dict(load_initial_backbone_state(m.init, m.backbone, m.backbone_kwargs), strict=True)
        procs.say(f"model: backbone weights from model.init={printable_path(m.init)} (head and prototypes fresh)")
    checkpointing = apply_activation_checkpointing(core.backbone, m.activation_checkpointing, m.backbone)
    core = core.to(device)
    memory_format = torch.channels_last if resolve_auto_flag(m.channels_last, device) else torch.contiguous_format
    if cfg.dist.strategy != "fsdp":  # FSDP2 shards contiguous weights only; NHWC crops still make NHWC convolutions
        core = core.to(memory_format=memory_format)
    core = distributed.convert_sync_batchnorm(core, m.sync_batchnorm, procs.local_world_size)
    if m.compile:
        # Static shapes: the backbone sees one fixed shape per crop resolution. Left automatic, the second
        # resolution makes dynamo recompile a dynamic-shape graph: twice the compile time on a CPU (19 vs
        # 39 s for resnet18, same speed after), and on an H100 still compiling after 170 s.
        core.backbone.compile(dynamic=False)
    if cfg.dist.strategy == "fsdp":  # what the forward runs: the sharded core itself, not DDP around it
        model = shard_model(core, procs.precision, device, m.backbone)
    else:
        model = distributed.wrap_ddp(core, device)
    procs.say(f"model: {m.backbone} ({core.backbone.num_features}-d features) -> head {m.hidden_dim or '-'} -> "
              f"{m.output_dim}-d -> {m.n_prototypes} prototypes; precision {procs.precision} on {device}"
              + (" (channels_last)" if memory_format == torch.channels_last else "")
              + (f" ({torch.get_num_threads()} compute thread(s) beside {cfg.data.num_workers} data worker(s); "
                 "OMP_NUM_THREADS overrides)" if device.type == "cpu" else "")
              + (f"; {checkpointing}" if checkpointing else "")
              + (f"; FSDP over {procs.world} processes" if cfg.dist.strategy == "fsdp" else ""))
    return core, model, memory_format


def _build_state(cfg: Config, procs: _Processes, data: _Data, core: SwAVModel,
                 model: torch.nn.Module) -> tuple[TrainState, StepSettings]:
    """(fresh TrainState with its LR schedule, the step's settings)"""
    optimizer_name = resolve_optimizer_name(cfg.optim.optimizer, core.backbone)
    lr_schedule = build_lr_schedule(cfg, data.steps_per_epoch, optimizer_name)
    optimizer = build_optimizer(core, optimizer_name, lr=lr_schedule.peak_lr, weight_decay=cfg.optim.weight_decay,
                                momentum=cfg.optim.momentum, trust_coefficient=cfg.optim.lars_trust_coefficient)
    queue = None
    if cfg.swav.queue_length:
        queue = FeatureQueue(len(cfg.swav.assignment_crops), cfg.swav.queue_length // procs.world,
                             cfg.model.output_dim).to(procs.device)
    state = TrainState(core, optimizer, torch.amp.GradScaler(procs.device.type, enabled=procs.precision == "fp16"),
                       queue, CollapseMonitor(cfg.model.n_prototypes, cfg.train.collapse_patience_steps), model,
                       lr_schedule=lr_schedule, epsilon=cfg.swav.epsilon,
                       budget=BudgetPlan(60.0 * cfg.train.budget_minutes) if cfg.train.budget_minutes > 0 else None)
    state.sharded = cfg.dist.strategy == "fsdp"
    if state.budget is not None:  # until the first plan, the run cannot end by train.epochs
        data.total_steps = UNPLANNED_TOTAL_STEPS
    settings = StepSettings.from_config(cfg, data.steps_per_epoch, autocast_dtype(procs.precision))
    procs.say(f"optimiser: {optimizer_name}, {lr_schedule.describe()} ({explain_peak_lr(cfg, optimizer_name)}); "
              f"prototypes frozen for {settings.freeze_prototype_steps} steps"
              + (f"; queue {cfg.swav.queue_length} from epoch {cfg.swav.queue_start_epoch}" if queue is not None else ""))
    s = cfg.swav
    procs.say(f"codes: Sinkhorn epsilon {s.epsilon:g}" + (
        f", lowered towards {s.min_epsilon:g} while the codes' entropy is above {s.code_entropy_target:g} ln K "
        "(swav.prevent_collapse=false: fixed, as in the paper)" if s.prevent_collapse else ", fixed"))
    return state, settings


def _planned_settings(settings: StepSettings, plan: BudgetPlan | None) -> StepSettings:
    """The step settings of a budget's plan (a resumed one), else those of the config."""
    if plan is None or not plan.planned:
        return settings
    return dataclasses.replace(settings, freeze_prototype_steps=plan.freeze_prototype_steps,
                               queue_start_step=plan.queue_start_step)


def _epsilon_control(cfg: Config) -> EpsilonControl | None:
    s = cfg.swav
    if not s.prevent_collapse:
        return None
    return EpsilonControl(target_fraction=s.code_entropy_target, min_epsilon=min(s.min_epsilon, s.epsilon),
                          max_epsilon=s.epsilon)


# ----------------------------------------------------------------------------------------------------
# stage 7: the loop

def _train_epochs(loop: _Loop, state: TrainState, stop_request: "_StopRequest", show_progress: bool) -> str | None:
    """Epochs of steps until ``total_steps``. Returns None when done, else why it stopped early (a
    signal or stop_after_steps; a checkpoint is saved then)."""
    data = loop.data
    state.model.train()
    bar = tqdm(total=min(data.total_steps, loop.lr_schedule.total_steps), initial=state.step,
               disable=not (show_progress and loop.procs.is_main), desc="pretrain", unit="step", dynamic_ncols=True, file=sys.stdout)
    progress = _Progress(bar, stop_request, LogWindow.open(loop.procs.device), time.monotonic())
    if loop.budget_clock is not None:
        loop.budget_clock.mark(state.step)
    with stop_request.deferred():  # a signal now only sets a flag: the loop saves and stops in step
        while state.step < data.total_steps:
            epoch = state.step // data.steps_per_epoch
            if not _train_one_epoch(loop, state, progress, epoch):
                bar.close()
                return stop_request.signal_name or f"stop_after_steps={loop.stop_after_steps}"
            _end_of_epoch(loop, state, epoch)
    bar.close()
    return None


def _train_one_epoch(loop: _Loop, state: TrainState, progress: _Progress, epoch: int) -> bool:
    """The steps of ``epoch`` from ``state.step`` on; False when the run must stop now (checkpoint saved)."""
    data, cfg = loop.data, loop.cfg
    epoch_start = epoch * data.steps_per_epoch
    data.sampler.set_epoch(epoch, start=(state.step - epoch_start) * data.per_rank_batch)
    batches = iter(data.loader)
    while state.step < min(epoch_start + data.steps_per_epoch, data.total_steps):
        crops = _next_batch(loop, state, batches, progress.window)  # ---- 7a. data
        if crops is None:
            break
        lr = loop.lr_schedule.lr(state.step)
        result = train_step(state, crops, loop.settings, lr)  # ---- 7b-7f. the step
        if not result.applied:
            _refused_step(loop, state, result)  # raises once past train.skip_nonfinite_steps
            state.step += 1  # the batch is dropped; the schedule moves on
            continue
        progress.window.loss_sum += result.loss
        progress.window.row_entropy_sum += row_entropy(result.codes)
        progress.window.steps += 1
        progress.bar.update(1)
        if loop.budget_clock is not None:
            loop.budget_clock.mark(state.step)
        if state.step % cfg.train.log_every_steps == 0 or state.step == data.total_steps:
            _log_metrics(loop, state, result, lr, progress)  # ---- 7g. logging
            if loop.budget_clock is not None:
                _follow_budget(loop, state, progress)  # ---- 7g'. the time budget's plan
        if _checkpoint_and_stop(loop, state, progress):  # ---- 7h. checkpoints and stop requests
            return False
    return True


def _next_batch(loop: _Loop, state: TrainState, batches, window: LogWindow) -> list[torch.Tensor] | None:
    """7a: the next V crop tensors [B, 3, s, s] on the device, or None when the epoch's batches ran out.
    The time spent blocked here is the data-wait fraction."""
    wait_start = time.perf_counter()
    try:
        crops, _, skipped = next(batches)
    except StopIteration:
        return None
    except RuntimeError as err:
        if "DataLoader worker" not in str(err):
            raise
        reading = loop.data.dataset.describe_reading()
        raise DataLoaderCrashed(f"a data-loading worker died ({str(err).splitlines()[0]}) while reading "
                                f"{', '.join(reading) or 'an unknown file'}; move that file away or use "
                                "data.num_workers=0 to see the full error") from None
    if loop.procs.decode_on_device:  # encoded JPEGs: decoded and cut here (counted as data wait)
        crops, undecodable = decode_batch(crops, loop.data.transform.sizes_px, loop.procs.device)
        skipped = skipped + undecodable
    window.wait_s += time.perf_counter() - wait_start
    if skipped:
        _record_skipped(loop.files.skipped, state, skipped, loop.procs.is_main)
    device = loop.procs.device
    if loop.procs.colour_on_device:  # uint8 crops + parameters: the colour half runs here
        crops = loop.data.transform.finish(crops, device)
    return [c.to(device, non_blocking=True, memory_format=loop.memory_format) for c in crops]


def _record_skipped(skipped_path: Path, state: TrainState, new: list[tuple[str, str]], is_main: bool) -> None:
    """Remember unreadable files (path, why) in the state and append the new ones to skipped.txt."""
    fresh = [(p, why) for p, why in new if p not in state.skipped_files]
    state.skipped_files.update(p for p, _ in fresh)
    if fresh and is_main:
        append_skipped_report(skipped_path, fresh)
        tqdm.write(f"skipped {len(fresh)} unreadable file(s) (total {len(state.skipped_files)}), e.g. "
                   f"{printable_path(fresh[0][0])}; see {printable_path(skipped_path)}")


def _refused_step(loop: _Loop, state: TrainState, result: StepResult) -> None:
    """A step refused for a non-finite loss or gradient: past train.skip_nonfinite_steps, save the last good
    state and raise TrainingDiverged; otherwise say so."""
    if state.nonfinite_skipped <= loop.cfg.train.skip_nonfinite_steps:
        tqdm.write(f"step {result.step}: non-finite {result.nonfinite}, step skipped ({state.nonfinite_skipped} so far)")
        return
    _save_checkpoint(loop, state)  # the weights are still those of the last good step
    if not result.nonfinite_loss and loop.procs.device.type == "cpu" and loop.settings.autocast_dtype == torch.bfloat16:
        hint = (f"CPU bf16 convolutions return corrupt weight gradients in torch {torch.__version__} when a "
                "stride-2 3x3 convolution sees a 1x1 map (crops under 32 px): use train.precision=fp32")
    else:
        hint = ("Likely causes: learning rate too high (optim.base_lr), swav.epsilon too small for fp32 (try "
                "swav.sinkhorn_fp64=true), or fp16 overflow (use train.precision=bf16)")
    epoch = result.step // loop.data.steps_per_epoch
    raise TrainingDiverged(f"non-finite {result.nonfinite} at step {result.step} (epoch {epoch}); the last good "
                           f"state is saved in {loop.files.checkpoint}. {hint}. train.skip_nonfinite_steps=N skips "
                           "up to N bad steps")


def _log_metrics(loop: _Loop, state: TrainState, result: StepResult, lr: float, progress: _Progress) -> None:
    """7g: one metrics.jsonl row over the window since the last (the only host syncs besides the step's
    finiteness check), the collapse check, a fresh window."""
    window, procs = progress.window, loop.procs
    sums = distributed.all_reduce_sum(torch.stack([window.loss_sum, window.row_entropy_sum]))
    mean_loss, mean_row_entropy = (sums / (window.steps * procs.world)).tolist()
    elapsed = time.perf_counter() - window.start_s
    usage = code_statistics(result.codes)
    state.last_loss = mean_loss
    epsilon = loop.settings.epsilon if math.isnan(state.epsilon) else state.epsilon
    if loop.epsilon_control is not None:  # every rank decides the same from the all-reduced loss and entropy
        state.epsilon = loop.epsilon_control.next_epsilon(epsilon, mean_row_entropy, state.core.n_prototypes)
        if result.queue_started and state.queue.is_full:
            state.queue_near_ln_k_windows, stop = queue_should_stop(state.queue_near_ln_k_windows, mean_loss,
                                                                    state.core.n_prototypes)
            if stop:
                state.queue_dropped_at_step = state.step
                procs.say_progress(f"step {state.step}: the loss returned to ln K while the queue was in use; going on "
                                   "without the queue (swav.prevent_collapse=false keeps it)")
    row = {"step": state.step, "epoch": state.step / loop.data.steps_per_epoch, "loss": round(state.last_loss, 5),
           "ln_k": round(math.log(state.core.n_prototypes), 5), "lr": lr,
           "images_per_s": round(window.steps * loop.data.per_rank_batch * procs.world / elapsed, 2),
           "data_wait_fraction": round(window.wait_s / elapsed, 4),
           "prototypes_used": usage["prototypes_used"], "code_entropy": round(usage["code_entropy"], 4),
           "code_row_entropy": round(mean_row_entropy, 4), "epsilon": epsilon,
           "queue_in_use": bool(result.queue_started and state.queue.is_full)}
    if procs.is_main:
        loop.loggers.log(row)
        progress.bar.set_postfix(loss=f"{state.last_loss:.3f}", lr=f"{lr:.3g}", used=usage["prototypes_used"])
        warning = state.collapse.update(state.step, state.last_loss, usage["prototypes_used"])
        if warning:
            tqdm.write("WARNING " + warning)
    progress.window = LogWindow.open(procs.device)


def _checkpoint_and_stop(loop: _Loop, state: TrainState, progress: _Progress) -> bool:
    """7h: save when due (every N steps or M minutes, at the end of an epoch, on a stop request); whether the
    run must stop now. Every rank takes the same decisions."""
    train_cfg, step = loop.cfg.train, state.step
    stop = progress.stop_request.signal_name is not None
    steps_due = train_cfg.checkpoint_every_steps > 0 and step % train_cfg.checkpoint_every_steps == 0
    time_due = time.monotonic() - progress.last_save_s > 60 * train_cfg.checkpoint_every_minutes
    if loop.procs.world > 1:
        # Signals and wall clocks differ between ranks: act on them only at logging steps, where every
        # rank joins the same all-reduce.
        if step % train_cfg.log_every_steps == 0:
            stop, steps_due, time_due = _on_any_rank(loop.procs.device, stop, steps_due, time_due)
        else:
            stop = time_due = False
    if loop.stop_after_steps is not None and step >= loop.stop_after_steps:
        stop = True
    if stop or steps_due or time_due or step % loop.data.steps_per_epoch == 0:
        save_start_s = time.monotonic()
        _save_checkpoint(loop, state)
        progress.last_save_s = time.monotonic()
        progress.save_duration_s = progress.last_save_s - save_start_s
    return stop and step < loop.data.total_steps


def _follow_budget(loop: _Loop, state: TrainState, progress: _Progress) -> None:
    """7g': with train.budget_minutes, make the plan once the speed is measured, then re-fit the total to the
    recent speed. Rank 0's clock decides; every rank applies the same numbers."""
    clock, plan, schedule = loop.budget_clock, state.budget, loop.lr_schedule
    proposal = [0.0] * 4  # total, warm-up, freeze, queue start; 0 total = no change
    seconds_per_step = clock.seconds_per_step()
    if loop.procs.is_main and seconds_per_step is not None and (plan.planned or clock.calibrated()):
        # the final checkpoint and the export (about two checkpoint writes) must fit too
        reserve_s = 1.0 + 2.0 * progress.save_duration_s
        total = fit_total_steps(state.step, clock.elapsed_s(), plan.budget_s, seconds_per_step, reserve_s)
        if not plan.planned:
            shape_total = loop.cfg.train.epochs * loop.data.steps_per_epoch  # what the config's shares refer to
            warmup = schedule.warmup_steps  # a warm-up already over stays as it was
            if state.step < warmup:  # its share of the planned run, never ending before now (no LR jump)
                warmup = max(share_of_run(warmup, total, shape_total), state.step)
            proposal = [total, warmup,
                        share_of_run(loop.settings.freeze_prototype_steps, total, shape_total),
                        share_of_run(loop.settings.queue_start_step, total, shape_total)]
        elif worth_changing(total, plan.total_steps, state.step):
            proposal = [total, plan.warmup_steps, plan.freeze_prototype_steps, plan.queue_start_step]
    if loop.procs.world > 1:
        proposal = distributed.all_reduce_max(torch.tensor(proposal, dtype=torch.float64,
                                                           device=loop.procs.device)).tolist()
    total, warmup, freeze, queue_start = (int(v) for v in proposal)
    if not total:
        return
    if not plan.planned:
        if state.step < schedule.warmup_steps:
            schedule.warmup_steps, schedule.total_steps = warmup, total
        else:
            schedule.change_total_steps(total, state.step, loop.data.steps_per_epoch)
        plan.warmup_steps, plan.freeze_prototype_steps, plan.queue_start_step = warmup, freeze, queue_start
        loop.settings = _planned_settings(loop.settings, dataclasses.replace(plan, total_steps=total))
        loop.procs.say_progress(
            f"budget {plan.budget_s / 60:g} min: {clock.elapsed_s():.0f} s used (start-up and the first steps at "
            f"{seconds_per_step:.3g} s/step) -> {total} steps = {total / loop.data.steps_per_epoch:.1f} epochs; "
            f"warm-up {warmup} steps, prototypes frozen {freeze} steps"
            + (f", queue from step {queue_start}" if state.queue is not None else "")
            + "; re-fitted as the speed changes")
    else:
        schedule.change_total_steps(total, state.step, loop.data.steps_per_epoch)
    plan.total_steps = loop.data.total_steps = total
    progress.bar.total = total
    progress.bar.refresh()


def _on_any_rank(device: torch.device, *flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over the ranks, in one all-reduce (on ``device``: NCCL reduces GPU tensors only)."""
    reduced = distributed.all_reduce_max(torch.tensor([float(f) for f in flags], device=device))
    return tuple(bool(v) for v in reduced.tolist())


def _end_of_epoch(loop: _Loop, state: TrainState, epoch: int) -> None:
    """7i: after a complete epoch, the optional online k-NN on a labelled folder."""
    cfg = loop.cfg
    complete = state.step == (epoch + 1) * loop.data.steps_per_epoch
    if cfg.monitor.knn_data and (epoch + 1) % cfg.monitor.every_epochs == 0 and complete:
        result = _monitor_knn(state.core.backbone, cfg, loop.procs.device)
        if cfg.monitor.floors and not loop.monitor_floors:
            loop.monitor_floors.update(_monitor_floors(cfg, loop.procs.device))
        floors = loop.monitor_floors
        if loop.procs.is_main:
            loop.loggers.log({"step": state.step, "epoch": epoch + 1, **result, **floors})
            beside = (f" (random init {floors['knn_top1_random_init']:.2f}%, raw pixels "
                      f"{floors['knn_top1_raw_pixels']:.2f}%, same split)" if floors else "")
            tqdm.write(f"epoch {epoch + 1}: online k-NN top-1 {result['knn_top1']:.2f}%{beside}")
    state.model.train()


def _save_checkpoint(loop: _Loop, state: TrainState) -> None:
    """The checkpoint is the state's dict plus the config. Every rank contributes its queue and RNG; rank 0
    writes one file atomically."""
    if loop.budget_clock is not None:
        state.budget.used_s = loop.budget_clock.elapsed_s()
    if state.sharded:
        save_sharded_checkpoint(state, loop.files.checkpoint, to_dict(loop.cfg))
        return
    checkpoint = state.state_dict()
    if loop.procs.is_main:
        save_atomic({**checkpoint, "config": to_dict(loop.cfg)}, loop.files.checkpoint)
        remove_shard_folders(loop.files.checkpoint.parent)  # a resumed FSDP run's shards: now superseded
    distributed.barrier()


def _export(loop: _Loop, state: TrainState) -> Path:
    """Stage 9: the backbone alone, in timm's local-dir layout with its model card (written by rank 0); the
    closing lines, which say so when the run ended on the collapse plateau."""
    cfg, procs, files = loop.cfg, loop.procs, loop.files
    model_state = full_model_state(state.core)  # collective under FSDP (gathers the shards on rank 0)
    if not procs.is_main:
        return files.backbone
    m = cfg.model
    export_net = create_backbone(m.backbone, **m.backbone_kwargs)
    export_net.load_state_dict(backbone_state(model_state), strict=True)
    card = card_for_training(to_dict(cfg), architecture=m.backbone, feature_dim=export_net.num_features,
                             backbone_dir=files.backbone, steps=state.step, final_loss=state.last_loss,
                             n_images=len(loop.data.dataset),
                             extra_training={"optimizer": type(state.optimizer).__name__,
                                             "peak_lr": loop.lr_schedule.peak_lr,
                                             "epochs": round(state.step / loop.data.steps_per_epoch, 2),
                                             **({"budget_minutes": cfg.train.budget_minutes}
                                                if state.budget is not None else {})})
    export_backbone(export_net, files.backbone, image_size_px=cfg.crops.sizes_px[0], mean=cfg.crops.mean,
                    std=cfg.crops.std, model_card=card)
    backbone = printable_path(files.backbone)
    procs.say(f"done: {state.step} steps, final loss {state.last_loss:.4f} (ln K = {math.log(m.n_prototypes):.3f})\n"
              f"  checkpoint: {printable_path(files.checkpoint)}\n  backbone:   {backbone}  "
              f"(timm.create_model('local-dir:{backbone}', pretrained=True) or swavkit.load_backbone)\n"
              f"  metrics:    {printable_path(files.metrics)}")
    verdict = state.collapse.final_verdict(state.last_loss)
    if verdict:
        procs.say(f"WARNING {verdict}")
    return files.backbone


# ----------------------------------------------------------------------------------------------------
# helpers

def _monitor_folders(cfg: Config) -> tuple[Path, Path | None]:
    """``monitor.knn_data`` -> (train folder, val folder or None); "bundled" = the bundled sample."""
    from swavkit.knn import monitor_folders

    return monitor_folders(BUNDLED_SAMPLE if cfg.monitor.knn_data == "bundled" else cfg.monitor.knn_data)


def _monitor_knn(backbone: torch.nn.Module, cfg: Config, device: torch.device) -> dict:
    """k-NN top-1/top-5 of the current backbone on the labelled ``monitor.knn_data``."""
    from swavkit.knn import knn_monitor

    train_dir, val_dir = _monitor_folders(cfg)
    result = knn_monitor(backbone, train_dir, val_dir, image_size_px=cfg.monitor.image_size or cfg.crops.sizes_px[0],
                         k=cfg.monitor.k, device=device, max_images=cfg.monitor.max_images, batch_size=256,
                         mean=cfg.crops.mean, std=cfg.crops.std)
    return {"knn_top1": result["top1"], "knn_top5": result.get("top5")}


def _monitor_floors(cfg: Config, device: torch.device) -> dict:
    """The online k-NN's floors on the same split: the same architecture randomly initialised (the floor of
    swavkit.features, fixed seed, the training RNG untouched) and raw pixels in [0, 1]."""
    from swavkit.features import load_eval_backbone
    from swavkit.preprocessing import RAW_PIXELS_SOURCE
    from swavkit.knn import knn_monitor

    train_dir, val_dir = _monitor_folders(cfg)
    common = dict(image_size_px=cfg.monitor.image_size or cfg.crops.sizes_px[0], k=cfg.monitor.k, device=device,
                  max_images=cfg.monitor.max_images, batch_size=256)
    random_init = load_eval_backbone(f"timm:{cfg.model.backbone}").to(device)
    floors = {"knn_top1_random_init": knn_monitor(random_init, train_dir, val_dir, mean=cfg.crops.mean,
                                                  std=cfg.crops.std, **common)["top1"],
              "knn_top1_raw_pixels": knn_monitor(load_eval_backbone(RAW_PIXELS_SOURCE), train_dir, val_dir,
                                                 mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **common)["top1"]}
    return floors


__all__ = ["train", "TrainResult", "TrainingDiverged", "DataLoaderCrashed", "StopRequested"]
