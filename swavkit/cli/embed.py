"""``swavkit embed`` and ``swavkit neighbours``: parse, call the library (swavkit/embeddings/embed.py and
neighbours.py; stdlib and numpy at import, torch and faiss inside the calls)."""

from __future__ import annotations

import os

from swavkit.cli.args import PRECISIONS, add_command, non_negative_int, positive_int, workers_default
from swavkit.data.names import printable_path
from swavkit.embeddings.embed import DEFAULT_CHUNK_IMAGES, embed
from swavkit.embeddings.neighbours import (DEFAULT_PAGE_ROWS, EXACT_MAX_VECTORS, INDEX_KINDS, IVF_DEFAULT_PROBE,
                                          neighbours)


def register(subparsers) -> None:
    p = add_command(
        subparsers, "embed", help="L2-normalised backbone features of every image, resumable, to .npy or .parquet",
        description="Embed every image of DATA with the backbone's eval crop rule; unreadable files are skipped "
                    "and listed. Writes FILE.npy + FILE.paths.txt (or FILE.parquet) and FILE.json, a manifest "
                    "naming the backbone. Run the same command again to resume an interrupted run.",
        examples=["swavkit embed runs/a /data/imgs --out embeddings/a.npy",
                  "swavkit embed runs/a 'shards/train-{000000..000099}.tar' --out embeddings/a.parquet"],
        func=_cmd_embed)
    _embed_arguments(p)
    p = add_command(
        subparsers, "neighbours", help="nearest neighbours and near-duplicates in an embeddings file (faiss)",
        description="Top-k cosine neighbours of every embedded image, or of --query images (embedded with the "
                    "backbone the manifest names), or --duplicates groups; writes a CSV and a page of thumbnails.",
        examples=["swavkit neighbours embeddings/a.npy --k 10 --out neighbours/a",
                  "swavkit neighbours embeddings/a.npy --query cat.jpg --out neighbours/cat",
                  "swavkit neighbours embeddings/a.npy --duplicates --threshold 0.95 --out duplicates/a"],
        func=_cmd_neighbours)
    _neighbours_arguments(p)


def _embed_arguments(parser) -> None:
    """The flags of ``swavkit embed``."""
    parser.add_argument("source", metavar="SOURCE", help="backbone: a run folder, an exported backbone folder, a "
                        "checkpoint, a released SwAV checkpoint, timm:<name> (random init) or pixels")
    parser.add_argument("data", nargs="+", metavar="DATA", help="image folder(s), .txt/.csv list(s) of image paths, "
                        "or tar shards (a pattern ending in .tar)")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="FILE.npy (+ FILE.paths.txt) or FILE.parquet (pyarrow), + FILE.json manifest")
    parser.add_argument("--image-size", type=positive_int, default=None, metavar="PX",
                        help="input side (default: the export's input size, else the checkpoint's large crop)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass (default 256)")
    parser.add_argument("--workers", "--num-workers", dest="workers", type=non_negative_int, default=workers_default(),
                        metavar="N", help="DataLoader decoding processes; 0 decodes in this process")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: the GPU when "
                                                          "there is one)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto = bf16 autocast on GPUs that support it, fp32 on CPU")
    parser.add_argument("--channels-last", action="store_true", help="NHWC (faster convnets on GPUs)")
    parser.add_argument("--chunk-images", type=positive_int, default=DEFAULT_CHUNK_IMAGES, metavar="N",
                        help=f"images per resumable chunk (default {DEFAULT_CHUNK_IMAGES}; shards: one per shard)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_embed(args) -> int:
    """``swavkit embed``: embed, then one summary line."""
    result = embed(args.source, args.data, args.out, image_size_px=args.image_size, batch_size=args.batch_size,
                   num_workers=args.workers, device=args.device, precision=args.precision,
                   channels_last=args.channels_last, chunk_images=args.chunk_images, progress=not args.no_progress)
    resumed = f", {result.resumed_chunks} chunk(s) from the earlier run" if result.resumed_chunks else ""
    skipped = f", {result.n_skipped} unreadable listed in {printable_path(result.skipped)}" if result.n_skipped else ""
    print(f"{result.n_rows} images -> {printable_path(result.vectors)} ({result.n_rows} x {result.feature_dim} "
          f"float32, L2-normalised{resumed}{skipped}); manifest {printable_path(result.manifest)}")
    return 0


def _neighbours_arguments(parser) -> None:
    """The flags of ``swavkit neighbours``."""
    parser.add_argument("embeddings", metavar="EMBEDDINGS", help="what swavkit embed wrote: FILE.npy, "
                                                                 "FILE.parquet or FILE.json")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for neighbours.csv or duplicates.csv, index.html and thumbs/ (new, empty, or an "
                             "earlier output of this command)")
    parser.add_argument("--k", type=positive_int, default=10, metavar="N", help="neighbours per query (default 10)")
    parser.add_argument("--query", nargs="+", metavar="IMG", help="image file(s) to search for, embedded with the "
                                                                  "backbone the manifest names")
    parser.add_argument("--duplicates", action="store_true",
                        help="groups of images whose cosine is >= --threshold (connected components)")
    parser.add_argument("--threshold", type=float, default=0.95, metavar="T",
                        help="cosine for --duplicates (default 0.95)")
    parser.add_argument("--index", default="auto", choices=INDEX_KINDS,
                        help=f"faiss index: auto = exact up to {EXACT_MAX_VECTORS:,} vectors, else ivf "
                             f"(nprobe {IVF_DEFAULT_PROBE}); see benchmarks/README.md")
    parser.add_argument("--backbone", metavar="SRC", default=None,
                        help="where the manifest's backbone lives now, if it moved (its weights must be the same)")
    parser.add_argument("--device", default="auto", help="for --query: auto | cpu | cuda | cuda:N")
    parser.add_argument("--page-rows", type=positive_int, default=DEFAULT_PAGE_ROWS, metavar="N",
                        help=f"queries or groups shown on the page (default {DEFAULT_PAGE_ROWS}; the CSV has all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _cmd_neighbours(args) -> int:
    """``swavkit neighbours``: search, then a short summary."""
    result = neighbours(args.embeddings, args.out, k=args.k, queries=args.query, duplicates=args.duplicates,
                        threshold=args.threshold, index=args.index, backbone=args.backbone, device=args.device,
                        page_rows=args.page_rows, progress=not args.no_progress)
    fewer = f" (--k {result['k_asked']}: there are not that many)" if result["k"] < result["k_asked"] else ""
    found = (f"{result['n_groups']} near-duplicate groups" if "n_groups" in result
             else f"{result['k']} neighbours{fewer} of {result['n_queries']} queries")
    print(f"{found} among {result['n_vectors']} images ({result['index']}); wrote {printable_path(result['csv'])}")
    print(f"open {printable_path(os.path.abspath(result['page']))}")
    return 0
