"""Rebuild swavkit/sample_data/fashion_mnist: a class-balanced Fashion-MNIST sample bundled with swavkit.

    python scripts/make_fashion_sample.py ../shared/data/fashion-mnist

Takes the first N images of each class (in file order) from the official train and t10k IDX files and
writes 28x28 grey PNGs as train/<class>/<index>.png and val/<class>/<index>.png. Pretraining reads
train/ and ignores the class folders; the labels are there for k-NN monitoring and evaluation only.
"""

import argparse
import gzip
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    n_dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(n_dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * n_dims).reshape(shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="folder with the Fashion-MNIST IDX .gz files")
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[1] / "swavkit" / "sample_data" / "fashion_mnist")
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--val-per-class", type=int, default=50)
    args = parser.parse_args()
    shutil.rmtree(args.dest, ignore_errors=True)
    for split, prefix, per_class in (("train", "train", args.train_per_class), ("val", "t10k", args.val_per_class)):
        images = read_idx(args.source / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(args.source / f"{prefix}-labels-idx1-ubyte.gz")
        for label, name in enumerate(CLASSES):
            folder = args.dest / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in np.flatnonzero(labels == label)[:per_class]:
                Image.fromarray(images[index], mode="L").save(folder / f"{index:05d}.png", optimize=True)
    shutil.copy(args.source / "COPYRIGHT", args.dest / "COPYRIGHT")
    (args.dest / "README.md").write_text(
        "Class-balanced sample of Fashion-MNIST (Zalando Research, MIT licence, see COPYRIGHT), made by\n"
        f"scripts/make_fashion_sample.py: the first {args.train_per_class} train and {args.val_per_class} test "
        "images of each class, as 28x28 grey PNG.\n")


if __name__ == "__main__":
    main()
