"""method=deepclusterv2 against a transcription of the reference (facebookresearch/swav main_deepclusterv2.py),
its distributed k-means, resume, export and released-checkpoint layout.

The ``reference_*`` functions below re-state the reference's ``cluster_memory`` and loss as literally as a
single process allows (its dist.broadcast / all_reduce / all_gather are identities with one process; its
``get_indices_sparse`` (a scipy CSR trick) is written as the per-cluster ``np.where`` it computes). They were
first written from memory, then checked line by line against main_deepclusterv2.py (the reference's default
branch, read 2026-12): init centroids from a random permutation of bank j on rank 0, 10 + 1 E steps, empty
clusters keeping their centroid, re-normalised centroids, -100 for images in no bank, the loss averaged over
heads with the targets repeated over every crop.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

# Light imports only at the top: the 2-process test's workers import this module again (spawn).
from swavkit.core.deepcluster import (IGNORE_TARGET, MemoryBank, TargetTable, cluster_bank, deepcluster_loss,
                                      initial_centroids, spherical_kmeans)
from swavkit.runtime import distributed


# ----------------------------------------------------------------------------------------------------
# the reference, transcribed

def reference_cluster_memory(local_memory_index, local_memory_embeddings, size_dataset, nmb_prototypes,
                             crops_for_assign, feat_dim, randperm, nmb_kmeans_iters=10):
    """main_deepclusterv2.cluster_memory in one process; returns (centroids per head, assignments [H, N])."""
    j = 0
    assignments = -100 * torch.ones(len(nmb_prototypes), size_dataset).long()
    all_centroids = []
    with torch.no_grad():
        for i_K, K in enumerate(nmb_prototypes):
            random_idx = randperm(len(local_memory_embeddings[j]))[:K]
            assert len(random_idx) >= K, "please reduce the number of centroids"
            centroids = local_memory_embeddings[j][random_idx]
            for n_iter in range(nmb_kmeans_iters + 1):
                dot_products = torch.mm(local_memory_embeddings[j], centroids.t())
                _, local_assignments = dot_products.max(dim=1)
                if n_iter == nmb_kmeans_iters:
                    break
                where_helper = [np.where(local_assignments.numpy() == k) for k in range(K)]
                counts = torch.zeros(K).int()
                emb_sums = torch.zeros(K, feat_dim)
                for k in range(len(where_helper)):
                    if len(where_helper[k][0]) > 0:
                        emb_sums[k] = torch.sum(local_memory_embeddings[j][where_helper[k][0]], dim=0)
                        counts[k] = len(where_helper[k][0])
                mask = counts > 0
                centroids[mask] = emb_sums[mask] / counts[mask].unsqueeze(1)
                centroids = nn.functional.normalize(centroids, dim=1, p=2)
            all_centroids.append(centroids)
            assignments[i_K][local_memory_index] = local_assignments
            j = (j + 1) % len(crops_for_assign)
    return all_centroids, assignments


def reference_loss(output, idx, assignments, nmb_crops, nmb_prototypes, temperature):
    """The loss block of main_deepclusterv2.train: output = one [V*B, K] score tensor per head."""
    cross_entropy = nn.CrossEntropyLoss(ignore_index=-100)
    loss = 0
    for h in range(len(nmb_prototypes)):
        scores = output[h] / temperature
        targets = assignments[h][idx].repeat(sum(nmb_crops))
        loss += cross_entropy(scores, targets)
    return loss / len(nmb_prototypes)


def clustered_bank(n: int, dim: int, n_crops: int = 2, seed: int = 0) -> torch.Tensor:
    """[n_crops, n, dim] unit embeddings around 6 directions (clear clusters: no argmax near-ties)."""
    g = torch.Generator().manual_seed(seed)
    centres = nn.functional.normalize(torch.randn(6, dim, generator=g), dim=1)
    which = torch.randint(0, 6, (n_crops, n), generator=g)
    return nn.functional.normalize(centres[which] + 0.3 * torch.randn(n_crops, n, dim, generator=g), dim=2)


# ----------------------------------------------------------------------------------------------------
# k-means and loss against the reference

def test_kmeans_on_a_fixed_bank_gives_the_reference_centroids_and_assignments():
    N, D, size_dataset = 120, 8, 150
    embeddings = clustered_bank(N, D)
    index = torch.randperm(size_dataset, generator=torch.Generator().manual_seed(1))[:N]  # 30 images in no bank
    bank = MemoryBank(2, N, D)
    bank.write(index, embeddings)
    ours, table = cluster_bank(bank, [5, 7, 4], 10, torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)  # the same draws, in the same order (head after head)
    ref_centroids, ref_assignments = reference_cluster_memory(
        index, embeddings, size_dataset, [5, 7, 4], [0, 1], D, lambda n: torch.randperm(n, generator=g))
    for h in range(3):
        torch.testing.assert_close(ours[h].centroids, ref_centroids[h], rtol=0, atol=1e-6)
    torch.testing.assert_close(table.lookup(torch.arange(size_dataset)), ref_assignments, rtol=0, atol=0)
    assert (table.lookup(torch.arange(size_dataset)) == IGNORE_TARGET).sum() == 3 * 30
    assert int(ours[1].counts.sum()) == N


def test_empty_cluster_keeps_its_previous_centroid():
    embeddings = nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    start = nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), dim=1)  # the 3rd wins nothing
    result = spherical_kmeans(embeddings, start, n_iters=3)
    torch.testing.assert_close(result.centroids[2], start[2])
    assert result.counts.tolist() == [2, 1, 0] and result.assignments.tolist() == [0, 0, 1]


def test_loss_equals_the_reference():
    g = torch.Generator().manual_seed(0)
    V, B, K, H, size_dataset = 4, 6, 5, 3, 20
    scores = torch.randn(V, B, H * K, generator=g)
    assignments = torch.randint(0, K, (H, size_dataset), generator=g)
    assignments[:, 3] = -100  # an image in no bank last epoch
    idx = torch.tensor([3, 0, 7, 19, 5, 11])
    output = [scores[..., h * K:(h + 1) * K].reshape(V * B, K) for h in range(H)]
    expected = reference_loss(output, idx, assignments, [2, 2], [K] * H, 0.1)
    table = TargetTable.build(torch.arange(size_dataset), assignments)
    ours = deepcluster_loss(scores, table.lookup(idx), [K] * H, 0.1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def _kmeans_worker(rank, world, port, bank_embeddings, ids, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    distributed.init("cpu")
    half = ids.shape[0] // world
    bank = MemoryBank(2, half, bank_embeddings.shape[2])
    bank.write(ids[rank * half:(rank + 1) * half], bank_embeddings[:, rank * half:(rank + 1) * half])
    results, table = cluster_bank(bank, [4, 6], 10, torch.Generator().manual_seed(5))
    torch.save({"centroids": [r.centroids for r in results], "counts": [r.counts for r in results],
                "table": table.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.shutdown()


@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_kmeans(tmp_path, gloo_pair):
    N, D = 80, 8
    embeddings = clustered_bank(N, D, seed=2)
    ids = torch.randperm(N, generator=torch.Generator().manual_seed(4)) + 1000
    gloo_pair.run(_kmeans_worker, embeddings, ids, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # one process over the whole bank, from the centroids process 0 draws from its own half
    g = torch.Generator().manual_seed(5)
    expected_targets = []
    for h, K in enumerate([4, 6]):
        start = initial_centroids(embeddings[h % 2, :N // 2], K, g)
        one = spherical_kmeans(embeddings[h % 2], start, 10)
        expected_targets.append(one.assignments)
        for r in ranks:  # every process ends with the same centroids as the single process
            torch.testing.assert_close(r["centroids"][h], one.centroids, rtol=0, atol=1e-6)
            assert r["counts"][h].tolist() == one.counts.tolist()
    expected = TargetTable.build(ids, torch.stack(expected_targets))
    for r in ranks:
        assert torch.equal(r["table"]["ids"], expected.ids) and torch.equal(r["table"]["targets"], expected.targets)


# ----------------------------------------------------------------------------------------------------
# training: resume, export, banner

DC = {"method": "deepclusterv2", "model.n_prototypes": 3, "deepcluster.n_heads": 2, "deepcluster.kmeans_iterations": 3,
      "crops.counts": "[2]", "crops.sizes_px": "[16]", "crops.min_scales": "[0.3]", "crops.max_scales": "[1.0]",
      "train.epochs": 3, "train.batch_size": 8, "train.log_every_steps": 1, "model.hidden_dim": 0,
      "train.checkpoint_every_steps": 1}


@pytest.mark.slow
def test_resume_equals_uninterrupted_and_the_export_loads(tiny_images_16, tmp_path, capsys):
    from conftest import tiny_overrides
    from swavkit import load_backbone
    from swavkit.artifacts.checkpoint import load_training_checkpoint
    from swavkit.artifacts.pretrained import load_swav_model
    from swavkit.config import load_config
    from swavkit.training.trainer import train

    # 16 images, batch 8: 2 steps per epoch, 3 epochs. A run killed with SIGKILL once it has checkpointed step 3:
    # inside epoch 1 its targets and the half-refreshed bank come from the checkpoint, and epoch 2's k-means runs
    # on the restored bank (or, killed at step 4, on the bank saved at the epoch's end).
    run = lambda out, **kw: train(load_config([], tiny_overrides(tiny_images_16, out, **DC)), progress=False, **kw)
    full = run(tmp_path / "full")
    assert full.completed and full.step == 6
    out = capsys.readouterr().out
    assert "memory bank of 2 x 16 x 16 embeddings per process" in out and "2 k-means head(s) of 3 clusters" in out

    killed_at = _killed_after(tiny_overrides(tiny_images_16, tmp_path / "parts", **DC),
                              tmp_path / "parts" / "checkpoints" / "last.pt", min_step=3)
    assert 3 <= killed_at < 6  # inside epoch 1 or at the start of epoch 2: nothing saved at the kill
    last = run(tmp_path / "parts")
    assert last.completed and last.step == 6

    a, b = load_training_checkpoint(full.checkpoint), load_training_checkpoint(last.checkpoint)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    for key in ("embeddings", "ids"):
        assert torch.equal(a["per_rank"][0]["deepcluster_bank"][key], b["per_rank"][0]["deepcluster_bank"][key])
    assert torch.equal(a["deepcluster"]["table"]["targets"], b["deepcluster"]["table"]["targets"])
    assert a["deepcluster"]["clustered_epoch"] == 2 and a["model"]["prototypes.weight"].shape == (6, 16)

    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(full.backbone_dir)(x), load_backbone(full.checkpoint)(x))
    model, _ = load_swav_model(full.checkpoint)  # the whole model: both heads' prototype rows
    assert model.prototypes.weight.shape == (6, 16)


def _killed_after(overrides: list[str], checkpoint, min_step: int) -> int:
    """``swavkit pretrain`` in a subprocess, killed with SIGKILL once ``checkpoint`` holds ``min_step`` or later;
    the step of the checkpoint it left. The environment as it is: another thread count would change the float
    sums of the convolutions."""
    import sys

    from test_distributed import killed_after

    return killed_after([sys.executable, "-m", "swavkit", "pretrain", "--no-progress", "--no-auto", *overrides],
                        checkpoint, min_step, timeout_s=300, poll_s=0.05)


@pytest.fixture
def tiny_images_16(tmp_path):
    from conftest import write_images
    write_images(tmp_path / "images", 16, size_px=16)
    return tmp_path / "images"


# ----------------------------------------------------------------------------------------------------
# released checkpoints, config, diagnosis

def test_released_deepclusterv2_layout_loads_like_swav(tmp_path):
    from swavkit import load_backbone
    from swavkit.artifacts.pretrained import load_swav_model
    from swavkit.core.model import create_backbone

    net = create_backbone("resnet10t")
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    state |= {"module.projection_head.0.weight": torch.randn(32, net.num_features), "module.projection_head.0.bias":
              torch.zeros(32), "module.projection_head.1.weight": torch.ones(32), "module.projection_head.1.bias":
              torch.zeros(32), "module.projection_head.1.running_mean": torch.zeros(32),
              "module.projection_head.1.running_var": torch.ones(32),
              "module.projection_head.1.num_batches_tracked": torch.tensor(0),
              "module.projection_head.3.weight": torch.randn(16, 32), "module.projection_head.3.bias": torch.zeros(16)}
    heads = [torch.randn(5, 16) for _ in range(3)]
    state |= {f"module.prototypes.prototypes{h}.weight": w for h, w in enumerate(heads)}
    path = tmp_path / "deepclusterv2_800ep_pretrain.pth.tar"
    torch.save(state, path)

    loaded = load_backbone(path, architecture="resnet10t")
    for key, value in net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
    model, config = load_swav_model(path, architecture="resnet10t")
    torch.testing.assert_close(model.prototypes.weight, torch.cat(heads))  # head after head, as swavkit trains them
    assert config["model"]["n_prototypes"] == 15


def test_config_refuses_what_deepclusterv2_cannot_take():
    from swavkit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="method: 'deepcluster' is not one of swav, deepclusterv2"):
        load_config([], ["method=deepcluster"])
    with pytest.raises(ConfigError, match="swav.queue_length=256: the queue is SwAV's"):
        load_config([], ["method=deepclusterv2", "swav.queue_length=256"])
    with pytest.raises(ConfigError, match="dist.strategy=fsdp is not supported yet"):
        load_config([], ["method=deepclusterv2", "dist.strategy=fsdp"])
    with pytest.raises(ConfigError, match="train.accumulate_steps=2: not supported with method=deepclusterv2"):
        load_config([], ["method=deepclusterv2", "train.accumulate_steps=2"])
    assert load_config([], ["swav.queue_length=256"]).method == "swav"


def test_kmeans_collapse_is_diagnosed():
    from swavkit.training.diagnosis import kmeans_collapse_warning

    assert kmeans_collapse_warning(0, 10, {"largest_cluster_fraction": 0.2, "empty_clusters": 1}) is None
    text = kmeans_collapse_warning(1, 10, {"largest_cluster_fraction": 0.9, "empty_clusters": 8})
    assert "head 1 put 90% of the images into one cluster and left 8 of 10" in text and "model.n_prototypes" in text


def test_auto_leaves_the_queue_to_swav(tmp_path):
    from conftest import write_images
    from swavkit.config import merge_sources
    from swavkit.training.presets import auto_config

    write_images(tmp_path / "imgs", 64, size_px=16)
    keys = [f"data.path={tmp_path / 'imgs'}", "train.batch_size=8", f"out_dir={tmp_path / 'run'}"]
    assert auto_config(merge_sources([], keys)).swav.queue_length == 16  # SwAV at batch 8 gets a queue
    cfg = auto_config(merge_sources([], keys + ["method=deepclusterv2"]))
    assert cfg.method == "deepclusterv2" and cfg.swav.queue_length == 0  # the memory bank replaces it


# facebookresearch/swav scripts/deepclusterv2_{400,800}ep_pretrain.sh, the flags that set numbers, as written there
REFERENCE_SCRIPTS = {
    800: "--nmb_crops 2 6 --size_crops 224 96 --min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14 "
         "--crops_for_assign 0 1 --temperature 0.1 --feat_dim 128 --nmb_prototypes 3000 3000 3000 --epochs 800 "
         "--batch_size 64 --base_lr 4.8 --final_lr 0.0048 --freeze_prototypes_niters 300000 --wd 0.000001 "
         "--warmup_epochs 10 --start_warmup 0.3",
    400: "--nmb_crops 2 4 --size_crops 160 96 --min_scale_crops 0.08 0.05 --max_scale_crops 1. 0.14 "
         "--crops_for_assign 0 1 --temperature 0.1 --feat_dim 128 --nmb_prototypes 3000 3000 3000 --epochs 400 "
         "--batch_size 64 --base_lr 4.8 --final_lr 0.0048 --freeze_prototypes_niters 300000 --wd 0.000001 "
         "--warmup_epochs 10 --start_warmup 0.3",
}


@pytest.mark.parametrize("epochs", [800, 400])
def test_recipes_equal_the_reference_scripts(epochs):
    from swavkit.config import load_config

    flags, key = {}, None
    for word in REFERENCE_SCRIPTS[epochs].split():
        if word.startswith("--"):
            key = word[2:]
            flags[key] = []
        else:
            flags[key].append(float(word))
    cfg = load_config([str(Path(__file__).parents[1] / "configs" / f"deepclusterv2_{epochs}ep.yaml")], [])
    gpus = 64  # #SBATCH --gpus=64
    assert cfg.method == "deepclusterv2"
    assert cfg.crops.counts == flags["nmb_crops"] and cfg.crops.sizes_px == flags["size_crops"]
    assert cfg.crops.min_scales == flags["min_scale_crops"] and cfg.crops.max_scales == flags["max_scale_crops"]
    assert list(cfg.swav.assignment_crops) == flags["crops_for_assign"]
    assert [cfg.swav.temperature] == flags["temperature"] and [cfg.model.output_dim] == flags["feat_dim"]
    assert [cfg.model.n_prototypes] * cfg.deepcluster.n_heads == flags["nmb_prototypes"]
    assert [cfg.train.epochs] == flags["epochs"] and cfg.train.batch_size == flags["batch_size"][0] * gpus
    assert cfg.optim.reference_batch_size == cfg.train.batch_size  # the LRs below are the script's, unscaled
    assert [cfg.optim.base_lr] == flags["base_lr"] and [cfg.optim.final_lr] == flags["final_lr"]
    assert [cfg.optim.weight_decay] == flags["wd"] and [cfg.optim.warmup_epochs] == flags["warmup_epochs"]
    assert [cfg.optim.warmup_start_lr] == flags["start_warmup"]
    # never trained: 300000 iterations outlast the run (312 steps per ImageNet epoch at 4096)
    assert flags["freeze_prototypes_niters"][0] > epochs * (1_281_167 // cfg.train.batch_size)
    assert cfg.optim.lars_exclude == "none" and cfg.train.precision == "fp32" and cfg.deepcluster.kmeans_iterations == 10
