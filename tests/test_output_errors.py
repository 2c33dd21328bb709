"""Where swavkit writes, and what happens when it cannot: every output kind (run folder, export, embeddings,
neighbour and cluster pages, result JSON, shards, fine-tune folder) on a read-only folder (EACCES, EROFS) or a
full disk (ENOSPC) is one line, exit 2, naming a path there, with nothing half-written left behind; files
and folders get the modes the umask gives; skipped.txt lists a file once.

The tests run as root, which ignores permission bits, so a read-only folder or a full disk is made by
injecting the kernel's answer at the OS boundary (:class:`Unwritable`): os.open / open() / os.mkdir /
os.replace of anything under the folder raise the errno a read-only mount or a folder without write
permission gives, and a full disk fails os.fsync (where a delayed-allocation or NFS ENOSPC surfaces).
swavkit's own code runs unchanged.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
import stat
from pathlib import Path

import pytest

from conftest import tiny_overrides, write_images
from evaluation_fixtures import one_thread, write_labelled_folders  # noqa: F401 (autouse fixture)
from swavkit.cli import main

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class Unwritable:
    """While active, ``folder`` behaves as a read-only folder (``code`` EACCES or EROFS: nothing can be
    created, opened for writing or renamed into it) or as a folder on a full disk (ENOSPC: files can be
    created, but flushing them to the disk with fsync fails)."""

    def __init__(self, folder: Path, code: int):
        self.folder, self.code = str(folder.resolve()), code
        self.real = {"open": builtins.open, "os_open": os.open, "mkdir": os.mkdir, "replace": os.replace,
                     "rename": os.rename, "fsync": os.fsync}
        self.refused: list[str] = []

    def inside(self, path) -> bool:
        if isinstance(path, int):
            return False
        text = os.path.abspath(os.fsdecode(path))
        return text == self.folder or text.startswith(self.folder + os.sep)

    def refuse(self, path):
        self.refused.append(os.fsdecode(path))
        raise OSError(self.code, os.strerror(self.code), os.fsdecode(path))

    def install(self, monkeypatch) -> Unwritable:
        read_only = self.code != errno.ENOSPC

        def os_open(path, flags, mode=0o777, *, dir_fd=None):
            if read_only and flags & WRITE_FLAGS and self.inside(path):
                self.refuse(path)
            return self.real["os_open"](path, flags, mode, dir_fd=dir_fd)

        def py_open(file, mode="r", *args, **kwargs):
            if read_only and any(c in mode for c in "wax+") and self.inside(file):
                self.refuse(file)
            return self.real["open"](file, mode, *args, **kwargs)

        def mkdir(path, mode=0o777, *, dir_fd=None):
            if read_only and self.inside(path):
                self.refuse(path)
            return self.real["mkdir"](path, mode, dir_fd=dir_fd)

        def moving(name):
            def move(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
                if read_only and self.inside(dst):
                    self.refuse(dst)
                return self.real[name](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
            return move

        def fsync(fd):
            target = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
            if not read_only and self.inside(target) and os.path.isfile(target):
                self.refuse(target)
            return self.real["fsync"](fd)

        for module, name, function in ((os, "open", os_open), (builtins, "open", py_open), (io, "open", py_open),
                                       (os, "mkdir", mkdir), (os, "replace", moving("replace")),
                                       (os, "rename", moving("rename")), (os, "fsync", fsync)):
            monkeypatch.setattr(module, name, function)
        return self


def tree(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` -> its size (folders as -1)."""
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """What the commands read: an image folder, a training checkpoint of an untrained tiny resnet10t (as
    swavkit writes one; a real 2-step run costs ~15 s here), labelled folders, an embeddings file."""
    import torch

    from swavkit.artifacts.checkpoint import CHECKPOINT_FORMAT, save_atomic
    from swavkit.config import from_dict, to_dict
    from swavkit.core.model import build_model

    root = tmp_path_factory.mktemp("sources")
    write_images(root / "images", 12, size_px=20)
    config = {"model": {"backbone": "resnet10t", "n_prototypes": 6, "hidden_dim": 16, "output_dim": 8},
              "crops": {"counts": [2], "sizes_px": [16], "min_scales": [0.5], "max_scales": [1.0]}}
    torch.manual_seed(0)
    model = build_model("resnet10t", n_prototypes=6, hidden_dim=16, output_dim=8)
    checkpoint = save_atomic({"format": CHECKPOINT_FORMAT, "config": to_dict(from_dict(config)), "step": 0,
                              "model": model.state_dict()}, root / "last.pt")
    train, val = write_labelled_folders(root / "labelled", n_train=2, n_val=1, size_px=16)
    embed_argv = ["embed", str(checkpoint), str(root / "images"), "--out", str(root / "emb.npy"),
                  "--workers", "0", "--device", "cpu", "--no-progress"]
    assert main(embed_argv) == 0
    return {"root": root, "images": root / "images", "run": checkpoint, "train": train, "val": val,
            "emb": root / "emb.npy"}


def command(kind: str, s: dict, dest: Path) -> list[str]:
    """The command line of one output kind, writing into ``dest``."""
    common = ["--workers", "0", "--no-progress"]
    return {
        "run folder": ["pretrain", *tiny_overrides(s["images"], dest / "run", **{"train.epochs": 1})],
        "export": ["export", str(s["run"]), str(dest / "exported")],
        "embeddings": ["embed", str(s["run"]), str(s["images"]), "--out", str(dest / "emb.npy"), "--device", "cpu",
                       *common],
        "neighbour page": ["neighbours", str(s["emb"]), "--out", str(dest / "nn"), "--no-progress"],
        "cluster page": ["cluster", "--checkpoint", str(s["run"]), "--data", str(s["images"]), "--out",
                         str(dest / "clusters"), *common],
        "result": ["knn", "--backbone", str(s["run"]), "--train", str(s["train"]), "--val", str(s["val"]),
                   "--k", "2", "--floors", "off", "--device", "cpu", "--out", str(dest / "knn.json"), *common],
        "shards": ["shard", str(s["images"]), str(dest / "shards"), "--no-progress"],
        "fine-tune folder": ["finetune", "--backbone", str(s["run"]), "--train", str(s["train"]), "--val",
                             str(s["val"]), "--label-fraction", "1", "--epochs", "1", "--min-steps", "1",
                             "--floors", "off", "--device", "cpu", "--out-dir", str(dest / "ft"), "--out",
                             str(dest / "ft.json"), *common],
    }[kind]


# each kind meets one failure, each failure several kinds (every pair would cost 3x the time for no new path:
# the errno only changes the words of the one line)
CASES = [("run folder", errno.ENOSPC), ("export", errno.EROFS), ("embeddings", errno.EACCES),
         ("neighbour page", errno.ENOSPC), ("cluster page", errno.EROFS), ("result", errno.ENOSPC),
         ("shards", errno.EACCES), ("fine-tune folder", errno.EROFS), ("embeddings", errno.ENOSPC),
         ("export", errno.ENOSPC), ("cluster page", errno.EACCES), ("fine-tune folder", errno.ENOSPC)]


@pytest.mark.parametrize("kind,code", CASES, ids=[f"{k}-{errno.errorcode[c]}" for k, c in CASES])
def test_an_unwritable_destination_is_one_line_and_leaves_nothing_half_written(kind, code, sources, tmp_path,
                                                                               monkeypatch, capsys):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("the user's own file")
    capsys.readouterr()
    fault = Unwritable(dest, code).install(monkeypatch)
    status = main(command(kind, sources, dest))
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and fault.refused, (kind, err)
    assert len(err) == 1 and "Traceback" not in err[0], err
    words = {errno.EROFS: "read-only file system", errno.ENOSPC: "no space left", errno.EACCES: "permission denied"}
    assert words[code] in err[0] and str(dest) in err[0], err[0]  # names a path there, not a temporary sibling
    assert not re.search(r"/\.", err[0]), err[0]  # nor a temporary name (.x.tmp, .folder.abc123)
    left = tree(dest)
    assert left.pop("notes.txt") == len("the user's own file")
    # nothing half-written: no temporary file, and no output that looks finished (a page, a manifest marked
    # complete, an export's weights, a result, shards.json)
    assert not [name for name in left if Path(name).name.startswith(".")], left
    finished = ("index.html", "emb.npy", "model.safetensors", "knn.json", "ft.json", "shards.json", "last.pt")
    assert not [name for name in left if Path(name).name in finished], left


def test_a_full_disk_mid_run_leaves_the_run_resumable(sources, tmp_path, monkeypatch, capsys):
    """embed: the disk fills after two chunks; the same command, once there is space, finishes the run and
    gives the same vectors as an uninterrupted one (the chunks before the failure are kept)."""
    import numpy as np

    from swavkit.embeddings.embed import load_embeddings

    out = tmp_path / "emb.npy"
    argv = ["embed", str(sources["run"]), str(sources["images"]), "--out", str(out), "--chunk-images", "4",
            "--device", "cpu", "--workers", "0", "--no-progress"]
    real_fsync, fsyncs = os.fsync, []

    def fsync_until_full(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if "chunk-000002" in target:  # the third chunk's vectors
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsyncs.append(target)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_until_full)
    assert main(argv) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert "no space left" in err and "chunk-000002.npy" in err and len(err.splitlines()) == 1
    assert not [p for p in tmp_path.rglob(".*")], "a temporary file was left"
    assert main(argv) == 0
    resumed, whole = load_embeddings(out), load_embeddings(sources["emb"])
    assert resumed.paths == whole.paths
    np.testing.assert_allclose(resumed.vectors, whole.vectors, atol=1e-5)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_and_folders_follow_the_umask(umask, tmp_path):
    """Atomic files (checkpoints, exports, manifests all go through atomic_writer) and the temporary
    folders exports are built in get 0o666 / 0o777 less the umask, as open() and mkdir give, not mkstemp's
    0600 / mkdtemp's 0700."""
    from swavkit.runtime.fileio import make_temp_folder, write_text_atomic

    previous = os.umask(umask)
    try:
        written = write_text_atomic(tmp_path / "sub" / "manifest.json", "{}")
        folder = make_temp_folder(tmp_path, ".export.")
        plain = tmp_path / "plain.txt"
        plain.write_text("")
        os.mkdir(tmp_path / "plain")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask == stat.S_IMODE(plain.stat().st_mode)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_an_export_is_readable_by_others_under_the_usual_umask(sources, tmp_path):
    previous = os.umask(0o022)
    try:
        assert main(["export", str(sources["run"]), str(tmp_path / "exported")]) == 0
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "exported", *(tmp_path / "exported").iterdir()]}
    assert modes.pop("exported") == 0o755 and set(modes.values()) == {0o644}, modes


def test_a_file_failing_twice_in_one_batch_is_listed_once(tmp_path):
    """Training's skipped.txt: a file sampled twice in one batch (or failing in several crops) is one line,
    with its first reason; a file met again in a later batch is not listed again."""
    from swavkit.data import read_skipped_report
    from swavkit.training.loop import _record_skipped
    from swavkit.training.step import TrainState

    state = TrainState.__new__(TrainState)
    state.skipped_files = set()
    report = tmp_path / "skipped.txt"
    _record_skipped(report, state, [("/a.png", "truncated"), ("/b.png", "empty"), ("/a.png", "crop 2")], True)
    _record_skipped(report, state, [("/b.png", "empty"), ("/c.png", "empty")], True)
    assert read_skipped_report(report) == [("/a.png", "truncated"), ("/b.png", "empty"), ("/c.png", "empty")]


def test_sharded_checkpoint_on_a_full_disk_is_the_disk_error_and_no_partial_shards(tmp_path, monkeypatch):
    """An FSDP run's DCP save: DCP wraps a rank's ENOSPC in its CheckpointException (a BaseException with
    every rank's traceback, which would escape the one-line handler); it becomes the OSError, and the
    partial shard folder goes (last.pt still names the previous, complete save)."""
    import torch

    from swavkit.artifacts.sharded_checkpoint import save_sharded_checkpoint
    from swavkit.errors import is_user_error

    class State:  # what save_sharded_checkpoint reads of a TrainState
        core = torch.nn.Linear(4, 2)
        optimizer = torch.optim.SGD(core.parameters(), lr=0.1)
        step = 3

        def state_dict(self, weights=True):
            return {"step": self.step}

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    Unwritable(checkpoints, errno.ENOSPC).install(monkeypatch)
    with pytest.raises(OSError) as caught:
        save_sharded_checkpoint(State(), checkpoints / "last.pt", {})
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC and is_user_error(caught.value)
    assert str(checkpoints) in str(caught.value.filename) and list(checkpoints.iterdir()) == []
