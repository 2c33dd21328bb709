"""``data.decode_on_device``: JPEG files decoded in the training process, a batch at a time, on its device.

Why: on a GPU node the data workers spend most of their time in the JPEG decoder (an ImageNet-sized JPEG
is ~5 ms of one core, and the paper's 8 crops need ~1,000 images/s per GPU); nvJPEG decodes a batch on
the GPU. The split of work:

* **worker** (:func:`read_encoded`, :class:`EncodedCrops`, :func:`collate_encoded`): reads the file,
  checks its header as every command does (swavkit's formats and pixel limit, :func:`~swavkit.data.images.
  open_image`), and for a plain JPEG (RGB or grey, no EXIF rotation, not cut short) keeps the encoded
  bytes and draws the crops' geometry and colour parameters from the per-sample seeded generator - the
  same single draw as the PIL route (``MultiCropTransform.geometry``), so the crops are a function of
  (seed, epoch, index) exactly as there. Any other file (PNG, CMYK or rotated JPEG, ...) is decoded and
  cut with PIL in the worker as today.
* **training process** (:func:`decode_batch`): ``torchvision.io.decode_jpeg`` on the list of byte
  tensors (nvJPEG on CUDA, libjpeg-turbo on a CPU), then every crop cut and resized (bilinear,
  antialiased, like PIL's) and flipped on the device, spliced with the worker-cut crops into the groups
  ``MultiCropTransform.finish`` takes (the colour half then runs on the device too).

**Unreadable files.** A file whose header cannot be read is skipped in the worker as on the PIL route
(replaced by the next readable file). A JPEG whose header is fine but whose data the decoder refuses is
found only in the training process: the batch is decoded again one image at a time, the failing file is
listed in ``skipped.txt`` and its place in the batch is taken by the crops of the next decodable image of
the batch (as a bad member of a tar shard is), so a batch keeps its size.

**Pixels.** libjpeg-turbo (torchvision) and Pillow's decoder can round a few levels apart, and nvJPEG a
few more, so the crops are close to, not bit-identical with, the PIL route's (tests/test_gpu_decode.py
states the measured difference); geometry, flips and colour parameters are identical.
"""

from __future__ import annotations

import io
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from swavkit.errors import DataError
from swavkit.data.images import UnreadableImage, describe_failure, open_image, read_rgb_bytes
from swavkit.data.names import printable_path

EXIF_ORIENTATION_TAG = 0x0112
PLAIN_JPEG_MODES = ("RGB", "L")  # what decode_jpeg(mode=RGB) turns into the RGB Pillow's convert gives
SOS, EOI = b"\xff\xda", b"\xff\xd9"  # JPEG markers: start of scan, end of image


def resolve_decode_on_device(value: str, device: torch.device) -> bool:
    """data.decode_on_device (auto | true | false) -> bool. auto is off until benchmarks/bench_gpu_pipeline.py
    has measured it on a GPU; true works on any device (on a CPU the training process decodes)."""
    return value == "true"


# ----------------------------------------------------------------------------------------------------
# worker side

class EncodedJpeg(NamedTuple):
    """A JPEG file kept encoded: its bytes and the size its header gives."""
    data: torch.Tensor  # [n_bytes] uint8
    width: int
    height: int
    name: str  # the path (or shard member) it came from, for skipped.txt


def _is_complete(data: bytes) -> bool:
    # A file cut short has no end-of-image marker after its last start-of-scan (0xFF is stuffed inside
    # the coded data, so neither marker occurs there). nvJPEG would decode such a file with a grey
    # bottom where Pillow refuses it; checking here keeps both routes refusing the same files.
    return data.rfind(EOI) > data.rfind(SOS) >= 0


def encoded_or_rgb(data: bytes, name: str) -> EncodedJpeg | Image.Image:
    """Image file bytes -> EncodedJpeg for a plain JPEG (RGB or grey, no EXIF rotation, complete), else
    the RGB PIL image :func:`~swavkit.data.images.read_rgb_bytes` decodes. UnreadableImage (naming
    ``name``) for what every command refuses: a header that cannot be read, too many pixels, ..."""
    try:
        with open_image(io.BytesIO(data)) as image:
            plain = (image.format == "JPEG" and image.mode in PLAIN_JPEG_MODES
                     and image.getexif().get(EXIF_ORIENTATION_TAG, 1) == 1 and _is_complete(data))
            width, height = image.size
    except Exception as err:  # the same failures read_rgb reports
        raise UnreadableImage(name, describe_failure(err)) from err
    if not plain:
        return read_rgb_bytes(data, name)
    return EncodedJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), width, height, os.fsdecode(name))


def read_encoded(path: str | os.PathLike) -> EncodedJpeg | Image.Image:
    """:func:`encoded_or_rgb` of a file (the ``reader`` of UnlabeledImageFolder on this route)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise UnreadableImage(path, describe_failure(err)) from err
    return encoded_or_rgb(data, path)


class EncodedSample(NamedTuple):
    """One image of the decode-on-device route as a worker hands it over. V = crops per image."""
    jpeg: EncodedJpeg | None  # None: the crops were cut in the worker (``pixels``)
    boxes: torch.Tensor  # [V, 4] int64 (left, top, right, bottom) in the image's pixels
    flips: torch.Tensor  # [V] bool
    params: torch.Tensor  # [V, N_PARAMS] colour parameters (swavkit.data.multicrop)
    pixels: list[torch.Tensor]  # V uint8 crops [3, s_v, s_v] from the PIL route; [] for a JPEG


class EncodedCrops:
    """The per-image transform of this route, around a MultiCropTransform: EncodedJpeg -> its crops'
    geometry and colour parameters (no pixels); a PIL image -> its crops cut by the MultiCropTransform."""

    def __init__(self, multicrop):
        self.multicrop = multicrop

    def __call__(self, image: EncodedJpeg | Image.Image) -> EncodedSample:
        if isinstance(image, EncodedJpeg):
            boxes, flips, params = zip(*self.multicrop.geometry(image.width, image.height))
            return EncodedSample(image, torch.tensor(boxes), torch.tensor(flips), torch.stack(params), [])
        crops = self.multicrop(image)
        n_views = len(crops)
        return EncodedSample(None, torch.zeros(n_views, 4, dtype=torch.long), torch.zeros(n_views, dtype=torch.bool),
                             torch.stack([p for _, p in crops]), [c for c, _ in crops])


class EncodedBatch(NamedTuple):
    """A batch of B EncodedSamples, J of them JPEGs (tensors only, so the DataLoader can pin them)."""
    data: torch.Tensor  # [sum of the J files' bytes] uint8, the JPEGs one after the other
    offsets: torch.Tensor  # [J + 1] int64: JPEG j is data[offsets[j]:offsets[j + 1]]
    jpeg_rows: torch.Tensor  # [J] int64: each JPEG's row in the batch
    sizes: torch.Tensor  # [J, 2] int64 (height, width) from the headers
    boxes: torch.Tensor  # [J, V, 4] int64
    flips: torch.Tensor  # [J, V] bool
    names: list[str]  # [J] for skipped.txt
    params: torch.Tensor  # [B, V, N_PARAMS]
    pixel_rows: torch.Tensor  # [B - J] int64: the rows cut in the workers
    pixels: list[torch.Tensor]  # V uint8 [B - J, 3, s_v, s_v]


def collate_encoded(items) -> tuple[EncodedBatch, torch.Tensor, list[tuple[str, str]]]:
    """[(EncodedSample, index, skipped)] from UnlabeledImageFolder / ShardStream -> (EncodedBatch,
    indices [B], skipped), the triple the other collates give; :func:`decode_batch` makes the crops."""
    samples = [item[0] for item in items]
    jpeg_rows = [row for row, s in enumerate(samples) if s.jpeg is not None]
    pixel_rows = [row for row, s in enumerate(samples) if s.jpeg is None]
    jpegs = [samples[row].jpeg for row in jpeg_rows]
    lengths = torch.tensor([0] + [j.data.numel() for j in jpegs], dtype=torch.long)
    n_views = len(samples[0].params)

    def stack(rows, field, empty):
        return torch.stack([getattr(samples[r], field) for r in rows]) if rows else empty

    batch = EncodedBatch(
        data=torch.cat([j.data for j in jpegs]) if jpegs else torch.zeros(0, dtype=torch.uint8),
        offsets=lengths.cumsum(0), jpeg_rows=torch.tensor(jpeg_rows, dtype=torch.long),
        sizes=torch.tensor([[j.height, j.width] for j in jpegs], dtype=torch.long).view(-1, 2),
        boxes=stack(jpeg_rows, "boxes", torch.zeros(0, n_views, 4, dtype=torch.long)),
        flips=stack(jpeg_rows, "flips", torch.zeros(0, n_views, dtype=torch.bool)),
        names=[j.name for j in jpegs], params=torch.stack([s.params for s in samples]),
        pixel_rows=torch.tensor(pixel_rows, dtype=torch.long),
        pixels=[torch.stack([samples[r].pixels[v] for r in pixel_rows]) if pixel_rows else torch.zeros(0)
                for v in range(n_views)])
    return batch, torch.tensor([item[1] for item in items]), [entry for item in items for entry in item[2]]


# ----------------------------------------------------------------------------------------------------
# training-process side

def decode_jpegs(jpegs: list[torch.Tensor], device: torch.device | str) -> tuple[list[torch.Tensor | None], list[str]]:
    """Encoded JPEGs ([n_bytes] uint8 CPU tensors) -> (RGB images [3, H, W] uint8 on ``device``, None
    for one that does not decode; the decoder's reason for each failure, "" for a success). One batched
    decode_jpeg call; when it fails, one call per image, so one bad file costs only itself."""
    if not jpegs:
        return [], []
    try:
        return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)), [""] * len(jpegs)
    except torch.OutOfMemoryError:
        raise  # the device's fault, not a file's
    except Exception:  # some file of the batch: find which, one call each
        pass
    images, reasons = [], []
    for data in jpegs:
        try:
            images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            reasons.append("")
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            images.append(None)
            reasons.append(describe_failure(RuntimeError(str(err).rsplit(", ", 1)[-1])))  # drop the C++ source
    return images, reasons


def cut_crop(image: torch.Tensor, box: tuple[int, int, int, int], size_px: int) -> torch.Tensor:
    """image [3, H, W] uint8, PIL box (left, top, right, bottom) -> [3, size_px, size_px] uint8, resized
    bilinearly with antialiasing like PIL's ``resize(box=...)`` (torch's uint8 kernel on a CPU, which
    follows Pillow's; float then rounded elsewhere)."""
    left, top, right, bottom = box
    patch = image[None, :, top:bottom, left:right]
    if patch.device.type != "cpu":  # interpolate takes uint8 on the CPU only
        patch = patch.float()
    out = F.interpolate(patch, size=(size_px, size_px), mode="bilinear", antialias=True, align_corners=False)[0]
    return out if out.dtype == torch.uint8 else out.round_().clamp_(0, 255).to(torch.uint8)


def decode_and_crop(jpegs: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, sizes_px: list[int],
                    device: torch.device | str, expected_hw: torch.Tensor | None = None):
    """J encoded JPEGs and their crops -> (V uint8 crop tensors [J, 3, s_v, s_v] on ``device``, reasons [J]).

    ``boxes`` [J, V, 4] PIL boxes, ``flips`` [J, V] bool (horizontal flip after the resize), ``sizes_px``
    the V output sides; ``expected_hw`` [J, 2] the (height, width) the boxes were drawn for. Reason "" for
    an image that decoded; otherwise its row of every output is left as zeros.
    """
    images, reasons = decode_jpegs(jpegs, device)
    views = [torch.zeros(len(jpegs), 3, s, s, dtype=torch.uint8, device=device) for s in sizes_px]
    box_list, flip_list = boxes.tolist(), flips.tolist()
    for j, image in enumerate(images):
        if image is not None and expected_hw is not None and list(image.shape[1:]) != expected_hw[j].tolist():
            images[j], reasons[j] = None, (f"decoded {image.shape[2]} x {image.shape[1]} px, the header says "
                                           f"{int(expected_hw[j, 1])} x {int(expected_hw[j, 0])}")
        if images[j] is None:
            continue
        for v, size in enumerate(sizes_px):
            views[v][j] = cut_crop(images[j], box_list[j][v], size)
    for v in range(len(sizes_px)):
        rows = flips[:, v].nonzero().squeeze(1).to(device)
        if rows.numel():
            views[v][rows] = views[v][rows].flip(-1)
    return views, reasons


def decode_batch(batch: EncodedBatch, sizes_px: list[int], device: torch.device | str):
    """EncodedBatch -> (groups for ``MultiCropTransform.finish``, unreadable [(name, reason)]).

    Groups are one per resolution, as ``collate_pixels`` makes them: (uint8 crops [n_g * B, 3, s_g, s_g]
    view-major on ``device``, colour parameters [n_g * B, N_PARAMS] on the CPU, n_g). A JPEG that does
    not decode is replaced by the next decodable image of the batch (crops and parameters); DataError
    when none is.
    """
    device = torch.device(device)
    n_rows = len(batch.params)
    jpegs = [batch.data[int(a):int(b)] for a, b in zip(batch.offsets[:-1], batch.offsets[1:])]
    cut, reasons = decode_and_crop(jpegs, batch.boxes, batch.flips, sizes_px, device, batch.sizes)
    jpeg_rows = batch.jpeg_rows.to(device)
    views = []
    for v, size in enumerate(sizes_px):
        view = torch.empty(n_rows, 3, size, size, dtype=torch.uint8, device=device)
        view[jpeg_rows] = cut[v]
        if len(batch.pixel_rows):
            view[batch.pixel_rows.to(device)] = batch.pixels[v].to(device, non_blocking=True)
        views.append(view)
    params = batch.params
    bad = [int(batch.jpeg_rows[j]) for j, why in enumerate(reasons) if why]
    if bad:
        views, params = _replace_rows(views, params, bad, batch)
    return _group(views, params, sizes_px), [(batch.names[j], why) for j, why in enumerate(reasons) if why]


def _replace_rows(views: list[torch.Tensor], params: torch.Tensor, bad: list[int], batch: EncodedBatch):
    """Rows ``bad`` of every view (and their parameters) replaced by the next good row, cyclically."""
    good = sorted(set(range(len(params))) - set(bad))
    if not good:
        raise DataError(f"none of the {len(params)} images of a batch could be decoded on the device (first: "
                        f"{printable_path(batch.names[0])}); set data.decode_on_device=false to decode with PIL")
    source = torch.tensor([next((g for g in good if g > row), good[0]) for row in bad])
    target = torch.tensor(bad)
    params = params.clone()
    params[target] = params[source]
    for view in views:
        view[target.to(view.device)] = view[source.to(view.device)]
    return views, params


def _group(views: list[torch.Tensor], params: torch.Tensor, sizes_px: list[int]):
    """V views [B, 3, s_v, s_v] + parameters [B, V, N] -> collate_pixels' groups (consecutive equal sizes)."""
    groups, start = [], 0
    while start < len(sizes_px):
        end = start
        while end < len(sizes_px) and sizes_px[end] == sizes_px[start]:
            end += 1
        groups.append((torch.cat(views[start:end]), torch.cat([params[:, v] for v in range(start, end)]),
                       end - start))
        start = end
    return groups


__all__ = ["resolve_decode_on_device", "EncodedJpeg", "encoded_or_rgb", "read_encoded", "EncodedSample",
           "EncodedCrops", "EncodedBatch", "collate_encoded", "decode_jpegs", "cut_crop", "decode_and_crop",
           "decode_batch"]
