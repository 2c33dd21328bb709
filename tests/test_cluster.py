"""Cluster explorer: `swavkit cluster` on a tiny random checkpoint and a folder of generated images."""

from __future__ import annotations

import csv
import os
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bad_images import ODD_NAMES, EpsSpy, write_eps_as_jpg, write_just_over_limit_png
from swavkit.artifacts.checkpoint import CHECKPOINT_FORMAT
from swavkit.cli.main import main
from swavkit.config import from_dict, to_dict
from swavkit.data import MAX_IMAGE_PIXELS, eval_transform, path_from_printable, read_rgb
from swavkit.core.model import build_model

N_PROTOTYPES = 8
TOP_PER_CLUSTER = 4
ODD_NAME = "odd & <name>.png"  # paths must come out HTML-escaped
CORRUPT_NAME = "corrupt & <bad>.png"


def write_checkpoint(path: Path, seed_images: list[Path]) -> Path:
    """A swavkit training checkpoint (load_swav_model reads format/config/model) of an untrained resnet10t.

    An untrained network maps every image to nearly the same embedding, so random prototypes would put all
    images into one cluster; seeding the first prototypes with the embeddings of ``seed_images`` (as a
    k-means initialisation would) makes several clusters, each holding at least its seed image.
    """
    cfg = from_dict({"model": {"backbone": "resnet10t", "n_prototypes": N_PROTOTYPES, "hidden_dim": 32,
                               "output_dim": 16},
                     "crops": {"counts": [2, 2], "sizes_px": [32, 16]}})
    torch.manual_seed(0)
    model = build_model("resnet10t", n_prototypes=N_PROTOTYPES, hidden_dim=32, output_dim=16).eval()
    transform = eval_transform(32, cfg.crops.mean, cfg.crops.std, crop_fraction=1.0)
    with torch.no_grad():
        z, _ = model(torch.stack([transform(read_rgb(p)) for p in seed_images]))
        model.prototypes.weight[:len(seed_images)] = z
    torch.save({"format": CHECKPOINT_FORMAT, "config": to_dict(cfg), "step": 0, "model": model.state_dict()}, path)
    return path


def write_image_folder(root: Path) -> tuple[list[Path], Path]:
    """20 readable PNGs/JPEGs (flat and nested, varied colours and sizes) + one corrupt file."""
    rng = np.random.default_rng(0)
    readable = []
    for i in range(20):
        folder = root if i < 8 else root / f"group{i % 2}" / ("deep" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        name = ODD_NAME if i == 5 else f"img{i:02d}.{'jpg' if i % 4 == 0 else 'png'}"
        size_px = 24 + 4 * (i % 5)
        colour = rng.integers(0, 256, size=3)
        pixels = np.clip(colour + rng.normal(0, 30, (size_px, size_px + 6, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name)
        readable.append(folder / name)
    corrupt = root / "group0" / CORRUPT_NAME
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return readable, corrupt


@pytest.fixture(scope="module")
def explored(tmp_path_factory):
    """Runs the CLI once; the tests below read its outputs."""
    base = tmp_path_factory.mktemp("cluster")
    readable, corrupt = write_image_folder(base / "images")
    checkpoint = write_checkpoint(base / "last.pt", [readable[i] for i in (0, 5, 11, 16)])
    out = base / "out"
    run = subprocess.run([sys.executable, "-m", "swavkit", "cluster", "--checkpoint", str(checkpoint),
                          "--data", str(base / "images"), "--out", str(out), "--top", str(TOP_PER_CLUSTER),
                          "--batch-size", "8", "--device", "cpu", "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    with open(out / "assignments.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {"checkpoint": checkpoint, "data": base / "images", "readable": readable, "corrupt": corrupt,
            "out": out, "rows": rows, "stdout": run.stdout}


def test_csv_has_one_row_per_readable_image(explored):
    rows = explored["rows"]
    assert list(rows[0]) == ["path", "cluster", "confidence"]
    assert sorted(row["path"] for row in rows) == sorted(str(p) for p in explored["readable"])
    for row in rows:
        assert 0 <= int(row["cluster"]) < N_PROTOTYPES
        assert 0.0 < float(row["confidence"]) <= 1.0
    assert "20 images" in explored["stdout"] and "1 unreadable" in explored["stdout"]
    assert str(explored["corrupt"]) in explored["stdout"]


def test_confidence_is_the_softmax_of_the_assigned_prototype(explored):
    from swavkit.clusters.explorer import soft_codes
    from swavkit.artifacts.pretrained import load_swav_model

    model, _ = load_swav_model(explored["checkpoint"])
    model.prototypes.normalize_()
    row = next(r for r in explored["rows"] if r["path"].endswith(ODD_NAME))
    image = eval_transform(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), crop_fraction=1.0)(read_rgb(row["path"]))
    with torch.inference_mode():
        _, scores = model(image[None])
    codes = soft_codes(scores, temperature=0.1)[0]  # config default swav.temperature
    assert int(row["cluster"]) == int(codes.argmax())
    assert float(row["confidence"]) == pytest.approx(float(codes.max()), abs=1e-5)


def test_histogram_is_a_png(explored):
    with Image.open(explored["out"] / "cluster_sizes.png") as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 200
        image.verify()


def test_page_shows_top_images_per_cluster_with_escaped_paths(explored):
    page = (explored["out"] / "index.html").read_text(encoding="utf-8")
    sizes: dict[int, int] = {}
    for row in explored["rows"]:
        sizes[int(row["cluster"])] = sizes.get(int(row["cluster"]), 0) + 1
    assert f"{len(sizes)} of {N_PROTOTYPES} prototypes" in page
    assert set(map(int, re.findall(r'<section class="cluster" id="cluster-(\d+)"', page))) == set(sizes)
    thumbs = re.findall(r'<img src="(thumbs/[^"]+)"', page)
    assert len(thumbs) == sum(min(n, TOP_PER_CLUSTER) for n in sizes.values())
    assert all((explored["out"] / src).is_file() for src in thumbs)
    assert "<name>" not in page and "<bad>" not in page
    assert "corrupt &amp; &lt;bad&gt;.png" in page  # listed among the skipped files
    odd = next(row for row in explored["rows"] if row["path"].endswith(ODD_NAME))
    rank = sum(float(r["confidence"]) > float(odd["confidence"]) for r in explored["rows"]
               if r["cluster"] == odd["cluster"])
    assert ("odd &amp; &lt;name&gt;.png" in page) == (rank < TOP_PER_CLUSTER)


def test_user_errors_print_one_line_and_exit_2(explored, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    cases = [(["--checkpoint", str(explored["checkpoint"]), "--data", str(tmp_path / "missing")], "does not exist"),
             (["--checkpoint", str(garbage), "--data", str(explored["data"])], "garbage.pt"),
             (["--checkpoint", str(explored["checkpoint"]), "--data", str(explored["data"]), "--device", "nope"],
              "not a device")]
    for arguments, expected in cases:
        assert main(["cluster", *arguments, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("swavkit cluster: error:") and expected in err and "\n" not in err
    with pytest.raises(SystemExit) as exited:  # argparse rejects it before anything runs
        main(["cluster", "--checkpoint", "x", "--data", "y", "--out", "z", "--top", "0"])
    assert exited.value.code == 2


def test_page_renders_in_headless_chromium(explored, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("SWAVKIT_REQUIRE_BROWSER") == "1":
            pytest.fail("SWAVKIT_REQUIRE_BROWSER=1 but no chromium on PATH")
        pytest.skip("Chromium not installed: apt-get install chromium")
    page = explored["out"] / "index.html"
    run = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
                          "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    n_sections = len(re.findall(r'<section class="cluster"', page.read_text(encoding="utf-8")))
    assert n_sections > 0 and len(re.findall(r'<section class="cluster"', dom)) == n_sections
    # Set by the page's own script once loaded: decoded images / all images (thumbnails + histogram).
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, "the page's load script did not run"
    n_images = len(re.findall(r"<img ", dom))
    assert loaded.group(1) == loaded.group(2) == str(n_images)


def test_hostile_files_are_skipped_and_odd_names_written_exactly(tmp_path, monkeypatch):
    """Issue 17: PostScript in a .jpg is never given to the EPS decoder, an image just over swavkit's pixel
    limit is refused as in training, a link loop adds no row, and names that are not UTF-8 or hold control
    characters reach the CSV reversibly and the page printable (they used to crash both writers)."""
    from swavkit.clusters.explorer import explore_clusters

    spy = EpsSpy(monkeypatch)
    data = tmp_path / "images"
    (data / "group0").mkdir(parents=True)
    rng = np.random.default_rng(1)
    readable = []
    for name in ["a.png", "b.png", "c.jpg", "group0/d.png", *ODD_NAMES]:
        pixels = np.clip(rng.integers(0, 256, size=3) + rng.normal(0, 30, (28, 34, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(data / name, format="JPEG" if name.endswith(".jpg") else "PNG")
        readable.append(str(data / name))
    bad_name = data / os.fsdecode(b"\xff\x1b[2J not an image.png")
    bad_name.write_bytes(b"junk")
    unreadable = {str(write_eps_as_jpg(data / "vector.jpg")), str(bad_name),
                  str(write_just_over_limit_png(data / "huge.png", MAX_IMAGE_PIXELS))}
    os.symlink(data, data / "group0" / "loop")
    checkpoint = write_checkpoint(tmp_path / "last.pt", [Path(p) for p in readable[:4]])

    result = explore_clusters(checkpoint, data, tmp_path / "out", top_per_cluster=64, batch_size=4, progress=False)

    assert spy.calls == []
    skipped = dict(result["skipped"])
    assert set(skipped) == unreadable and result["n_images"] == len(readable)
    assert f"over swavkit's limit of {MAX_IMAGE_PIXELS:,} pixels" in skipped[str(data / "huge.png")]
    with open(tmp_path / "out" / "assignments.csv", newline="", encoding="utf-8") as handle:
        paths = [path_from_printable(row["path"]) for row in csv.DictReader(handle)]
    assert sorted(paths) == sorted(readable)  # every readable image exactly once, names exact
    page = (tmp_path / "out" / "index.html").read_bytes().decode("utf-8")  # strict: no lone surrogates
    assert "\x1b" not in page and "\u202e" not in page
    assert "\\x1b[31mred.png" in page and "\\xff\\xfe.png" in page  # shown in the printable form
    assert "\\xff\\x1b[2J not an image.png" in page  # listed among the skipped files
