import pytest

from swavkit.training import presets
from swavkit.config import from_dict, validate
from swavkit.core.schedule import build_lr_schedule


@pytest.mark.parametrize("n_images, side_px, world", [(2_000, 28, 1), (50_000, 32, 1), (100_000, 96, 2),
                                                      (1_281_167, 400, 64), (300, 500, 1)])
def test_derived_configs_are_valid_and_follow_the_data(n_images, side_px, world):
    tree: dict = {}
    applied = presets.apply(tree, presets.derive(n_images, side_px, world), chosen=set())
    cfg = from_dict(tree)
    validate(cfg, world_size=world)
    assert all(s.reason for s in applied)
    assert cfg.crops.sizes_px[0] <= max(32, side_px) or side_px > 200
    assert cfg.train.batch_size <= n_images and cfg.train.batch_size % world == 0
    assert 10 <= cfg.model.n_prototypes <= 3000
    if cfg.swav.queue_length:
        assert cfg.swav.queue_length % cfg.train.batch_size == 0 and cfg.swav.queue_length <= n_images


def test_imagenet_scale_gets_the_paper_recipe():
    tree: dict = {"train": {"batch_size": 4096, "epochs": 800}}  # what the user chose
    applied = presets.apply(tree, presets.derive(1_281_167, 400, 64, global_batch=4096, epochs=800),
                            chosen={"train.batch_size", "train.epochs"})
    cfg = from_dict(tree)
    assert cfg.crops.sizes_px == [224, 96] and cfg.crops.counts == [2, 6]
    assert cfg.model.n_prototypes == 3000 and cfg.swav.queue_length == 0
    assert cfg.swav.freeze_prototypes_epochs == 1.0  # 313 steps = one epoch at batch 4096
    # the paper's LR at batch 4096: 4.8 down to 0.0048 after 10 warm-up epochs (not 0.6 x 16 = 9.6)
    schedule = build_lr_schedule(cfg, 312, "lars")
    assert (schedule.peak_lr, schedule.final_lr) == pytest.approx((4.8, 0.0048))
    assert schedule.warmup_steps == 3120
    hint = next(s.reason for s in applied if s.key == "optim.base_lr")
    assert "LARS 4.8" in hint and "9.6" in hint  # the value used, and the linear-scaling trap named


def test_user_choices_win(tmp_path, capsys):
    from conftest import write_images
    from swavkit.config import merge_sources

    write_images(tmp_path / "imgs", 40)
    cfg = presets.auto_config(merge_sources([], [f"data.path={tmp_path / 'imgs'}", "model.n_prototypes=7",
                                                 "train.batch_size=8"]))
    assert cfg.model.n_prototypes == 7 and cfg.train.batch_size == 8
    assert cfg.crops.sizes_px == [32] and cfg.crops.counts == [2]  # derived from the 24 px images, on a CPU
    printed = capsys.readouterr().out
    assert "crops.sizes_px = [32]" in printed and "model.n_prototypes" not in printed


def test_small_images_get_small_crops_only_on_gpus():
    on_gpu = {s.key: s.value for s in presets.derive(50_000, 32, on_gpu=True)}
    on_cpu = {s.key: s.value for s in presets.derive(50_000, 32, on_gpu=False)}
    assert on_gpu["crops.sizes_px"] == [32, 16] and on_gpu["crops.counts"] == [2, 4]
    assert on_cpu["crops.sizes_px"] == [32] and on_cpu["crops.counts"] == [2]


def test_auto_reads_lists_and_refuses_shards(tmp_path, capsys):
    from conftest import write_images
    from swavkit.config import ConfigError, merge_sources
    from swavkit.training.presets import auto_config

    write_images(tmp_path / "a", 12)
    write_images(tmp_path / "b", 12, seed=1)
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(f"b/{p.name}" for p in sorted((tmp_path / "b").iterdir())) + "\n")
    auto_config(merge_sources([], [f"data.paths=[{tmp_path / 'a'},{listed}]", f"out_dir={tmp_path / 'run'}"]))
    assert "derived from 24 images" in capsys.readouterr().out  # both sources, not the bundled sample
    with pytest.raises(ConfigError, match="shards"):
        auto_config(merge_sources([], [f"data.path={tmp_path / 'shard-{000..003}.tar'}"]))


def test_auto_never_freezes_the_prototypes_for_more_than_5_percent_of_the_run():
    from swavkit.training.presets import derive

    for epochs in (1, 4, 20, 400):
        by_key = {s.key: s.value for s in derive(1000, 28, 1, on_gpu=False, epochs=epochs)}
        assert by_key["swav.freeze_prototypes_epochs"] <= 0.05 * epochs + 1e-9


def test_a_cpu_budget_picks_the_largest_crop_that_affords_enough_passes():
    from swavkit.training.presets import CPU_MIN_PASSES, budget_passes, derive

    def speed(seconds_at_32, seen=None):  # a step of the candidate: its batch x its crops, cost growing with pixels
        def seconds(candidate):
            values = {s.key: s.value for s in candidate}
            if seen is not None:
                seen.append(values)
            return values["train.batch_size"] * sum(c * seconds_at_32 * (s / 32) ** 2
                                                    for c, s in zip(values["crops.counts"], values["crops.sizes_px"]))
        return seconds

    # 10,000 photos of 224 px, 20 minutes: a fast machine affords larger crops than a slow one
    seen = []
    fast = {s.key: s.value for s in derive(10_000, 224, budget_minutes=20, seconds_per_step=speed(1e-4, seen))}
    slow = {s.key: s.value for s in derive(10_000, 224, budget_minutes=20, seconds_per_step=speed(2e-3))}
    assert fast["crops.sizes_px"][0] > slow["crops.sizes_px"][0] == 32
    assert fast["model.backbone"] == slow["model.backbone"] == "resnet10t"
    # each candidate timed is the config the run would be: backbone, prototypes, crops and the batch derived for them
    assert seen[0]["model.backbone"] == "resnet10t" and seen[0]["model.n_prototypes"] == fast["model.n_prototypes"]
    assert [v["train.batch_size"] for v in seen[:3]] == [128, 128, 128] and seen[3]["train.batch_size"] == 32
    # the chosen crops afford the passes the choice promises, at the figure of the step the run will take
    size, batch = fast["crops.sizes_px"][0], fast["train.batch_size"]
    passes = budget_passes(20 * 60, speed(1e-4)([s for s in derive(10_000, 224, budget_minutes=20,
                                                                    seconds_per_step=speed(1e-4))]), 10_000 // batch)
    assert passes >= CPU_MIN_PASSES and fast["train.epochs"] == round(passes)
    bigger = {s.key: s.value for s in derive(10_000, 224, budget_minutes=20, seconds_per_step=speed(1e-4 / 4))}
    assert bigger["crops.sizes_px"][0] > size  # 4x the speed: the next size fits
    # a user's backbone is kept (not suggested)
    mine = {s.key: s.value for s in derive(10_000, 224, budget_minutes=20, backbone="resnet18",
                                           seconds_per_step=speed(1e-4))}
    assert "model.backbone" not in mine


def test_a_crop_layout_the_user_set_is_not_mixed_with_a_derived_one():
    # the user's two resolution groups, no scales given: derived one-group scales would not fit them
    tree: dict = {"crops": {"counts": [2, 2], "sizes_px": [32, 16]}}
    applied = presets.apply(tree, presets.derive(2_000, 28, 1), chosen={"crops.counts", "crops.sizes_px"})
    assert not [s.key for s in applied if s.key in presets.CROP_GROUP_KEYS]
    cfg = from_dict(tree)
    validate(cfg)  # the schema's per-group scales for two groups
    assert cfg.crops.counts == [2, 2] and len(cfg.crops.min_scales) == 2
    assert any(s.key == "model.backbone" for s in applied)  # the rest is still derived
