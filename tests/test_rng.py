"""swavkit.runtime.rng: the one capture/restore pair of the RNG state that pretraining and fine-tuning checkpoint."""

import pytest
import torch

from swavkit.runtime.rng import capture_rng_state, restore_rng_state


def test_restore_replays_the_same_draws_under_the_checkpoint_keys():
    device = torch.device("cpu")
    state = capture_rng_state(device)
    assert set(state) == {"rng_cpu", "rng_cuda"} and state["rng_cuda"] is None  # TrainState's keys since v1
    first = torch.rand(5)
    restore_rng_state(state, device)
    assert torch.equal(torch.rand(5), first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_gpu_generator_is_captured_and_restored():
    device = torch.device("cuda", torch.cuda.current_device())
    state = capture_rng_state(device)
    first = torch.rand(5, device=device)
    restore_rng_state(state, device)
    assert torch.equal(torch.rand(5, device=device), first)
    restore_rng_state({"rng_cpu": state["rng_cpu"], "rng_cuda": None}, device)  # saved on a CPU: GPU's kept
