"""Cluster explorer: which images did each SwAV prototype collect?

``explore_clusters`` runs a trained SwAVModel over an image folder and writes to ``out_dir``:

* ``assignments.csv``: one row per readable image: ``path`` (absolute, in swavkit's printable form:
  control characters and bytes that are not UTF-8 backslash-escaped; ``swavkit.data.path_from_printable``
  gives the exact name back), ``cluster`` (argmax prototype, 0..K-1), ``confidence`` (the soft code of
  that prototype, in (0, 1]);
* ``cluster_sizes.png``: images per prototype, largest first, drawn with PIL only;
* ``index.html`` + ``thumbs/``: a static page (no server, no network, opens from disk) with a summary
  and a grid of each used prototype's most confident images (file names in the printable form).

Soft code = softmax(scores / temperature) with the checkpoint's ``swav.temperature``: the model's own
prediction p in the swapped-prediction loss (SwAV eq. 2), defined per image. We deliberately do not use
Sinkhorn codes here: they equipartition a batch, so an image's code would depend on which other images
share its batch and on the batch size, and the enforced equal cluster sizes would hide exactly what an
explorer should reveal (dominant or empty prototypes).
"""

from __future__ import annotations

import csv
import html
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader
from tqdm import tqdm

from swavkit.artifacts import pages
from swavkit.artifacts.pages import (EAGER_THUMBNAILS, PAGE_FILE, THUMBS_DIR, page_head, thumbnail_figure,
                                     write_thumbnail)
from swavkit.config import from_dict
from swavkit.data import (ImageFiles, ReadOrReport, UnreadableImage, collate_read_or_report, find_images,
                          printable_path)
from swavkit.errors import DataError
from swavkit.runtime.device import resolve_device
from swavkit.runtime.fileio import atomic_writer, removed_on_failure, write_text_atomic
from swavkit.data.transforms import Preprocessing
from swavkit.data.constants import eval_size_px

HISTOGRAM_FILE = "cluster_sizes.png"
ASSIGNMENTS_FILE = "assignments.csv"
OUTPUT_NAMES = (HISTOGRAM_FILE, ASSIGNMENTS_FILE, PAGE_FILE, THUMBS_DIR)
PAGE_MARKER = '<meta name="generator" content="swavkit cluster explorer">'  # how a rerun knows the folder


def check_output_folder(out_dir: Path, data_dir: str, *, output_names: tuple[str, ...] = OUTPUT_NAMES,
                        page_marker: str = PAGE_MARKER, page_file: str = PAGE_FILE) -> None:
    """:func:`swavkit.artifacts.pages.check_output_folder` with the explorer's names and page marker
    (``cluster --k`` and ``assign`` pass their own)."""
    pages.check_output_folder(out_dir, data_dir, output_names=output_names, page_marker=page_marker,
                              page_file=page_file)


# ----------------------------------------------------------------------------------------------------
# assignment

@dataclass
class ClusterAssignments:
    """Hard and soft assignment of every readable image of a folder.

    ``paths`` [N] are in ``find_images`` order; ``clusters`` [N] int64 holds each image's argmax
    prototype; ``confidences`` [N] float32 the soft code of that prototype; ``skipped`` lists the
    (path, reason) of unreadable files.
    """
    paths: list[str]
    clusters: torch.Tensor
    confidences: torch.Tensor
    n_prototypes: int
    skipped: list[tuple[str, str]]

    def sizes(self) -> torch.Tensor:
        """[K] int64: images assigned to each prototype."""
        return torch.bincount(self.clusters, minlength=self.n_prototypes)


def soft_codes(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, K] cosine scores -> [B, K] soft codes softmax(scores / temperature); rows sum to 1."""
    return torch.softmax(scores.float() / temperature, dim=1)


@torch.inference_mode()
def assign_clusters(model, paths: list[str], transform, *, temperature: float, batch_size: int = 128,
                    device: str | torch.device = "cpu", num_workers: int = 0,
                    progress: bool = True) -> ClusterAssignments:
    """Run ``model`` (a SwAVModel) over ``paths`` and assign each image to a prototype.

    Puts the model in eval mode on ``device`` and projects its prototypes onto the unit sphere (in place).

    Args:
        transform: PIL image -> [3, s, s] normalised tensor (e.g. ``Preprocessing.for_size(...).transform()``).
        temperature: softmax temperature of the soft codes (the config's ``swav.temperature``).
        device: as :func:`swavkit.runtime.device.resolve_device`.
    """
    device = resolve_device(device)
    model.to(device).eval()
    # Training normalises the prototypes before each step, so the saved ones are one update off the
    # unit sphere; normalising makes the scores true cosines, as in training.
    model.prototypes.normalize_()
    # Unreadable files are not replaced by a neighbour (as in pretraining): every row must be the image
    # it names.
    loader = DataLoader(ReadOrReport(ImageFiles(paths, transform=transform)), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, collate_fn=collate_read_or_report,
                        pin_memory=device.type == "cuda")
    kept_indices, clusters, confidences, skipped = [], [], [], []
    with tqdm(total=len(paths), desc="assigning", unit="img", disable=not progress) as bar:
        for indices, images, _, batch_skipped in loader:
            skipped += batch_skipped
            if images is not None:
                _, scores = model(images.to(device, non_blocking=True))  # [B, K]
                confidence, cluster = soft_codes(scores, temperature).max(dim=1)
                kept_indices.append(indices)
                clusters.append(cluster.cpu())
                confidences.append(confidence.cpu())
            bar.update(len(indices) + len(batch_skipped))
    if not kept_indices:
        example = f", e.g. {UnreadableImage(*skipped[0])}" if skipped else ""
        raise DataError(f"none of the {len(paths)} image files could be read{example}")
    kept = torch.cat(kept_indices).tolist()
    return ClusterAssignments(paths=[paths[i] for i in kept], clusters=torch.cat(clusters),
                              confidences=torch.cat(confidences), n_prototypes=model.n_prototypes,
                              skipped=skipped)


def top_members(assignments: ClusterAssignments, per_cluster: int) -> dict[int, list[int]]:
    """{cluster: indices into ``assignments.paths`` of its ``per_cluster`` most confident images},
    most confident first (ties keep folder order); only clusters with at least one image."""
    order = torch.argsort(assignments.confidences, descending=True, stable=True).tolist()
    members: dict[int, list[int]] = {}
    clusters = assignments.clusters.tolist()
    for i in order:
        chosen = members.setdefault(clusters[i], [])
        if len(chosen) < per_cluster:
            chosen.append(i)
    return members


# ----------------------------------------------------------------------------------------------------
# outputs

def write_assignments_csv(assignments: ClusterAssignments, path: str | Path) -> Path:
    """``path,cluster,confidence`` with one row per readable image, in folder order; paths in the
    printable form (see swavkit.data.names), so any file name is written and read back exactly."""
    path = Path(path)
    with atomic_writer(path, "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "cluster", "confidence"])
        for image_path, cluster, confidence in zip(assignments.paths, assignments.clusters.tolist(),
                                                   assignments.confidences.tolist()):
            writer.writerow([printable_path(image_path), cluster, f"{confidence:.6f}"])
    return path


def _font(size_px: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size_px)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def draw_size_histogram(sizes: torch.Tensor, path: str | Path, *, width_px: int = 900,
                        height_px: int = 360, unit: str = "prototype") -> Path:
    """Bar chart of images per prototype (``unit``; [K] counts), largest first, empty ones shaded, as PNG.

    Sorted bars (a rank-size plot) show at a glance whether a few prototypes took most images and how
    many got none, which a plot in prototype-index order hides once K is in the thousands.
    """
    counts = sorted(sizes.tolist(), reverse=True)
    K, used, n_images = len(counts), sum(1 for c in counts if c > 0), sum(counts)
    peak = max(counts[0], 1)
    left, right, top, bottom = 64, 20, 44, 52
    plot_w, plot_h = width_px - left - right, height_px - top - bottom
    image = Image.new("RGB", (width_px, height_px), "white")
    draw = ImageDraw.Draw(image)
    title_font, font = _font(16), _font(12)

    draw.text((left, 12), f"images per {unit}: {n_images} images, {used} of {K} {unit}s used",
              fill="black", font=title_font)
    bar_w = plot_w / K
    if used < K:  # shade the empty prototypes so "unused" is visible even where bars are sub-pixel
        draw.rectangle([left + used * bar_w, top, left + plot_w, top + plot_h], fill=(238, 238, 238))
        draw.text((left + used * bar_w + 4, top + 4), f"{K - used} empty", fill=(120, 120, 120), font=font)
    # Axes before bars: with K in the thousands a bar is one pixel wide and the largest one would
    # otherwise vanish under the y axis.
    draw.line([left, top, left, top + plot_h, left + plot_w, top + plot_h], fill="black")
    for rank, count in enumerate(counts[:used]):
        x0 = left + rank * bar_w
        # Leave a 1 px gap between bars only where bars are wide enough to show it.
        x1 = max(x0, x0 + bar_w - (1 if bar_w >= 3 else 0) - 1)
        draw.rectangle([x0, top + plot_h * (1 - count / peak), x1, top + plot_h], fill=(52, 101, 164))

    for tick in sorted({0, peak // 2, peak}):  # whole images only
        y = top + plot_h * (1 - tick / peak)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((left - 8, y), str(tick), fill="black", font=font, anchor="rm")
    draw.text((left + plot_w / 2, top + plot_h + 16), f"{unit}s, largest first (K = {K})",
              fill="black", font=font, anchor="mt")
    draw.text((left - 8, top - 8), "images", fill="black", font=font, anchor="rb")
    path = Path(path)
    with atomic_writer(path) as handle:
        image.save(handle, "PNG")
    return path


def render_page(assignments: ClusterAssignments, members: dict[int, list[int]], thumbnails: dict[int, str],
                *, data_dir: str, checkpoint: str, temperature: float, image_size_px: int,
                page_dir: str | None = None, unit: str = "prototype", confidence_text: str | None = None) -> str:
    """The self-contained ``index.html``: summary, histogram, then one section per used prototype.

    ``thumbnails`` maps an index into ``assignments.paths`` to its thumbnail path relative to the page.
    Every link is relative: thumbnails, CSV and histogram live next to the page, and each thumbnail links
    to its original image by a path relative to ``page_dir`` (the page's folder; None = no such link).
    Every path and name that comes from the file system is shown in swavkit's printable form
    (swavkit.data.names) and HTML-escaped. ``unit`` names a cluster ("prototype", or "k-means group") and
    ``confidence_text`` says what the confidence is (default: the soft code at ``temperature``).
    """

    def esc(text: str) -> str:  # a file name can hold any bytes: printable first, then HTML-safe
        return html.escape(printable_path(text))

    sizes = assignments.sizes().tolist()
    K, n_images = assignments.n_prototypes, len(assignments.paths)
    ordered = sorted(members, key=lambda c: (-sizes[c], c))  # largest cluster first
    confidences = assignments.confidences
    # One pass over N, not one mask per cluster (N x K is 3e9 for a million images and 3000 prototypes).
    confidence_sums = torch.bincount(assignments.clusters, weights=confidences.double(), minlength=K).tolist()

    skipped_html = f"{len(assignments.skipped)}"
    if assignments.skipped:
        items = "".join(f"<li>{esc(path)} <small>({esc(reason)})</small></li>" for path, reason in assignments.skipped)
        skipped_html = f"<details><summary>{len(assignments.skipped)} unreadable</summary><ul>{items}</ul></details>"
    out = [
        *page_head(f"SwAV clusters of {os.path.basename(data_dir.rstrip(os.sep)) or data_dir}", PAGE_MARKER),
        "<h1>SwAV cluster explorer</h1>",
        '<table class="summary">',
        f"<tr><td>images</td><td>{n_images}</td></tr>",
        f"<tr><td>clusters used</td><td>{len(ordered)} of {K} {esc(unit)}s</td></tr>",
        f"<tr><td>skipped files</td><td>{skipped_html}</td></tr>",
        f"<tr><td>data</td><td>{esc(data_dir)}</td></tr>",
        f"<tr><td>checkpoint</td><td>{esc(checkpoint)}</td></tr>",
        f"<tr><td>confidence</td><td>{esc(confidence_text or f'softmax(cosine scores / {temperature:g}) at the assigned prototype')}; "
        f"model input {image_size_px} x {image_size_px} px centre crop</td></tr>",
        f'<tr><td>files</td><td><a href="{ASSIGNMENTS_FILE}">{ASSIGNMENTS_FILE}</a> (every image), '
        f'<a href="{HISTOGRAM_FILE}">{HISTOGRAM_FILE}</a></td></tr>',
        "</table>",
        f'<img class="histogram" src="{HISTOGRAM_FILE}" alt="images per {esc(unit)}">',
        "<nav>" + "".join(f'<a href="#cluster-{c}">{c} <small>({sizes[c]})</small></a>' for c in ordered) + "</nav>",
    ]
    shown = 0
    for c in ordered:
        top = members[c]
        more = sizes[c] - len(top)
        note = f", top {len(top)} shown" if more > 0 else ""
        out.append(f'<section class="cluster" id="cluster-{c}">')
        out.append(f"<h2>cluster {c} <small>{sizes[c]} image{'s' if sizes[c] != 1 else ''}{note}, "
                   f"mean confidence {confidence_sums[c] / sizes[c]:.2f}</small></h2>")
        out.append('<div class="grid">')
        for i in top:
            path = assignments.paths[i]
            relative = os.path.relpath(path, data_dir)
            confidence = float(confidences[i])
            label = f"{relative} (confidence {confidence:.3f})"
            out.append(thumbnail_figure(path, relative, label, f"{confidence:.2f}", thumbnails.get(i),
                                        page_dir=page_dir, lazy=shown >= EAGER_THUMBNAILS))
            shown += i in thumbnails
        out.append("</div></section>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------
# public entry point

def explore_clusters(checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path, *,
                     top_per_cluster: int = 16, batch_size: int = 128, device: str = "cpu",
                     num_workers: int = 0, image_size_px: int | None = None, progress: bool = True) -> dict:
    """Assign every image of ``data_dir`` to a prototype of ``checkpoint`` and write the explorer files.

    Args:
        checkpoint: a swavkit training checkpoint (``checkpoints/last.pt``) or a released SwAV checkpoint.
        data_dir: folder of images, flat or nested; unreadable files are skipped and listed.
        out_dir: created if needed; receives assignments.csv, cluster_sizes.png, index.html, thumbs/.
        top_per_cluster: thumbnails per cluster on the page (the CSV always lists every image).
        device: "cpu", "cuda", "cuda:1" ... or "auto" (CUDA when available).
        image_size_px: side of the centre crop fed to the model; default the checkpoint's large crop
            size (``crops.sizes_px[0]``; 224 for released checkpoints).

    Returns:
        {"n_images", "n_skipped", "skipped" [(path, reason)], "n_prototypes", "clusters_used",
        "cluster_sizes" [K], "image_size_px", "temperature", "assignments_csv", "histogram_png",
        "index_html"} (paths as strings).
    """
    from swavkit.artifacts.pretrained import LoadError, load_swav_model  # heavy (timm registry); only when needed

    if top_per_cluster < 1:
        raise ValueError(f"top_per_cluster: must be >= 1, got {top_per_cluster}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if image_size_px is not None and image_size_px < 1:
        raise ValueError(f"image_size_px: must be >= 1, got {image_size_px}")
    data_dir = os.path.abspath(data_dir)
    paths = find_images(data_dir)  # DataError for a missing/empty folder, before the model loads
    out_dir = Path(out_dir)
    check_output_folder(out_dir, data_dir)
    device = resolve_device(device)

    model, config = load_swav_model(checkpoint)
    cfg = from_dict(config)
    if (cfg.data.channels, cfg.data.bit_depth) != (3, 8):  # not yet: thumbnails and decoding here are 8-bit RGB
        raise LoadError(f"{printable_path(str(checkpoint))}: trained with data.channels={cfg.data.channels} "
                        f"data.bit_depth={cfg.data.bit_depth}; the cluster explorer reads 8-bit RGB images only")
    size_px = image_size_px or eval_size_px(cfg.crops.sizes_px)
    transform = Preprocessing.for_size(size_px, cfg.crops.mean, cfg.crops.std).transform()
    temperature = cfg.swav.temperature

    assignments = assign_clusters(model, paths, transform, temperature=temperature, batch_size=batch_size,
                                  device=device, num_workers=num_workers, progress=progress)
    return write_explorer(assignments, out_dir, data_dir=data_dir, checkpoint=str(checkpoint),
                          top_per_cluster=top_per_cluster, progress=progress, temperature=temperature,
                          image_size_px=size_px)


def write_explorer(assignments: ClusterAssignments, out_dir: Path, *, data_dir: str, checkpoint: str,
                   top_per_cluster: int, progress: bool, temperature: float, image_size_px: int,
                   unit: str = "prototype", confidence_text: str | None = None) -> dict:
    """Write the CSV, the size histogram, the thumbnails and the page of ``assignments`` into ``out_dir``
    (prototype clusters, or k-means groups: ``unit`` and ``confidence_text`` as in :func:`render_page`);
    returns the summary dict of :func:`explore_clusters`."""
    with removed_on_failure(out_dir):  # a new folder that could not be finished is not left to block the rerun
        (out_dir / THUMBS_DIR).mkdir(parents=True, exist_ok=True)
        csv_path = write_assignments_csv(assignments, out_dir / ASSIGNMENTS_FILE)
        sizes = assignments.sizes()
        histogram_path = draw_size_histogram(sizes, out_dir / HISTOGRAM_FILE, unit=unit)
        members = top_members(assignments, top_per_cluster)
        thumbnails: dict[int, str] = {}
        chosen = sorted(i for top in members.values() for i in top)
        width = len(str(len(assignments.paths)))
        for i in tqdm(chosen, desc="thumbnails", unit="img", disable=not progress):
            name = f"{THUMBS_DIR}/{i:0{width}d}.jpg"  # digits only: nothing to escape, no clashes
            if write_thumbnail(assignments.paths[i], out_dir / name):
                thumbnails[i] = name
        page = render_page(assignments, members, thumbnails, data_dir=data_dir, checkpoint=checkpoint,
                           temperature=temperature, image_size_px=image_size_px, page_dir=str(out_dir), unit=unit,
                           confidence_text=confidence_text)
        page_path = write_text_atomic(out_dir / PAGE_FILE, page)

    return {"n_images": len(assignments.paths), "n_skipped": len(assignments.skipped),
            "skipped": assignments.skipped, "n_prototypes": assignments.n_prototypes,
            "clusters_used": int((sizes > 0).sum()), "cluster_sizes": sizes.tolist(),
            "image_size_px": image_size_px, "temperature": temperature, "assignments_csv": str(csv_path),
            "histogram_png": str(histogram_path), "index_html": str(page_path)}


__all__ = ["ClusterAssignments", "assign_clusters", "soft_codes", "top_members", "write_assignments_csv",
           "draw_size_histogram", "render_page", "page_head", "thumbnail_figure", "explore_clusters"]
