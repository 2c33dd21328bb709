"""train.accumulate_steps: micro-batches whose codes come from ONE Sinkhorn over the whole batch give the update of
the whole batch (GroupNorm backbone, head without BN: nothing else couples the samples), on one process and on two
gloo processes; the no-gradient scores pass leaves the BatchNorm running statistics alone."""

import copy
import os

import pytest
import torch

from swavkit.runtime import distributed
from swavkit.config import ConfigError, load_config
from swavkit.core.loss import FeatureQueue
from swavkit.core.model import build_model
from swavkit.core.optim import build_optimizer
from swavkit.training.step import StepSettings, TrainState, forward_loss, split_micro_batches, train_step
from test_distributed import _set_env

K, D, BATCH = 12, 16, 128


def gn_state(queue_length: int = 0) -> TrainState:
    """A GroupNorm backbone, a one-layer head (no BN): the per-sample maths does not depend on the batch."""
    torch.manual_seed(0)
    core = build_model("test_efficientnet_gn", K, hidden_dim=0, output_dim=D)
    optimizer = build_optimizer(core, "sgd", lr=0.5, weight_decay=1e-6, momentum=0.9, trust_coefficient=0.001)
    queue = FeatureQueue(2, queue_length, D) if queue_length else None
    return TrainState(core, optimizer, torch.amp.GradScaler("cpu", enabled=False), queue)


def queued_embeddings() -> torch.Tensor:
    """[2, BATCH, D] unit embeddings of "past batches" for the queue."""
    return torch.nn.functional.normalize(torch.randn(2, BATCH, D, generator=torch.Generator().manual_seed(9)), dim=-1)


def crops_of(seed: int, n: int = BATCH) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, s, s, generator=g) for s in (16, 16, 8)]


def test_four_micro_batches_of_32_make_the_update_of_one_batch_of_128():
    plain, accumulated, naive = (gn_state(queue_length=BATCH) for _ in range(3))
    for state in (plain, accumulated, naive):  # a full queue: Sinkhorn runs over [queue; 128 samples]
        state.queue.push(queued_embeddings())
    crops = crops_of(1)
    one = train_step(plain, crops, StepSettings(), lr=0.5)
    four = train_step(accumulated, crops, StepSettings(accumulate_steps=4), lr=0.5)
    assert one.applied and four.applied and plain.step == accumulated.step == 1
    torch.testing.assert_close(four.codes, one.codes, rtol=0, atol=1e-5)
    torch.testing.assert_close(four.loss, one.loss, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(plain.core.state_dict().items(), accumulated.core.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
    # the queue got the embeddings of all four micro-batches, newest batch first, as the plain step's
    torch.testing.assert_close(accumulated.queue.embeddings, plain.queue.embeddings, rtol=0, atol=1e-5)

    # the invariant can fail: Sinkhorn on each micro-batch alone (plain accumulation) gives other codes
    per_micro = [forward_loss(naive, m, StepSettings(), use_queue=True).codes[0] for m in split_micro_batches(crops, 4)]
    assert not torch.allclose(torch.cat(per_micro), one.codes, atol=1e-3)


def test_freezing_and_the_queue_count_optimiser_steps():
    state = gn_state(queue_length=64)
    settings = StepSettings(accumulate_steps=4, freeze_prototype_steps=1, queue_start_step=1)
    frozen = torch.nn.functional.normalize(state.core.prototypes.weight.detach(), dim=1)
    train_step(state, crops_of(4, n=32), settings, lr=0.5)  # optimiser step 0: 4 micro-batches
    assert state.step == 1 and torch.equal(state.core.prototypes.weight, frozen) and state.queue._n_filled == 0
    train_step(state, crops_of(5, n=32), settings, lr=0.5)  # step 1: prototypes learn, the queue gets all 32 rows
    assert state.step == 2 and not torch.allclose(state.core.prototypes.weight, frozen)
    assert state.queue._n_filled == 32


def test_scores_pass_leaves_batchnorm_statistics_to_the_gradient_pass():
    """With BatchNorm, the running statistics after an accumulated step are those of the gradient pass over the
    micro-batches only (the no-gradient pass that computes the codes is not counted)."""
    torch.manual_seed(0)
    core = build_model("resnet10t", K, hidden_dim=8, output_dim=D)
    reference = copy.deepcopy(core).train()
    optimizer = build_optimizer(core, "sgd", lr=0.0, weight_decay=0.0, momentum=0.0, trust_coefficient=0.001)
    state = TrainState(core, optimizer, torch.amp.GradScaler("cpu", enabled=False))
    crops = crops_of(2, n=16)
    assert train_step(state, crops, StepSettings(accumulate_steps=2), lr=0.0).applied
    with torch.no_grad():  # what the gradient pass alone does to the statistics (lr 0: the weights stay)
        for micro in split_micro_batches(crops, 2):
            reference(micro)
    for (name, a), b in zip(reference.named_buffers(), core.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert int(core.head.layers[1].num_batches_tracked) == 2  # one update per micro-batch, not four


def test_accumulate_steps_must_split_each_process_batch():
    with pytest.raises(ConfigError, match="train.accumulate_steps"):
        load_config([], ["train.batch_size=96", "train.accumulate_steps=5"])
    with pytest.raises(ConfigError, match="train.accumulate_steps"):
        load_config([], ["train.accumulate_steps=0"])
    assert load_config([], ["train.batch_size=96", "train.accumulate_steps=4"]).train.accumulate_steps == 4


def _accumulating_rank(rank, world, port, crops, out_dir):
    _set_env(rank, world, port)
    distributed.init("cpu")
    state = gn_state(queue_length=BATCH // world)
    # as the trainer wraps it with train.accumulate_steps > 1 (DDP's static graph refuses no_sync)
    state.model = distributed.wrap_ddp(state.core, torch.device("cpu"), static_graph=False)
    half = BATCH // world
    mine = [c[rank * half:(rank + 1) * half] for c in crops]
    state.queue.push(queued_embeddings()[:, rank * half:(rank + 1) * half])
    result = train_step(state, mine, StepSettings(accumulate_steps=2), lr=0.5)
    torch.save({"model": state.core.state_dict(), "codes": result.codes}, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.shutdown()


@pytest.mark.slow
def test_two_gloo_ranks_accumulating_equal_one_plain_step(tmp_path, gloo_pair):
    """One optimiser step of batch 128: one process without accumulation vs 2 processes x 2 micro-batches of 32
    (DDP no_sync for the first; Sinkhorn's sums all-reduced over both ranks' whole batches and queues)."""
    crops = crops_of(3)
    gloo_pair.run(_accumulating_rank, crops, str(tmp_path))
    plain = gn_state(queue_length=BATCH)
    # the one-process queue holds both ranks' rows: Sinkhorn sees the same [queues; batches] columns
    plain.queue.push(queued_embeddings())
    one = train_step(plain, crops, StepSettings(), lr=0.5)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.cat([r["codes"] for r in ranks]), one.codes, rtol=0, atol=1e-5)
    for name, value in plain.core.state_dict().items():
        torch.testing.assert_close(ranks[0]["model"][name], value, rtol=1e-4, atol=1e-6, msg=name)
