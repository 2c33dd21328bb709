"""Data sources besides one folder: list files, several folders, the compact path list and its cache."""

import os
import pickle

import numpy as np
import pytest

import importlib
from conftest import tiny_overrides, write_images
from swavkit.config import load_config
from swavkit.data import DataError, UnlabeledImageFolder
from swavkit.data.filelist import CACHE_NAME, PathList, load_path_cache, read_list_file, save_path_cache
from swavkit.data.sources import data_specs, resolve_images
from swavkit.training.trainer import train

data_setup = importlib.import_module("swavkit.training.data_setup")  # where train() resolves its images
from test_distributed import _train_worker


def test_path_list_round_trips_any_name_and_slices():
    names = ["a/b.png", "ü/ñ.jpg", os.fsdecode(b"bad\xffname.png"), "tab\tname.png", ""]
    paths = PathList.from_paths(names)
    assert len(paths) == 5 and list(paths) == names and paths[-2] == names[-2]
    assert paths[1:4] == names[1:4] and paths[::2] == names[::2]
    assert list(pickle.loads(pickle.dumps(paths))) == names
    assert list(paths + PathList.from_paths(["z.png"])) == names + ["z.png"]
    assert paths.buffer.dtype == np.uint8 and paths.offsets.dtype == np.int64  # no Python objects per path
    with pytest.raises(IndexError):
        paths[5]


def test_txt_list_paths_are_relative_to_the_list(tmp_path, monkeypatch):
    write_images(tmp_path / "data" / "imgs", 4)
    listing = tmp_path / "data" / "train.txt"
    listing.write_text("imgs/img001.png\n\nimgs/img000.jpg\n" + str(tmp_path / "data" / "imgs" / "img002.png") + "\n")
    monkeypatch.chdir(tmp_path)  # the working folder must not matter
    found = read_list_file(listing)
    assert found == [str(tmp_path / "data" / "imgs" / "img001.png"), str(tmp_path / "data" / "imgs" / "img000.jpg"),
                     str(tmp_path / "data" / "imgs" / "img002.png")]
    assert all(os.path.isfile(p) for p in found)
    dataset = UnlabeledImageFolder(str(listing), paths=resolve_images([str(listing)]))
    image, _, skipped = dataset[0]
    assert image.size == (24, 24) and skipped == []


def test_csv_path_column_or_first_column(tmp_path):
    (tmp_path / "with_header.csv").write_text("label,path\n3,x/a.png\n4,x/b.png\n")
    (tmp_path / "no_header.csv").write_text("x/c.png,7\nx/d.png,8\n\n")
    assert read_list_file(tmp_path / "with_header.csv") == [str(tmp_path / "x" / "a.png"), str(tmp_path / "x" / "b.png")]
    assert read_list_file(tmp_path / "no_header.csv") == [str(tmp_path / "x" / "c.png"), str(tmp_path / "x" / "d.png")]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="empty.txt names no files"):
        read_list_file(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="missing.csv does not exist"):
        read_list_file(tmp_path / "missing.csv")


def test_several_folders_and_lists_read_in_order(tmp_path):
    a = write_images(tmp_path / "a", 3)
    b = write_images(tmp_path / "b", 2, seed=1)
    (tmp_path / "c.txt").write_text("a/img000.jpg\n")
    found = list(resolve_images([str(tmp_path / "b"), str(tmp_path / "a"), str(tmp_path / "c.txt")]))
    assert found == sorted(map(str, b)) + sorted(map(str, a)) + [str(tmp_path / "a" / "img000.jpg")]
    with pytest.raises(DataError, match="both set"):
        data_specs("x", ["y"])
    with pytest.raises(DataError, match="does not exist"):
        resolve_images([str(tmp_path / "a"), str(tmp_path / "nope")])


def test_cache_refuses_another_source_and_corruption(tmp_path):
    paths = PathList.from_paths(["a.png", "b.png"])
    save_path_cache(tmp_path, paths, "source-1")
    cached, _ = load_path_cache(tmp_path, "source-1")
    assert list(cached) == ["a.png", "b.png"]
    assert load_path_cache(tmp_path, "source-2")[0] is None
    (tmp_path / CACHE_NAME).write_bytes(b"PK\x03\x04 torn")
    cached, why = load_path_cache(tmp_path, "source-1")
    assert cached is None and "unreadable" in why


def test_list_trains_and_resume_reads_the_cache(image_folder, tmp_path, monkeypatch):
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{os.path.relpath(p, tmp_path)}\n" for p in sorted(image_folder.iterdir())))
    out = tmp_path / "run"
    overrides = tiny_overrides(listing, out, **{"train.epochs": 1})
    first = train(load_config([], overrides), progress=False, stop_after_steps=2)
    assert not first.completed and (out / CACHE_NAME).is_file()
    assert list(load_path_cache(out, data_setup.source_key([str(listing)]))[0]) \
        == [str(tmp_path / os.path.relpath(p, tmp_path)) for p in sorted(image_folder.iterdir())]

    def no_walk(specs):
        raise AssertionError("the resume walked the data source again")

    monkeypatch.setattr(data_setup, "resolve_images", no_walk)
    resumed = train(load_config([], overrides), progress=False)
    assert resumed.completed and resumed.step == 4  # 32 images / batch 8


def test_resume_with_a_corrupt_cache_walks_again(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    overrides = tiny_overrides(image_folder, out, **{"train.epochs": 1})
    train(load_config([], overrides), progress=False, stop_after_steps=2)
    (out / CACHE_NAME).write_bytes(b"not a cache")
    walks = []
    real = data_setup.resolve_images
    monkeypatch.setattr(data_setup, "resolve_images", lambda specs: walks.append(specs) or real(specs))
    assert train(load_config([], overrides), progress=False).completed
    assert walks == [[str(image_folder)]]
    assert load_path_cache(out, data_setup.source_key([str(image_folder)]))[0] is not None  # rewritten


def test_two_processes_train_from_a_list(image_folder, tmp_path, gloo_pair):
    listing = tmp_path / "list.csv"
    listing.write_text("path\n" + "".join(f"images/{p.name}\n" for p in sorted(image_folder.iterdir())))
    overrides = tiny_overrides(listing, tmp_path / "two", **{"train.epochs": 1})
    gloo_pair.run(_train_worker, overrides, None)
    assert (tmp_path / "two" / "backbone").is_dir() and (tmp_path / "two" / CACHE_NAME).is_file()


def test_csv_row_without_the_path_column_is_named(tmp_path):
    (tmp_path / "short.csv").write_text("label,path\n1,a.png\n2\n")
    with pytest.raises(DataError, match="short.csv row 3 has no column 2"):
        read_list_file(tmp_path / "short.csv")


def test_csv_field_over_the_csv_limit_is_one_line_naming_file_and_line(tmp_path):
    import csv
    over_long = "x" * (csv.field_size_limit() + 10)
    (tmp_path / "long.csv").write_text(f"path\na.png\n{over_long}.png\nb.png\n")
    with pytest.raises(DataError, match=r"long.csv line 3: unreadable CSV \(field larger than field limit") as caught:
        read_list_file(tmp_path / "long.csv")
    assert "\n" not in str(caught.value)
    # an unclosed quote runs its field on: named at the line where that row starts
    (tmp_path / "quote.csv").write_text('path\n"a.png\n' + "b.png\n" * (csv.field_size_limit() // 6 + 10))
    with pytest.raises(DataError, match=r"quote.csv line 2: unreadable CSV"):
        read_list_file(tmp_path / "quote.csv")


def test_first_list_entry_reads_only_up_to_it(tmp_path, monkeypatch):
    import csv
    from swavkit.data.filelist import first_list_entry
    (tmp_path / "a.txt").write_text("\n  \nsub/x.tar\ny.png\n")
    (tmp_path / "h.csv").write_text("label,path\n\n3,s/1.tar\n")
    (tmp_path / "n.csv").write_text("s/2.tar,9\n")
    (tmp_path / "blank.txt").write_text("\n\n")
    assert first_list_entry(tmp_path / "a.txt") == str(tmp_path / "sub" / "x.tar")
    assert first_list_entry(tmp_path / "h.csv") == str(tmp_path / "s" / "1.tar")
    assert first_list_entry(tmp_path / "n.csv") == str(tmp_path / "s" / "2.tar")
    assert first_list_entry(tmp_path / "blank.txt") is None
    # what follows the first entry is never read: a later row the csv module refuses does not matter
    (tmp_path / "later.csv").write_text("path\nfirst.png\n" + "x" * (csv.field_size_limit() + 10) + "\n")
    assert first_list_entry(tmp_path / "later.csv") == str(tmp_path / "first.png")
    with pytest.raises(DataError, match="later.csv line 3"):
        read_list_file(tmp_path / "later.csv")
