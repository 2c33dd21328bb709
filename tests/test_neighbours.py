"""`swavkit neighbours`: faiss top-k held to brute force, duplicate groups, the CSV/page outputs, queries
embedded by the manifest's backbone, and the one-line refusals (another channel count, another backbone)."""

from __future__ import annotations

import csv
import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import write_images
from swavkit.cli import main
from swavkit.data import DataError, find_images, path_from_printable
from swavkit.embeddings.neighbours import (PAGE_MARKER, build_search_index, choose_index, duplicate_groups, recall_at_k, search,
                                search_all)

embed_module = importlib.import_module("swavkit.embeddings.embed")


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of every row among the others, by numpy: ids [N, k], cosines [N, k]."""
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    ids = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(similarity, ids, axis=1)


def test_flat_search_of_every_row_is_brute_force_without_self():
    vectors = unit_rows(300, 16)
    ids, cosines = search_all(build_search_index(vectors, "flat"), vectors, 5, batch_rows=64, progress=False)
    expected_ids, expected_cosines = brute_force(vectors, 5)
    assert not (ids == np.arange(300)[:, None]).any()
    np.testing.assert_allclose(cosines, expected_cosines, atol=1e-5)
    assert recall_at_k(ids, expected_ids) == 1.0
    assert (np.diff(cosines, axis=1) <= 1e-6).all()  # best first


def test_approximate_indexes_reach_exact_when_asked_to_search_everything():
    vectors = unit_rows(2000, 16, seed=1)
    exact, _ = brute_force(vectors, 10)
    ivf = build_search_index(vectors, "ivf", n_lists=20, n_probe=20)  # every cell probed: exact
    ids, _ = search_all(ivf, vectors, 10, progress=False)
    assert recall_at_k(ids, exact) == 1.0
    hnsw = build_search_index(vectors, "hnsw", ef_search=256)
    ids, _ = search_all(hnsw, vectors, 10, progress=False)
    assert recall_at_k(ids, exact) > 0.95
    few = build_search_index(vectors, "ivf", n_lists=20, n_probe=1)
    assert recall_at_k(search_all(few, vectors, 10, progress=False)[0], exact) < 1.0  # the recall measure can fail
    assert choose_index(100_000) == "flat" and choose_index(100_001) == "ivf"


def test_fewer_vectors_than_k_are_padded_not_invented():
    vectors = unit_rows(3, 8)
    ids, cosines = search(build_search_index(vectors, "flat"), vectors, 5, self_ids=np.arange(3))
    assert (ids[:, :2] >= 0).all() and (ids[:, 2:] == -1).all() and np.isnan(cosines[:, 2:]).all()


def test_duplicate_groups_are_the_connected_components_above_threshold():
    base = unit_rows(8, 32, seed=2)
    copies = np.stack([base[0], base[0] + 0.01, base[3], base[3] + 0.01, base[3] - 0.01, base[5]])
    vectors = np.concatenate([base, copies]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids, cosines = search_all(build_search_index(vectors, "flat"), vectors, 4, progress=False)
    groups = duplicate_groups(ids, cosines, 0.99)
    assert groups == [[3, 10, 11, 12], [0, 8, 9], [5, 13]]  # largest first
    # transitive: a chain a-b-c is one group even when a-c alone is below the threshold
    chain_ids = np.array([[1], [2], [1]])
    chain_cos = np.array([[0.96], [0.96], [0.96]], dtype=np.float32)
    assert duplicate_groups(chain_ids, chain_cos, 0.95) == [[0, 1, 2]]
    assert duplicate_groups(chain_ids, chain_cos, 0.97) == []


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> tuple[Path, Path]:
    """Embeddings of 12 images + 3 exact copies (duplicates by construction) by resnet10t at 32 px."""
    base = tmp_path_factory.mktemp("neighbours")
    root = base / "images"
    paths = write_images(root, 12, seed=3)
    for i in (1, 2, 7):
        shutil.copy(paths[i], root / f"copy_of_{paths[i].name}")
    out = base / "emb.npy"
    embed_module.embed("timm:resnet10t", root, out, image_size_px=32, num_workers=0, device="cpu", progress=False)
    return root, out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_neighbours_csv_and_page_of_every_image(embedded, tmp_path, capsys):
    root, out = embedded
    data = embed_module.load_embeddings(out)
    assert main(["neighbours", str(out), "--k", "3", "--out", str(tmp_path / "nn"), "--no-progress"]) == 0
    assert "3 neighbours of 15 queries among 15 images (flat (exact))" in capsys.readouterr().out
    rows = read_csv(tmp_path / "nn" / "neighbours.csv")
    assert len(rows) == 15 * 3
    row_of = {p: i for i, p in enumerate(data.paths)}
    for row in rows:
        query, neighbour = path_from_printable(row["query"]), path_from_printable(row["neighbour"])
        assert query != neighbour
        assert float(row["cosine"]) == pytest.approx(float(data.vectors[row_of[query]] @ data.vectors[row_of[neighbour]]),
                                                     abs=1e-5)
    copy_rows = [r for r in rows if r["rank"] == "1" and Path(r["query"]).name.startswith("copy_of_")]
    assert {Path(r["neighbour"]).name for r in copy_rows} == {"img001.png", "img002.png", "img007.png"}
    page = (tmp_path / "nn" / "index.html").read_text()
    assert PAGE_MARKER in page and page.count("<figure>") == 15 * 4  # each query and its 3 neighbours
    assert len(list((tmp_path / "nn" / "thumbs").iterdir())) == 15
    # a rerun replaces its own output; a folder of someone else's files is refused
    assert main(["neighbours", str(out), "--out", str(tmp_path / "nn"), "--no-progress"]) == 0
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep")
    assert main(["neighbours", str(out), "--out", str(tmp_path / "theirs"), "--no-progress"]) == 2
    assert "holds files swavkit did not write" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) == ["notes.txt"]


def test_duplicates_are_the_copies(embedded, tmp_path, capsys):
    root, out = embedded
    assert main(["neighbours", str(out), "--duplicates", "--threshold", "0.999999", "--out", str(tmp_path / "d"),
                 "--no-progress"]) == 0
    rows = read_csv(tmp_path / "d" / "duplicates.csv")
    groups: dict[str, set[str]] = {}
    for row in rows:
        groups.setdefault(row["group"], set()).add(Path(row["path"]).name)
        assert float(row["cosine_to_first"]) >= 0.999999
    assert sorted(map(sorted, groups.values())) == [[f"copy_of_img00{i}.png", f"img00{i}.png"] for i in (1, 2, 7)]


def test_query_image_is_embedded_by_the_manifest_backbone(embedded, tmp_path):
    root, out = embedded
    query = find_images(root)[4]
    assert main(["neighbours", str(out), "--query", query, "--k", "2", "--out", str(tmp_path / "q"),
                 "--device", "cpu", "--no-progress"]) == 0
    rows = read_csv(tmp_path / "q" / "neighbours.csv")
    assert len(rows) == 2 and path_from_printable(rows[0]["neighbour"]) == query  # itself, as an outside query
    assert float(rows[0]["cosine"]) == pytest.approx(1.0, abs=1e-4)


def edited_copy(out: Path, tmp_path: Path, edit) -> Path:
    """A copy of the embeddings whose manifest ``edit`` changed."""
    target = tmp_path / "copy"
    target.mkdir()
    for suffix in (".npy", ".paths.txt", ".json"):
        shutil.copy(out.with_name("emb" + suffix), target / ("emb" + suffix))
    manifest = json.loads((target / "emb.json").read_text())
    edit(manifest)
    (target / "emb.json").write_text(json.dumps(manifest))
    return target / "emb.npy"


def test_query_of_another_channel_count_or_for_changed_weights_is_one_line(embedded, tmp_path, capsys):
    root, out = embedded
    query = find_images(root)[0]
    grey = edited_copy(out, tmp_path, lambda m: m["backbone"].update(in_channels=1))  # a 1-channel backbone's file
    assert main(["neighbours", str(grey), "--query", query, "--out", str(tmp_path / "q1"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and query in err and "3 channels" in err and "1-channel backbone" in err
    assert not (tmp_path / "q1").exists()

    shutil.rmtree(tmp_path / "copy")
    other = edited_copy(out, tmp_path, lambda m: m["backbone"].update(weights_sha256="0" * 64))
    with pytest.raises(DataError, match="is not the one that made these embeddings"):
        from swavkit.embeddings.neighbours import neighbours

        neighbours(str(other), str(tmp_path / "q2"), queries=[query], device="cpu", progress=False)
    assert not (tmp_path / "q2" / "neighbours.csv").exists()


def copied(out: Path, tmp_path: Path, name: str = "copy") -> Path:
    """A copy of the three embeddings files (to edit) -> its .npy."""
    target = tmp_path / name
    target.mkdir()
    for suffix in (".npy", ".paths.txt", ".json"):
        shutil.copy(out.with_name("emb" + suffix), target / ("emb" + suffix))
    return target / "emb.npy"


def refused(argv: list[str], capsys) -> str:
    """The one line of a refused command (exit 2)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_nan_rows_are_refused_not_dropped(embedded, tmp_path, capsys):
    """A NaN row edited into a good file: every search refuses it (faiss would rank it nowhere and a duplicate
    search would quietly find fewer groups)."""
    _, out = embedded
    edited = copied(out, tmp_path)
    vectors = np.load(edited)
    vectors[4] = np.nan
    np.save(edited, vectors)
    for extra in ([], ["--duplicates"]):
        err = refused(["neighbours", str(edited), *extra, "--out", str(tmp_path / "nn"), "--no-progress"], capsys)
        assert "1 of its 15 rows are NaN/inf (first: row 4" in err and "embed the images again" in err
    assert not (tmp_path / "nn").exists()


def test_zero_byte_empty_and_reordered_files_are_one_line(embedded, tmp_path, capsys):
    _, out = embedded
    zero = copied(out, tmp_path, "zero")
    zero.write_bytes(b"")
    assert "not readable as swavkit embeddings (EOFError" in refused(
        ["neighbours", str(zero), "--out", str(tmp_path / "nn"), "--no-progress"], capsys)

    empty = copied(out, tmp_path, "empty")  # 0 rows everywhere, the manifest edited to agree
    np.save(empty, np.zeros((0, 512), np.float32))
    empty.with_name("emb.paths.txt").write_text("")
    manifest = json.loads(empty.with_name("emb.json").read_text())
    manifest.update(n_rows=0, rows_sha256=None)
    empty.with_name("emb.json").write_text(json.dumps(manifest))
    assert "holds no embeddings (0 rows)" in refused(
        ["neighbours", str(empty), "--out", str(tmp_path / "nn"), "--no-progress"], capsys)

    swapped = copied(out, tmp_path, "swapped")  # two lines of the names exchanged: rows now name other images
    lines = swapped.with_name("emb.paths.txt").read_text().splitlines(keepends=True)
    lines[0], lines[1] = lines[1], lines[0]
    swapped.with_name("emb.paths.txt").write_text("".join(lines))
    assert "not the ones (or not in the order) swavkit embed wrote" in refused(
        ["neighbours", str(swapped), "--out", str(tmp_path / "nn"), "--no-progress"], capsys)
    assert not (tmp_path / "nn").exists()


def test_more_neighbours_asked_than_there_are_says_what_was_found(embedded, tmp_path, capsys):
    _, out = embedded
    assert main(["neighbours", str(out), "--k", "100", "--out", str(tmp_path / "nn"), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "14 neighbours (--k 100: there are not that many) of 15 queries among 15 images" in said
    assert len(read_csv(tmp_path / "nn" / "neighbours.csv")) == 15 * 14
    assert "swavkit 14 nearest neighbours" in (tmp_path / "nn" / "index.html").read_text()
