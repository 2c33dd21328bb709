"""`swavkit embed`: unit rows of every readable image by the eval crop rule, resumable chunks, a manifest
that names the backbone, refusals that change nothing (tiny resnet10t at 32 px, generated images)."""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import swavkit
from conftest import write_images
from swavkit import embed as embed_function  # the package attribute is the function
from swavkit.cli import main
from swavkit.data import DataError, find_images, read_rgb, read_skipped_report
from swavkit.evaluation.features import load_eval_backbone
from swavkit.artifacts.preprocessing import Preprocessing

embed_module = importlib.import_module("swavkit.embeddings.embed")
BACKBONE = "timm:resnet10t"
SIZE_PX = 32
COMMON = dict(image_size_px=SIZE_PX, batch_size=8, num_workers=0, device="cpu", progress=False)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[str], Path]:
    """22 readable images (flat + a sub-folder) and one corrupt file."""
    root = tmp_path_factory.mktemp("embed") / "images"
    write_images(root, 16, seed=1)
    write_images(root / "sub", 6, seed=2)
    corrupt = root / "sub" / "zz_corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    readable = [p for p in find_images(root) if p != str(corrupt)]
    return root, readable, corrupt


@pytest.fixture(scope="module")
def embedded(images, tmp_path_factory):
    root, _, _ = images
    out = tmp_path_factory.mktemp("embedded") / "emb.npy"
    result = embed_function(BACKBONE, root, out, chunk_images=7, **COMMON)
    return result, embed_module.load_embeddings(out)


def reference_vectors(paths: list[str]) -> np.ndarray:
    """The same images straight through the backbone with the eval transform, L2-normalised: [N, 512]."""
    backbone = load_eval_backbone(BACKBONE)
    transform = Preprocessing.for_size(SIZE_PX).transform()
    with torch.inference_mode():
        features = backbone(torch.stack([transform(read_rgb(p)) for p in paths]))
    return torch.nn.functional.normalize(features, dim=1).numpy()


def test_every_readable_image_becomes_one_unit_row_in_folder_order(images, embedded):
    root, readable, corrupt = images
    result, loaded = embedded
    assert swavkit.embed is embed_function and callable(swavkit.embed)
    assert loaded.paths == readable and result.n_rows == len(readable) == 22
    np.testing.assert_allclose(np.linalg.norm(loaded.vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(loaded.vectors, reference_vectors(readable), atol=2e-5)
    assert result.n_skipped == 1 and str(corrupt) in result.skipped.read_text()
    manifest = loaded.manifest
    assert manifest["complete"] and [c["index"] for c in manifest["chunks"]] == [0, 1, 2, 3]  # 23 inputs / 7
    assert manifest["backbone"]["weights_sha256"] == embed_module.weights_sha256(load_eval_backbone(BACKBONE))
    assert manifest["backbone"]["feature_dim"] == 512 and manifest["preprocessing"]["image_size_px"] == SIZE_PX
    assert not (result.vectors.parent / "emb.parts").exists()  # the chunks were joined and removed


def test_a_killed_run_is_refused_by_neighbours_and_resumes_to_the_same_vectors(images, embedded, tmp_path,
                                                                             monkeypatch, capsys):
    root, _, _ = images
    out = tmp_path / "emb.npy"
    calls = []
    real_save = embed_module._save_chunk

    def save_then_die(files, chunk, vectors, names):
        calls.append(chunk.index)
        real_save(files, chunk, vectors, names)
        if chunk.index == 3:  # killed after the last chunk (the corrupt file's) was written, before it counted
            from swavkit.data import append_skipped_report

            append_skipped_report(files.skipped, [("/listed/before/the/kill.png", "test")])
            raise KeyboardInterrupt

    monkeypatch.setattr(embed_module, "_save_chunk", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        embed_function(BACKBONE, root, out, chunk_images=7, **COMMON)
    manifest = json.loads((tmp_path / "emb.json").read_text())
    assert not manifest["complete"] and [c["index"] for c in manifest["chunks"]] == [0, 1, 2]
    assert main(["neighbours", str(out), "--out", str(tmp_path / "nn"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not finished (3 of 4 chunks)" in err and "run the same swavkit embed command again" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "nn").exists()

    monkeypatch.setattr(embed_module, "_save_chunk", real_save)
    embedded_chunks = []
    real_embed_chunk = embed_module._embed_chunk
    monkeypatch.setattr(embed_module, "_embed_chunk",
                        lambda backbone, chunk, *a, **k: embedded_chunks.append(chunk.index)
                        or real_embed_chunk(backbone, chunk, *a, **k))
    result = embed_function(BACKBONE, root, out, chunk_images=7, **COMMON)
    assert result.resumed_chunks == 3 and embedded_chunks == [3]  # finished chunks are not redone
    resumed = embed_module.load_embeddings(out)
    _, uninterrupted = embedded
    assert resumed.paths == uninterrupted.paths
    np.testing.assert_allclose(resumed.vectors, uninterrupted.vectors, atol=1e-6)
    # the lines of the chunk that did not count are taken back: the corrupt file is listed once
    assert [path for path, _ in read_skipped_report(result.skipped)] == [str(images[2])]


def test_another_backbone_or_foreign_files_are_refused_and_left_as_they_were(images, tmp_path, capsys):
    root, _, _ = images
    out = tmp_path / "emb.npy"
    embed_function(BACKBONE, root, out, chunk_images=64, **COMMON)
    before = {p.name: file_digest(p) for p in tmp_path.iterdir()}
    argv = ["embed", "timm:resnet18", str(root), "--out", str(out), "--image-size", "32", "--workers", "0",
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "another backbone" in err and "architecture resnet10t there, resnet18 here" in err
    assert len(err.splitlines()) == 1
    assert {p.name: file_digest(p) for p in tmp_path.iterdir()} == before  # nothing changed

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "data.npy").write_bytes(b"the user's own file")
    with pytest.raises(DataError, match="without the manifest data.json"):
        embed_function(BACKBONE, root, foreign / "data.npy", **COMMON)
    assert (foreign / "data.npy").read_bytes() == b"the user's own file"
    assert sorted(p.name for p in foreign.iterdir()) == ["data.npy"]


def write_shard(path: Path, images: list[str]) -> None:
    """A WebDataset tar: sample i = <key>.png from images[i], then a sample whose image is garbage."""
    with tarfile.open(path, "w") as tar:
        for i, image in enumerate(images):
            tar.add(image, arcname=f"s{i:04d}.png")
        bad = path.parent / "bad.png"
        bad.write_bytes(b"garbage")
        tar.add(bad, arcname="s9999.png")


def test_shards_give_the_same_vectors_as_the_files_with_workers(images, embedded, tmp_path):
    _, readable, _ = images
    _, loaded = embedded
    shard = tmp_path / "train-000000.tar"
    write_shard(shard, readable[:9])
    result = embed_function(BACKBONE, str(shard), tmp_path / "shards.npy",
                            **{**COMMON, "num_workers": 2})  # two workers interleave; rows come back in tar order
    got = embed_module.load_embeddings(tmp_path / "shards.npy")
    assert got.paths == [f"{shard}/s{i:04d}.png" for i in range(9)]
    np.testing.assert_allclose(got.vectors, loaded.vectors[:9], atol=1e-5)
    assert result.n_skipped == 1 and "s9999.png" in result.skipped.read_text()


def test_parquet_rows_equal_the_npy_rows(images, embedded, tmp_path):
    pytest.importorskip("pyarrow")
    root, _, _ = images
    _, loaded = embedded
    embed_function(BACKBONE, root, tmp_path / "emb.parquet", **COMMON)
    got = embed_module.load_embeddings(tmp_path / "emb.parquet")
    assert got.paths == loaded.paths
    np.testing.assert_allclose(got.vectors, loaded.vectors, atol=1e-6)
    assert not (tmp_path / "emb.paths.txt").exists()  # the paths live in the parquet file


def test_parquet_without_pyarrow_is_one_line_naming_the_extra(images, tmp_path, monkeypatch):
    root, _, _ = images
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    from swavkit.config import ConfigError

    with pytest.raises(ConfigError, match=r'pip install "swavkit\[parquet\]", or name a .npy file'):
        embed_function(BACKBONE, root, tmp_path / "emb.parquet", **COMMON)
    assert list(tmp_path.iterdir()) == []


def test_embed_and_neighbours_need_none_of_the_extras(images, embedded, tmp_path, monkeypatch):
    """The core path (.npy, faiss search, page) with pyarrow and the ONNX packages unimportable."""
    for extra in ("pyarrow", "pyarrow.parquet", "onnx", "onnxscript", "onnxruntime"):
        monkeypatch.setitem(sys.modules, extra, None)
    from swavkit.embeddings.neighbours import neighbours

    root, readable, _ = images
    _, loaded = embedded
    embed_function(BACKBONE, [str(root / "sub")], tmp_path / "sub.npy", **COMMON)
    got = embed_module.load_embeddings(tmp_path / "sub.npy")
    sub_rows = [loaded.paths.index(p) for p in got.paths]
    np.testing.assert_allclose(got.vectors, loaded.vectors[sub_rows], atol=1e-5)
    result = neighbours(str(tmp_path / "sub.npy"), str(tmp_path / "nn"), k=2, progress=False)
    assert result["n_queries"] == len(got.paths) == 6 and (tmp_path / "nn" / "index.html").is_file()


def exported_backbone(folder: Path, edit=None) -> Path:
    """resnet10t (timm's random init, seeded) exported as swavkit exports it, after ``edit(backbone)``."""
    from swavkit.artifacts.checkpoint import export_backbone

    backbone = load_eval_backbone(BACKBONE)
    if edit is not None:
        with torch.no_grad():
            edit(backbone)
    return export_backbone(backbone, folder, image_size_px=SIZE_PX, mean=(0.5,) * 3, std=(0.25,) * 3)


def test_a_backbone_with_one_nan_weight_is_refused_before_anything_is_written(images, tmp_path, capsys):
    root, _, _ = images
    broken = exported_backbone(tmp_path / "broken", lambda b: b.layer1[0].conv1.weight.view(-1)[7].fill_(float("nan")))
    out = tmp_path / "out" / "emb.npy"
    assert main(["embed", str(broken), str(root), "--out", str(out), "--workers", "0", "--device", "cpu",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NaN/inf even for a blank image" in err
    assert "1 non-finite weight value(s) (in layer1.0.conv1.weight)" in err and "use an earlier checkpoint" in err
    assert not out.parent.exists()  # nothing written, not even the manifest


def test_rows_that_overflow_stop_the_run_unfinished(images, tmp_path, capsys):
    """Finite weights whose activations overflow fp32 on real images (1e30 x 1e30; a blank image stays 0:
    no bias in the stem): the first chunk with a NaN row stops the run, names how many and the cause;
    nothing is marked complete and neighbours refuses the unfinished output."""
    root, _, _ = images

    def overflowing(backbone):
        backbone.conv1[0].weight.mul_(1e30)
        backbone.conv1[3].weight.mul_(1e30)

    huge = exported_backbone(tmp_path / "huge", overflowing)
    out = tmp_path / "emb.npy"
    assert main(["embed", str(huge), str(root), "--out", str(out), "--chunk-images", "7", "--workers", "0",
                 "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "embed: 7 of the 7 images of chunk 0 gave NaN/inf features" in err and "overflow even in fp32" in err
    manifest = json.loads((tmp_path / "emb.json").read_text())
    assert not manifest["complete"] and manifest["chunks"] == [] and not out.exists()
    assert main(["neighbours", str(out), "--out", str(tmp_path / "nn"), "--no-progress"]) == 2
    assert "not finished" in capsys.readouterr().err


def test_the_manifest_names_the_backbone_by_its_absolute_path(images, tmp_path, monkeypatch, capsys):
    """Embedded with a relative path, queried from another directory: found; moved: the one line names
    --backbone."""
    root, readable, _ = images
    exported_backbone(tmp_path / "work" / "exported")
    monkeypatch.chdir(tmp_path / "work")
    embed_function("exported", [str(root / "sub")], "emb.npy", **COMMON)
    manifest = json.loads((tmp_path / "work" / "emb.json").read_text())
    assert manifest["backbone"]["source"] == str(tmp_path / "work" / "exported")
    monkeypatch.chdir(tmp_path)
    query = str(root / "sub" / Path(readable[-1]).name)
    argv = ["neighbours", "work/emb.npy", "--query", query, "--k", "1", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--out", "q1"]) == 0
    (tmp_path / "work" / "exported").rename(tmp_path / "moved")
    capsys.readouterr()
    assert main([*argv, "--out", "q2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass where it lives now with --backbone" in err
    assert str(tmp_path / "work" / "exported") in err and not (tmp_path / "q2").exists()
