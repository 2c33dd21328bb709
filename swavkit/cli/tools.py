"""``swavkit plot`` and ``swavkit shard``: the tools around a run (metrics picture, tar shards)."""

from __future__ import annotations

from pathlib import Path

from swavkit.cli.args import add_command, positive_int
from swavkit.data.names import printable_path
from swavkit.errors import DataError
from swavkit.data import shard_writer  # torch and webdataset are imported only when shards are written
from swavkit.training.plot import DEFAULT_PLOT_NAME, plot_runs  # matplotlib: only when a plot is drawn


def _cmd_plot(args) -> int:
    out = args.out or Path(args.runs[0]) / DEFAULT_PLOT_NAME
    path = plot_runs(args.runs, out)
    print(f"wrote {path} ({len(args.runs)} run{'s' if len(args.runs) > 1 else ''})")
    return 0


def _add_plot(subparsers) -> None:
    """Register ``swavkit plot RUN [RUN ...] [--out FILE.png]`` on an argparse sub-parser set."""
    p = add_command(
        subparsers, "plot", help="draw the metrics of one or more runs into one PNG",
        description="Draw loss (with the ln K collapse level), learning rate, prototypes used, code entropy, "
                    "online k-NN top-1, images/s and data-wait fraction of each run's metrics.jsonl into one "
                    "PNG, runs overlaid in different colours.",
        examples=["swavkit plot runs/swav runs/swav_eps003 --out compare.png"], func=_cmd_plot)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) holding metrics.jsonl")
    p.add_argument("--out", metavar="FILE.png", default=None,
                   help=f"PNG to write (default: the first run's folder / {DEFAULT_PLOT_NAME})")


def _cmd_shard(args) -> int:
    index = shard_writer.write_shards(args.source, args.out, args.images_per_shard, seed=None if args.keep_order else args.seed,
                         progress=not args.no_progress)
    if not index["counts"]:
        raise DataError(f"{printable_path(args.source)}: no image could be decoded; nothing written")
    pattern = shard_writer.shard_pattern(args.out, len(index["counts"]))
    skipped = (f"{index['skipped']} unreadable skipped (see {printable_path(Path(args.out) / shard_writer.SKIPPED_NAME)})"
               if index["skipped"] else "no unreadable files")
    print(f"{index['total']} images in {len(index['counts'])} shard(s); {skipped}\n"
          f"train with: swavkit pretrain data.path='{printable_path(pattern)}'")
    return 0


def _add_shard(subparsers) -> None:
    """Register ``swavkit shard SRC OUT --images-per-shard N`` on an argparse sub-parser set."""
    p = add_command(
        subparsers, "shard", help="pack a folder or list of images into WebDataset tar shards",
        description=shard_writer.__doc__.split("\n\n", 1)[1] + "\nThen pretrain with "
                    "data.path='/data/shards/shard-{000000..000199}.tar'.",
        examples=["swavkit shard /data/images /data/shards --images-per-shard 5000"], func=_cmd_shard)
    p.add_argument("source", metavar="SRC", help="folder of images (walked like pretrain's) or a .txt/.csv list")
    p.add_argument("out", metavar="OUT", help="folder for the shards (new, empty, or an earlier swavkit shard output)")
    p.add_argument("--images-per-shard", type=positive_int, default=5000, metavar="N",
                   help="images per shard (default 5000: ~0.5 GB of ImageNet-size JPEGs; use at least "
                        "processes x data workers shards)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle before sharding (default 0)")
    p.add_argument("--keep-order", action="store_true", help="keep the source's order (no shuffle)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    _add_plot(subparsers)
    _add_shard(subparsers)
