"""``swavkit knn``, ``linear`` and ``cluster``: parse, call the library's evaluations."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from swavkit.cli.args import (PRECISIONS, SOURCE_HELP, WORKERS_DEFAULT_HELP, add_command, add_workers, non_negative_int,
                              positive_float, positive_int, workers_default)
from swavkit.data.constants import (CENTRE_CROP_FRACTION, DEFAULT_IMAGE_SIZE_PX, FULL_IMAGE_MAX_SIZE_PX,
                                    RAW_PIXELS_DEFAULT_SIZE_PX)
from swavkit.evaluation.baselines import add_baselines_argument  # stdlib only
from swavkit.evaluation.floors import add_floors_argument  # stdlib only
from swavkit.evaluation.options import INDEX_TYPES, RECIPES, EvalOptions, KnnOptions, LinearOptions  # stdlib only
from swavkit.data.names import printable_path  # stdlib only

def evaluation_options(args, method_options: type) -> tuple:
    """Parsed ``knn``/``linear`` flags -> (EvalOptions, ``method_options``): the one place that maps flags
    to the library's options (each flag's dest is its field's name). A flag left at None keeps the library's
    default."""
    values = {name: value for name, value in vars(args).items() if value is not None}
    values["num_workers"] = args.workers  # --workers is the same flag in every command
    return tuple(cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
                 for cls in (EvalOptions, method_options))

def _add_eval_options(p, evaluation: str) -> None:
    """Flags shared by ``knn`` and ``linear``: the fields of :class:`swavkit.evaluation.options.EvalOptions`, with
    its defaults."""
    defaults = EvalOptions()
    p.add_argument("--backbone", required=True, metavar="SRC",
                   help=f"{SOURCE_HELP}; or timm:<name> (random init: the floor) or 'pixels' (raw pixels, each "
                        "image's mean removed: the other floor)")
    p.add_argument("--train", required=True, metavar="DIR", help="labelled folder DIR/<class>/<image>")
    p.add_argument("--val", required=True, metavar="DIR",
                   help="labelled folder with the same class names; the reported split")
    p.add_argument("--image-size", dest="image_size_px", type=positive_int, default=None, metavar="PX",
                   help="eval side length (default: the export's input_size, else the checkpoint's large crop, "
                        f"else {DEFAULT_IMAGE_SIZE_PX}; {RAW_PIXELS_DEFAULT_SIZE_PX} for pixels); images <= "
                        f"{FULL_IMAGE_MAX_SIZE_PX} px are resized whole, larger ones resized to "
                        f"PX/{CENTRE_CROP_FRACTION} and centre-cropped")
    _add_option(p, "--batch-size", defaults, "batch_size", "images per forward pass", type=positive_int)
    add_workers(p, defaults.num_workers, WORKERS_DEFAULT_HELP)
    _add_option(p, "--device", defaults, "device", "auto | cpu | cuda | cuda:N")
    _add_option(p, "--precision", defaults, "precision", "auto = bf16 autocast on GPUs that support it, fp32 on "
                "CPU; fp16 needs a GPU", choices=PRECISIONS)
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convnets on GPUs)")
    _add_option(p, "--max-per-class", defaults, "max_per_class", "use at most N images per class in each split, a "
                "deterministic subset; 0 = all", type=non_negative_int, metavar="N")
    p.add_argument("--out", dest="out_json", default=None, metavar="JSON",
                   help=f"result file (default results/{evaluation}-<run or backbone name>-<UTC "
                        "YYYYmmdd-HHMMSS>.json under the current folder)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_floors_argument(p, "the same architecture at random init and raw pixels at the same image size and "
                        "protocol", default=defaults.floors)
    add_baselines_argument(p, "the same split, image size and protocol")

def _finish_evaluation(result: dict) -> int:
    from swavkit.evaluation.report import print_report, summary_rows  # torch: not at `swavkit --help`
    from swavkit.runtime import distributed  # torch: as above

    if distributed.is_main_process():
        print_report(summary_rows(result), result)
    distributed.shutdown()
    return 0

def _cmd_knn(args) -> int:
    from swavkit.evaluation.knn import evaluate_knn  # torch + faiss: not at `swavkit --help`

    options, knn = evaluation_options(args, KnnOptions)
    return _finish_evaluation(evaluate_knn(args.backbone, args.train, args.val, options, knn))

def _cmd_linear(args) -> int:
    from swavkit.evaluation.linear_probe import evaluate_linear  # torch: not at `swavkit --help`

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
    _add_option(p, "--k", knn, "k", "neighbours", type=positive_int)
    _add_option(p, "--temperature", knn, "temperature", "T in exp(sim/T)", type=positive_float)
    _add_option(p, "--index", knn, "index", "faiss search: exact, or ivf: approximate, for train sets of millions",
                choices=INDEX_TYPES)
    _add_option(p, "--ivf-lists", knn, "n_lists", "ivf cells, 0 = ~4 sqrt(N_train)", type=non_negative_int,
                metavar="N")
    _add_option(p, "--ivf-probe", knn, "n_probe", "ivf cells searched per query, 0 = 16; more = closer to exact",
                type=non_negative_int, metavar="N")

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
                type=positive_float, nargs="+", metavar="WD")
    _add_option(p, "--holdout-fraction", linear, "holdout_fraction",
                "fast: fraction of each train class held out for the choice", type=positive_float)
    _add_option(p, "--lbfgs-iterations", linear, "lbfgs_iterations", "fast: L-BFGS iteration cap",
                type=positive_int)
    _add_option(p, "--epochs", linear, "epochs", "reference: epochs", type=positive_int)
    _add_option(p, "--lr", linear, "lr", "reference: LR at batch 256, scaled linearly with --batch-size",
                type=positive_float)
    _add_option(p, "--weight-decay", linear, "weight_decay", "reference: SGD weight decay", type=float)
    _add_option(p, "--checkpoint", linear, "checkpoint",
                "reference: save the probe's training state to this file (every 10 min, at the end, on SIGTERM); "
                "the same command resumes from it", type=str)
    _add_option(p, "--min-crop-scale", linear, "min_crop_scale",
                "reference: smallest random-resized-crop area fraction", type=positive_float)

def _cmd_cluster(args) -> int:
    common = dict(top_per_cluster=args.top, batch_size=args.batch_size, device=args.device, num_workers=args.workers,
                  image_size_px=args.image_size, progress=not args.no_progress)
    if args.k is None:
        from swavkit.clusters.explorer import explore_clusters  # torch: not at `swavkit --help`

        result = explore_clusters(args.checkpoint, args.data, args.out, **common)
    else:
        from swavkit.clusters.groups import group_images  # torch: not at `swavkit --help`

        result = group_images(args.checkpoint, args.data, args.out, k=args.k, max_k=args.k_max, seed=args.seed, **common)
        for row in result["k_selection"] or []:
            print(f"  K={row['k']:<3} silhouette {row['silhouette']:.3f}  stability (ARI) {row['stability_ari']:.3f}"
                  + ("  <- chosen" if row["chosen"] else "" if row["stable"] else "  (unstable)"))
    unit = "prototypes" if args.k is None else "k-means groups"
    print(f"{result['n_images']} images in {result['clusters_used']} of {result['n_prototypes']} {unit} "
          f"({result['n_skipped']} unreadable files skipped)")
    for path, reason in result["skipped"][:5]:
        print(f"  skipped {printable_path(path)}: {printable_path(reason)}")
    print(f"wrote {printable_path(result['assignments_csv'])}, {printable_path(result['histogram_png'])}")
    if args.k is not None:
        print(f"wrote {printable_path(result['centroids'])} (new images: swavkit assign --clusters "
              f"{printable_path(args.out)} ...; unassigned beyond cosine distance "
              + ", ".join(f"{t:.3f}" for t in result["thresholds_cosine_distance"]) + " per group) and "
              f"{printable_path(result['groups_dir'])}/ ({result['groups_written']})")
    print(f"open {printable_path(Path(result['index_html']).absolute())}")
    return 0


def _k_value(text: str):
    """--k: auto, or a whole number >= 1 (argparse type; stdlib only)."""
    return "auto" if text.strip().lower() == "auto" else positive_int(text)

def _add_cluster(subparsers) -> None:
    p = add_command(
        subparsers, "cluster", help="assign images to prototypes; write a CSV, a size histogram and a browsable page",
        description="Assign every image of a folder to its SwAV prototype (argmax of the scores; confidence = "
                    "softmax(scores / swav.temperature) at that prototype) and write OUT/assignments.csv, "
                    "OUT/cluster_sizes.png and OUT/index.html, a static page of each cluster's most confident "
                    "images that opens from disk (relative links: zip OUT and open it elsewhere).",
        examples=["swavkit cluster --checkpoint runs/a --data /data/imgs --out clusters",
                  "swavkit cluster --checkpoint swav_800ep_pretrain.pth.tar --data /data/imgs --out clusters --top 8",
                  "swavkit cluster --backbone runs/a --data /data/imgs --out groups --k auto"],
        func=_cmd_cluster)
    p.add_argument("--checkpoint", "--backbone", dest="checkpoint", required=True, metavar="SRC",
                   help="a run folder (out_dir; its checkpoints/last.pt), a checkpoint .pt, or a released SwAV "
                        "checkpoint (the prototypes are needed, so not an exported backbone); with --k any backbone "
                        "source (export, cached timm pretrained name ...)")
    p.add_argument("--k", type=_k_value, default=None, metavar="N|auto",
                   help="instead of the prototypes: spherical k-means (faiss) of the backbone's L2-normalised "
                        "embeddings into N groups, or auto: the K of highest cosine silhouette among those stable "
                        "over seeds 0-2 (adjusted Rand index >= 0.8), each candidate's numbers in k_selection.csv; "
                        "also writes centroids.safetensors (for swavkit assign) and groups/<cluster>/ links")
    p.add_argument("--k-max", type=positive_int, default=20, metavar="N",
                   help="--k auto: the largest K tried (default 20; at most images/5)")
    p.add_argument("--seed", type=int, default=0, help="--k N: the k-means seed (default 0)")
    p.add_argument("--data", required=True, metavar="DIR", help="folder of images, flat or nested")
    p.add_argument("--out", required=True, metavar="OUT", help="folder for assignments.csv, cluster_sizes.png, "
                                                               "index.html and thumbs/")
    p.add_argument("--top", type=positive_int, default=16, metavar="N", help="thumbnails per cluster (default 16)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per forward pass (default 128)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    add_workers(p, workers_default(), WORKERS_DEFAULT_HELP)
    p.add_argument("--image-size", type=positive_int, default=None, metavar="PX",
                   help="centre-crop side fed to the model (default: the checkpoint's large crop size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _cmd_assign(args) -> int:
    from swavkit.clusters.groups import assign_images  # torch: not at `swavkit --help`

    result = assign_images(args.clusters, args.data, args.out, backbone_source=args.backbone, threshold=args.threshold,
                           batch_size=args.batch_size, device=args.device, num_workers=args.workers,
                           progress=not args.no_progress)
    print(f"{result['n_images']} images: {result['n_assigned']} assigned, {result['n_unassigned']} unassigned (cosine "
          f"distance to the nearest centroid above its group's threshold "
          + ", ".join(f"{t:.3f}" for t in result["thresholds_cosine_distance"]) + f"), {result['n_skipped']} "
          "unreadable files skipped")
    print("images per group: " + ", ".join(f"{k}: {n}" for k, n in enumerate(result["cluster_sizes"])))
    print(f"wrote {printable_path(result['assignments_csv'])} and {printable_path(result['groups_dir'])}/ "
          f"({result['groups_written']})")
    return 0


def _add_assign(subparsers) -> None:
    p = add_command(
        subparsers, "assign", help="put new images into the groups of an earlier swavkit cluster --k",
        description="Embed the images of --data with the backbone the groups were made with (refused when its "
                    "weights sha256 differs from the one centroids.safetensors records) and put each into the group "
                    "of its nearest centroid, or leave it unassigned (cluster -1, groups/unassigned/) when its "
                    "cosine distance to that centroid is above the threshold. Writes OUT/assignments.csv (path, "
                    "cluster, nearest_cluster, cosine_distance), OUT/groups/ and OUT/assign.json.",
        examples=["swavkit assign --clusters groups --data /data/new --out new-groups",
                  "swavkit assign --clusters groups --data /data/new --out new-groups --threshold 0.3"],
        func=_cmd_assign)
    p.add_argument("--clusters", required=True, metavar="DIR", help="the --out folder of swavkit cluster --k")
    p.add_argument("--data", required=True, metavar="DIR", help="folder of images (flat or nested) or a list file")
    p.add_argument("--out", required=True, metavar="OUT", help="folder for assignments.csv, groups/ and assign.json")
    p.add_argument("--threshold", type=float, default=None, metavar="D",
                   help="cosine distance (1 - cosine) to the nearest centroid above which an image is unassigned, "
                        "for every group (default: each group's own, saved by swavkit cluster: the median + 2 x (99th "
                        "percentile - median) of its clustered images' distances)")
    p.add_argument("--backbone", default=None, metavar="SRC",
                   help="where the backbone is now, if it moved (default: the source the centroids record)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per forward pass (default 128)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    add_workers(p, workers_default(), WORKERS_DEFAULT_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    _add_knn(subparsers)
    _add_linear(subparsers)
    _add_cluster(subparsers)
    _add_assign(subparsers)
