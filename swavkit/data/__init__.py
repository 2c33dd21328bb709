"""Images from folders: finding them, decoding them safely, the datasets built on them, and how their
names are written out. One concept per module:

* ``folders``: the one folder walker of every command (symlinks followed without looping), class folders.
* ``images``: decoding. Only the formats swavkit supports (never EPS and the like, whatever the file's
  extension), one pixel limit, every mode (grey, palette, alpha, CMYK, 16-bit) to 8-bit RGB.
* ``datasets``: UnlabeledImageFolder (pretraining reads flat or nested folders, class folders ignored),
  ImageFiles / LabelledImageFolder (evaluation, cluster explorer), and ReadOrReport, the one wrapper that
  turns an unreadable file into a report instead of an exception inside a worker.
* ``names``: the printable, reversible form of file names (terminal, skipped.txt, CSV, HTML) and the
  skipped-files report.
* ``sampling``: per-sample augmentation seeds and the epoch sampler (resume and distributed runs see the
  crops of one uninterrupted process).
* ``transforms``: the evaluation transform.
* ``filelist``: the compact path list (PathList) every worker shares, .txt/.csv list files, the run
  folder's cached list (``files.npz``).
* ``sources``: what data.path / data.paths name (folders, list files, shards) resolved to images.
* ``device_decode``: data.decode_on_device, JPEGs handed over encoded and decoded + cut in batches on the
  training device.
"""

from swavkit.data.datasets import (ImageFiles, LabelledImageFolder, ReadBatch, ReadOrReport, UnlabeledImageFolder,
                                   collate_read_or_report, raise_for_unreadable)
from swavkit.data.errors import DataError
from swavkit.data.filelist import PathList, read_list_file
from swavkit.data.folders import BUNDLED_SAMPLE, find_classes, find_images, walk_images
from swavkit.data.images import (IMAGE_EXTENSIONS, IMAGE_FORMATS, MAX_IMAGE_PIXELS, ImageTooLarge, UnreadableImage,
                                 check_readable, open_image, read_rgb)
from swavkit.data.names import append_skipped_report, path_from_printable, printable_path, read_skipped_report
from swavkit.data.sampling import EpochSampler, sample_seed
from swavkit.data.transforms import eval_transform

__all__ = ["DataError", "UnreadableImage", "ImageTooLarge", "IMAGE_EXTENSIONS", "IMAGE_FORMATS", "MAX_IMAGE_PIXELS",
           "BUNDLED_SAMPLE", "walk_images", "find_images", "find_classes", "open_image", "read_rgb",
           "check_readable", "ImageFiles", "LabelledImageFolder", "UnlabeledImageFolder", "ReadOrReport", "ReadBatch",
           "collate_read_or_report", "raise_for_unreadable", "printable_path", "path_from_printable",
           "append_skipped_report", "read_skipped_report", "EpochSampler", "sample_seed", "eval_transform",
           "PathList", "read_list_file"]
