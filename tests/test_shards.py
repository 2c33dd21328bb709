"""WebDataset tar shards: `swavkit shard`, naming shards, the stream (bad members, broken shards, exact
resume) and training from shards in one and two processes."""

import importlib
import io
import json
import tarfile
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from conftest import tiny_overrides, write_images
from swavkit.cli import main
from swavkit.checkpoint import load_training_checkpoint
from swavkit.config import load_config
from swavkit.data import DataError, read_skipped_report
from swavkit.data.shards import ShardStream, expand_shards, is_shard_spec, pass_batch, stored_count
from swavkit.multicrop import MultiCropTransform
from swavkit.shard import check_shard_target, write_shards
from swavkit.train import train
from test_distributed import _train_worker, free_port
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


def test_two_processes_train_from_shards(shard_folder, tmp_path):
    overrides = tiny_overrides(shard_folder / "shard-*.tar", tmp_path / "two",
                               **{"train.epochs": 1, "data.colour_on_device": "true"})
    mp.spawn(_train_worker, args=(2, free_port(), overrides, None), nprocs=2)
    checkpoint = load_training_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    assert checkpoint["step"] == 5 and len(checkpoint["per_rank"]) == 2


def test_resume_with_other_workers_says_what_is_not_exact(tmp_path, capsys):
    train_module = importlib.import_module("swavkit.train")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  num_workers: 2\n")
    procs = SimpleNamespace(say=print)
    cfg = load_config([], tiny_overrides("x.tar", run))  # num_workers 0
    train_module._say_if_stream_layout_changed(cfg, procs, SimpleNamespace(config=run / "config.yaml"))
    assert "changed from 2 to 0" in capsys.readouterr().out
    cfg = load_config([], tiny_overrides("x.tar", run, **{"data.num_workers": 2}))
    train_module._say_if_stream_layout_changed(cfg, procs, SimpleNamespace(config=run / "config.yaml"))
    assert capsys.readouterr().out == ""
