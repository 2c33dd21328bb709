"""The evaluation side's single homes: device/precision words, the crop rule (and the export's crop_pct),
the options objects shared by the library and the CLI, and the reference probe's LR schedule."""

import json
import math

import pytest
import torch
from PIL import Image

from evaluation_fixtures import one_thread, write_labelled_folders  # noqa: F401
from swavkit.artifacts.checkpoint import export_backbone
from swavkit.cli.evaluate import evaluation_options
from swavkit.cli.main import build_parser, parse_arguments
from swavkit.config import ConfigError
from swavkit.runtime.cores import default_num_workers
from swavkit.data import eval_transform
from swavkit.runtime.device import resolve_device, resolve_precision
from swavkit.evaluation.options import EvalOptions, KnnOptions, LinearOptions, apply_keywords
from swavkit.evaluation.features import load_eval_backbone
from swavkit.evaluation.knn import evaluate_knn
from swavkit.data.transforms import Preprocessing
from swavkit.data.constants import crop_fraction_for


def test_device_words_and_objects():
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(torch.device("cpu"))
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        for gpu in ("cuda", "cuda:1", torch.device("cuda", 0)):
            with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
                resolve_device(gpu)
    with pytest.raises(ConfigError, match="'nope' is not a device"):
        resolve_device("nope")


def test_precision_words():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ConfigError, match="'fp8' is not one of"):
        resolve_precision("fp8", cpu)


@pytest.mark.parametrize("size_px, fraction", [(16, 1.0), (64, 1.0), (65, 0.875), (224, 0.875)])
def test_one_crop_rule_everywhere(size_px, fraction):
    assert crop_fraction_for(size_px) == fraction
    assert Preprocessing.for_size(size_px).crop_fraction == fraction
    # the transform's default follows the rule: a 2*size image is resized to size/fraction, then cropped
    image = Image.new("RGB", (2 * size_px, 2 * size_px))
    ruled = eval_transform(size_px, (0.5,) * 3, (0.5,) * 3)(image)
    explicit = eval_transform(size_px, (0.5,) * 3, (0.5,) * 3, fraction)(image)
    assert ruled.shape == (3, size_px, size_px) and torch.equal(ruled, explicit)


@pytest.mark.parametrize("size_px", [32, 224])
def test_export_records_the_crop_swavkit_evaluates_with(tmp_path, size_px):
    # timm's registry says 0.95 for resnet10t; swavkit evaluates with its own rule
    out = export_backbone(load_eval_backbone("timm:resnet10t"), tmp_path / "export", image_size_px=size_px,
                          mean=(0.5,) * 3, std=(0.5,) * 3)
    pretrained_cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert pretrained_cfg["crop_pct"] == crop_fraction_for(size_px)


def test_library_default_workers_suit_the_machine():
    assert EvalOptions().num_workers == default_num_workers()


def test_keywords_set_the_options_they_name():
    options, knn = apply_keywords({"k": 5, "batch_size": 8}, EvalOptions(), KnnOptions(temperature=0.1))
    assert (knn.k, knn.temperature, options.batch_size) == (5, 0.1, 8)
    with pytest.raises(TypeError, match="unexpected keyword argument.*colour"):
        apply_keywords({"colour": 1}, EvalOptions(), KnnOptions())


def test_options_and_keywords_give_the_same_result(tmp_path):
    train_dir, val_dir = write_labelled_folders(tmp_path, n_train=4, n_val=2, size_px=16)
    common = EvalOptions(image_size_px=16, num_workers=0, out_json="", progress=False)
    by_options = evaluate_knn("pixels", train_dir, val_dir, common, KnnOptions(k=3, temperature=0.5))
    by_keywords = evaluate_knn("pixels", train_dir, val_dir, k=3, temperature=0.5, image_size_px=16,
                               num_workers=0, out_json="", progress=False)
    assert by_options["protocol"] == by_keywords["protocol"] and by_options["metrics"] == by_keywords["metrics"]
    assert by_options["protocol"]["k"] == 3 and by_options["protocol"]["temperature"] == 0.5


def test_cli_flags_map_onto_the_options():
    knn_args = parse_arguments(build_parser(), ["knn", "--backbone", "b", "--train", "t", "--val", "v", "--k", "7",
                                                "--image-size", "48", "--workers", "2", "--out", "r.json",
                                                "--ivf-lists", "9", "--index", "ivf", "--no-progress"])
    options, knn = evaluation_options(knn_args, KnnOptions)
    assert options == EvalOptions(image_size_px=48, num_workers=2, out_json="r.json", progress=False)
    assert knn == KnnOptions(k=7, index="ivf", n_lists=9)
    linear_args = parse_arguments(build_parser(), ["linear", "--backbone", "b", "--train", "t", "--val", "v",
                                                   "--recipe", "reference", "--epochs", "3", "--lr", "0.1"])
    options, linear = evaluation_options(linear_args, LinearOptions)
    assert options == EvalOptions() and linear == LinearOptions(recipe="reference", epochs=3, lr=0.1)
    weight_decays = parse_arguments(build_parser(), ["linear", "--backbone", "b", "--train", "t", "--val", "v",
                                                     "--weight-decays", "0.1", "1"])
    assert evaluation_options(weight_decays, LinearOptions)[1].weight_decays == [0.1, 1.0]


def test_reference_probe_lr_is_a_cosine_to_zero(monkeypatch):
    """linear_probe_reference sets each step's LR from swavkit.core.schedule: peak at step 0, half at the
    middle, 0 at the end, and 0.5 * peak * (1 + cos(pi * t / T)) in between."""
    import swavkit.evaluation.linear_probe as linear_probe

    seen = []
    original = torch.optim.SGD.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", record)
    data = [(torch.randn(3, 4, 4), i % 2) for i in range(8)]
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 4))
    result = linear_probe.linear_probe_reference(backbone, _PilFree(data), _PilFree(data), n_classes=2, epochs=4,
                                                 batch_size=4, lr=0.256, num_workers=0, progress=False)
    peak, total = result["peak_lr"], result["steps"]
    assert total == 8 and len(seen) == total and peak == pytest.approx(0.004)
    expected = [0.5 * peak * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    assert seen == pytest.approx(expected)


class _PilFree(torch.utils.data.Dataset):
    """Items that are already tensors: (image [3, 4, 4], label)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_one_set_up_writes_the_record_and_what_belongs_beside_it(tmp_path, monkeypatch):
    """evaluation/setup: the record gets its path, the file beside it is written first, "" writes nothing."""
    from swavkit.evaluation import report, setup

    monkeypatch.setattr(report, "git_commit", lambda path=None: (None, None))  # no git subprocess: a fast test

    def record(run):
        return run.record(metrics={"top1": 50.0}, protocol={}, backbone={"source": "x"}, data={"n_train": 1},
                          preprocessing=Preprocessing.for_size(32))

    out = tmp_path / "r.json"
    run = setup.start("knn", "x", EvalOptions(out_json=str(out), device="cpu"))
    written = []
    result = run.publish(record(run), str(out), write_beside=lambda path: written.append(path.exists()))
    assert written == [False] and json.loads(out.read_text())["schema"] == report.RESULT_SCHEMA
    assert result["result_path"] == str(out) and result["evaluation"] == "knn" and result["wall_time_s"] >= 0
    quiet = setup.start("knn", "x", EvalOptions(out_json="", device="cpu"))
    assert "result_path" not in quiet.publish(record(quiet), "")
    (tmp_path / "foreign.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not a swavkit result"):  # checked before any work
        setup.start("knn", "x", EvalOptions(out_json=str(tmp_path / "foreign.json"), device="cpu"))


def test_one_summary_for_every_evaluation():
    """report.summary_rows prints k-NN, linear and fine-tune records, floors and their warning alike."""
    import swavkit.evaluation.finetune as finetune_module
    from swavkit.evaluation.report import summary_rows

    common = {"backbone": {"source": "runs/a", "feature_dim": 8}, "preprocessing": {"image_size_px": 32},
              "metrics": {"top1": 20.0}, "wall_time_s": 1.0,
              "floors": {"random_init": {"source": "timm:resnet10t", "top1": 30.0}}}
    knn = {**common, "evaluation": "knn", "protocol": {"k": 20, "temperature": 0.07, "index": "exact"},
           "data": {"n_train": 10, "n_val": 5, "n_classes": 2}}
    tune = {**common, "evaluation": "finetune",
            "protocol": {"label_fraction": "2/class", "n_labelled": 4, "epochs": 3, "global_batch_size": 4,
                         "trunk_lr": 0.01, "head_lr": 0.2, "lr_schedule": "step: x0.2 at epochs [2]"},
            "data": {"n_train_folder": 10, "n_val": 5, "n_classes": 2}}
    for result in (knn, tune):
        rows = dict(summary_rows(result))
        assert rows["floor: random init (timm:resnet10t) top1 %"] == 30.0 and "random init 30.00 %" in rows["WARNING"]
    assert dict(summary_rows(tune))["labels"] == "2/class: 4 of 10 train images, 2 classes"
    assert not hasattr(finetune_module, "summary_rows")
