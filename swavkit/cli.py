"""Command line: ``swavkit pretrain | export | knn | linear | cluster``. Thin: parse, call the library.

User mistakes (bad config key, missing folder, corrupt checkpoint ...) print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from swavkit.checkpoint import CheckpointError
from swavkit.config import ConfigError
from swavkit.data import DataError
from swavkit.distributed import LaunchError
from swavkit.pretrained import LoadError

# Exceptions whose message is meant for the user as is: printed as one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, LoadError, CheckpointError, LaunchError,
                                                 FileNotFoundError, NotADirectoryError)


def quickstart_config_path() -> Path:
    return Path(str(resources.files("swavkit") / "presets" / "quickstart.yaml"))


# ----------------------------------------------------------------------------------------------------
# pretrain

def _cmd_pretrain(args) -> int:
    from swavkit.config import describe, load_config
    from swavkit.train import train

    if args.help_config:
        print("\n".join(describe()))
        return 0
    files = list(args.config or [])
    overrides = list(args.overrides)
    if not files and not any(o.split("=", 1)[0].strip() == "data.path" for o in overrides):
        files = [quickstart_config_path()]
        print("swavkit: no --config and no data.path given: the quickstart recipe on the bundled Fashion-MNIST "
              f"sample ({files[0]})")
    cfg = load_config(files, overrides)
    result = train(cfg, restart=args.restart, progress=not args.no_progress)
    return 0 if result.completed else 3


def _add_pretrain(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="SwAV pretraining on a folder of unlabeled images",
        description="Pretrain a timm backbone with SwAV. Without --config or data.path it trains on the bundled "
                    "Fashion-MNIST sample. Re-running with the same out_dir resumes from out_dir/checkpoints/last.pt.",
        epilog="examples:\n  swavkit pretrain\n  swavkit pretrain --config configs/cifar10.yaml data.path=/data/imgs "
               "out_dir=runs/a\n  torchrun --nproc_per_node=8 -m swavkit pretrain --config configs/imagenet_resnet50.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", metavar="FILE.yaml", help="YAML recipe (repeatable; later wins)")
    p.add_argument("--restart", action="store_true", help="discard the checkpoint in out_dir and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=10 model.backbone=resnet18")
    p.set_defaults(func=_cmd_pretrain)


# ----------------------------------------------------------------------------------------------------
# export

def _cmd_export(args) -> int:
    from swavkit.pretrained import export_checkpoint, export_torchvision

    out = export_checkpoint(args.checkpoint, args.out_dir)
    print(f"exported backbone to {out} (timm.create_model('local-dir:{out}', pretrained=True))")
    if args.torchvision:
        tv = export_torchvision(out, args.torchvision)
        print(f"torchvision ResNet layout: {tv} (model.fc = torch.nn.Identity(); model.load_state_dict(...))")
    return 0


def _add_export(subparsers) -> None:
    p = subparsers.add_parser("export", help="training checkpoint -> timm-loadable backbone folder")
    p.add_argument("checkpoint", help="swavkit checkpoints/last.pt, or a released SwAV checkpoint")
    p.add_argument("out_dir", help="folder to write config.json + model.safetensors into")
    p.add_argument("--torchvision", metavar="FILE.safetensors",
                   help="also write the weights in torchvision's ResNet key layout")
    p.set_defaults(func=_cmd_export)


# ----------------------------------------------------------------------------------------------------
# evaluation

def add_eval_commands(subparsers) -> None:
    """``knn`` and ``linear`` sub-commands."""


# ----------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swavkit", description="SwAV self-supervised learning for timm backbones")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_pretrain(subparsers)
    _add_export(subparsers)
    add_eval_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"swavkit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"swavkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
