"""Command line: ``swavkit pretrain | export | knn | linear | cluster``. Thin: parse, call the library.

User mistakes (bad config key, missing folder, corrupt checkpoint ...) print one line and exit with 2.
Nothing heavy is imported here: torch and timm load inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

from swavkit.config import default_num_workers  # stdlib + yaml only
from swavkit.eval_options import INDEX_TYPES, RECIPES, EvalOptions, KnnOptions, LinearOptions  # stdlib only
from swavkit.preprocessing import (CENTRE_CROP_FRACTION, DEFAULT_IMAGE_SIZE_PX, FULL_IMAGE_MAX_SIZE_PX,  # stdlib only
                                   RAW_PIXELS_DEFAULT_SIZE_PX)
from swavkit.errors import EXIT_STOPPED, is_stop_request, is_user_error
from swavkit.floors import add_floors_argument  # stdlib only
from swavkit.plot import add_plot_command  # matplotlib is imported only when a plot is drawn
from swavkit.shard import add_shard_command  # torch and webdataset are imported only when shards are written
from swavkit.finetune import add_finetune_command  # torch and timm load inside the command

def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def parse_duration_minutes(text: str) -> float:
    """'20m', '1300s', '1.5h' or a bare number of minutes -> minutes (> 0); ValueError otherwise."""
    units = {"s": 1 / 60, "m": 1.0, "min": 1.0, "h": 60.0}
    text = text.strip().lower()
    number, unit = text, "m"
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            number, unit = text[: -len(suffix)], suffix
            break
    try:
        minutes = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"expected a duration like 20m, 1300s or 1.5h, got {text!r}") from None
    if not (minutes > 0 and math.isfinite(minutes)):
        raise ValueError(f"expected a positive duration like 20m, 1300s or 1.5h, got {text!r}")
    return minutes


def _duration(text: str) -> float:
    try:
        return parse_duration_minutes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_workers(p, default: int | None, what: str) -> None:
    """``--workers`` (alias ``--num-workers``), the same flag in every sub-command."""
    p.add_argument("--workers", "--num-workers", dest="workers", type=_non_negative_int, default=default,
                   metavar="N", help=f"DataLoader decoding processes; 0 decodes in this process ({what})")


def add_command(subparsers, name: str, *, help: str, examples: list[str], func,
                description: str | None = None) -> argparse.ArgumentParser:
    """A sub-command whose help ends with ``examples`` (one command line each, shown as written) and that
    runs ``func(args)``."""
    heading = "example" if len(examples) == 1 else "examples"
    p = subparsers.add_parser(name, help=help, description=description,
                              epilog=f"{heading}:\n" + "\n".join(f"  {line}" for line in examples),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


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
    budget = [f"train.budget_minutes={args.budget}"] if args.budget is not None else []
    cfg = build_config(args.config or [], workers + budget + list(args.overrides), auto=args.auto)
    try:
        result = train(cfg, restart=args.restart, progress=not args.no_progress)
    finally:
        distributed.shutdown()  # no-op in a single process; avoids torch's "not destroyed" warning
    return 0 if result.completed else 3


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
               "  swavkit pretrain data.path=/data/imgs --auto --budget 20m\n"
               "  torchrun --nproc_per_node=8 -m swavkit pretrain --config configs/imagenet_resnet50.yaml "
               "data.path=/data/train",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", metavar="FILE.yaml", help="YAML recipe (repeatable; later wins)")
    p.add_argument("--restart", action="store_true", help="discard the checkpoint in out_dir and start over")
    p.add_argument("--auto", action="store_true",
                   help="derive crops, batch, prototypes, queue, freezing, warm-up and epochs from the data and the "
                        "hardware for every key not set explicitly, and print each value with its reason")
    p.add_argument("--budget", type=_duration, default=None, metavar="DURATION",
                   help="wall-clock time for the whole run (20m, 1300s, 1.5h; same as train.budget_minutes): the "
                        "schedule is fitted to the measured speed so the run and its export end on time; with --auto "
                        "it also sizes the backbone and crops")
    _add_workers(p, None, "same as data.num_workers=N; " + WORKERS_DEFAULT_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. train.epochs=10 model.backbone=resnet18 model.init=runs/previous")
    p.set_defaults(func=_cmd_pretrain)


# ----------------------------------------------------------------------------------------------------
# export

def _cmd_export(args) -> int:
    from swavkit.checkpoint import check_export_target
    from swavkit.config import ConfigError
    from swavkit.pretrained import LoadError, export_checkpoint, export_torchvision, torchvision_state

    if args.out_dir is None and (args.torchvision or not args.onnx):
        raise ConfigError("export: give OUT_DIR (the timm layout; --torchvision converts it), --onnx FILE, or both")
    if args.onnx:  # checked before anything is written
        from swavkit.onnx_export import check_onnx_target, require_exporter

        require_exporter()
        check_onnx_target(args.onnx)
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


def _export_onnx(args) -> int:
    from swavkit.onnx_export import describe, export_onnx

    print(describe(export_onnx(args.source, args.onnx)))
    return 0


def _add_export(subparsers) -> None:
    p = add_command(subparsers, "export", help="run folder or checkpoint -> timm-loadable backbone folder",
                    examples=["swavkit export runs/a exports/a",
                              "swavkit export swav_800ep_pretrain.pth.tar exports/swav_rn50 "
                              "--torchvision exports/rn50_tv.safetensors",
                              "swavkit export runs/a --onnx exports/a.onnx"], func=_cmd_export)
    p.add_argument("source", metavar="SOURCE", help="a run folder (out_dir; its checkpoints/last.pt is used), a "
                                                    "checkpoint .pt, or a released SwAV/VISSL checkpoint")
    p.add_argument("out_dir", nargs="?", default=None,
                   help="folder to write config.json + model.safetensors into (may be left out with --onnx)")
    p.add_argument("--onnx", metavar="FILE.onnx", default=None,
                   help="also (or only) write the backbone as ONNX with a dynamic batch axis, checked against "
                        "PyTorch's output (max abs difference printed); needs pip install \"swavkit[onnx]\"")
    p.add_argument("--torchvision", metavar="FILE.safetensors",
                   help="also write the weights in torchvision's ResNet key layout")


# ----------------------------------------------------------------------------------------------------
# evaluation

def evaluation_options(args, method_options: type) -> tuple:
    """Parsed ``knn``/``linear`` flags -> (EvalOptions, ``method_options``): the one place that maps flags
    to the library's options (each flag's dest is its field's name). A flag left at None keeps the library's
    default."""
    values = {name: value for name, value in vars(args).items() if value is not None}
    values["num_workers"] = args.workers  # --workers is the same flag in every command
    return tuple(cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
                 for cls in (EvalOptions, method_options))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _add_eval_options(p, evaluation: str) -> None:
    """Flags shared by ``knn`` and ``linear``: the fields of :class:`swavkit.eval_options.EvalOptions`, with
    its defaults."""
    defaults = EvalOptions()
    p.add_argument("--backbone", required=True, metavar="SRC",
                   help=f"{SOURCE_HELP}; or timm:<name> (random init: the floor) or 'pixels' (raw pixels, each "
                        "image's mean removed: the other floor)")
    p.add_argument("--train", required=True, metavar="DIR", help="labelled folder DIR/<class>/<image>")
    p.add_argument("--val", required=True, metavar="DIR",
                   help="labelled folder with the same class names; the reported split")
    p.add_argument("--image-size", dest="image_size_px", type=_positive_int, default=None, metavar="PX",
                   help="eval side length (default: the export's input_size, else the checkpoint's large crop, "
                        f"else {DEFAULT_IMAGE_SIZE_PX}; {RAW_PIXELS_DEFAULT_SIZE_PX} for pixels); images <= "
                        f"{FULL_IMAGE_MAX_SIZE_PX} px are resized whole, larger ones resized to "
                        f"PX/{CENTRE_CROP_FRACTION} and centre-cropped")
    _add_option(p, "--batch-size", defaults, "batch_size", "images per forward pass", type=_positive_int)
    _add_workers(p, defaults.num_workers, WORKERS_DEFAULT_HELP)
    _add_option(p, "--device", defaults, "device", "auto | cpu | cuda | cuda:N")
    _add_option(p, "--precision", defaults, "precision", "auto = bf16 autocast on GPUs that support it, fp32 on "
                "CPU; fp16 needs a GPU", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convnets on GPUs)")
    _add_option(p, "--max-per-class", defaults, "max_per_class", "use at most N images per class in each split, a "
                "deterministic subset; 0 = all", type=_non_negative_int, metavar="N")
    p.add_argument("--out", dest="out_json", default=None, metavar="JSON",
                   help=f"result file (default results/{evaluation}-<run or backbone name>-<UTC "
                        "YYYYmmdd-HHMMSS>.json under the current folder)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_floors_argument(p, "the same architecture at random init and raw pixels at the same image size and "
                        "protocol", default=defaults.floors)


def _finish_evaluation(result: dict) -> int:
    from swavkit import distributed
    from swavkit.report import format_table, summary_rows

    if distributed.is_main_process():
        print(format_table(summary_rows(result)))
        print(f"wrote {result['result_path']}")
    distributed.shutdown()
    return 0


def _cmd_knn(args) -> int:
    from swavkit.knn import evaluate_knn

    options, knn = evaluation_options(args, KnnOptions)
    return _finish_evaluation(evaluate_knn(args.backbone, args.train, args.val, options, knn))


def _cmd_linear(args) -> int:
    from swavkit.linear_probe import evaluate_linear

    options, linear = evaluation_options(args, LinearOptions)
    return _finish_evaluation(evaluate_linear(args.backbone, args.train, args.val, options, linear))


def _add_option(p, flag: str, options, name: str, help: str, **kwargs) -> None:
    """``flag`` sets the field ``name`` of ``options``' class; its default is that field's, shown in the help.
    A tuple default (a list flag) stays None here, which :func:`evaluation_options` leaves to the library."""
    default = getattr(options, name)
    shown = " ".join(f"{v:g}" for v in default) if isinstance(default, tuple) else (
        f"{default:g}" if isinstance(default, float) else default)
    p.add_argument(flag, dest=name, default=None if isinstance(default, tuple) else default,
                   help=f"{help} (default {shown})", **kwargs)


def _add_knn(subparsers) -> None:
    p = add_command(
        subparsers, "knn", help="weighted k-NN accuracy of a frozen backbone on labelled train/val folders",
        description="k-NN evaluation (InstDisc/DINO protocol): L2-normalised frozen features, cosine similarity, "
                    "each of the k nearest train images votes for its class with weight exp(sim/T); top-1 and "
                    "top-5 (with more than 5 classes) on --val. Prints a table and writes a JSON record with the "
                    "protocol, data sizes, swavkit version and git commit. Works under torchrun.",
        examples=["swavkit knn --backbone runs/swav --train data/train --val data/val",
                  "swavkit knn --backbone timm:resnet18 --train data/train --val data/val --image-size 32"],
        func=_cmd_knn)
    _add_eval_options(p, "knn")
    knn = KnnOptions()
    _add_option(p, "--k", knn, "k", "neighbours", type=_positive_int)
    _add_option(p, "--temperature", knn, "temperature", "T in exp(sim/T)", type=_positive_float)
    _add_option(p, "--index", knn, "index", "faiss search: exact, or ivf: approximate, for train sets of millions",
                choices=INDEX_TYPES)
    _add_option(p, "--ivf-lists", knn, "n_lists", "ivf cells, 0 = ~4 sqrt(N_train)", type=_non_negative_int,
                metavar="N")
    _add_option(p, "--ivf-probe", knn, "n_probe", "ivf cells searched per query, 0 = 16; more = closer to exact",
                type=_non_negative_int, metavar="N")


def _add_linear(subparsers) -> None:
    linear = LinearOptions()
    p = add_command(
        subparsers, "linear", help="linear-probe accuracy of a frozen backbone on labelled train/val folders",
        description="Linear probe on a frozen backbone. --recipe fast (default): cached centre-crop features, "
                    "standardised, softmax regression by L-BFGS; the weight decay is chosen on a held-out part "
                    "of --train, the classifier refitted on all of --train, and --val evaluated once. "
                    f"--recipe reference (GPU): random-resized-crop + flip, SGD momentum {linear.momentum}, --lr "
                    f"{linear.lr} x batch/256 cosine, --epochs {linear.epochs}, last epoch reported. Nothing is ever "
                    "selected on --val.",
        examples=["swavkit linear --backbone runs/swav --train data/train --val data/val",
                  "torchrun --nproc_per_node=8 -m swavkit linear --recipe reference --backbone runs/swav "
                  "--train imagenet/train --val imagenet/val"],
        func=_cmd_linear)
    _add_eval_options(p, "linear")
    _add_option(p, "--recipe", linear, "recipe", "fast or reference", choices=RECIPES)
    _add_option(p, "--seed", linear, "seed", "held-out split / training order seed", type=int)
    _add_option(p, "--weight-decays", linear, "weight_decays", "fast: L2 grid searched on held-out train",
                type=_positive_float, nargs="+", metavar="WD")
    _add_option(p, "--holdout-fraction", linear, "holdout_fraction",
                "fast: fraction of each train class held out for the choice", type=_positive_float)
    _add_option(p, "--lbfgs-iterations", linear, "lbfgs_iterations", "fast: L-BFGS iteration cap",
                type=_positive_int)
    _add_option(p, "--epochs", linear, "epochs", "reference: epochs", type=_positive_int)
    _add_option(p, "--lr", linear, "lr", "reference: LR at batch 256, scaled linearly with --batch-size",
                type=_positive_float)
    _add_option(p, "--weight-decay", linear, "weight_decay", "reference: SGD weight decay", type=float)
    _add_option(p, "--min-crop-scale", linear, "min_crop_scale",
                "reference: smallest random-resized-crop area fraction", type=_positive_float)


def add_eval_commands(subparsers) -> None:
    """``knn`` and ``linear`` sub-commands."""
    _add_knn(subparsers)
    _add_linear(subparsers)


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
    p = add_command(
        subparsers, "cluster", help="assign images to prototypes; write a CSV, a size histogram and a browsable page",
        description="Assign every image of a folder to its SwAV prototype (argmax of the scores; confidence = "
                    "softmax(scores / swav.temperature) at that prototype) and write OUT/assignments.csv, "
                    "OUT/cluster_sizes.png and OUT/index.html, a static page of each cluster's most confident "
                    "images that opens from disk (relative links: zip OUT and open it elsewhere).",
        examples=["swavkit cluster --checkpoint runs/a --data /data/imgs --out clusters",
                  "swavkit cluster --checkpoint swav_800ep_pretrain.pth.tar --data /data/imgs --out clusters --top 8"],
        func=_cmd_cluster)
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


# ----------------------------------------------------------------------------------------------------
# embed, neighbours (their flags and their work live in swavkit/embed.py and swavkit/neighbours.py)

def _add_embed(subparsers) -> None:
    from swavkit.embed import add_arguments, run  # stdlib only at import; torch loads inside run

    p = add_command(
        subparsers, "embed", help="L2-normalised backbone features of every image, resumable, to .npy or .parquet",
        description="Embed every image of DATA with the backbone's eval crop rule; unreadable files are skipped "
                    "and listed. Writes FILE.npy + FILE.paths.txt (or FILE.parquet) and FILE.json, a manifest "
                    "naming the backbone. Run the same command again to resume an interrupted run.",
        examples=["swavkit embed runs/a /data/imgs --out embeddings/a.npy",
                  "swavkit embed runs/a 'shards/train-{000000..000099}.tar' --out embeddings/a.parquet"], func=run)
    add_arguments(p)


def _add_neighbours(subparsers) -> None:
    from swavkit.neighbours import add_arguments, run  # numpy only at import; faiss and torch inside run

    p = add_command(
        subparsers, "neighbours", help="nearest neighbours and near-duplicates in an embeddings file (faiss)",
        description="Top-k cosine neighbours of every embedded image, or of --query images (embedded with the "
                    "backbone the manifest names), or --duplicates groups; writes a CSV and a page of thumbnails.",
        examples=["swavkit neighbours embeddings/a.npy --k 10 --out neighbours/a",
                  "swavkit neighbours embeddings/a.npy --query cat.jpg --out neighbours/cat",
                  "swavkit neighbours embeddings/a.npy --duplicates --threshold 0.95 --out duplicates/a"], func=run)
    add_arguments(p)


# ----------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swavkit", description="SwAV self-supervised learning for timm backbones")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_pretrain(subparsers)
    _add_export(subparsers)
    add_eval_commands(subparsers)
    _add_cluster(subparsers)
    _add_embed(subparsers)
    _add_neighbours(subparsers)
    add_plot_command(subparsers)
    add_shard_command(subparsers)
    add_finetune_command(subparsers)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` where options and ``key=value`` overrides may come in any order
    (``pretrain data.path=x --config y.yaml train.epochs=3``): argparse gives its one ``overrides``
    positional only the first run of them, so the later ones are collected here, in order."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extras = parser.parse_known_args(argv)
    if extras:
        overrides = getattr(args, "overrides", None)
        stray = [text for text in extras if text.startswith("-") or "=" not in text]
        if overrides is None or stray:
            command = _subcommand_parser(parser, getattr(args, "command", None)) or parser
            command.error(f"unrecognized arguments: {' '.join(stray or extras)}{_did_you_mean(command, stray, argv)}")
        args.overrides = [*overrides, *extras]
    return args


def _subcommand_parser(parser: argparse.ArgumentParser, name: str | None) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def _did_you_mean(parser: argparse.ArgumentParser, stray: list[str], argv: list[str]) -> str:
    """" (did you mean --k 5?)" for the first unknown option in ``stray``: for ``pretrain`` the config key
    it names (--epochs 3 -> train.epochs=3), else the option of ``parser`` closest in spelling, else one whose
    help names the word (--neighbours -> --k, "neighbours"); "" when nothing is close."""
    import difflib
    import re

    flag = next((text for text in stray if text.startswith("--") and len(text) > 2), None)
    if flag is None:
        return ""
    given, _, value = flag.partition("=")
    following = argv[argv.index(flag) + 1:argv.index(flag) + 2] if flag in argv else []
    if not value and following and not following[0].startswith("-") and "=" not in following[0]:
        value = following[0]
    name = given.lstrip("-")
    if any(action.dest == "overrides" for action in parser._actions):  # pretrain: key=value overrides
        from swavkit.api import config_key
        from swavkit.config import ConfigError

        try:
            return f" (did you mean {config_key(name.replace('-', '_'))}={value or '...'}?)"
        except ConfigError:
            pass
    options = {text.lstrip("-"): text for text, action in parser._option_string_actions.items()
               if text.startswith("--") and action.help != argparse.SUPPRESS}
    close = [options[match] for match in difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)]
    word = re.compile(rf"\b{re.escape(name.replace('-', ' '))}\b", re.IGNORECASE)
    close = close or [text for text, action in parser._option_string_actions.items() if text in options.values()
                      and word.search((action.help or "").split(" (default")[0])]
    return f" (did you mean {close[0]}{' ' + value if value else ''}?)" if close else ""


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
