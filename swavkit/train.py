"""SwAV pretraining: ``train(cfg)`` reads top to bottom, one banner per stage.

Runs as one plain process on CPU or one GPU, or as one process per device under torchrun / srun.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from swavkit import distributed
from swavkit.checkpoint import CHECKPOINT_FORMAT, backbone_state, export_backbone, load_training_checkpoint, save_atomic
from swavkit.config import Config, ConfigError, save_yaml, to_dict, validate
from swavkit.data import BUNDLED_SAMPLE, EpochSampler, check_readable, UnlabeledImageFolder, find_images
from swavkit.diagnosis import CollapseMonitor, code_statistics
from swavkit.loss import FeatureQueue, swapped_prediction_loss
from swavkit.model import build_model, create_backbone
from swavkit.multicrop import MultiCropTransform
from swavkit.optim import REFERENCE_BASE_LR, build_optimizer, resolve_optimizer_name
from swavkit.presets import typical_side_px
from swavkit.schedule import lr_at_step, scaled_lr
from swavkit.sinkhorn import sinkhorn

# Keys a resumed run may change: they do not alter what has been computed so far.
RESUMABLE_CHANGES = ("train.epochs", "train.log_every_steps", "train.checkpoint_every_minutes",
                     "train.checkpoint_every_steps", "train.device", "train.skip_nonfinite_steps",
                     "train.collapse_patience_steps", "data.num_workers", "data.pin_memory",
                     "data.prefetch_factor", "data.colour_on_device", "model.channels_last", "model.compile",
                     "monitor.", "out_dir")


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


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda requested but no GPU is visible; use train.device=cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs a GPU (it needs a loss scaler); use bf16 or fp32 on CPU")
    return name


def resolve_auto_flag(name: str, device: torch.device) -> bool:
    """auto | true | false -> bool, auto meaning "on a GPU": for data.colour_on_device (on a GPU the
    workers' colour ops were the bottleneck) and model.channels_last (faster there, neutral on a CPU)."""
    return name == "true" or (name == "auto" and device.type == "cuda")


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, ignoring RESUMABLE_CHANGES."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key not in ("backbone_kwargs",):
            diffs += config_differences(a, b, f"{dotted}.")
        elif a != b and not dotted.startswith(RESUMABLE_CHANGES):
            diffs.append(dotted)
    return diffs


class _StopRequest:
    """SIGTERM/SIGINT (what schedulers send before preemption) only set a flag; the loop then saves a
    checkpoint at the end of the current step and exits cleanly."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _write_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def gradient_norm_sum(module: torch.nn.Module) -> torch.Tensor:
    """Sum of the per-parameter gradient L2 norms (fp32 scalar, on the parameters' device): non-finite
    exactly when some gradient is, and also when one is so large (> ~1e19) that its square overflows -
    the kind of garbage a broken kernel returns. One fused pass, no host sync."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.stack(torch._foreach_norm(grads)).float().sum()


def nonfinite_gradient_name(module: torch.nn.Module) -> str:
    """Name of the first parameter whose gradient is non-finite (for the error message only)."""
    for name, p in module.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad.float().norm())):
            return name
    return "unknown parameter"


def train(cfg: Config, *, restart: bool = False, stop_after_steps: int | None = None,
          progress: bool = True) -> TrainResult:
    """Pretrain with SwAV as described by ``cfg``; resume from ``out_dir/checkpoints/last.pt`` if present.

    Args:
        restart: discard an existing checkpoint in ``out_dir`` and start over.
        stop_after_steps: stop (with a checkpoint, like a preemption) once this global step is reached.
    """
    # ================================================================================================
    # 1. processes, device, precision
    # ================================================================================================
    launch = distributed.detect_launch()
    device = resolve_device(cfg.train.device, launch.local_rank)
    launch = distributed.init(device.type)
    world, rank, is_main = distributed.world_size(), distributed.rank(), distributed.is_main_process()
    validate(cfg, world_size=world)
    precision = resolve_precision(cfg.train.precision, device)
    colour_on_device = resolve_auto_flag(cfg.data.colour_on_device, device)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    say = print if is_main else (lambda *a, **k: None)

    # ================================================================================================
    # 2. run directory: resume or start
    # ================================================================================================
    out_dir = Path(cfg.out_dir)
    checkpoint_path = out_dir / "checkpoints" / "last.pt"
    metrics_path, skipped_path = out_dir / "metrics.jsonl", out_dir / "skipped.txt"
    resume = None
    if checkpoint_path.exists() and not restart:
        resume = load_training_checkpoint(checkpoint_path)
        diffs = config_differences(resume["config"], to_dict(cfg))
        if diffs:
            raise ConfigError(f"{out_dir} holds a run with a different config ({', '.join(diffs[:6])}); use another "
                              "out_dir, or --restart to discard that run")
    distributed.barrier()
    if is_main:
        if restart and out_dir.exists():
            for stale in (checkpoint_path, metrics_path, skipped_path):
                stale.unlink(missing_ok=True)
            shutil.rmtree(out_dir / "backbone", ignore_errors=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out_dir / "config.yaml")
    distributed.barrier()

    # ================================================================================================
    # 3. data: unlabeled folder -> multi-crop -> per-rank batches
    # ================================================================================================
    data_root = cfg.data.path or str(BUNDLED_SAMPLE / "train")
    paths = find_images(data_root)
    check_readable(paths, data_root)
    per_rank_batch = cfg.train.batch_size // world
    if len(paths) < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size: the global batch {cfg.train.batch_size} is larger than the "
                          f"{len(paths)} images in {data_root}; lower it")
    if cfg.monitor.knn_data:
        _monitor_folders(cfg)  # a wrong monitoring folder should fail now, not after the first epoch
    transform = MultiCropTransform.from_config(cfg.crops)
    dataset = UnlabeledImageFolder(data_root, transform, paths=paths)
    sampler = EpochSampler(len(paths), rank, world, cfg.seed)
    workers = cfg.data.num_workers
    loader = DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler, drop_last=True,
                        num_workers=workers,
                        collate_fn=transform.collate_pixels if colour_on_device else transform.collate,
                        pin_memory=cfg.data.pin_memory and device.type == "cuda",
                        persistent_workers=workers > 0, prefetch_factor=cfg.data.prefetch_factor if workers else None)
    typical_side = typical_side_px(paths, sample=50)
    if cfg.crops.sizes_px[0] > 2 * typical_side:
        say(f"warning: crops.sizes_px[0]={cfg.crops.sizes_px[0]} is over twice the typical image side ({typical_side} "
            "px): crops are upsampled and small crops hold almost nothing; use smaller crops or --auto")
    if device.type == "cpu" and precision == "bf16" and min(cfg.crops.sizes_px) < 32:
        # Measured with torch 2.14.1: the CPU bf16 weight gradient of a stride-2 3x3 convolution whose input
        # is 1x1 (a ResNet's last stage on crops under 32 px) is garbage or NaN in most calls.
        say(f"warning: train.precision=bf16 on CPU with {min(cfg.crops.sizes_px)} px crops: torch's CPU bf16 "
            "convolutions return corrupt gradients on 1x1 feature maps; use train.precision=fp32 (bad steps are "
            "detected and skipped, see train.skip_nonfinite_steps)")
    steps_per_epoch = len(sampler) // per_rank_batch
    total_steps = steps_per_epoch * cfg.train.epochs
    n_crops = sum(cfg.crops.counts)
    say(f"data: {len(paths)} images in {data_root}"
        + (" (bundled Fashion-MNIST sample, MIT licence)" if not cfg.data.path else "")
        + f"; {n_crops} crops each ({' + '.join(f'{c}x{s}px' for c, s in zip(cfg.crops.counts, cfg.crops.sizes_px))}); "
        f"{steps_per_epoch} steps/epoch at global batch {cfg.train.batch_size} ({world} process(es)); colour ops "
        + (f"on {device.type} (data.colour_on_device)" if colour_on_device else "in the data workers"))

    # ================================================================================================
    # 4. model: timm backbone -> projection head -> L2 norm -> prototypes
    # ================================================================================================
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    m = cfg.model
    core = build_model(m.backbone, m.n_prototypes, m.hidden_dim, m.output_dim, m.backbone_kwargs).to(device)
    memory_format = torch.channels_last if resolve_auto_flag(m.channels_last, device) else torch.contiguous_format
    core = core.to(memory_format=memory_format)
    core = distributed.convert_sync_batchnorm(core, m.sync_batchnorm, launch.local_world_size)
    if m.compile:
        # Static shapes: the backbone sees one fixed shape per crop resolution. Left automatic, the second
        # resolution makes dynamo recompile a dynamic-shape graph: twice the compile time on a CPU (19 vs
        # 39 s for resnet18, same speed after), and on an H100 still compiling after 170 s.
        core.backbone.compile(dynamic=False)
    model = distributed.wrap_ddp(core, device)
    K = m.n_prototypes
    say(f"model: {m.backbone} ({core.backbone.num_features}-d features) -> head {m.hidden_dim or '-'} -> "
        f"{m.output_dim}-d -> {K} prototypes; precision {precision} on {device}"
        + (" (channels_last)" if memory_format == torch.channels_last else ""))

    # ================================================================================================
    # 5. optimiser, schedules, queue, prototype freezing
    # ================================================================================================
    optimizer_name = resolve_optimizer_name(cfg.optim.optimizer, core.backbone)
    base_lr = cfg.optim.base_lr or REFERENCE_BASE_LR[optimizer_name]
    peak_lr = scaled_lr(base_lr, cfg.train.batch_size, cfg.optim.reference_batch_size)
    optimizer = build_optimizer(core, optimizer_name, lr=peak_lr, weight_decay=cfg.optim.weight_decay,
                                momentum=cfg.optim.momentum, trust_coefficient=cfg.optim.lars_trust_coefficient)
    schedule = dict(peak_lr=peak_lr, total_steps=total_steps,
                    warmup_steps=round(cfg.optim.warmup_epochs * steps_per_epoch),
                    warmup_start_lr=cfg.optim.warmup_start_lr * peak_lr, final_lr=cfg.optim.final_lr * peak_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    freeze_prototype_steps = round(cfg.swav.freeze_prototypes_epochs * steps_per_epoch)
    assignment_crops = list(cfg.swav.assignment_crops)
    queue = None
    if cfg.swav.queue_length:
        queue = FeatureQueue(len(assignment_crops), cfg.swav.queue_length // world, m.output_dim).to(device)
    sinkhorn_dtype = torch.float64 if cfg.swav.sinkhorn_fp64 else torch.float32
    collapse = CollapseMonitor(K, cfg.train.collapse_patience_steps)
    say(f"optimiser: {optimizer_name}, peak LR {peak_lr:.4g} (base {base_lr:g} x {cfg.train.batch_size}/"
        f"{cfg.optim.reference_batch_size}), {schedule['warmup_steps']} warm-up steps, {total_steps} steps; "
        f"prototypes frozen for {freeze_prototype_steps} steps"
        + (f"; queue {cfg.swav.queue_length} from epoch {cfg.swav.queue_start_epoch}" if queue is not None else ""))

    # ================================================================================================
    # 6. resume: weights, optimiser, step, queue, RNG
    # ================================================================================================
    step, nonfinite_skipped, last_loss = 0, 0, float("nan")
    skipped_files: set[str] = set()
    if resume is not None:
        core.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        step, nonfinite_skipped = int(resume["step"]), int(resume.get("nonfinite_skipped", 0))
        last_loss = float(resume.get("last_loss", float("nan")))
        collapse.load_state_dict(resume.get("collapse", {}))
        skipped_files = set(resume.get("skipped_files", []))
        per_rank = resume["per_rank"]
        mine = per_rank[rank] if len(per_rank) == world else per_rank[0]
        torch.set_rng_state(mine["rng_cpu"])
        if device.type == "cuda" and mine.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(mine["rng_cuda"], device)
        if queue is not None and mine.get("queue") is not None:
            if len(per_rank) == world:
                queue.load_state_dict(mine["queue"])
            else:
                say(f"resume: the queue was saved by {len(per_rank)} process(es), now {world}: it refills")
        say(f"resume: {checkpoint_path} at step {step}/{total_steps}")

    def save_checkpoint() -> None:
        """Every rank contributes its queue and RNG; rank 0 writes one file atomically."""
        mine = {"rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "queue": {k: v.cpu() for k, v in queue.state_dict().items()} if queue is not None else None}
        per_rank = distributed.all_gather_objects(mine)
        if is_main:
            save_atomic({"format": CHECKPOINT_FORMAT, "config": to_dict(cfg), "step": step,
                         "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "per_rank": per_rank, "collapse": collapse.state_dict(),
                         "nonfinite_skipped": nonfinite_skipped, "last_loss": last_loss, "skipped_files": sorted(skipped_files)},
                        checkpoint_path)
        distributed.barrier()

    def record_skipped(new: list) -> None:
        fresh = [(p, why) for p, why in new if p not in skipped_files]
        for p, why in fresh:
            skipped_files.add(p)
            if is_main:
                with open(skipped_path, "a") as handle:
                    handle.write(f"{p}\t{why}\n")
        if fresh and is_main:
            tqdm.write(f"skipped {len(fresh)} unreadable file(s) (total {len(skipped_files)}), e.g. {fresh[0][0]}; "
                       f"see {skipped_path}")

    # ================================================================================================
    # 7. training loop
    # ================================================================================================
    model.train()
    V, B = n_crops, per_rank_batch
    code_buffers: dict[int, torch.Tensor] = {}  # Sinkhorn output per assignment crop, reused every step
    buffers = [b for b in core.buffers()]
    buffer_backup = [b.detach().clone() for b in buffers]
    last_save_time = time.monotonic()
    window = {"loss": torch.zeros((), device=device), "steps": 0, "wait_s": 0.0, "start": time.perf_counter()}
    bar = tqdm(total=total_steps, initial=step, disable=not (progress and is_main), desc="pretrain",
               unit="step", dynamic_ncols=True, file=sys.stdout)
    completed = step >= total_steps
    with _StopRequest() as stop_request:
        while step < total_steps:
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, start=step_in_epoch * per_rank_batch)
            use_queue_now = queue is not None and epoch >= cfg.swav.queue_start_epoch
            batches = iter(loader)
            while step_in_epoch < steps_per_epoch and step < total_steps:
                # ---- 7a. data (the time spent blocked here is the data-wait fraction)
                wait_start = time.perf_counter()
                try:
                    crops, _, skipped = next(batches)
                except StopIteration:
                    break
                except RuntimeError as err:
                    if "DataLoader worker" not in str(err):
                        raise
                    reading = dataset.describe_reading()
                    raise DataLoaderCrashed(f"a data-loading worker died ({str(err).splitlines()[0]}) while reading "
                                            f"{', '.join(reading) or 'an unknown file'}; move that file away or use "
                                            "data.num_workers=0 to see the full error") from None
                window["wait_s"] += time.perf_counter() - wait_start
                if skipped:
                    record_skipped(skipped)
                if colour_on_device:  # uint8 crops + parameters: the colour half runs here
                    crops = transform.finish(crops, device)
                crops = [c.to(device, non_blocking=True, memory_format=memory_format) for c in crops]

                # ---- 7b. schedule and projected prototypes
                lr = lr_at_step(step, **schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                core.prototypes.normalize_()

                # ---- 7c. forward: grouped by resolution, then head, L2 norm, prototypes
                # (BN running statistics change in forward: keep a copy so a non-finite step leaves no trace)
                if buffers:
                    torch._foreach_copy_(buffer_backup, buffers)
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                    z, scores = model(crops)
                scores = scores.float().view(V, B, K)
                z = z.detach().float().view(V, B, -1)

                # ---- 7d. codes: Sinkhorn on the assignment crops (with the queue once it is full), fp32
                codes = {}
                with torch.no_grad():
                    for j, i in enumerate(assignment_crops):
                        crop_scores = scores[i].detach()
                        if use_queue_now and queue.is_full:
                            crop_scores = torch.cat([queue.embeddings[j] @ core.prototypes.weight.t().float(), crop_scores])
                        buffer = code_buffers.get(j)
                        if buffer is None or buffer.shape != crop_scores.shape:  # first step, or the queue joined
                            buffer = code_buffers[j] = torch.empty(crop_scores.shape, dtype=sinkhorn_dtype,
                                                                   device=device)
                        codes[i] = sinkhorn(crop_scores, cfg.swav.epsilon, cfg.swav.sinkhorn_iterations,
                                            dtype=sinkhorn_dtype, out=buffer)[-B:]

                # ---- 7e. swapped-prediction loss
                loss = swapped_prediction_loss(scores, codes, cfg.swav.temperature)

                # ---- 7f. backward; refuse to step on a non-finite loss or gradient (one host sync)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if step < freeze_prototype_steps:
                    core.prototypes.weight.grad = None
                # With fp16 the GradScaler already skips steps with inf/NaN gradients (and lowers its scale).
                check_grads = not scaler.is_enabled()
                finite = torch.isfinite(loss.detach() + (gradient_norm_sum(core) if check_grads else 0.0))
                if not check_grads and world > 1:
                    # Gradients are all-reduced, so their norm is the same on every rank, but the loss is
                    # not: with fp16 only the loss is checked, so the ranks must agree on it. Otherwise the
                    # refusing rank skips scaler.update(), the loss scales drift apart, and a
                    # TrainingDiverged on one rank leaves the others waiting in the next all-reduce.
                    finite = distributed.all_reduce_max((~finite).float()) == 0
                if not bool(finite):
                    if buffers:
                        torch._foreach_copy_(buffers, buffer_backup)
                    bad_loss = not bool(torch.isfinite(loss))
                    what = "loss" if bad_loss else f"gradient ({nonfinite_gradient_name(core)})"
                    optimizer.zero_grad(set_to_none=True)
                    nonfinite_skipped += 1
                    if nonfinite_skipped > cfg.train.skip_nonfinite_steps:
                        save_checkpoint()  # the weights are still those of the last good step
                        if not bad_loss and device.type == "cpu" and autocast_dtype == torch.bfloat16:
                            hint = (f"CPU bf16 convolutions return corrupt weight gradients in torch "
                                    f"{torch.__version__} when a stride-2 3x3 convolution sees a 1x1 map (crops "
                                    "under 32 px): use train.precision=fp32")
                        else:
                            hint = ("Likely causes: learning rate too high (optim.base_lr), swav.epsilon too small "
                                    "for fp32 (try swav.sinkhorn_fp64=true), or fp16 overflow (use "
                                    "train.precision=bf16)")
                        raise TrainingDiverged(
                            f"non-finite {what} at step {step} (epoch {epoch}); the last good state is saved in "
                            f"{checkpoint_path}. {hint}. train.skip_nonfinite_steps=N skips up to N bad steps")
                    tqdm.write(f"step {step}: non-finite {what}, step skipped ({nonfinite_skipped} so far)")
                    step += 1
                    step_in_epoch += 1
                    continue
                scaler.step(optimizer)
                scaler.update()
                if use_queue_now:
                    queue.push(z[assignment_crops])
                window["loss"] += loss.detach()
                window["steps"] += 1
                step += 1
                step_in_epoch += 1
                bar.update(1)

                # ---- 7g. logging (the only host syncs besides the finiteness check)
                if step % cfg.train.log_every_steps == 0 or step == total_steps:
                    mean_loss = distributed.all_reduce_sum(window["loss"].clone()) / (window["steps"] * world)
                    elapsed = time.perf_counter() - window["start"]
                    usage = code_statistics(codes[assignment_crops[0]])
                    last_loss = float(mean_loss)
                    row = {"step": step, "epoch": step / steps_per_epoch, "loss": round(last_loss, 5),
                           "ln_k": round(math.log(K), 5), "lr": lr,
                           "images_per_s": round(window["steps"] * B * world / elapsed, 2),
                           "data_wait_fraction": round(window["wait_s"] / elapsed, 4),
                           "prototypes_used": usage["prototypes_used"],
                           "code_entropy": round(usage["code_entropy"], 4),
                           "queue_in_use": bool(use_queue_now and queue.is_full)}
                    if is_main:
                        _write_jsonl(metrics_path, row)
                        bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.3g}", used=usage["prototypes_used"])
                        warning = collapse.update(step, last_loss, usage["prototypes_used"])
                        if warning:
                            tqdm.write("WARNING " + warning)
                    window = {"loss": torch.zeros((), device=device), "steps": 0, "wait_s": 0.0,
                              "start": time.perf_counter()}

                # ---- 7h. checkpoints and stop requests (decided together on every rank)
                decision = torch.tensor([
                    float(stop_request.signal_name is not None),
                    float(cfg.train.checkpoint_every_steps > 0 and step % cfg.train.checkpoint_every_steps == 0),
                    float(time.monotonic() - last_save_time > 60 * cfg.train.checkpoint_every_minutes)])
                if world > 1:
                    # Signals and wall clocks differ between ranks: act on them only at logging steps,
                    # where every rank joins the same all-reduce.
                    if step % cfg.train.log_every_steps == 0:
                        distributed.all_reduce_max(decision)
                    else:
                        decision[0] = decision[2] = 0.0
                if stop_after_steps is not None and step >= stop_after_steps:
                    decision[0] = 1.0
                if decision.any() or step_in_epoch == steps_per_epoch:
                    save_checkpoint()
                    last_save_time = time.monotonic()
                if decision[0] > 0 and step < total_steps:
                    reason = stop_request.signal_name or f"stop_after_steps={stop_after_steps}"
                    bar.close()
                    say(f"stopped at step {step}/{total_steps} ({reason}); checkpoint saved to {checkpoint_path}. "
                        "Run the same command again to resume.")
                    return TrainResult(out_dir, checkpoint_path, None, step, last_loss, completed=False)
            # ---- 7i. end of epoch: optional online k-NN on a labelled folder
            if cfg.monitor.knn_data and (epoch + 1) % cfg.monitor.every_epochs == 0 and step_in_epoch == steps_per_epoch:
                result = _monitor_knn(core.backbone, cfg, device)
                if is_main:
                    _write_jsonl(metrics_path, {"step": step, "epoch": epoch + 1, **result})
                    tqdm.write(f"epoch {epoch + 1}: online k-NN top-1 {result['knn_top1']:.2f}%")
                model.train()
        completed = True
    bar.close()

    # ================================================================================================
    # 8. final checkpoint and backbone export
    # ================================================================================================
    if resume is None or int(resume["step"]) != step:
        save_checkpoint()
    backbone_dir = out_dir / "backbone"
    if is_main:
        export_net = create_backbone(m.backbone, **m.backbone_kwargs)
        export_net.load_state_dict(backbone_state(core.state_dict()), strict=True)
        export_backbone(export_net, backbone_dir, image_size_px=cfg.crops.sizes_px[0], mean=cfg.crops.mean,
                        std=cfg.crops.std)
        say(f"done: {step} steps, final loss {last_loss:.4f} (ln K = {math.log(K):.3f})\n"
            f"  checkpoint: {checkpoint_path}\n  backbone:   {backbone_dir}  "
            f"(timm.create_model('local-dir:{backbone_dir}', pretrained=True) or swavkit.load_backbone)\n"
            f"  metrics:    {metrics_path}")
    distributed.barrier()
    return TrainResult(out_dir, checkpoint_path, backbone_dir, step, last_loss, completed=completed)


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


__all__ = ["train", "TrainResult", "TrainingDiverged", "DataLoaderCrashed"]
