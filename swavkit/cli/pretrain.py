"""``swavkit pretrain`` and ``swavkit export``: parse, call the library."""

from __future__ import annotations

import argparse
from pathlib import Path

from swavkit.cli.args import WORKERS_DEFAULT_HELP, add_command, add_workers, duration
from swavkit.api import build_config
from swavkit.artifacts.layout import RUN_CHECKPOINT_CHOICES
from swavkit.artifacts import onnx_export
from swavkit.config import describe, describe_recipes, load_config, validate
from swavkit.errors import ConfigError


def _cmd_pretrain(args) -> int:
    if args.help_config:
        recipe = load_config(args.config, args.overrides) if args.config else None
        print("\n".join(describe(recipe=recipe)))
        print("\nrecipes (--config NAME, or a path to your own YAML file):")
        print("\n".join(f"  {line}" for line in describe_recipes()))
        return 0
    from swavkit.runtime import distributed  # torch: not at `swavkit --help`
    from swavkit.training.trainer import train  # torch + timm: as above

    if args.auto and args.no_auto:
        raise ConfigError("--auto and --no-auto: choose one (derive the unset keys, or keep the schema defaults)")
    # --workers first, so an explicit data.num_workers=N (applied later) wins
    workers = [f"data.num_workers={args.workers}"] if args.workers is not None else []
    budget = [f"train.budget_minutes={args.budget}"] if args.budget is not None else []
    cfg = build_config(args.config or [], workers + budget + list(args.overrides),
                       auto=True if args.auto else False if args.no_auto else None, restart=args.restart)
    if args.plan:
        return _print_plan(cfg, args)
    try:
        result = train(cfg, restart=args.restart, progress=not args.no_progress)
    finally:
        distributed.shutdown()  # no-op in a single process; avoids torch's "not destroyed" warning
    return 0 if result.completed else 3

def _print_plan(cfg, args) -> int:
    """``--plan``: the memory plan of ``cfg`` at ``--procs`` processes (nothing allocated, nothing written)."""
    import torch

    from swavkit.training.memory_plan import describe_plan, parse_bytes, plan_memory  # torch + timm: not at --help

    validate(cfg, world_size=args.procs)
    gpu_bytes = parse_bytes(args.gpu_memory, "--gpu-memory") if args.gpu_memory else None
    on_gpu = gpu_bytes is not None or cfg.train.device == "cuda" or (cfg.train.device == "auto"
                                                                     and torch.cuda.is_available())
    precision = cfg.train.precision if cfg.train.precision != "auto" else "bf16" if on_gpu else "fp32"
    plan = plan_memory(cfg, args.procs, "cuda" if on_gpu else "cpu", precision,
                       colour_on_device=cfg.data.colour_on_device == "true" or (on_gpu and cfg.data.colour_on_device
                                                                                 == "auto"))
    print(f"{cfg.model.backbone}: global batch {cfg.train.batch_size} over {args.procs} process(es), crops "
          + " + ".join(f"{n}x{s}" for n, s in zip(cfg.crops.counts, cfg.crops.sizes_px))
          + f", dist.strategy={cfg.dist.strategy}")
    print(describe_plan(plan, gpu_bytes))
    return 0 if gpu_bytes is None or plan.device_bytes <= gpu_bytes else 1


def _add_pretrain(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="SwAV pretraining on a folder of unlabeled images",
        description="Pretrain a timm backbone with SwAV. Without --config or data.path it trains on the bundled "
                    "Fashion-MNIST sample. With data.path and no --config, unset keys are derived from the data and "
                    "this machine (printed with reasons; --config configs/imagenet_resnet50.yaml is the paper's "
                    "recipe). A memory check stops a run that would not fit before anything is written. Re-running with the same out_dir resumes from out_dir/checkpoints/last.pt. "
                    "Options and key=value overrides may come in any order; overrides apply after every --config.",
        epilog="examples:\n"
               "  swavkit pretrain\n"
               "  swavkit pretrain --config cifar10_resnet18 data.path=/data/imgs out_dir=runs/a\n"
               "  swavkit pretrain data.path=/data/imgs model.backbone=resnet18 --workers 8\n"
               "  swavkit pretrain --config seer_regnety_1.3b --plan --procs 8 --gpu-memory 80GB\n"
               "  swavkit pretrain data.path=/data/imgs --auto --budget 20m\n"
               "  torchrun --nproc_per_node=8 -m swavkit pretrain --config configs/imagenet_resnet50.yaml "
               "data.path=/data/train",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", metavar="NAME|FILE.yaml",
                   help="a shipped recipe by name (imagenet_resnet50; --help-config lists them) or a YAML file "
                        "(repeatable; later wins)")
    p.add_argument("--restart", action="store_true", help="discard the checkpoint in out_dir and start over")
    p.add_argument("--auto", action="store_true",
                   help="derive crops, batch, prototypes, queue, freezing, warm-up and epochs from the data and the "
                        "hardware for every key not set explicitly, and print each value with its reason; the "
                        "default without --config, and with --config it fills what the recipe leaves unset")
    p.add_argument("--no-auto", action="store_true",
                   help="keep every unset key at the schema default (`--help-config`) instead of deriving it; "
                        "without --config, unset keys are otherwise derived as with --auto")
    p.add_argument("--plan", action="store_true",
                   help="print the memory plan per process (parameters, gradients, optimiser state, activations at "
                        "the configured batch, crops, precision and checkpointing) and exit, allocating nothing; "
                        "exit 1 when it does not fit --gpu-memory")
    p.add_argument("--procs", type=int, default=1, metavar="N",
                   help="with --plan: the number of processes (GPUs) the global batch and FSDP shards are split over")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="with --plan: memory per GPU to check the plan against (e.g. 80GB); plans for a GPU, bf16 "
                        "unless train.precision says otherwise")
    p.add_argument("--budget", type=duration, default=None, metavar="DURATION",
                   help="wall-clock time for the whole run (20m, 1300s, 1.5h; same as train.budget_minutes): the "
                        "schedule is fitted to the measured speed so the run and its export end on time; with --auto "
                        "it also sizes the backbone and crops")
    add_workers(p, None, "same as data.num_workers=N; " + WORKERS_DEFAULT_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.add_argument("--help-config", action="store_true",
                   help="list every config key with its default and meaning, and the shipped recipes; with --config, "
                        "also the value the recipe gives each key it changes")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. train.epochs=10 model.backbone=resnet18 model.init=runs/previous")
    p.set_defaults(func=_cmd_pretrain)

def _cmd_export(args) -> int:
    from swavkit.artifacts.checkpoint import check_export_target  # torch: not at `swavkit --help`
    from swavkit.artifacts.pretrained import (LoadError, export_checkpoint, export_torchvision,  # torch + timm: as above
                                              torchvision_state)

    if args.out_dir is None and (args.torchvision or not args.onnx):
        raise ConfigError("export: give OUT_DIR (the timm layout; --torchvision converts it), --onnx FILE, or both")
    args.source = _selected_checkpoint(args.source, args.select)
    if args.onnx:  # checked before anything is written

        onnx_export.require_exporter()
        onnx_export.check_onnx_target(args.onnx)
    if args.out_dir is None:
        return _export_onnx(args)
    check_export_target(args.out_dir)
    tv_state = None
    if args.torchvision and Path(args.torchvision).exists():  # a file the user already has is never replaced
        raise FileExistsError(f"--torchvision {args.torchvision} exists; choose a new file name")
    if args.torchvision:  # checked before anything is written
        try:
            tv_state = torchvision_state(args.source)
        except LoadError as err:
            raise LoadError(f"--torchvision {args.torchvision}: {err}") from None
    out = export_checkpoint(args.source, args.out_dir)
    print(f"exported backbone to {out} (timm.create_model('local-dir:{out}', pretrained=True))")
    if tv_state is not None:
        tv = export_torchvision(out, args.torchvision, state=tv_state)
        print(f"torchvision ResNet layout: {tv} (model.fc = torch.nn.Identity(); model.load_state_dict(...))")
    if args.onnx:
        return _export_onnx(args)
    return 0


def _selected_checkpoint(source: str, select: str) -> str:
    """--select rankme: a run folder's checkpoints/best-rankme.pt (ConfigError, one line, when there is none)."""

    if select == "last":
        return source
    best = Path(source) / RUN_CHECKPOINT_CHOICES[select]
    if not best.is_file():
        raise ConfigError(f"export --select {select}: {best} does not exist; SOURCE must be a run folder trained with "
                          "train.signal_images > 0 (it keeps that checkpoint at every save), or use --select last")
    return str(best)


def _export_onnx(args) -> int:
    print(onnx_export.describe(onnx_export.export_onnx(args.source, args.onnx)))
    return 0

def _add_export(subparsers) -> None:
    p = add_command(subparsers, "export", help="run folder or checkpoint -> timm-loadable backbone folder",
                    examples=["swavkit export runs/a exports/a",
                              "swavkit export swav_800ep_pretrain.pth.tar exports/swav_rn50 "
                              "--torchvision exports/rn50_tv.safetensors",
                              "swavkit export runs/a --onnx exports/a.onnx",
                              "swavkit export runs/a exports/a-rankme --select rankme"], func=_cmd_export)
    p.add_argument("source", metavar="SOURCE", help="a run folder (out_dir; its checkpoints/last.pt is used), a "
                                                    "checkpoint .pt, or a released SwAV/VISSL checkpoint")
    p.add_argument("out_dir", nargs="?", default=None,
                   help="folder to write config.json + model.safetensors into (may be left out with --onnx)")
    p.add_argument("--onnx", metavar="FILE.onnx", default=None,
                   help="also (or only) write the backbone as ONNX with a dynamic batch axis, checked against "
                        "PyTorch's output (max abs difference printed); needs pip install \"swavkit[onnx]\"")
    p.add_argument("--select", choices=("last", "rankme"), default="last",
                   help="for a run folder: export its last checkpoint (default) or checkpoints/best-rankme.pt, the one "
                        "with the highest label-free RankMe signal (docs/guides/checkpoint-selection.md)")
    p.add_argument("--torchvision", metavar="FILE.safetensors",
                   help="also write the weights in torchvision's ResNet key layout")


def register(subparsers) -> None:
    _add_pretrain(subparsers)
    _add_export(subparsers)
