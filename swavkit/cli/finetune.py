"""``swavkit finetune``: parse, call the library's fine-tuning (the SwAV paper's semi-supervised protocol)."""

from __future__ import annotations

import argparse

from swavkit.cli.args import PRECISIONS, WORKERS_DEFAULT_HELP, add_workers, positive_float, positive_int, workers_default
from swavkit.evaluation.finetune import REFERENCE_EPOCHS, FinetuneOptions, finetune  # torch: inside
from swavkit.evaluation.baselines import add_baselines_argument  # stdlib only
from swavkit.evaluation.floors import add_floors_argument  # stdlib only


def _cmd_finetune(args) -> int:
    from swavkit.evaluation.report import print_report, summary_rows  # torch: not at `swavkit --help`

    options = FinetuneOptions(
        label_fraction=args.label_fraction, labels_file=args.labels_file, seed=args.seed, epochs=args.epochs,
        min_steps=args.min_steps, batch_size=args.batch_size, trunk_lr=args.trunk_lr, head_lr=args.head_lr,
        min_crop_scale=args.min_crop_scale, image_size_px=args.image_size, num_workers=args.workers,
        device=args.device, precision=args.precision, out_dir=args.out_dir, out_json=args.out,
        floors=args.floors, baselines=args.baselines, restart=args.restart, progress=not args.no_progress)
    result = finetune(args.backbone, args.train, args.val, options)
    from swavkit.runtime import distributed  # torch: not at `swavkit --help`

    if distributed.is_main_process():  # under torchrun: one report
        print_report(summary_rows(result), result)  # --out "" writes no record: no "wrote" line
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune the whole backbone + a linear head on 1 %% / 10 %% of the labels",
        description="Semi-supervised protocol of the SwAV paper: fine-tune the backbone and a new linear head on a "
                    "stratified, seeded part of --train (SGD momentum 0.9, trunk and head LRs of the reference "
                    "eval_semisup.py, step decay), then evaluate --val once. The labelled files are listed in "
                    "<result>.labels.txt. Rerunning the same command resumes from --out-dir. With --floors (auto: "
                    "small labelled sets) the same fine-tune from random init runs beside it.",
        epilog="label budgets: 0.01 or 1% (a fraction of each class), 10/class (images per class)\n"
               "examples:\n"
               "  swavkit finetune --backbone runs/a --train data/train --val data/val --label-fraction 0.1\n"
               "  swavkit finetune --backbone runs/a --train data/train --val data/val --label-fraction 1% "
               "--image-size 32",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True, metavar="SRC",
                   help="a run folder, an exported backbone, a checkpoint, or timm:<name> (random init)")
    p.add_argument("--train", required=True, metavar="DIR", help="labelled folder DIR/<class>/<image>")
    p.add_argument("--val", required=True, metavar="DIR", help="labelled folder with the same class names")
    p.add_argument("--label-fraction", default="10%", metavar="F",
                   help="0 < F <= 1, a percentage (1%%) or N/class (default 10%%)")
    p.add_argument("--labels-file", default=None, metavar="TXT",
                   help="use the files a label list names (e.g. an earlier <result>.labels.txt) instead of drawing")
    p.add_argument("--seed", type=int, default=0, help="label subset, head init and data order (default 0)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"default {REFERENCE_EPOCHS}, raised until --min-steps optimiser steps are made")
    p.add_argument("--min-steps", type=positive_int, default=500, help="see --epochs (default 500)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="default 64 (at most the labelled images)")
    p.add_argument("--trunk-lr", type=positive_float, default=None, metavar="LR",
                   help="backbone LR at batch 256, scaled by batch/256 (default 0.01; reference 1 %% recipe: 0.02)")
    p.add_argument("--head-lr", type=positive_float, default=None, metavar="LR",
                   help="head LR at batch 256, scaled by batch/256 (default 0.2; the reference's 1 %% recipe: 5)")
    p.add_argument("--min-crop-scale", type=float, default=0.08, help="RandomResizedCrop's smallest area (0.08)")
    p.add_argument("--image-size", type=positive_int, default=None, metavar="PX",
                   help="default: the export's input_size, else the checkpoint's large crop, else 224")
    add_workers(p, workers_default(), WORKERS_DEFAULT_HELP)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto = bf16 autocast on GPUs that support it, fp32 on CPU; fp16 (loss-scaled) needs a GPU")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="checkpoint folder (default runs/finetune-<backbone>-<labels>-seed<seed>)")
    p.add_argument("--out", default=None, metavar="JSON",
                   help="result file (default results/finetune-<backbone>-<UTC time>.json)")
    add_floors_argument(p, "the same architecture fine-tuned from random init on the same labelled files",
                        default=FinetuneOptions.floors, counted="the labelled set")
    add_baselines_argument(p, "the same labelled files, image size and recipe (each in --out-dir/baseline-NAME/)")
    p.add_argument("--restart", action="store_true", help="discard --out-dir's fine-tune and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_finetune)
