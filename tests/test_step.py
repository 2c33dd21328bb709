"""The training step's contracts: assign_codes is Sinkhorn over [queue; batch], TrainState's dict round-trips,
a refused step leaves no trace."""

import torch
import torch.nn.functional as F

from swavkit.artifacts.checkpoint import state_digest
from swavkit.config import Config
from swavkit.training.diagnosis import CollapseMonitor
from swavkit.core.loss import FeatureQueue
from swavkit.core.model import build_model
from swavkit.core.optim import build_optimizer
from swavkit.core.sinkhorn import sinkhorn
from swavkit.training.step import StepSettings, TrainState, assign_codes, train_step

B, K, D = 8, 10, 16


def unit_rows(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=generator), dim=1)


def test_assign_codes_is_sinkhorn_over_queue_then_batch():
    g = torch.Generator().manual_seed(0)
    prototypes, batch, queued = unit_rows(K, D, g), unit_rows(B, D, g), unit_rows(3 * B, D, g)
    scores = batch @ prototypes.t()  # [B, K]

    alone = assign_codes(scores, None, prototypes, 0.05, 3)
    torch.testing.assert_close(alone, sinkhorn(scores, 0.05, 3), rtol=0, atol=0)

    out = torch.empty(4 * B, K)
    codes = assign_codes(scores, queued, prototypes, 0.05, 3, out=out)
    everything = sinkhorn(torch.cat([queued @ prototypes.t(), scores]), 0.05, 3)  # [4B, K]
    assert codes.shape == (B, K) and codes.data_ptr() == out[-B:].data_ptr()
    torch.testing.assert_close(codes, everything[-B:], rtol=0, atol=0)
    # the queue changes the answer: equipartition now holds over 4B samples, not B
    assert not torch.allclose(codes, alone, atol=1e-3)


def test_step_settings_defaults_are_the_config_defaults():
    """The benchmarks run StepSettings() as "the library's step": it must be the config's SwAV defaults
    (here with prototype freezing and the queue start at step 0, as 0 steps per epoch gives)."""
    assert StepSettings.from_config(Config(), steps_per_epoch=0, autocast_dtype=None) == StepSettings()
    cfg = Config()
    cfg.swav.sinkhorn_fp64, cfg.swav.queue_start_epoch, cfg.swav.freeze_prototypes_epochs = True, 2, 0.5
    settings = StepSettings.from_config(cfg, steps_per_epoch=10, autocast_dtype=torch.bfloat16)
    assert (settings.sinkhorn_dtype, settings.queue_start_step, settings.freeze_prototype_steps) == (torch.float64, 20, 5)


def tiny_state(seed: int, queue_length: int = 2 * B) -> TrainState:
    torch.manual_seed(seed)
    core = build_model("resnet10t", K, hidden_dim=32, output_dim=D)
    optimizer = build_optimizer(core, "lars", lr=0.1, weight_decay=1e-6, momentum=0.9, trust_coefficient=0.001)
    return TrainState(core, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                      FeatureQueue(2, queue_length, D), CollapseMonitor(K, patience_steps=5))


def tiny_crops(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, s, s, generator=g) for s in (32, 32, 24)]


def test_train_state_round_trips_through_its_dict():
    state = tiny_state(seed=0)
    for i in range(3):  # fills the queue (2 batches) and uses it once, gives the optimiser momentum
        assert train_step(state, tiny_crops(i), StepSettings(), lr=0.1).applied
    state.nonfinite_skipped, state.last_loss, state.skipped_files = 2, 1.5, {"b.png", "a.png"}
    state.epsilon = 0.02  # as the collapse policy leaves it
    state.collapse.update(3, float(torch.log(torch.tensor(float(K)))))
    saved = state.state_dict()
    assert saved["format"] == "swavkit-train-v1" and saved["step"] == 3 and len(saved["per_rank"]) == 1

    fresh = tiny_state(seed=1)
    assert state_digest(fresh.state_dict()) != state_digest(saved)  # different weights, empty queue
    torch.rand(5)  # move the RNG on: loading must put it back
    notes = fresh.load_state_dict(saved)
    assert notes == []
    assert state_digest(fresh.state_dict()) == state_digest(saved)
    assert torch.equal(torch.get_rng_state(), saved["per_rank"][0]["rng_cpu"])
    assert fresh.queue.is_full and (fresh.step, fresh.nonfinite_skipped) == (3, 2)
    assert fresh.collapse.since_step == 3 and fresh.skipped_files == {"a.png", "b.png"}
    assert fresh.epsilon == 0.02
    # older checkpoints held NaN (or no key) for "the configured epsilon": the state keeps the one it was built with
    for old in ({**saved, "epsilon": float("nan")}, {k: v for k, v in saved.items() if k != "epsilon"}):
        fresh.epsilon = 0.03
        fresh.load_state_dict(old)
        assert fresh.epsilon == 0.03


def test_state_from_another_process_count_refills_the_queue():
    state = tiny_state(seed=0)
    saved = state.state_dict()
    saved["per_rank"] = saved["per_rank"] * 2  # as written by two processes
    fresh = tiny_state(seed=1)
    notes = fresh.load_state_dict(saved)
    assert notes == ["the queue was saved by 2 process(es), now 1: it refills"]
    assert not fresh.queue.is_full


def test_refused_step_leaves_weights_and_batchnorm_untouched():
    state = tiny_state(seed=0)
    assert train_step(state, tiny_crops(0), StepSettings(), lr=0.1).applied
    before = {k: v.clone() for k, v in state.core.state_dict().items()}
    poison = state.core.head.layers[0].weight.register_hook(lambda grad: grad * float("nan"))
    result = train_step(state, tiny_crops(1), StepSettings(), lr=0.1)
    poison.remove()
    assert not result.applied and not result.nonfinite_loss
    assert result.nonfinite == "gradient (head.layers.0.weight)" and result.step == 1
    assert (state.step, state.nonfinite_skipped) == (1, 1)
    # BN running statistics included: the forward changed them, the refusal put them back. The prototypes
    # were projected onto the unit sphere first, as every step does (the next step would do the same).
    after = state.core.state_dict()
    torch.testing.assert_close(after.pop("prototypes.weight"), F.normalize(before.pop("prototypes.weight"), dim=1),
                               rtol=0, atol=0)
    assert any("running_mean" in k for k in after)
    assert state_digest(after) == state_digest(before)
    assert train_step(state, tiny_crops(1), StepSettings(), lr=0.1).applied and state.step == 2
