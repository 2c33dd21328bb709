"""swavkit cluster --k N|auto (spherical k-means of the embeddings, K chosen by silhouette and stability) and
swavkit assign (new images into the saved groups, or unassigned): generated groups and the bundled sample."""

import csv
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation_fixtures import one_thread  # noqa: F401
from swavkit.clusters import kmeans

SAMPLE_VAL = Path(__file__).resolve().parents[1] / "swavkit" / "sample_data" / "fashion_mnist" / "val"
# Three obviously distinct groups: a colour each, plus a texture (stripes) in one of them.
GROUP_COLOURS = {"red": (210, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210)}
MIN_PURITY = 0.95  # generated groups: at most 1 image in 20 in a group of another colour


def _write_group_images(folder: Path, n_per_group: int, seed: int, size_px: int = 12) -> dict[str, str]:
    """{path: group} of noisy single-colour PNGs (the blue ones striped) in one flat folder."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for name, colour in GROUP_COLOURS.items():
        for i in range(n_per_group):
            pixels = np.asarray(colour, np.float32)[None, None] + rng.normal(0, 25, (size_px, size_px, 3))
            if name == "blue":
                pixels[::3] *= 0.5
            path = folder / f"{name}-{seed}-{i:02d}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
            truth[str(path)] = name
    return truth


def _purity(csv_path: Path, truth: dict[str, str]) -> float:
    """Fraction of images whose group's majority label is their own label."""
    rows = list(csv.DictReader(open(csv_path, encoding="utf-8")))
    by_group = {}
    for row in rows:
        by_group.setdefault(row["cluster"], []).append(truth[row["path"]])
    return sum(Counter(labels).most_common(1)[0][1] for labels in by_group.values()) / len(rows)


def test_ari_and_silhouette_match_their_definitions():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert kmeans.adjusted_rand_index(a, (a + 1) % 3) == pytest.approx(1.0)  # renaming changes nothing
    # hand count: pairs together in both 1, in the first 3, in the second 4 of 15: (1 - 3*4/15) / (3.5 - 3*4/15)
    assert kmeans.adjusted_rand_index(a, np.array([0, 0, 0, 1, 1, 2])) == pytest.approx(0.2 / 2.7)
    vectors = torch.nn.functional.normalize(torch.randn(12, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    distances = 1 - vectors @ vectors.T
    expected = []
    for i in range(12):
        own = [distances[i, j] for j in range(12) if labels[j] == labels[i] and j != i]
        others = [np.mean([distances[i, j] for j in range(12) if labels[j] == g]) for g in set(labels) - {labels[i]}]
        a_i, b_i = np.mean(own), min(others)
        expected.append((b_i - a_i) / max(a_i, b_i))
    measured = kmeans.cosine_silhouette(kmeans.cosine_distances(vectors.numpy()), labels)
    assert measured == pytest.approx(float(np.mean(expected)), abs=1e-5)


def test_auto_finds_the_generated_groups_and_assign_places_new_images(tmp_path, capsys):
    from swavkit.cli.main import main
    from swavkit.clusters.groups import read_centroids

    truth = _write_group_images(tmp_path / "images", 16, seed=0)
    out = tmp_path / "groups"
    assert main(["cluster", "--backbone", "pixels", "--data", str(tmp_path / "images"), "--out", str(out),
                 "--k", "auto", "--k-max", "6", "--image-size", "12", "--workers", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    selection = json.loads((out / "k_selection.json").read_text())
    assert selection["chosen_k"] == 3 and [row["k"] for row in selection["candidates"]] == [2, 3, 4, 5, 6]
    chosen = next(row for row in selection["candidates"] if row["chosen"])
    assert chosen["stable"] and chosen["silhouette"] == max(r["silhouette"] for r in selection["candidates"] if r["stable"])
    assert "K=3" in printed and "<- chosen" in printed and (out / "k_selection.csv").read_text().count("\n") == 6
    assert _purity(out / "assignments.csv", truth) >= MIN_PURITY
    # one folder of links per group, each link to an image of that group
    folders = sorted(p.name for p in (out / "groups").iterdir())
    assert folders == ["cluster-0", "cluster-1", "cluster-2"]
    linked = {os.readlink(link): folder for folder in folders for link in (out / "groups" / folder).iterdir()}
    rows = {row["path"]: f"cluster-{row['cluster']}" for row in csv.DictReader(open(out / "assignments.csv"))}
    assert linked == rows and set(linked) == set(truth)
    centroids, metadata = read_centroids(out)
    assert centroids.shape == (3, 3 * 12 * 12) and np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    assert all(0 < t < 1 for t in metadata["thresholds_cosine_distance"]) and len(metadata["backbone"]["weights_sha256"]) == 64

    # new images: the same groups go to the matching centroid; an image unlike every group is unassigned
    new = _write_group_images(tmp_path / "new", 3, seed=1)
    Image.fromarray(np.tile(np.array([[0, 255], [255, 0]], np.uint8).repeat(6, 0).repeat(6, 1)[..., None], 3)
                    ).save(tmp_path / "new" / "checkerboard.png")
    assigned = tmp_path / "assigned"
    assert main(["assign", "--clusters", str(out), "--data", str(tmp_path / "new"), "--out", str(assigned),
                 "--workers", "0", "--no-progress"]) == 0
    group_of = {name: Counter(truth_group for path, truth_group in truth.items()
                              if rows[path] == f"cluster-{c}").most_common(1)[0][0]
                for c in range(3) for name in [c]}
    results = {row["path"]: row for row in csv.DictReader(open(assigned / "assignments.csv"))}
    assert results[str(tmp_path / "new" / "checkerboard.png")]["cluster"] == "-1"
    assert all(group_of[int(results[path]["cluster"])] == group for path, group in new.items())
    assert sorted(p.name for p in (assigned / "groups").iterdir()) == ["cluster-0", "cluster-1", "cluster-2",
                                                                       "unassigned"]
    summary = json.loads((assigned / "assign.json").read_text())
    assert summary["n_unassigned"] == 1 and summary["n_assigned"] == 9
    # a threshold of 0 leaves everything unassigned; another backbone's weights are refused in one line
    assert main(["assign", "--clusters", str(out), "--data", str(tmp_path / "new"), "--out", str(assigned),
                 "--threshold", "0", "--workers", "0", "--no-progress"]) == 0
    assert json.loads((assigned / "assign.json").read_text())["n_unassigned"] == 10
    capsys.readouterr()
    assert main(["assign", "--clusters", str(out), "--data", str(tmp_path / "new"), "--out", str(assigned),
                 "--backbone", "timm:resnet10t", "--workers", "0", "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "not the backbone these groups were made with" in error


def test_without_symlinks_each_group_is_a_list(tmp_path, monkeypatch):
    from swavkit.clusters.groups import write_group_links

    def no_links(*args, **kwargs):
        raise OSError("symbolic links are not supported here")

    monkeypatch.setattr(os, "symlink", no_links)
    paths = [str(tmp_path / f"{i}.png") for i in range(4)]
    assert write_group_links(paths, np.array([1, 0, 1, -1]), 2, tmp_path / "groups") == "lists"
    assert (tmp_path / "groups" / "cluster-1.txt").read_text().splitlines() == [paths[0], paths[2]]
    assert (tmp_path / "groups" / "unassigned.txt").read_text().splitlines() == [paths[3]]


def test_k_groups_of_the_bundled_sample_follow_its_classes(tmp_path, capsys):
    from swavkit.cli.main import main

    out = tmp_path / "sample-groups"
    assert main(["cluster", "--backbone", "pixels", "--data", str(SAMPLE_VAL), "--out", str(out), "--k", "10",
                 "--image-size", "16", "--workers", "0", "--no-progress"]) == 0
    assert "500 images in 10 of 10 k-means groups" in capsys.readouterr().out
    truth = {str(path): path.parent.name for path in SAMPLE_VAL.rglob("*.png")}
    # raw pixels of Fashion-MNIST: far above the 10 % of chance, far from perfect
    assert _purity(out / "assignments.csv", truth) >= 0.45
    assert "k-means group" in (out / "index.html").read_text()
