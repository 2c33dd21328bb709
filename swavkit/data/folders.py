"""Finding images: the one folder walker every command uses, and the class folders of a labelled tree.

Symlinks are followed (data sets are often assembled from links), but each real folder is read once,
and never one that holds the folder being walked: a link back up the tree (to the walked folder or any
folder above it) or a second link to a folder already read adds nothing, where following it would repeat
images (about 40 times, until the OS refuses the path), pull in the neighbouring class folders, or never
end. Hidden files and folders (".thumbnails", ".ipynb_checkpoints") are ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

from swavkit.errors import DataError
from swavkit.data.images import IMAGE_EXTENSIONS
from swavkit.data.names import printable_path

# Class-balanced Fashion-MNIST sample (MIT, see its COPYRIGHT): train/<class>/*.png and val/<class>/*.png.
BUNDLED_SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "fashion_mnist"


def _folders_above(real_folder: str) -> list[str]:
    """The parents of an absolute, resolved folder, nearest first, up to the file-system root."""
    parents = []
    while (parent := os.path.dirname(real_folder)) != real_folder:
        parents.append(parent)
        real_folder = parent
    return parents


def walk_images(folder: str | os.PathLike) -> list[str]:
    """Sorted paths of the image files under ``folder`` (recursively; see the module docstring for links
    and hidden files); [] when there are none. Folders that cannot be listed are passed over."""
    found: list[str] = []
    seen = set(_folders_above(os.path.realpath(folder)))  # reaching one of them again is a loop
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=lambda err: None):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree, or a second link to a folder already read
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        found += [os.path.join(dirpath, name) for name in filenames
                  if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
    return sorted(found)


def find_images(root: str | os.PathLike) -> list[str]:
    """Sorted paths of all images under ``root`` (see :func:`walk_images`).

    Raises DataError for a missing folder, a file given instead of a folder, or no images at all.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data.path: folder {printable_path(root)} does not exist")
    if not root.is_dir():
        raise DataError(f"data.path: {printable_path(root)} is a file; give the folder that holds the images")
    found = walk_images(root)
    if not found:
        raise DataError(f"data.path: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {printable_path(root)}")
    return found


def find_classes(root: str | os.PathLike) -> list[str]:
    """Sorted names of the class folders of ``root``; DataError (naming the folder) if there are none.

    A link inside ``root`` that points back to ``root`` or above it is a loop, not a class, and is left out.
    """
    root = Path(root)
    shown = printable_path(root)
    if not root.exists():
        raise DataError(f"{shown}: folder does not exist (expected {shown}/<class>/<image>)")
    if not root.is_dir():
        raise DataError(f"{shown}: is a file; give a folder laid out as <folder>/<class>/<image>")
    real_root = os.path.realpath(root)
    loops = {real_root, *_folders_above(real_root)}
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith(".")
                     and os.path.realpath(entry.path) not in loops)
    if not classes:
        raise DataError(f"{shown}: has no class folders (expected {shown}/<class>/<image>)")
    return classes
