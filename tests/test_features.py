"""Labelled folders and feature extraction: order, values, errors, and the 2-process gather."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from evaluation_fixtures import one_thread, write_labelled_folders, write_labelled_split  # noqa: F401
from swavkit.artifacts.checkpoint import export_backbone
from swavkit.data import DataError, eval_transform, find_images
from swavkit.data import LabelledImageFolder
from swavkit.evaluation.features import RawPixels, extract_features, load_eval_backbone
from swavkit.data.constants import IMAGENET_MEAN as MEAN
from swavkit.data.constants import IMAGENET_STD as STD
from swavkit.artifacts.preprocessing import resolve_preprocessing



def test_labelled_folder_labels_follow_sorted_class_names(tmp_path):
    train_dir, _ = write_labelled_folders(tmp_path, n_train=3, n_val=1)
    nested = train_dir / "red" / "sub"
    nested.mkdir()
    (train_dir / "red" / "red000.png").rename(nested / "moved.png")  # images may sit deeper in a class
    data = LabelledImageFolder(train_dir)
    assert data.classes == ["blue", "green", "red"]
    assert len(data) == 9 and data.targets == [0] * 3 + [1] * 3 + [2] * 3
    assert all(f"/{data.classes[label]}/" in path for path, label in data.samples)
    image, label = data[0]
    assert image.mode == "RGB" and label == 0


def test_val_labels_use_the_train_class_list(tmp_path):
    train_dir, val_dir = write_labelled_folders(tmp_path, n_train=2, n_val=2)
    train = LabelledImageFolder(train_dir)
    for path in (val_dir / "blue").iterdir():  # val lacks a class: the others must keep their index
        path.unlink()
    (val_dir / "blue").rmdir()
    val = LabelledImageFolder(val_dir, classes=train.classes)
    assert sorted(set(val.targets)) == [train.class_to_idx["green"], train.class_to_idx["red"]] == [1, 2]
    write_labelled_split(val_dir, 1, classes={"purple": (128, 0, 128)})
    with pytest.raises(DataError, match="purple"):
        LabelledImageFolder(val_dir, classes=train.classes)



def test_symlink_loops_give_each_image_once(tmp_path):
    # Evaluation used to follow links without training's loop guard: one self-link repeated a class's images
    # ~40 times (skewing k-NN and linear results) and two links could walk for ever.
    train_dir, _ = write_labelled_folders(tmp_path, n_train=3, n_val=1)
    expected = sorted(str(p) for p in train_dir.rglob("*.png"))
    os.symlink(train_dir / "red", train_dir / "red" / "self")  # a class folder linking to itself
    os.symlink(train_dir, train_dir / "green" / "up1")  # two links up to the root
    os.symlink(train_dir, train_dir / "green" / "up2")
    os.symlink(train_dir, train_dir / "everything")  # a "class" that is the root again
    data = LabelledImageFolder(train_dir)
    assert data.classes == ["blue", "green", "red"]
    assert sorted(data.paths) == expected and data.targets == [0] * 3 + [1] * 3 + [2] * 3
    assert find_images(train_dir) == expected  # pretraining and the cluster explorer walk alike

def test_max_per_class_is_a_deterministic_subset(tmp_path):
    train_dir, _ = write_labelled_folders(tmp_path, n_train=10, n_val=1)
    full = LabelledImageFolder(train_dir)
    capped = LabelledImageFolder(train_dir, max_per_class=4)
    again = LabelledImageFolder(train_dir, max_per_class=4)
    assert capped.samples == again.samples
    assert [capped.targets.count(c) for c in range(3)] == [4, 4, 4]
    assert set(capped.samples) <= set(full.samples)
    # not simply the first files by name
    firsts = {p for p, _ in full.samples if p.endswith(("000.png", "001.png", "002.png", "003.png"))}
    assert {p for p, _ in capped.samples} != firsts


@pytest.mark.parametrize("layout", ["missing", "file", "no_classes", "no_images"])
def test_bad_folders_raise_one_line_naming_the_folder(tmp_path, layout):
    root = tmp_path / "data"
    if layout == "file":
        root.write_text("x")
    elif layout == "no_classes":
        root.mkdir()
        (root / "loose.png").write_bytes(b"")
    elif layout == "no_images":
        (root / "cat").mkdir(parents=True)
        (root / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError) as info:
        LabelledImageFolder(root)
    assert str(root) in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unreadable_image_names_the_file(tmp_path):
    train_dir, _ = write_labelled_folders(tmp_path, n_train=2, n_val=1)
    broken = train_dir / "green" / "broken.png"
    broken.write_bytes(b"not a png at all")
    data = LabelledImageFolder(train_dir, eval_transform(32, MEAN, STD, 1.0))
    with pytest.raises(DataError, match="broken.png"):
        extract_features(torch.nn.Flatten(), data, "cpu", batch_size=4, num_workers=0, progress=False)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_extract_features_equals_a_direct_forward_in_order(tmp_path, num_workers):
    train_dir, _ = write_labelled_folders(tmp_path, n_train=4, n_val=1)
    data = LabelledImageFolder(train_dir, eval_transform(32, MEAN, STD, 1.0))
    backbone = load_eval_backbone("timm:resnet10t")
    backbone.train()  # the caller's mode must come back, and BN statistics must not move
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    features, labels = extract_features(backbone, data, "cpu", batch_size=5, num_workers=num_workers,
                                        progress=False)
    assert backbone.training
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
    backbone.eval()
    with torch.no_grad():
        expected = backbone(torch.stack([data[i][0] for i in range(len(data))]))
    assert features.shape == (12, backbone.num_features) and features.dtype == torch.float32
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)
    assert labels.tolist() == data.targets
    # the result is an ordinary tensor: a linear probe can train on it
    weight = torch.zeros(features.shape[1], 3, requires_grad=True)
    torch.nn.functional.cross_entropy(features @ weight, labels).backward()


def test_raw_pixels_removes_each_image_mean():
    images = torch.rand(4, 3, 8, 8) + torch.arange(4.0)[:, None, None, None]
    out = RawPixels()(images)
    assert out.shape == (4, 3 * 8 * 8)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(RawPixels()(images + 5.0), out, atol=1e-5, rtol=0)  # brightness-invariant


def test_preprocessing_sources(tmp_path):
    default = resolve_preprocessing("timm:resnet10t")
    assert (default.image_size_px, default.crop_fraction, default.size_from) == (224, 0.875, "default")
    small = resolve_preprocessing("timm:resnet10t", 32)
    assert (small.image_size_px, small.crop_fraction) == (32, 1.0)
    pixels = resolve_preprocessing("pixels", 32)
    assert pixels.mean == (0.0, 0.0, 0.0) and pixels.std == (1.0, 1.0, 1.0)
    export = export_backbone(load_eval_backbone("timm:resnet10t"), tmp_path / "export", image_size_px=48,
                             mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    exported = resolve_preprocessing(export)
    assert (exported.image_size_px, exported.crop_fraction, exported.size_from) == (48, 1.0, "export config")
    assert exported.mean == (0.5, 0.5, 0.5) and exported.std == (0.25, 0.25, 0.25)
    assert resolve_preprocessing(export, 96).image_size_px == 96  # an explicit size wins


# ----------------------------------------------------------------------------------------------------
# two processes (gloo): every rank gets exactly the single-process result

class _Items(torch.utils.data.Dataset):
    def __init__(self, n):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 8, 8, generator=generator)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % 3


def _small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten())


def _worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from swavkit.runtime import distributed

    torch.set_num_threads(1)
    distributed.init("cpu")
    try:
        features, labels = extract_features(_small_net(), _Items(11), "cpu", batch_size=2, num_workers=0,
                                            progress=False)
        torch.save({"features": features, "labels": labels}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


def test_two_process_extraction_equals_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imported modules instead of re-importing torch and timm
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    single_features, single_labels = extract_features(_small_net(), _Items(11), "cpu", batch_size=4,
                                                      num_workers=0, progress=False)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["labels"].tolist() == single_labels.tolist() == [i % 3 for i in range(11)]
        torch.testing.assert_close(got["features"], single_features, rtol=1e-5, atol=1e-6)


def test_random_init_floor_is_reproducible():
    state = torch.random.get_rng_state()
    first = load_eval_backbone("timm:resnet10t").state_dict()
    second = load_eval_backbone("timm:resnet10t").state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_given_dataloader_is_used_as_is():
    items = _Items(7)
    loader = torch.utils.data.DataLoader(items, batch_size=3, shuffle=False)
    features, labels = extract_features(_small_net(), loader, "cpu", progress=False)
    with torch.no_grad():
        expected = _small_net().eval()(items.images)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    assert labels.tolist() == [i % 3 for i in range(7)]
