import subprocess
import sys

import pytest

from swavkit.config import Config, ConfigError, load_config, parse_override, validate


def test_defaults_follow_the_paper():
    cfg = Config()
    assert cfg.crops.counts == [2, 6] and cfg.crops.sizes_px == [224, 96]
    assert cfg.model.n_prototypes == 3000 and cfg.swav.epsilon == 0.05 and cfg.swav.temperature == 0.1
    # the batch-256 scripts: no warm-up, weight decay 1e-6, LARS trust 0.001 (LRs: tests/test_schedule.py)
    assert cfg.train.batch_size == 256 and cfg.optim.warmup_epochs == 0
    assert cfg.optim.weight_decay == 1e-6 and cfg.optim.lars_trust_coefficient == 0.001
    assert cfg.model.zero_init_last is False
    validate(cfg)


def test_yaml_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  backbone: resnet18\ntrain:\n  epochs: 3\n")
    cfg = load_config([recipe], ["train.epochs=5", "crops.sizes_px=[64,32]", "swav.epsilon=0.03"])
    assert cfg.model.backbone == "resnet18" and cfg.train.epochs == 5
    assert cfg.crops.sizes_px == [64, 32] and cfg.swav.epsilon == 0.03
    assert cfg.model.n_prototypes == 3000  # untouched default


@pytest.mark.parametrize("override, key", [
    ("model.n_protos=10", "model.n_protos"),
    ("train.epochs=ten", "train.epochs"),
    ("train.batch_size=0", "train.batch_size"),
    ("model.n_prototypes=0", "model.n_prototypes"),
    ("crops.sizes_px=[224]", "crops.sizes_px"),
    ("crops.min_scales=[0.5,2.0]", "crops.min_scales"),
    ("swav.epsilon=-1", "swav.epsilon"),
    ("train.precision=fp8", "train.precision"),
    ("data.colour_on_device=gpu", "data.colour_on_device"),
    ("model.channels_last=1", "model.channels_last"),
    ("out_dir=off", "out_dir"),  # YAML's bool, not a folder named "false"
    ("swav.queue_length=1000", "swav.queue_length"),
    ("optim.final_lr=-0.5", "optim.final_lr"),
    ("optim.base_lr=.nan", "optim.base_lr"),
    ("optim.warmup_start_lr=0.3", "optim.warmup_start_lr"),  # stated at reference_batch_size: needs base_lr
    ("nonsense=1", "nonsense"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace(".", r"\.")):
        load_config([], [override])


def test_gpu_levers_default_to_auto_meaning_on_a_gpu(tmp_path):
    """data.colour_on_device and model.channels_last: auto | true | false; YAML's bools (from an override
    or a saved run's config.yaml) are the words."""
    import torch

    from swavkit.training.trainer import resolve_auto_flag

    assert Config().data.colour_on_device == Config().model.channels_last == "auto"
    old_run = tmp_path / "config.yaml"
    old_run.write_text("data:\n  colour_on_device: false\nmodel:\n  channels_last: true\n")  # as runs before 'auto'
    cfg = load_config([old_run], ["data.colour_on_device=true"])
    assert (cfg.data.colour_on_device, cfg.model.channels_last) == ("true", "true")
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # only compared, never used
    assert [resolve_auto_flag(v, cpu) for v in ("auto", "true", "false")] == [False, True, False]
    assert [resolve_auto_flag(v, gpu) for v in ("auto", "true", "false")] == [True, True, False]


def test_lr_keys_must_make_a_decaying_schedule():
    with pytest.raises(ConfigError, match=r"optim\.final_lr: 1\.0 is above optim\.base_lr 0\.6"):
        load_config([], ["optim.base_lr=0.6", "optim.final_lr=1.0"])
    with pytest.raises(ConfigError, match=r"optim\.warmup_start_lr: 5\.0 is above optim\.base_lr 4\.8"):
        load_config([], ["optim.base_lr=4.8", "optim.warmup_start_lr=5.0"])
    cfg = load_config([], ["optim.base_lr=4.8", "optim.reference_batch_size=4096", "optim.warmup_start_lr=0.3",
                           "optim.final_lr=0"])  # cosine to 0 is allowed, as is -1 (the default)
    assert (cfg.optim.base_lr, cfg.optim.warmup_start_lr, cfg.optim.final_lr) == (4.8, 0.3, 0.0)


def test_batch_must_divide_by_world_size():
    cfg = Config()
    cfg.train.batch_size = 10
    with pytest.raises(ConfigError, match="train.batch_size.*4 processes"):
        validate(cfg, world_size=4)


def test_override_parsing():
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    assert parse_override("out_dir=runs/x") == {"out_dir": "runs/x"}
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_cli_bad_config_exit_2_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "swavkit", "pretrain", f"out_dir={tmp_path}", "model.n_protos=10"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.n_protos" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, key", [(["train.epochs=abc"], "train.epochs"), (["--config", "missing.yaml"], "missing.yaml"),
                                       (["crops.counts=[0]"], "crops.counts[0]"),
                                       (["crops.counts=[2,2]"], "crops.sizes_px: has 1 entries"),
                                       (["model.backbone=resnet_nope"], "model.backbone")])
def test_cli_bad_config_in_process(tmp_path, capsys, argv, key):
    from swavkit.cli.main import main

    assert main(["pretrain", f"out_dir={tmp_path}", *argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0]


def test_misspelled_backbone_is_reported_first_with_suggestions(tmp_path):
    from swavkit.training.preflight import preflight

    cfg = load_config([], ["model.backbone=resnt18"])  # the config's own checks do not import timm
    with pytest.raises(ConfigError, match=r"model.backbone: 'resnt18' is not a timm model name; did you mean resnet18"):
        preflight(cfg)
    # train checks it before it walks the data folder: the (missing) folder is never reached
    from swavkit.config import from_dict
    from swavkit.training.trainer import train

    cfg = from_dict({"model": {"backbone": "ResNet18"}, "data": {"path": str(tmp_path / "no_such_folder")},
                     "out_dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match="did you mean resnet18"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("model.backbone_kwargs={pretrained: true}", "model.backbone_kwargs.pretrained: .*set model.init"),
    ("model.backbone_kwargs={checkpoint_path: w.pth}", "model.backbone_kwargs.checkpoint_path: .*model.init"),
    ("model.backbone_kwargs={num_classes: 10}", "model.backbone_kwargs.num_classes"),
    ("model.init=weights/missing.pth", "model.init: weights/missing.pth does not exist"),
    ("model.init=resnet_nope", "model.init: 'resnet_nope' is neither an existing file"),
])
def test_weight_sources_are_checked_in_one_line(override, message):
    from swavkit.training.preflight import preflight

    with pytest.raises(ConfigError, match=message) as err:
        preflight(load_config([], [override]))
    assert "\n" not in str(err.value)


def test_exponent_without_a_dot_is_a_number():
    # YAML 1.1 reads 1e-5 as a string; a user typing optim.base_lr=1e-5 means the number
    assert load_config([], ["optim.base_lr=1e-5", "optim.weight_decay=2E-6"]).optim.base_lr == 1e-5
    with pytest.raises(ConfigError, match="optim.base_lr"):
        load_config([], ["optim.base_lr=fast"])


def test_a_key_without_its_section_is_named_with_it():
    with pytest.raises(ConfigError, match=r"unknown config key 'epochs' \(did you mean train.epochs\?\)"):
        load_config([], ["epochs=3"])
    with pytest.raises(ConfigError, match=r"did you mean train.epochs\?"):
        load_config([], ["train.epocs=3"])


def test_cpu_training_threads_share_the_cores_between_processes_and_restore_the_count(monkeypatch):
    import torch

    from swavkit.runtime import cores

    monkeypatch.setattr(cores, "usable_cores", lambda: 8)
    assert cores.cpu_training_threads() == 8
    assert cores.cpu_training_threads(local_world_size=2) == 4
    assert cores.cpu_training_threads(local_world_size=16) == 1  # never below one
    # one rule for data workers too: the share of the cores, one left to the main process unless --auto
    assert cores.default_num_workers() == 4 and cores.default_num_workers(8) == 7
    assert cores.default_num_workers(8, local_world_size=2, leave_one_for_main=False) == 4
    assert cores.default_num_workers(local_world_size=8) == 0
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(3)
    try:
        with cores.training_threads(torch.device("cpu"), local_world_size=2) as inside:
            assert inside == torch.get_num_threads() == 4
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's setting wins
        with cores.training_threads(torch.device("cpu")) as inside:
            assert inside == 3
    finally:
        torch.set_num_threads(min(2, torch.get_num_threads()))


def test_decisions_are_read_once_and_validate_changes_nothing():
    from swavkit.config import CHOICES, STRATEGIES, shards_weights, to_dict
    from swavkit.data.constants import is_rgb8

    assert CHOICES["dist.strategy"] is STRATEGIES  # the strategy's choices are declared once
    assert not shards_weights(load_config([], [])) and shards_weights(load_config([], ["dist.strategy=fsdp"]))
    assert is_rgb8(3, 8) and not is_rgb8(3, 16) and not is_rgb8(1, 8) and not is_rgb8(4, 8)
    cfg = load_config([], ["data.channels=4", "data.bit_depth=16"])
    before = to_dict(cfg)
    validate(cfg)  # pure: the config is the same after its checks
    assert to_dict(cfg) == before
