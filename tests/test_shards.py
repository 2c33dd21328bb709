"""WebDataset tar shards: `swavkit shard`, naming shards, the stream (bad members, broken shards, exact
resume) and training from shards in one and two processes."""

import csv
import importlib
import io
import json
import os
import signal
import tarfile
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import tiny_overrides, write_images
from swavkit.cli.main import main
from swavkit.artifacts.checkpoint import load_training_checkpoint
from swavkit.config import load_config
from swavkit.data import DataError, read_skipped_report
from swavkit.data.shards import ShardStream, expand_shards, is_shard_spec, pass_batch, stored_count
from swavkit.data.multicrop import MultiCropTransform
from swavkit.data.shard_writer import check_shard_target, write_shards
from swavkit.training.trainer import train
from test_distributed import _train_worker
from test_train import assert_same_state


@pytest.fixture
def shard_folder(tmp_path):
    """40 images + 1 undecodable file -> 5 shards of 8 images."""
    write_images(tmp_path / "images", 40)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    index = write_shards(str(tmp_path / "images"), tmp_path / "shards", 8, progress=False)
    assert index["total"] == 40 and index["skipped"] == 1 and len(index["counts"]) == 5
    return tmp_path / "shards"


def _stream(shards, batch, *, seed=0, buffer=8, workers=0):
    cfg = load_config([], tiny_overrides("x", "y"))
    transform = MultiCropTransform.from_config(cfg.crops)
    stream = ShardStream(shards, transform, transform.collate, batch, rank=0, world=1, seed=seed,
                         shuffle_buffer=buffer, samples_per_epoch=40)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=pass_batch)
    return stream, loader


def _take(stream, loader, epoch, start, n_batches):
    stream.set_epoch(epoch, start=start)
    batches = iter(loader)
    return [next(batches) for _ in range(n_batches)]


def test_shard_writes_counts_report_and_refuses_foreign_folders(shard_folder, tmp_path):
    index = json.loads((shard_folder / "shards.json").read_text())
    assert stored_count(expand_shards(str(shard_folder / "shard-{000000..000004}.tar"))) == 40
    with tarfile.open(shard_folder / "shard-000000.tar") as tar:
        assert len(tar.getnames()) == 8 and all(n.endswith((".png", ".jpg")) for n in tar.getnames())
    assert [p.endswith("broken.jpg") for p, _ in read_skipped_report(shard_folder / "skipped.txt")] == [True]
    # its own output is replaced (fewer, larger shards: the stale ones go), a foreign file is never touched
    again = write_shards(str(tmp_path / "images"), shard_folder, 20, progress=False)
    assert sorted(again["counts"]) == ["shard-000000.tar", "shard-000001.tar"]
    assert not (shard_folder / "shard-000004.tar").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="did not write.*notes.txt"):
        write_shards(str(tmp_path / "images"), tmp_path / "mine", 8, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and check_shard_target(tmp_path / "new") == set()
    assert index["written_by"] == "swavkit shard"


def test_shard_command_line(tmp_path, capsys):
    write_images(tmp_path / "images", 6)
    assert main(["shard", str(tmp_path / "images"), str(tmp_path / "out"), "--images-per-shard", "4",
                 "--no-progress"]) == 0
    assert "shard-{000000..000001}.tar" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.tar").write_bytes(b"")
    assert main(["shard", str(tmp_path / "images"), str(tmp_path / "other"), "--images-per-shard", "4"]) == 2
    assert "did not write (x.tar)" in capsys.readouterr().err


def test_shard_names(shard_folder, tmp_path):
    listing = tmp_path / "shards.txt"
    listing.write_text("shards/shard-000001.tar\nshards/shard-000003.tar\n")
    assert is_shard_spec(str(listing)) and not is_shard_spec(str(tmp_path / "images"))
    # decided from the first entry alone: the rest of a (10M-line) list is not read, nor parsed
    long_list = tmp_path / "long.csv"
    long_list.write_text("path\n\nshards/shard-000001.tar\n" + "x" * (csv.field_size_limit() + 10) + "\n")
    assert is_shard_spec(str(long_list))
    (tmp_path / "images.csv").write_text("path\nimages/a.png\nshards/shard-000001.tar\n")
    assert not is_shard_spec(str(tmp_path / "images.csv")) and not is_shard_spec(str(tmp_path / "missing.txt"))
    assert [p.name for p in map(__import__("pathlib").Path, expand_shards(str(listing)))] == \
        ["shard-000001.tar", "shard-000003.tar"]
    assert len(expand_shards(str(shard_folder / "shard-*.tar"))) == 5
    with pytest.raises(DataError, match=r"no shard matches .*train-\*\.tar"):
        expand_shards(str(tmp_path / "train-*.tar"))
    with pytest.raises(DataError, match="1 shard.*do not exist.*shard-000005.tar"):
        expand_shards(str(shard_folder / "shard-{000000..000005}.tar"))


def test_bad_member_and_broken_shard_are_listed_and_the_stream_goes_on(shard_folder, tmp_path):
    shards = expand_shards(str(shard_folder / "shard-*.tar"))
    # an undecodable member inside a good shard, and a shard cut in the middle of its third member
    with tarfile.open(tmp_path / "bad-member.tar", "w") as tar:
        for name, data in (("a.png", (shard_folder / "x").name.encode()), ("b.txt", b"no image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = (shard_folder / "shard-000001.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(raw[:512 * 3 + 300])
    stream, loader = _stream([*shards, str(tmp_path / "bad-member.tar"), str(tmp_path / "cut.tar")], 8, buffer=4)
    batches = _take(stream, loader, 0, 0, 8)
    assert all(len(b[1]) == 8 and b[0][0].shape[0] == 8 for b in batches)  # every batch is full
    skipped = {name.rsplit("/", 1)[-1]: why for b in batches for name, why in b[2]}
    assert "a.png" in skipped and "b" in skipped and "no image" in skipped["b"]
    assert "broken shard" in skipped["cut.tar"]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resume_is_exact(shard_folder, workers):
    """The statement of swavkit.data.shards: resumed at batch k of an epoch (same workers), the batches
    are those of the uninterrupted stream from batch k on, the same images with the same crops."""
    shards = expand_shards(str(shard_folder / "shard-*.tar"))
    stream, loader = _stream(shards, 4, buffer=6, workers=workers)
    whole = _take(stream, loader, 1, 0, 9)
    resumed = _take(stream, loader, 1, 5 * 4, 4)
    for a, b in zip(whole[5:], resumed):
        assert torch.equal(a[1], b[1])
        for crop_a, crop_b in zip(a[0], b[0]):
            assert torch.equal(crop_a, crop_b)
    if workers == 0:  # one reader of all 5 shards: 40 images before any repeats (2 readers: 24 + 16)
        seen = torch.cat([b[1] for b in whole]).tolist()
        assert len(set(seen)) == len(seen) == 36
    assert not torch.equal(_take(stream, loader, 2, 0, 1)[0][1], whole[0][1])  # each epoch its own order


def test_train_from_shards_resume_equals_uninterrupted(shard_folder, tmp_path):
    """With a shard cut short among them: listed in skipped.txt, training goes on, and a run killed
    mid-epoch and resumed ends with the weights of the uninterrupted run (the exactness statement)."""
    raw = (shard_folder / "shard-000002.tar").read_bytes()
    (shard_folder / "shard-000005.tar").write_bytes(raw[:512 * 5 + 100])  # not in shards.json: count given
    pattern = str(shard_folder / "shard-{000000..000005}.tar")
    extra = {"train.epochs": 1, "data.shuffle_buffer": 6, "data.samples_per_epoch": 48}  # 6 steps of 8: past pass 0
    full = train(load_config([], tiny_overrides(pattern, tmp_path / "full", **extra)), progress=False)
    assert full.completed and full.step == 6
    parts = tmp_path / "parts"
    assert train(load_config([], tiny_overrides(pattern, parts, **extra)), progress=False, stop_after_steps=3).step == 3
    last = train(load_config([], tiny_overrides(pattern, parts, **extra)), progress=False)
    assert last.completed and last.step == 6
    assert_same_state(load_training_checkpoint(full.checkpoint)["model"], load_training_checkpoint(last.checkpoint)["model"])
    for run in (tmp_path / "full", parts):
        listed = read_skipped_report(run / "skipped.txt")
        assert [p.endswith("shard-000005.tar") and "broken shard" in why for p, why in listed] == [True]


def test_pattern_matching_nothing_is_one_line(tmp_path, capsys):
    code = main(["pretrain", *tiny_overrides(tmp_path / "nothing-{0..3}.tar", tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "no shard matches" in err and "nothing-{0..3}.tar" in err


def test_two_processes_train_from_shards(shard_folder, tmp_path, gloo_pair):
    overrides = tiny_overrides(shard_folder / "shard-*.tar", tmp_path / "two",
                               **{"train.epochs": 1, "data.colour_on_device": "true"})
    gloo_pair.run(_train_worker, overrides, None)
    checkpoint = load_training_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    assert checkpoint["step"] == 5 and len(checkpoint["per_rank"]) == 2


def test_resume_with_other_workers_says_what_is_not_exact(tmp_path, capsys):
    data_setup = importlib.import_module("swavkit.training.data_setup")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  num_workers: 2\n")
    procs = SimpleNamespace(say=print)
    cfg = load_config([], tiny_overrides("x.tar", run))  # num_workers 0
    data_setup.say_if_stream_layout_changed(cfg, procs, SimpleNamespace(config=run / "config.yaml"))
    assert "changed from 2 to 0" in capsys.readouterr().out
    cfg = load_config([], tiny_overrides("x.tar", run, **{"data.num_workers": 2}))
    data_setup.say_if_stream_layout_changed(cfg, procs, SimpleNamespace(config=run / "config.yaml"))
    assert capsys.readouterr().out == ""


def _within(seconds, run):
    """run() under an alarm, so that a stream which never ends fails the test instead of hanging it."""
    def on_alarm(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        return run()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _undecodable_shards(folder):
    """Two files that are no tar at all and a tar whose only member is no image: nothing to decode."""
    folder.mkdir()
    for i in range(2):
        (folder / f"bad-{i}.tar").write_bytes(b"not a tar at all " * 64)
    with tarfile.open(folder / "bad-2.tar", "w") as tar:
        info = tarfile.TarInfo("0001.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    return str(folder / "bad-{0..2}.tar")


def test_training_from_shards_with_nothing_decodable_is_one_line(tmp_path, capsys):
    spec = _undecodable_shards(tmp_path / "bad")
    code = _within(60, lambda: main(["pretrain", *tiny_overrides(spec, tmp_path / "run",
                                                                 **{"data.samples_per_epoch": 16})]))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "nothing in" in err and "bad-{0..2}.tar" in err and "could be decoded" in err
    # shards whose members are all undecodable image bytes: the same message, naming the first one
    (tmp_path / "junk").mkdir()
    with tarfile.open(tmp_path / "junk" / "j.tar", "w") as tar:
        for key in range(3):
            info = tarfile.TarInfo(f"{key:04d}.jpg")
            info.size = 12
            tar.addfile(info, io.BytesIO(b"\xff\xd8\xff not jpeg"))
    code = _within(60, lambda: main(["pretrain", *tiny_overrides(tmp_path / "junk" / "j.tar", tmp_path / "run2",
                                                                 **{"data.samples_per_epoch": 16})]))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "nothing in" in err and "0000.jpg" in err, err


def test_stream_of_shards_without_an_image_ends_with_data_error(tmp_path):
    """The stream itself (not only the start-up check) ends once every shard was read without an image."""
    shards = expand_shards(_undecodable_shards(tmp_path / "bad"))
    stream, loader = _stream(shards, 4)
    with pytest.raises(DataError, match=r"nothing in the 3 shards .*bad-0.tar \.\.\. .*bad-2.tar could be decoded"):
        _within(60, lambda: _take(stream, loader, 0, 0, 1))
    stream.set_epoch(0, start=8)  # the fast-forward of a resume reads the same stream
    with pytest.raises(DataError, match="nothing in the 3 shards"):
        _within(60, lambda: next(iter(stream)))


def _members(shard):
    """(name, bytes) of each member: a shard's content without the tar headers' write times."""
    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _folder_state(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_reshard_failing_midway_leaves_the_earlier_set_untouched(shard_folder, tmp_path, monkeypatch):
    """The new set is written under temporary names and swapped in only once complete: an interruption
    while writing it (Ctrl-C here, at the 12th image) changes nothing in OUT."""
    images = importlib.import_module("swavkit.data.images")
    before = _folder_state(shard_folder)
    real, calls = images._decode_rgb, []

    def interrupted(source):
        calls.append(source)
        if len(calls) == 12:
            raise KeyboardInterrupt
        return real(source)

    monkeypatch.setattr(images, "_decode_rgb", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_shards(str(tmp_path / "images"), shard_folder, 4, seed=1, progress=False)
    assert _folder_state(shard_folder) == before


_KILL_SCRIPT = """
import os, signal, sys
import swavkit.data.images as images
import swavkit.data.shard_writer as shard
real, when, calls = {patched}, int(sys.argv[3]), []
def killed(*args):
    calls.append(1)
    if len(calls) == when:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args)
{patch}
shard.write_shards(sys.argv[1], sys.argv[2], 4, progress=False)
"""


@pytest.mark.parametrize("where", ["writing", "swapping"])
def test_a_killed_shard_run_is_cleaned_up_by_the_next(shard_folder, tmp_path, where):
    """kill -9 while the new shards are written, or while they are renamed into place: the same command
    again removes the leftovers (and only them) and gives the set an uninterrupted run gives."""
    import os
    import subprocess
    import sys
    patched, patch = (("images._decode_rgb", "images._decode_rgb = killed") if where == "writing"
                      else ("os.replace", "shard.os = type(os)('os'); shard.os.__dict__.update(os.__dict__); "
                                          "shard.os.replace = killed"))
    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT.format(patched=patched, patch=patch))
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "clean").mkdir()
    for target in (out, tmp_path / "clean"):  # an earlier set of 20 per shard in both
        write_shards(str(tmp_path / "images"), target, 20, progress=False)
    when = 10 if where == "writing" else 3
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "images"), str(out), str(when)],
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, capture_output=True)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()
    left = {p.name for p in out.iterdir()}
    assert any(name.endswith(".swavkit-new") or name.endswith(".tmp") for name in left), left
    again = write_shards(str(tmp_path / "images"), out, 4, progress=False)
    clean = write_shards(str(tmp_path / "images"), tmp_path / "clean", 4, progress=False)
    assert again["counts"] == clean["counts"] and len(again["counts"]) == 10
    assert _folder_state(out).keys() == _folder_state(tmp_path / "clean").keys()
    assert all(_members(out / name) == _members(tmp_path / "clean" / name) for name in clean["counts"])


def test_leftover_names_are_recognised_narrowly(tmp_path):
    (tmp_path / "out").mkdir()
    for name in ("shard-000003.tar.swavkit-new", ".shard-000001.tar.swavkit-new.k2j_9x0a.tmp",
                 ".shards.json.ab12cd34.tmp", ".skipped.txt.zz99zz99.tmp"):
        (tmp_path / "out" / name).write_bytes(b"x")
    assert len(check_shard_target(tmp_path / "out")) == 4  # all swavkit's own leftovers
    for name in ("shard-000003.tar", "my.tar.swavkit-new", ".notes.txt.ab12cd34.tmp"):
        (tmp_path / "out" / name).write_bytes(b"mine")  # without a swavkit index: not ours
        with pytest.raises(DataError, match="did not write"):
            check_shard_target(tmp_path / "out")
        (tmp_path / "out" / name).unlink()
    # the index of a swap cut short names both sets; only plain shard names inside OUT count from it
    (tmp_path / "out" / "shards.json").write_text(json.dumps({"written_by": "swavkit shard", "counts": {},
                                                              "replacing": ["shard-000007.tar", "../x.tar", "a.txt"]}))
    assert check_shard_target(tmp_path / "out") >= {"shards.json", "skipped.txt", "shard-000007.tar"}
    assert not {"../x.tar", "a.txt"} & check_shard_target(tmp_path / "out")


def test_shard_reads_each_image_file_once(tmp_path, monkeypatch):
    import builtins
    import io as io_module
    paths = {str(p) for p in write_images(tmp_path / "images", 6)}
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    paths.add(str(tmp_path / "images" / "broken.jpg"))
    opened = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) in paths:
            opened.append(os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io_module, "open", counting_open)
    index = write_shards(str(tmp_path / "images"), tmp_path / "out", 4, progress=False)
    assert index["total"] == 6 and index["skipped"] == 1
    assert sorted(opened) == sorted(paths)  # each file opened exactly once
