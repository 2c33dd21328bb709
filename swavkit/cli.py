"""Command line: ``swavkit pretrain | export | knn | linear | cluster``. Thin: parse, call the library.

User mistakes (bad config key, missing folder, corrupt checkpoint ...) print one line and exit with 2.
Nothing heavy is imported here: torch and timm load inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from swavkit.config import default_num_workers  # stdlib + yaml only
from swavkit.errors import EXIT_STOPPED, is_stop_request, is_user_error
from swavkit.plot import add_plot_command  # matplotlib is imported only when a plot is drawn
from swavkit.finetune import add_finetune_command  # torch and timm load inside the command

def quickstart_config_path() -> Path:
    from swavkit.api import quickstart_config_path as path

    return path()


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _add_workers(p, default: int | None, what: str) -> None:
    """``--workers`` (alias ``--num-workers``), the same flag in every sub-command."""
    p.add_argument("--workers", "--num-workers", dest="workers", type=_non_negative_int, default=default,
                   metavar="N", help=f"DataLoader decoding processes; 0 decodes in this process ({what})")


WORKERS_DEFAULT_HELP = "default min(4, usable CPU cores - 1)"
SOURCE_HELP = ("a run folder (out_dir), an exported backbone folder, a checkpoint .pt, or a released SwAV/VISSL "
               "checkpoint")


# ----------------------------------------------------------------------------------------------------
# pretrain

def _cmd_pretrain(args) -> int:
    if args.help_config:
        from swavkit.config import describe

        print("\n".join(describe()))
        return 0
    from swavkit import distributed
    from swavkit.api import build_config
    from swavkit.train import train

    # --workers first, so an explicit data.num_workers=N (applied later) wins
    workers = [f"data.num_workers={args.workers}"] if args.workers is not None else []
    cfg = build_config(args.config or [], workers + list(args.overrides), auto=args.auto)
    try:
        result = train(cfg, restart=args.restart, progress=not args.no_progress)
    finally:
        distributed.shutdown()  # no-op in a single process; avoids torch's "not destroyed" warning
    return 0 if result.completed else 3


def _auto_config(files, overrides):
    """--auto on YAML files + key=value overrides (see :func:`swavkit.api.auto_config`)."""
    from swavkit.api import auto_config
    from swavkit.config import merge_sources

    return auto_config(merge_sources(files, overrides))


def _add_pretrain(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="SwAV pretraining on a folder of unlabeled images",
        description="Pretrain a timm backbone with SwAV. Without --config or data.path it trains on the bundled "
                    "Fashion-MNIST sample. Re-running with the same out_dir resumes from out_dir/checkpoints/last.pt. "
                    "Options and key=value overrides may come in any order; overrides apply after every --config.",
        epilog="examples:\n"
               "  swavkit pretrain\n"
               "  swavkit pretrain --config configs/cifar10_resnet18.yaml data.path=/data/imgs out_dir=runs/a\n"
               "  swavkit pretrain data.path=/data/imgs --auto model.backbone=resnet18 --workers 8\n"
               "  torchrun --nproc_per_node=8 -m swavkit pretrain --config configs/imagenet_resnet50.yaml "
               "data.path=/data/train",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", metavar="FILE.yaml", help="YAML recipe (repeatable; later wins)")
    p.add_argument("--restart", action="store_true", help="discard the checkpoint in out_dir and start over")
    p.add_argument("--auto", action="store_true",
                   help="derive crops, batch, prototypes, queue, freezing, warm-up and epochs from the data and the "
                        "hardware for every key not set explicitly, and print each value with its reason")
    _add_workers(p, None, "same as data.num_workers=N; " + WORKERS_DEFAULT_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. train.epochs=10 model.backbone=resnet18 model.init=runs/previous")
    p.set_defaults(func=_cmd_pretrain)


# ----------------------------------------------------------------------------------------------------
# export

def _cmd_export(args) -> int:
    from swavkit.pretrained import export_checkpoint, export_torchvision

    out = export_checkpoint(args.source, args.out_dir)
    print(f"exported backbone to {out} (timm.create_model('local-dir:{out}', pretrained=True))")
    if args.torchvision:
        tv = export_torchvision(out, args.torchvision)
        print(f"torchvision ResNet layout: {tv} (model.fc = torch.nn.Identity(); model.load_state_dict(...))")
    return 0


def _add_export(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="run folder or checkpoint -> timm-loadable backbone folder",
        epilog="examples:\n  swavkit export runs/a exports/a\n"
               "  swavkit export swav_800ep_pretrain.pth.tar exports/swav_rn50 "
               "--torchvision exports/rn50_tv.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="a run folder (out_dir; its checkpoints/last.pt is used), a "
                                                    "checkpoint .pt, or a released SwAV/VISSL checkpoint")
    p.add_argument("out_dir", help="folder to write config.json + model.safetensors into")
    p.add_argument("--torchvision", metavar="FILE.safetensors",
                   help="also write the weights in torchvision's ResNet key layout")
    p.set_defaults(func=_cmd_export)


# ----------------------------------------------------------------------------------------------------
# evaluation

def add_eval_commands(subparsers) -> None:
    """``knn`` and ``linear`` sub-commands."""
    positive_int, non_negative_int = _positive_int, _non_negative_int

    def positive_float(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    def add_common(p, evaluation: str) -> None:
        p.add_argument("--backbone", required=True, metavar="SRC",
                       help=f"{SOURCE_HELP}; or timm:<name> (random init: the floor) or 'pixels' (raw pixels, each "
                            "image's mean removed: the other floor)")
        p.add_argument("--train", required=True, metavar="DIR", help="labelled folder DIR/<class>/<image>")
        p.add_argument("--val", required=True, metavar="DIR",
                       help="labelled folder with the same class names; the reported split")
        p.add_argument("--image-size", type=positive_int, default=None, metavar="PX",
                       help="eval side length (default: the export's input_size, else the checkpoint's large crop, "
                            "else 224; 32 for pixels); images <= 64 px are resized whole, larger ones resized to "
                            "PX/0.875 and centre-cropped")
        p.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass (default 256)")
        _add_workers(p, default_num_workers(), WORKERS_DEFAULT_HELP)
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
        p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                       help="auto = bf16 autocast on GPUs that support it, fp32 on CPU")
        p.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convnets on GPUs)")
        p.add_argument("--max-per-class", type=non_negative_int, default=0, metavar="N",
                       help="use at most N images per class in each split, a deterministic subset (default 0 = all)")
        p.add_argument("--out", default=None, metavar="JSON",
                       help=f"result file (default results/{evaluation}-<run or backbone name>-<UTC "
                            "YYYYmmdd-HHMMSS>.json under the current folder)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def finish(result: dict) -> int:
        from swavkit import distributed
        from swavkit.report import format_table, summary_rows

        if distributed.is_main_process():
            print(format_table(summary_rows(result)))
            print(f"wrote {result['result_path']}")
        distributed.shutdown()
        return 0

    def cmd_knn(args) -> int:
        from swavkit.knn import evaluate_knn

        return finish(evaluate_knn(
            args.backbone, args.train, args.val, k=args.k, temperature=args.temperature,
            image_size_px=args.image_size, batch_size=args.batch_size, num_workers=args.workers,
            device=args.device, out_json=args.out, max_per_class=args.max_per_class, index=args.index,
            n_lists=args.ivf_lists, n_probe=args.ivf_probe, precision=args.precision,
            channels_last=args.channels_last, progress=not args.no_progress))

    def cmd_linear(args) -> int:
        from swavkit.linear_probe import evaluate_linear

        return finish(evaluate_linear(
            args.backbone, args.train, args.val, recipe=args.recipe, image_size_px=args.image_size,
            batch_size=args.batch_size, num_workers=args.workers, device=args.device, out_json=args.out,
            max_per_class=args.max_per_class, precision=args.precision, channels_last=args.channels_last,
            progress=not args.no_progress, seed=args.seed, holdout_fraction=args.holdout_fraction,
            lbfgs_iterations=args.lbfgs_iterations, epochs=args.epochs, lr=args.lr,
            weight_decay=args.weight_decay, min_crop_scale=args.min_crop_scale,
            **({"weight_decays": args.weight_decays} if args.weight_decays else {})))

    p = subparsers.add_parser(
        "knn", help="weighted k-NN accuracy of a frozen backbone on labelled train/val folders",
        description="k-NN evaluation (InstDisc/DINO protocol): L2-normalised frozen features, cosine similarity, "
                    "each of the k nearest train images votes for its class with weight exp(sim/T); top-1 and "
                    "top-5 (with more than 5 classes) on --val. Prints a table and writes a JSON record with the "
                    "protocol, data sizes, swavkit version and git commit. Works under torchrun.",
        epilog="examples:\n  swavkit knn --backbone runs/swav --train data/train --val data/val\n"
               "  swavkit knn --backbone timm:resnet18 --train data/train --val data/val --image-size 32",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p, "knn")
    p.add_argument("--k", type=positive_int, default=20, help="neighbours (default 20)")
    p.add_argument("--temperature", type=positive_float, default=0.07, help="T in exp(sim/T) (default 0.07)")
    p.add_argument("--index", choices=("exact", "ivf"), default="exact",
                   help="faiss search: exact (default) or ivf, approximate, for train sets of millions")
    p.add_argument("--ivf-lists", type=non_negative_int, default=0, metavar="N",
                   help="ivf cells (default 0 = ~4 sqrt(N_train))")
    p.add_argument("--ivf-probe", type=non_negative_int, default=0, metavar="N",
                   help="ivf cells searched per query (default 0 = 16; more = closer to exact)")
    p.set_defaults(func=cmd_knn)

    p = subparsers.add_parser(
        "linear", help="linear-probe accuracy of a frozen backbone on labelled train/val folders",
        description="Linear probe on a frozen backbone. --recipe fast (default): cached centre-crop features, "
                    "standardised, softmax regression by L-BFGS; the weight decay is chosen on a held-out part "
                    "of --train, the classifier refitted on all of --train, and --val evaluated once. "
                    "--recipe reference (GPU): random-resized-crop + flip, SGD momentum 0.9, lr 0.3 x batch/256 "
                    "cosine, --epochs 100, last epoch reported. Nothing is ever selected on --val.",
        epilog="examples:\n  swavkit linear --backbone runs/swav --train data/train --val data/val\n"
               "  torchrun --nproc_per_node=8 -m swavkit linear --recipe reference --backbone runs/swav "
               "--train imagenet/train --val imagenet/val",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p, "linear")
    p.add_argument("--recipe", choices=("fast", "reference"), default="fast", help="default fast")
    p.add_argument("--seed", type=int, default=0, help="held-out split / training order seed (default 0)")
    p.add_argument("--weight-decays", type=positive_float, nargs="+", default=None, metavar="WD",
                   help="fast: L2 grid searched on held-out train (default 1e-4 1e-3 1e-2 0.1 1 10)")
    p.add_argument("--holdout-fraction", type=positive_float, default=0.2,
                   help="fast: fraction of each train class held out for the choice (default 0.2)")
    p.add_argument("--lbfgs-iterations", type=positive_int, default=300, help="fast: L-BFGS iteration cap (default 300)")
    p.add_argument("--epochs", type=positive_int, default=100, help="reference: epochs (default 100)")
    p.add_argument("--lr", type=positive_float, default=0.3, help="reference: LR at batch 256, scaled linearly "
                                                                  "with --batch-size (default 0.3)")
    p.add_argument("--weight-decay", type=float, default=1e-6, help="reference: SGD weight decay (default 1e-6)")
    p.add_argument("--min-crop-scale", type=positive_float, default=0.08,
                   help="reference: smallest random-resized-crop area fraction (default 0.08)")
    p.set_defaults(func=cmd_linear)


# ----------------------------------------------------------------------------------------------------
# cluster

def _cmd_cluster(args) -> int:
    from swavkit.cluster import explore_clusters

    result = explore_clusters(args.checkpoint, args.data, args.out, top_per_cluster=args.top,
                              batch_size=args.batch_size, device=args.device, num_workers=args.workers,
                              image_size_px=args.image_size, progress=not args.no_progress)
    print(f"{result['n_images']} images in {result['clusters_used']} of {result['n_prototypes']} clusters "
          f"({result['n_skipped']} unreadable files skipped)")
    from swavkit.data import printable_path

    for path, reason in result["skipped"][:5]:
        print(f"  skipped {printable_path(path)}: {printable_path(reason)}")
    print(f"wrote {printable_path(result['assignments_csv'])}, {printable_path(result['histogram_png'])}")
    print(f"open {printable_path(Path(result['index_html']).absolute())}")
    return 0


def _add_cluster(subparsers) -> None:
    p = subparsers.add_parser(
        "cluster", help="assign images to prototypes; write a CSV, a size histogram and a browsable page",
        description="Assign every image of a folder to its SwAV prototype (argmax of the scores; confidence = "
                    "softmax(scores / swav.temperature) at that prototype) and write OUT/assignments.csv, "
                    "OUT/cluster_sizes.png and OUT/index.html, a static page of each cluster's most confident "
                    "images that opens from disk (relative links: zip OUT and open it elsewhere).",
        epilog="examples:\n  swavkit cluster --checkpoint runs/a --data /data/imgs --out clusters\n"
               "  swavkit cluster --checkpoint swav_800ep_pretrain.pth.tar --data /data/imgs --out clusters --top 8",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="SRC",
                   help="a run folder (out_dir; its checkpoints/last.pt), a checkpoint .pt, or a released SwAV "
                        "checkpoint (the prototypes are needed, so not an exported backbone)")
    p.add_argument("--data", required=True, metavar="DIR", help="folder of images, flat or nested")
    p.add_argument("--out", required=True, metavar="OUT", help="folder for assignments.csv, cluster_sizes.png, "
                                                               "index.html and thumbs/")
    p.add_argument("--top", type=_positive_int, default=16, metavar="N", help="thumbnails per cluster (default 16)")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="images per forward pass (default 128)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    _add_workers(p, default_num_workers(), WORKERS_DEFAULT_HELP)
    p.add_argument("--image-size", type=_positive_int, default=None, metavar="PX",
                   help="centre-crop side fed to the model (default: the checkpoint's large crop size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_cluster)


# ----------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swavkit", description="SwAV self-supervised learning for timm backbones")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_pretrain(subparsers)
    _add_export(subparsers)
    add_eval_commands(subparsers)
    _add_cluster(subparsers)
    add_plot_command(subparsers)
    add_finetune_command(subparsers)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` where options and ``key=value`` overrides may come in any order
    (``pretrain data.path=x --config y.yaml train.epochs=3``): argparse gives its one ``overrides``
    positional only the first run of them, so the later ones are collected here, in order."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        overrides = getattr(args, "overrides", None)
        stray = [text for text in extras if text.startswith("-") or "=" not in text]
        if overrides is None or stray:
            parser.error(f"unrecognized arguments: {' '.join(stray or extras)}")
        args.overrides = [*overrides, *extras]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"swavkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        if is_stop_request(err):
            print(f"swavkit {args.command}: {err}", file=sys.stderr)
            return EXIT_STOPPED
        if not is_user_error(err):
            raise
        lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        # An error raised inside a DataLoader worker arrives as "Caught X in DataLoader worker ...",
        # the traceback, then the original message on the last line: show that line.
        message = lines[-1].split(": ", 1)[-1] if lines[0].startswith("Caught ") else lines[0]
        print(f"swavkit {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
