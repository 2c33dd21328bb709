"""The training loop (stage 8): epochs of ``train_step`` with logging, the collapse policy, the time
budget, checkpoints and stop requests; then the export (stage 9). Everything it reads is in ``Loop``,
built by :func:`swavkit.training.trainer.train`'s setup stages."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from swavkit.errors import DataLoaderCrashed, TrainingDiverged  # noqa: F401 (re-exported: trainer)
from swavkit.runtime import distributed
from swavkit.training.budget import BudgetClock, BudgetPlan, first_plan, fit_total_steps, worth_changing
from swavkit.artifacts.checkpoint import CHECKPOINT_FORMAT, backbone_state, export_backbone, load_training_checkpoint
from swavkit.artifacts.checkpointer import Checkpointer
from swavkit.config import Config, backbone_kwargs, to_dict
from swavkit.data import (append_skipped_report, printable_path)
from swavkit.data.device_decode import decode_batch
from swavkit.training.diagnosis import code_statistics, kmeans_collapse_warning
from swavkit.training.deepcluster_epoch import cluster_epoch, fill_memory_bank
from swavkit.training.loggers import MetricLoggers
from swavkit.core.model import create_backbone
from swavkit.artifacts.modelcard import card_for_training
from swavkit.artifacts.rundir import RunFolder
from swavkit.core.schedule import LRSchedule
from swavkit.training.collapse import row_entropy
from swavkit.training.step import StepResult, StepSettings, TrainState, train_step
from swavkit.training.collapse import CollapsePolicy
from swavkit.training.data_setup import TrainingData
from swavkit.training.monitor import monitor_floors, monitor_knn
from swavkit.training.checkpoint_signal import (SignalSample, best_so_far, measure_signal, sample_paths,
                                                write_sample_list)
from swavkit.artifacts.layout import RUN_BEST_CHECKPOINT, RUN_SIGNAL_SAMPLE
from swavkit.runtime.fileio import copy_atomic, read_jsonl
from swavkit.training.processes import Processes
from swavkit.training.sharding import full_model_state
from swavkit.data.constants import eval_size_px


UNPLANNED_TOTAL_STEPS = 2 ** 62  # a budget run before its first plan: it ends when the plan says


@dataclass
class Loop:
    """Everything the training loop reads, built by ``train``'s setup stages. Only a time budget's plan
    changes it (``settings``, ``lr_schedule``: swavkit/training/budget.py)."""
    cfg: Config
    procs: Processes
    files: RunFolder
    data: TrainingData
    settings: StepSettings
    lr_schedule: LRSchedule
    memory_format: torch.memory_format
    checkpointer: Checkpointer  # saves (cadence, stop signals, stop_after_steps) and says when to stop
    loggers: MetricLoggers | None  # the main process's metric backends; None on the others
    collapse_policy: CollapsePolicy | None  # None: the configured epsilon and queue throughout (the paper)
    budget_clock: BudgetClock | None  # train.budget_minutes: this attempt's clock (the plan is in the state)
    monitor_floors: dict = field(default_factory=dict)  # monitor.floors: k-NN of random init / raw pixels, once
    signal: "CheckpointSignal | None" = None  # train.signal_images: set up by train_epochs (None: off)


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
class Progress:
    """What the loop changes besides the TrainState."""
    bar: tqdm
    window: LogWindow


def planned_settings(settings: StepSettings, plan: BudgetPlan | None) -> StepSettings:
    """The step settings of a budget's plan (a resumed one), else those of the config."""
    if plan is None or not plan.planned:
        return settings
    return dataclasses.replace(settings, freeze_prototype_steps=plan.freeze_prototype_steps,
                               queue_start_step=plan.queue_start_step)


def train_epochs(loop: Loop, state: TrainState, show_progress: bool) -> str | None:
    """Epochs of steps until ``total_steps``. Returns None when done, else why it stopped early (a
    signal or stop_after_steps; a checkpoint is saved then)."""
    data, checkpointer = loop.data, loop.checkpointer
    loop.signal = start_signal(loop)
    if loop.signal is not None:  # after each save, the label-free signal on the checkpoint just written
        checkpointer.after_save.append(lambda: checkpoint_signal(loop, state))
    if loop.settings.accumulate_steps > 1:
        micro = data.per_rank_batch // loop.settings.accumulate_steps
        loop.procs.say(f"accumulation: each step runs {loop.settings.accumulate_steps} micro-batches of {micro} per "
                       f"process, codes from one Sinkhorn over the global batch {loop.cfg.train.batch_size} (one extra "
                       "forward pass without gradients; docs/guides/accumulation.md)")
    state.model.train()
    bar = tqdm(total=min(data.total_steps, loop.lr_schedule.total_steps), initial=state.step,
               disable=not (show_progress and loop.procs.is_main), desc="pretrain", unit="step", dynamic_ncols=True, file=sys.stdout)
    progress = Progress(bar, LogWindow.open(loop.procs.device))
    checkpointer.last_save_s = time.monotonic()  # the minutes between saves count from the first step
    if loop.budget_clock is not None:
        loop.budget_clock.mark(state.step)
        if loop.budget_clock.measured_step_s is not None and not state.budget.planned:
            _follow_budget(loop, state, progress)  # the plan from --auto's figure, before the first step
    with checkpointer.stop_request.deferred():  # a signal now only sets a flag: the loop saves and stops in step
        while state.step < data.total_steps:
            epoch = state.step // data.steps_per_epoch
            if state.deepcluster is not None:  # method=deepclusterv2: bank, k-means, the epoch's targets
                _deepcluster_epoch_start(loop, state, epoch, show_progress)
            if not _train_one_epoch(loop, state, progress, epoch):
                bar.close()
                return checkpointer.stop_reason
            _end_of_epoch(loop, state, epoch)
    bar.close()
    return None


def _train_one_epoch(loop: Loop, state: TrainState, progress: Progress, epoch: int) -> bool:
    """The steps of ``epoch`` from ``state.step`` on; False when the run must stop now (checkpoint saved)."""
    data, cfg = loop.data, loop.cfg
    epoch_start = epoch * data.steps_per_epoch
    data.sampler.set_epoch(epoch, start=(state.step - epoch_start) * data.per_rank_batch)
    batches = iter(data.loader)
    while state.step < min(epoch_start + data.steps_per_epoch, data.total_steps):
        batch = _next_batch(loop, state, batches, progress.window)  # ---- 7a. data
        if batch is None:
            break
        crops, indices = batch
        lr = loop.lr_schedule.lr(state.step)
        result = train_step(state, crops, loop.settings, lr, indices=indices)  # ---- 7b-7f. the step
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
        if loop.checkpointer.maybe_save(state.step) and state.step < data.total_steps:  # ---- 7h. checkpoints, stops
            return False
    return True


def _next_batch(loop: Loop, state: TrainState, batches,
                window: LogWindow) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """7a: the next V crop tensors [B, 3, s, s] on the device and the images' dataset indices [B] (CPU), or
    None when the epoch's batches ran out. The time spent blocked here is the data-wait fraction."""
    wait_start = time.perf_counter()
    try:
        crops, indices, skipped = next(batches)
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
    return [c.to(device, non_blocking=True, memory_format=loop.memory_format) for c in crops], indices


def _deepcluster_epoch_start(loop: Loop, state: TrainState, epoch: int, show_progress: bool) -> None:
    """method=deepclusterv2 before the steps of ``epoch``: the first full pass that fills the memory bank (once,
    or again after a resume with another process count), then the k-means unless this epoch's targets came
    from the checkpoint; one metrics row and a collapse warning per head that needs one."""
    data, procs, dc = loop.data, loop.procs, state.deepcluster
    if not dc.bank_filled:
        data.sampler.set_epoch(epoch)
        batches, window = iter(data.loader), LogWindow.open(procs.device)
        bar = tqdm(total=data.steps_per_epoch, disable=not (show_progress and procs.is_main), desc="memory bank",
                   unit="step", dynamic_ncols=True, file=sys.stdout, leave=False)

        def bank_batches():
            for _ in range(data.steps_per_epoch):
                batch = _next_batch(loop, state, batches, window)
                if batch is None:
                    return
                bar.update(1)
                yield batch

        start_s = time.perf_counter()
        written = fill_memory_bank(state, bank_batches(), loop.settings)
        bar.close()
        procs.say_progress(f"deepclusterv2: memory bank filled with {written} images per process in "
                           f"{time.perf_counter() - start_s:.1f} s")
    if dc.clustered_epoch == epoch:  # resumed inside the epoch: its targets are the checkpoint's
        return
    start_s = time.perf_counter()
    stats = cluster_epoch(state, epoch, loop.cfg.seed, loop.cfg.deepcluster.kmeans_iterations)
    row = {"step": state.step, "epoch": epoch, "kmeans_seconds": round(time.perf_counter() - start_s, 3),
           "kmeans_empty_clusters": max(s["empty_clusters"] for s in stats),
           "kmeans_largest_cluster_fraction": max(s["largest_cluster_fraction"] for s in stats)}
    warnings = [w for w in (kmeans_collapse_warning(h, K, s) for h, (K, s) in enumerate(zip(dc.centroid_counts, stats)))
                if w]
    if procs.is_main:
        loop.loggers.log(row)
        if warnings and not dc.collapse_warned:  # once, not every epoch, until the clusters recover
            tqdm.write("WARNING " + warnings[0])
    dc.collapse_warned = bool(warnings)


def _record_skipped(skipped_path: Path, state: TrainState, new: list[tuple[str, str]], is_main: bool) -> None:
    """Remember unreadable files (path, why) in the state and append the new ones to skipped.txt."""
    first_reason: dict[str, str] = {}  # a file can fail more than once in one batch: listed once, first reason
    for path, why in new:
        if path not in state.skipped_files:
            first_reason.setdefault(path, why)
    fresh = list(first_reason.items())
    state.skipped_files.update(p for p, _ in fresh)
    if fresh and is_main:
        append_skipped_report(skipped_path, fresh)
        tqdm.write(f"skipped {len(fresh)} unreadable file(s) (total {len(state.skipped_files)}), e.g. "
                   f"{printable_path(fresh[0][0])}; see {printable_path(skipped_path)}")


def _refused_step(loop: Loop, state: TrainState, result: StepResult) -> None:
    """A step refused for a non-finite loss or gradient: past train.skip_nonfinite_steps, save the last good
    state and raise TrainingDiverged; otherwise say so."""
    if state.nonfinite_skipped <= loop.cfg.train.skip_nonfinite_steps:
        tqdm.write(f"step {result.step}: non-finite {result.nonfinite}, step skipped ({state.nonfinite_skipped} so far)")
        return
    loop.checkpointer.save(state.step)  # the weights are still those of the last good step
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


def _log_metrics(loop: Loop, state: TrainState, result: StepResult, lr: float, progress: Progress) -> None:
    """7g: one metrics.jsonl row over the window since the last (the only host syncs besides the step's
    finiteness check), the collapse policy's decisions for the next window, a fresh window."""
    window, procs = progress.window, loop.procs
    sums = distributed.all_reduce_sum(torch.stack([window.loss_sum, window.row_entropy_sum]))
    mean_loss, mean_row_entropy = (sums / (window.steps * procs.world)).tolist()
    elapsed = time.perf_counter() - window.start_s
    usage = code_statistics(result.codes)
    state.last_loss = mean_loss
    epsilon = state.epsilon  # the one this window's codes used (the collapse policy may move it below)
    queue_in_use = bool(result.queue_started and state.queue.is_full)
    row = {"step": state.step, "epoch": state.step / loop.data.steps_per_epoch, "loss": round(state.last_loss, 5),
           "ln_k": round(state.collapse.ln_k, 5), "lr": lr,
           "images_per_s": round(window.steps * loop.data.per_rank_batch * procs.world / elapsed, 2),
           "data_wait_fraction": round(window.wait_s / elapsed, 4),
           "prototypes_used": usage["prototypes_used"], "code_entropy": round(usage["code_entropy"], 4),
           "code_row_entropy": round(mean_row_entropy, 4), "epsilon": epsilon, "queue_in_use": queue_in_use}
    if procs.is_main:
        loop.loggers.log(row)
        progress.bar.set_postfix(loss=f"{state.last_loss:.3f}", lr=f"{lr:.3g}", used=usage["prototypes_used"])
        warning = state.collapse.update(state.step, state.last_loss, usage["prototypes_used"])
        if warning:
            tqdm.write("WARNING " + warning)
    if loop.collapse_policy is not None:  # every rank decides the same from the all-reduced means
        said = loop.collapse_policy.after_window(state, epsilon, mean_loss, mean_row_entropy, queue_in_use)
        if said:
            procs.say_progress(said)
    progress.window = LogWindow.open(procs.device)


def _follow_budget(loop: Loop, state: TrainState, progress: Progress) -> None:
    """7g': with train.budget_minutes, make the plan once the speed is measured, then re-fit the total to the
    recent speed. Rank 0's clock decides; every rank applies the same numbers."""
    clock, plan, schedule = loop.budget_clock, state.budget, loop.lr_schedule
    proposal = [0.0] * 4  # total, warm-up, freeze, queue start; 0 total = no change
    measured = not plan.planned and clock.measured_step_s is not None  # the first plan from --auto's figure
    seconds_per_step = clock.measured_step_s if measured else clock.seconds_per_step()
    # the clock re-fits (or makes) the plan once it has timed as long as a first plan needs: a few noisy
    # early steps do not override --auto's figure
    if loop.procs.is_main and seconds_per_step is not None and (measured or clock.calibrated()):
        # the final checkpoint and the export (about two checkpoint writes) must fit too
        reserve_s = 1.0 + 2.0 * loop.checkpointer.save_duration_s
        total = fit_total_steps(state.step, clock.elapsed_s(), plan.budget_s, seconds_per_step, reserve_s)
        if not plan.planned:
            made = first_plan(state.step, clock.elapsed_s(), plan.budget_s, seconds_per_step, reserve_s,
                              loop.cfg.train.epochs * loop.data.steps_per_epoch, schedule.warmup_steps,
                              loop.settings.freeze_prototype_steps, loop.settings.queue_start_step)
            proposal = [made.total_steps, made.warmup_steps, made.freeze_prototype_steps, made.queue_start_step]
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
        loop.settings = planned_settings(loop.settings, dataclasses.replace(plan, total_steps=total))
        speed = (f"start-up; a step as --auto timed it: {seconds_per_step:.3g} s" if measured else
                 f"start-up and the first steps at {seconds_per_step:.3g} s/step")
        loop.procs.say_progress(
            f"budget {plan.budget_s / 60:g} min: {clock.elapsed_s():.0f} s used ({speed}) -> {total} steps = "
            f"{total / loop.data.steps_per_epoch:.1f} epochs; "
            f"warm-up {warmup} steps" + (f", prototypes frozen {freeze} steps" if state.deepcluster is None else "")
            + (f", queue from step {queue_start}" if state.queue is not None else "")
            + "; re-fitted as the speed changes")
    else:
        schedule.change_total_steps(total, state.step, loop.data.steps_per_epoch)
    plan.total_steps = loop.data.total_steps = total
    progress.bar.total = total
    progress.bar.refresh()


def _end_of_epoch(loop: Loop, state: TrainState, epoch: int) -> None:
    """7i: after a complete epoch, the optional online k-NN on a labelled folder (swavkit/training/monitor.py)."""
    cfg = loop.cfg
    complete = state.step == (epoch + 1) * loop.data.steps_per_epoch
    if cfg.monitor.knn_data and (epoch + 1) % cfg.monitor.every_epochs == 0 and complete:
        result = monitor_knn(state.core.backbone, cfg, loop.procs.device)
        if cfg.monitor.floors and not loop.monitor_floors:
            loop.monitor_floors.update(monitor_floors(cfg, loop.procs.device))
        floors = loop.monitor_floors
        if loop.procs.is_main:
            loop.loggers.log({"step": state.step, "epoch": epoch + 1, **result, **floors})
            beside = (f" (random init {floors['knn_top1_random_init']:.2f}%, raw pixels "
                      f"{floors['knn_top1_raw_pixels']:.2f}%, same split)" if floors else "")
            tqdm.write(f"epoch {epoch + 1}: online k-NN top-1 {result['knn_top1']:.2f}%{beside}")
    state.model.train()


def pretraining_checkpointer(cfg: Config, procs: Processes, files: RunFolder, state: TrainState, steps_per_epoch: int,
                             stop_request, stop_after_steps: int | None) -> Checkpointer:
    """Pretraining's saves: the state's dict plus the config in ``checkpoints/last.pt`` (DCP shards beside it
    under FSDP) every ``train.checkpoint_every_steps`` / ``_minutes``, at the end of each epoch, on a stop
    request. Every rank contributes its queue and RNG; rank 0 writes the file."""
    train_cfg = cfg.train
    checkpointer = Checkpointer(files.checkpoint, CHECKPOINT_FORMAT, state,
                                every_steps=train_cfg.checkpoint_every_steps, every_minutes=train_cfg.checkpoint_every_minutes, epoch_steps=steps_per_epoch,
                                stop_request=stop_request, stop_after_steps=stop_after_steps,
                                sync_every_steps=train_cfg.log_every_steps, extra=lambda: {"config": to_dict(cfg)},
                                sharded=state.sharded, device=procs.device)
    return checkpointer


def save_budget_with_checkpoints(checkpointer: Checkpointer, state: TrainState, budget_clock: BudgetClock) -> None:
    """train.budget_minutes: every save writes the budget seconds used so far (earlier attempts included) into
    the saved plan. The clock is made after the resume, when the restored plan knows what earlier attempts used."""
    checkpointer.before_save.append(lambda: setattr(state.budget, "used_s", budget_clock.elapsed_s()))


@dataclass
class CheckpointSignal:
    """train.signal_images: the fixed sample and the best RankMe so far (main process only)."""
    sample: SignalSample
    best_rankme: float  # -inf before the first measurement
    best_path: Path  # checkpoints/best-rankme.pt
    measured_step: int = -1  # the step of the last measurement


def start_signal(loop: Loop) -> CheckpointSignal | None:
    """At the run's start (and at a resume, which gets the same images from the same file list): the sample,
    listed in checkpoints/signal-images.txt, and the best RankMe in metrics.jsonl so far. None when off, on
    the other processes, or where it cannot run (tar shards: no file list; FSDP: the forward needs all
    processes, and the best checkpoint would be shards)."""
    cfg, procs = loop.cfg, loop.procs
    paths = getattr(loop.data.dataset, "paths", None)
    if not cfg.train.signal_images or not procs.is_main:
        return None
    if paths is None or procs.sharded:
        procs.say("checkpoint signal: off (" + ("it does not run with dist.strategy=fsdp" if paths is not None else
                  "tar shards have no file list") + "); set train.signal_images=0 to silence this line")
        return None
    sample = SignalSample.from_config(cfg, [str(p) for p in sample_paths(paths, cfg.train.signal_images)])
    write_sample_list(loop.files.path / RUN_SIGNAL_SAMPLE, sample)
    return CheckpointSignal(sample, best_so_far(read_jsonl(loop.files.metrics)), loop.files.path / RUN_BEST_CHECKPOINT)


def checkpoint_signal(loop: Loop, state: TrainState) -> None:
    """7h': after a checkpoint save, the label-free signal on the fixed sample (one metrics.jsonl row); a new
    best RankMe copies the checkpoint just written to checkpoints/best-rankme.pt."""
    signal = loop.signal
    if signal.measured_step == state.step:  # the end of a run saves the last epoch's state again
        return
    signal.measured_step = state.step
    row = measure_signal(state.core, signal.sample, loop.procs.device, loop.settings.temperature)
    state.model.train()
    if not row:  # every sampled image unreadable
        return
    best = row["rankme"] > signal.best_rankme
    if best:
        signal.best_rankme = row["rankme"]
        copy_atomic(loop.files.checkpoint, signal.best_path)
    loop.loggers.log({"step": state.step, "epoch": state.step / loop.data.steps_per_epoch, **row,
                      "best_rankme": best})


def _exported_checkpoint(loop: Loop, state: TrainState, model_state: dict) -> tuple[dict, int, float, str]:
    """train.export_checkpoint: (model state dict, its step, its loss, what was chosen, for the message; "" for the
    last state). ``rankme`` without a best-rankme.pt (signal off, or no checkpoint measured) exports the last, and
    says so."""
    if loop.cfg.train.export_checkpoint != "rankme":
        return model_state, state.step, state.last_loss, ""
    best = loop.files.path / RUN_BEST_CHECKPOINT
    if not best.is_file():
        return model_state, state.step, state.last_loss, (f"the last state: train.export_checkpoint=rankme, but "
                                                          f"{printable_path(best)} does not exist (train.signal_images=0?)")
    saved = load_training_checkpoint(best)
    return saved["model"], int(saved["step"]), float(saved.get("last_loss", math.nan)), \
        f"{printable_path(best)} (step {int(saved['step'])}, train.export_checkpoint=rankme)"


def export(loop: Loop, state: TrainState) -> Path:
    """Stage 9: the backbone alone, in timm's local-dir layout with its model card (written by rank 0); the
    closing lines, which say so when the run ended on the collapse plateau."""
    cfg, procs, files = loop.cfg, loop.procs, loop.files
    model_state = full_model_state(state.core)  # collective under FSDP (gathers the shards on rank 0)
    if not procs.is_main:
        return files.backbone
    m = cfg.model
    model_state, steps, loss, chosen = _exported_checkpoint(loop, state, model_state)
    export_net = create_backbone(m.backbone, **backbone_kwargs(cfg))
    export_net.load_state_dict(backbone_state(model_state), strict=True)
    card = card_for_training(to_dict(cfg), architecture=m.backbone, feature_dim=export_net.num_features,
                             backbone_dir=files.backbone, steps=steps, final_loss=loss,
                             n_images=len(loop.data.dataset),
                             extra_training={"optimizer": type(state.optimizer).__name__,
                                             "peak_lr": loop.lr_schedule.peak_lr,
                                             "epochs": round(state.step / loop.data.steps_per_epoch, 2),
                                             **({"budget_minutes": cfg.train.budget_minutes}
                                                if state.budget is not None else {})})
    export_backbone(export_net, files.backbone, image_size_px=eval_size_px(cfg.crops.sizes_px), mean=cfg.crops.mean,
                    std=cfg.crops.std, model_card=card, bit_depth=cfg.data.bit_depth)
    backbone = printable_path(files.backbone)
    procs.say(f"done: {state.step} steps, final loss {state.last_loss:.4f} (ln K = {math.log(m.n_prototypes):.3f})\n"
              f"  checkpoint: {printable_path(files.checkpoint)}\n  backbone:   {backbone}  "
              f"(timm.create_model('local-dir:{backbone}', pretrained=True) or swavkit.load_backbone)\n"
              + (f"              made from {chosen}\n" if chosen else "")
              + (f"  best RankMe: {printable_path(loop.signal.best_path)} (RankMe {loop.signal.best_rankme:g}; "
                 "swavkit export RUN OUT --select rankme)\n" if loop.signal is not None and loop.signal.best_path.exists()
                 else "")
              + f"  metrics:    {printable_path(files.metrics)}")
    verdict = state.collapse.final_verdict(state.last_loss)
    if verdict:
        procs.say(f"WARNING {verdict}")
    return files.backbone
