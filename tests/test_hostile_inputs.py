"""Hostile forms of the files swavkit reads besides checkpoints and images: embeddings (`.npy`, its `.json`
manifest, its `.paths.txt`), WebDataset tar shards and list files with the run folder's list cache. Each case:
the code in a pickle never runs (its marker is never created), nothing outside the command's own output
changes, and the refusal is one line with exit code 2 (tests/test_hostile_runs.py: checkpoints;
tests/test_hostile_files.py: images)."""

from __future__ import annotations

import ast
import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_overrides, write_images
from test_hostile_runs import CodeRunner, snapshot  # one home for the payload and the change check
from swavkit.cli import main
from swavkit.config import load_config
from swavkit.data.filelist import CACHE_NAME, load_path_cache
from swavkit.data.multicrop import MultiCropTransform
from swavkit.data.shards import ShardStream, check_decodable

EMBED = ["--image-size", "32", "--workers", "0", "--device", "cpu", "--no-progress"]


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """8 images, their embeddings by resnet10t at 32 px, and a marker that a payload would create."""
    root = tmp_path_factory.mktemp("hostile-inputs")
    images = write_images(root / "images", 8, seed=5)
    emb = root / "emb" / "emb.npy"
    assert main(["embed", "timm:resnet10t", str(root / "images"), "--out", str(emb), *EMBED]) == 0
    return {"root": root, "images": images, "emb": emb, "marker": root / "payload-ran",
            "payload": pickle.dumps(CodeRunner(root / "payload-ran"))}


def refused(world, capsys, argv: list[str], *, changes: tuple[Path, ...] = ()) -> str:
    """The one line of ``argv`` refused (exit 2): the payload never ran and nothing under the world's
    folder changed except the paths in ``changes`` (the command's own output)."""
    before = {k: v for k, v in snapshot(world["root"]).items() if not any(
        str(world["root"] / k).startswith(str(c)) for c in changes)}
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert not world["marker"].exists(), f"{argv}: the payload ran"
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("swavkit "), err
    after = {k: v for k, v in snapshot(world["root"]).items() if not any(
        str(world["root"] / k).startswith(str(c)) for c in changes)}
    assert after == before, f"{argv} changed files"
    return err


def copied(world, name: str) -> Path:
    """A copy of the three embeddings files (to edit) -> its .npy."""
    target = world["root"] / name
    target.mkdir()
    for suffix in (".npy", ".paths.txt", ".json"):
        shutil.copy(world["emb"].with_suffix(suffix) if suffix != ".paths.txt" else
                    world["emb"].with_name("emb.paths.txt"), target / ("emb" + suffix))
    return target / "emb.npy"


# ----------------------------------------------------------------------------------------------------
# embeddings: the .npy, its manifest and its .paths.txt

def _edit_manifest(change):
    def edit(npy: Path, world) -> None:
        manifest_path = npy.with_suffix(".json")
        manifest = json.loads(manifest_path.read_text())
        manifest_path.write_text(json.dumps(change(manifest)))
    return edit


def _set(path: tuple[str, ...], value):
    def change(manifest):
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return manifest
    return change


def _paths_lines(change):
    def edit(npy: Path, world) -> None:
        names = npy.with_name("emb.paths.txt")
        names.write_text("".join(change(names.read_text().splitlines(keepends=True))))
    return edit


EMBEDDING_FORMS = {
    # a pickled object array saved with np.save: its element would run code when unpickled
    "npy-object-array": (lambda npy, world: np.save(npy, np.array([CodeRunner(world["marker"])] * 2, dtype=object),
                                                    allow_pickle=True), "pickled Python objects"),
    "npy-object-matrix": (lambda npy, world: np.save(npy, np.full((8, 512), CodeRunner(world["marker"]), dtype=object),
                                                     allow_pickle=True), "pickled Python objects"),
    "npy-is-a-pickle": (lambda npy, world: npy.write_bytes(world["payload"]), "not readable as swavkit embeddings"),
    "npy-truncated": (lambda npy, world: npy.write_bytes(npy.read_bytes()[:1000]), "not readable as swavkit embeddings"),
    "npy-wrong-dtype": (lambda npy, world: np.save(npy, np.zeros((8, 512), np.complex64)),
                        "holds complex64 values, not the float32 vectors"),
    "npy-wrong-shape": (lambda npy, world: np.save(npy, np.zeros((8, 2, 256), np.float32)), "an array of shape"),
    "manifest-zero-byte": (lambda npy, world: npy.with_suffix(".json").write_bytes(b""), "not a swavkit embeddings manifest"),
    "manifest-not-json": (lambda npy, world: npy.with_suffix(".json").write_bytes(b"\x80\x04garbage"),
                          "not a swavkit embeddings manifest"),
    "manifest-a-list": (lambda npy, world: npy.with_suffix(".json").write_text("[1, 2]"), "not a swavkit embeddings manifest"),
    "manifest-pickle": (lambda npy, world: npy.with_suffix(".json").write_bytes(world["payload"]),
                        "not a swavkit embeddings manifest"),
    "manifest-backbone-a-string": (_edit_manifest(_set(("backbone",), "resnet")), "not a swavkit embeddings manifest"),
    "manifest-feature-dim-a-string": (_edit_manifest(_set(("backbone", "feature_dim"), "wide")),
                                      "not a swavkit embeddings manifest"),
    "manifest-rows-a-list": (_edit_manifest(_set(("n_rows",), [8])), "not a swavkit embeddings manifest"),
    "manifest-chunks-a-number": (_edit_manifest(_set(("chunks",), 5)), "not a swavkit embeddings manifest"),
    "manifest-data-a-list": (_edit_manifest(_set(("data",), [])), "not a swavkit embeddings manifest"),
    "manifest-rows-hash-a-number": (_edit_manifest(_set(("rows_sha256",), 7)), "not a swavkit embeddings manifest"),
    "manifest-more-rows": (_edit_manifest(_set(("n_rows",), 9)), "the manifest says 9"),
    "paths-one-fewer": (_paths_lines(lambda lines: lines[:-1]), "8 vectors and 7 paths"),
    "paths-one-more": (_paths_lines(lambda lines: lines + lines[:1]), "8 vectors and 9 paths"),
    "paths-not-utf8": (lambda npy, world: npy.with_name("emb.paths.txt").write_bytes(b"\xff\xfe\n" * 8),
                       "not readable as swavkit embeddings"),
}


@pytest.mark.parametrize("form", list(EMBEDDING_FORMS))
def test_neighbours_refuses_every_hostile_embeddings_file(world, capsys, form):
    edit, message = EMBEDDING_FORMS[form]
    npy = copied(world, f"neighbours-{form}")
    edit(npy, world)
    out = world["root"] / f"nn-{form}"
    err = refused(world, capsys, ["neighbours", str(npy), "--out", str(out), "--no-progress"])
    assert message in err, err
    assert not out.exists()


RESUMED_FORMS = ["manifest-zero-byte", "manifest-not-json", "manifest-a-list", "manifest-pickle",
                 "manifest-backbone-a-string", "manifest-chunks-a-number", "manifest-data-a-list",
                 "manifest-rows-a-list"]


@pytest.mark.parametrize("form", RESUMED_FORMS + ["weights-hash-edited"])
def test_embed_into_a_hostile_manifest_changes_nothing(world, capsys, form):
    """`swavkit embed` into files whose manifest was replaced or edited: refused before anything is written."""
    npy = copied(world, f"embed-{form}")
    if form == "weights-hash-edited":
        _edit_manifest(_set(("backbone", "weights_sha256"), "0" * 64))(npy, world)
        message = "another backbone or preprocessing (weights_sha256 000000000000 there"
    else:
        EMBEDDING_FORMS[form][0](npy, world)
        message = "not a swavkit embeddings manifest"
    err = refused(world, capsys, ["embed", "timm:resnet10t", str(world["root"] / "images"), "--out", str(npy), *EMBED])
    assert message in err, err


def test_neighbours_query_refuses_an_edited_weights_hash(world, capsys):
    npy = copied(world, "query-weights-hash")
    _edit_manifest(_set(("backbone", "weights_sha256"), "0" * 64))(npy, world)
    out = world["root"] / "nn-query-hash"
    err = refused(world, capsys, ["neighbours", str(npy), "--query", str(world["images"][0]), "--out", str(out),
                                  "--device", "cpu", "--no-progress"])
    assert "weights" in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------
# tar shards: only image members are ever decoded, by swavkit's image decoder

def _shard_members(world) -> dict[str, bytes]:
    """8 image samples; two carry a pickle member beside the image (webdataset's default decoders would
    unpickle `.pyd` / `.pickle`), and one sample is a pickle alone."""
    members = {}
    for i, image in enumerate(world["images"]):
        members[f"s{i:03d}{image.suffix}"] = image.read_bytes()
    members["s000.pyd"] = members["s001.pickle"] = members["s999.pyd"] = world["payload"]
    return members


@pytest.fixture(scope="module")
def shards(world):
    folder = world["root"] / "shards"
    folder.mkdir()
    sound = write_tar(folder / "pickles.tar", _shard_members(world))
    raw = sound.read_bytes()
    return {
        "pickles": sound,
        "zero-byte": _write(folder / "zero-byte.tar", b""),
        "truncated": _write(folder / "truncated.tar", raw[:700]),  # inside the first member
        "not-a-tar": _write(folder / "not-a-tar.tar", world["payload"]),
        "no-images": write_tar(folder / "no-images.tar", {"a.pyd": world["payload"], "a.txt": b"hello",
                                                          "b.json": b"{}", "c.pickle": world["payload"]}),
        "images-that-are-not": write_tar(folder / "images-that-are-not.tar", {"a.jpg": world["payload"],
                                                                              "b.png": b"\x89PNG\r\n"}),
    }


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_shard_pickle_members_are_never_decoded(world, shards, capsys):
    """`swavkit embed` and one pretraining step on a shard holding `.pyd` / `.pickle` members: the images are
    used, the pickles never unpickled."""
    out = world["root"] / "shard-emb" / "emb.npy"
    assert main(["embed", "timm:resnet10t", str(shards["pickles"]), "--out", str(out), *EMBED]) == 0
    assert not world["marker"].exists()
    assert len(out.with_name("emb.paths.txt").read_text().splitlines()) == 8
    # pretraining's reader (the stream a data-loading worker runs), start-up check included: a whole epoch
    cfg = load_config([], tiny_overrides("x", "y"))
    transform = MultiCropTransform.from_config(cfg.crops)
    assert check_decodable([str(shards["pickles"])], str(shards["pickles"])) == [str(shards["pickles"])]
    stream = ShardStream([str(shards["pickles"])], transform, transform.collate, 4, rank=0, world=1, seed=0,
                         shuffle_buffer=4, samples_per_epoch=8)
    stream.set_epoch(0)
    batches = iter(stream)  # endless: 3 batches of 4 go round the shard's 8 images and 3 pickles
    skipped = [name for _ in range(3) for name, _ in next(batches)[2]]  # (views, indices, skipped)
    assert not world["marker"].exists()
    assert any(name.endswith("s999") for name in skipped), skipped  # the pickle-only sample: no image member
    # no swavkit module reaches webdataset's decoders: what it takes from webdataset is the tar iterator
    # (read) and TarWriter (swavkit shard), nothing that decodes
    used = set()
    for source in (Path(__file__).parent.parent / "swavkit").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("webdataset"):
                used |= {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in ("webdataset", "wds"):
                used.add(f"webdataset.{node.attr}")
    assert used == {"webdataset.tariterators.tar_file_iterator", "webdataset.tariterators.group_by_keys",
                    "webdataset.TarWriter"}, used

SHARD_FORMS = ["zero-byte", "truncated", "not-a-tar", "no-images", "images-that-are-not"]


@pytest.mark.parametrize("form", SHARD_FORMS)
@pytest.mark.parametrize("command", ["embed", "pretrain"])
def test_broken_shards_are_one_line(world, shards, capsys, command, form):
    """Nothing decodable: pretrain refuses at start-up naming data.path; embed after reading the set, naming
    its list of unreadable members (its own output)."""
    out = world["root"] / f"shard-{command}-{form}"
    if command == "embed":
        argv = ["embed", "timm:resnet10t", str(shards[form]), "--out", str(out / "emb.npy"), *EMBED]
    else:
        argv = ["pretrain", *tiny_overrides(shards[form], out, **{"train.epochs": 1, "data.samples_per_epoch": 8})]
    err = refused(world, capsys, argv, changes=(out,))
    if command == "pretrain":
        assert "data.path: nothing in" in err and shards[form].name in err, err
        assert not out.exists()
    else:
        assert "images could be read (listed in" in err, err
        assert not (out / "emb.npy").exists()


# ----------------------------------------------------------------------------------------------------
# list files (data.path=LIST.txt / .csv) and the run folder's cached list

LIST_FORMS = {
    "zero-byte.txt": b"",
    "blank-lines.txt": b"\n\n  \n",
    "garbage.txt": bytes(range(256)) * 4,
    "garbage.csv": b"path\n" + bytes(range(256)) * 4,
    "a-pickle.txt": None,  # the payload's bytes as a list
    "missing-files.txt": None,  # names only files that do not exist
}


@pytest.fixture(scope="module")
def lists(world):
    folder = world["root"] / "lists"
    folder.mkdir()
    made = {}
    for name, data in LIST_FORMS.items():
        if name == "a-pickle.txt":
            data = world["payload"]
        elif name == "missing-files.txt":
            data = "".join(f"{folder / 'gone'}/img{i}.png\n" for i in range(5)).encode()
        made[name] = _write(folder / name, data)
    return made


@pytest.mark.parametrize("form", list(LIST_FORMS))
@pytest.mark.parametrize("command", ["embed", "pretrain"])
def test_hostile_list_files_are_one_line(world, lists, capsys, command, form):
    out = world["root"] / f"list-{command}-{form}"
    if command == "embed":
        argv = ["embed", "timm:resnet10t", str(lists[form]), "--out", str(out / "emb.npy"), *EMBED]
    else:
        argv = ["pretrain", *tiny_overrides(lists[form], out, **{"train.epochs": 1})]
    err = refused(world, capsys, argv, changes=(out,))
    assert not (out / "emb.npy").exists() and not (out / "checkpoints").exists(), err
    if form in ("zero-byte.txt", "blank-lines.txt"):
        assert f"list file {lists[form]} names no files" in err, err
    elif form == "garbage.csv":
        assert "unreadable CSV" in err and "line 3" in err, err
    elif command == "pretrain":  # names that are no files: the start-up check tries them all
        assert "data.path: none of the" in err and f"under {lists[form]} can be decoded" in err, err
    else:  # embed lists each unreadable name in its own report
        assert "images could be read (listed in" in err, err


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def test_a_hostile_list_cache_is_never_unpickled(world, tmp_path):
    """The run folder's cached list replaced by pickle-bearing files: read without unpickling, found
    unreadable, and the images are found again (the cache is only ever a shortcut)."""
    key = "[]"
    forms = {
        "a-pickle": lambda path: path.write_bytes(world["payload"]),
        "npz-of-objects": lambda path: np.savez(path, buffer=np.array([CodeRunner(world["marker"])], object),
                                                offsets=np.array([CodeRunner(world["marker"])], object),
                                                source=np.array(key)),
        "npy-of-objects": lambda path: _write(path, _npy_bytes(np.array([CodeRunner(world["marker"])], object))),
        "zero-byte": lambda path: path.write_bytes(b""),
        "wrong-dtype": lambda path: np.savez(path, buffer=np.zeros(3, np.float32),
                                             offsets=np.zeros(2, np.float32), source=np.array(key)),
    }
    for form, write in forms.items():
        folder = tmp_path / form
        folder.mkdir()
        write(folder / CACHE_NAME)
        paths, why = load_path_cache(folder, key)
        assert paths is None and str(folder / CACHE_NAME) in why, (form, why)
        assert not world["marker"].exists(), form
