"""The one checkpointer (cadence, stop, format tag) and the one supervised loop of fine-tuning and the reference
linear probe: resume after kill -9 equals an uninterrupted run, a non-finite loss saves the last good state
and raises TrainingDiverged, two gloo processes train like one."""

import math
import os
import signal

import pytest
import torch

from evaluation_fixtures import one_thread, write_labelled_folders  # noqa: F401
from swavkit.artifacts.checkpoint import CheckpointError, load_state
from swavkit.artifacts.checkpointer import Checkpointer
from swavkit.errors import TrainingDiverged
from swavkit.runtime.signals import StopRequest


class _Counter:
    """A stateful whose state is the number of times it was saved."""

    def __init__(self):
        self.saves = 0

    def state_dict(self):
        self.saves += 1
        return {"saves": torch.tensor(self.saves)}

    def load_state_dict(self, state):
        self.saves = int(state["saves"])


def test_checkpointer_cadence_stop_and_format(tmp_path):
    path = tmp_path / "c.pt"
    counter = _Counter()
    by_steps = Checkpointer(path, "test-v1", counter, every_steps=3, epoch_steps=5, stop_after_steps=8)
    decisions = [by_steps.due(step) for step in range(1, 10)]
    assert [step for step, (save, _) in enumerate(decisions, 1) if save] == [3, 5, 6, 8, 9]  # steps, epochs, stop
    assert [step for step, (_, stop) in enumerate(decisions, 1) if stop] == [8, 9]
    assert by_steps.maybe_save(3) is False and load_state(path) == {"saves": 1, "format": "test-v1"}
    assert Checkpointer(path, "test-v1", counter, every_minutes=0.0).due(1) == (True, False)  # 0 min: every step
    assert Checkpointer(path, "test-v1", counter).due(1) == (False, False)  # no cadence: never by itself
    with StopRequest() as stop_request, stop_request.deferred():
        signalled = Checkpointer(path, "test-v1", counter, stop_request=stop_request)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signalled.maybe_save(7) is True and signalled.stop_reason == "SIGTERM"
    assert Checkpointer(path, "test-v1", _Counter()).read()["saves"] == 2
    with pytest.raises(CheckpointError, match=r"c.pt is not a swavkit checkpoint \(no format 'other-v1'\)"):
        Checkpointer(path, "other-v1", counter).read()


class _Nan(torch.nn.Module):
    """A trunk [B, 3, 4, 4] -> [B, 4] whose output turns NaN from its ``bad_call``-th training batch on."""

    def __init__(self, bad_call: int):
        super().__init__()
        self.linear, self.calls, self.bad_call = torch.nn.Linear(48, 4), 0, bad_call

    def forward(self, images):
        self.calls += 1
        features = self.linear(images.flatten(1))
        return features * math.nan if self.calls == self.bad_call else features


class _Items(torch.utils.data.Dataset):
    def __init__(self, n):
        generator = torch.Generator().manual_seed(0)
        self.items = [(torch.randn(3, 4, 4, generator=generator), i % 2) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_a_non_finite_loss_saves_the_last_good_state_and_raises_training_diverged(tmp_path):
    from swavkit.evaluation.linear_probe import linear_probe_reference

    path = tmp_path / "probe.pt"
    # call 1 measures the feature size; 8 items at batch 4: steps 0-1 are epoch 1, the NaN comes at step 3
    with pytest.raises(TrainingDiverged) as raised:
        linear_probe_reference(_Nan(bad_call=5), _Items(8), _Items(8), n_classes=2, epochs=3, batch_size=4,
                               num_workers=0, progress=False, checkpoint=path, checkpoint_every_minutes=math.inf)
    message = str(raised.value)
    assert "\n" not in message and "non-finite training loss at step 3 (epoch 2)" in message and "--lr" in message
    saved = load_state(path)
    assert saved["epoch"] == 1 and saved["part_epoch"]["batches"] == 1  # the 3 good steps, not the bad one
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_a_probe_checkpoint_of_another_setup_or_kind_is_refused_in_one_line(tmp_path):
    from swavkit.evaluation.linear_probe import linear_probe_reference

    path = tmp_path / "probe.pt"

    def probe(lr):
        torch.manual_seed(0)
        trunk = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 4))
        return linear_probe_reference(trunk, _Items(8), _Items(8), n_classes=2, epochs=1, batch_size=4, lr=lr,
                                      num_workers=0, progress=False, checkpoint=path)

    done = probe(0.1)
    assert probe(0.1) == done  # a finished run read back: the same result, nothing trained again
    with pytest.raises(CheckpointError, match=r"probe.pt holds a run of another setup \(lr: 0.1 there, 0.2 now\); "
                                              "delete it or choose another checkpoint path$"):
        probe(0.2)
    torch.save({"format": "swavkit-finetune-v1"}, path)
    with pytest.raises(CheckpointError, match="no format 'swavkit-linear-reference-v1'"):
        probe(0.1)


# ----------------------------------------------------------------------------------------------------
# kill -9 after a checkpoint, then the same call again = the uninterrupted result

def _killed_at(step: int, case: str, data, out) -> int:
    """Run ``case`` in a forked child that SIGKILLs itself right after the save of ``step``; its wait status.
    A fork, not a new interpreter: no second import of torch (the DataLoader's own workers are forks too)."""
    import swavkit.artifacts.checkpointer as checkpointer

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            torch.set_num_threads(1)
            save = checkpointer.Checkpointer.save

            def save_then_die(self, saved_step):
                save(self, saved_step)
                if saved_step == step:
                    os.kill(os.getpid(), signal.SIGKILL)

            checkpointer.Checkpointer.save = save_then_die
            run_case(case, data, out)
        finally:
            os._exit(1)  # reached only when the kill did not happen
    return os.waitpid(pid, 0)[1]


def run_case(case: str, data, out, workers: int = 0) -> dict:
    """Fine-tune (trunk trained) or reference-probe (trunk frozen) resnet10t at 16 px on 12 images: 3 steps of
    batch 4 per epoch, 2 epochs, a save after every step, images read by ``workers`` DataLoader workers;
    {"history", "metrics", "weights"}."""
    from swavkit.artifacts.pretrained import load_backbone

    torch.manual_seed(0)
    backbone = load_backbone("timm:resnet10t")
    if case == "finetune":
        from swavkit.artifacts.preprocessing import resolve_preprocessing
        from swavkit.evaluation.finetune import (FinetuneFolder, FinetuneOptions, label_list_text, load_labelled_data,
                                                 resolve_recipe, run_finetune)

        options = FinetuneOptions(label_fraction="0.5", epochs=2, batch_size=4, image_size_px=16,
                                  num_workers=workers, device="cpu", progress=False, checkpoint_interval_s=0.0)
        labelled = load_labelled_data(data / "train", data / "val", resolve_preprocessing("timm:resnet10t", 16),
                                      options)[0]
        folder = FinetuneFolder(out)
        folder.start({"test": 1}, label_list_text(labelled.relative, labelled.indices))
        outcome = run_finetune(backbone, labelled, resolve_recipe(options, 12, 24), folder, options, "test")
        return {"history": outcome["history"], "metrics": outcome["metrics"],
                "weights": load_state(folder.checkpoint)["model"]}
    from swavkit.data import LabelledImageFolder, eval_transform
    from swavkit.data.transforms import Preprocessing
    from swavkit.evaluation.linear_probe import linear_probe_reference, train_transform

    preprocessing = Preprocessing(16, 1.0, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "argument")
    train = LabelledImageFolder(data / "train", train_transform(preprocessing, min_crop_scale=0.5), max_per_class=4)
    val = LabelledImageFolder(data / "val", eval_transform(16, preprocessing.mean, preprocessing.std, 1.0),
                              classes=train.classes)
    out.mkdir(parents=True, exist_ok=True)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    metrics = linear_probe_reference(backbone, train, val, n_classes=3, epochs=2, batch_size=4, lr=3.0,
                                     num_workers=workers, progress=False, checkpoint=out / "probe.pt",
                                     checkpoint_every_minutes=0.0)
    # frozen: every backbone tensor as it was, BN statistics too; only the head is trained and saved
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    assert sorted(load_state(out / "probe.pt")["model"]) == ["bias", "weight"]
    assert metrics["steps"] == 6 and metrics["feature_dim"] == 512 and metrics["peak_lr"] == pytest.approx(3.0 * 4 / 256)
    return {"history": [metrics.pop("final_train_loss")], "metrics": metrics,
            "weights": load_state(out / "probe.pt")["model"]}


def _record_saves(monkeypatch) -> list[int]:
    """The steps every Checkpointer.save is called with from now on (the saves still happen)."""
    from swavkit.artifacts.checkpointer import Checkpointer

    steps, save = [], Checkpointer.save

    def recording(self, step):
        steps.append(step)
        return save(self, step)

    monkeypatch.setattr(Checkpointer, "save", recording)
    return steps


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_labelled_folders(root, n_train=8, n_val=4, size_px=16)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("case", ["finetune", "probe"])
def test_killed_with_sigkill_after_a_checkpoint_then_rerun_equals_an_uninterrupted_run(case, data, tmp_path,
                                                                                       monkeypatch):
    straight = run_case(case, data, tmp_path / "straight")
    status = _killed_at(4, case, data, tmp_path / "killed")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    saved = load_state(next((tmp_path / "killed").glob("*.pt")))
    assert saved["epoch"] == 1 and saved["part_epoch"]["batches"] == 1  # step 4: epoch 2's first batch
    # the rest in a DataLoader worker: each image's crop is seeded by (seed, epoch, image), not by the worker
    saved_steps = _record_saves(monkeypatch)
    resumed = run_case(case, data, tmp_path / "killed", workers=1 if case == "finetune" else 0)
    assert min(saved_steps) == 5, saved_steps  # it went on from step 4 (a rerun from scratch saves step 1 first)
    assert resumed["history"] == straight["history"] and resumed["metrics"] == straight["metrics"]
    assert all(torch.equal(straight["weights"][k], resumed["weights"][k]) for k in straight["weights"])


# ----------------------------------------------------------------------------------------------------
# two gloo processes on CPU train like one

def _probe(checkpoint):
    """The reference probe on a linear trunk [B, 3, 4, 4] -> [B, 8]: 16 items, global batch 8, 3 epochs."""
    from swavkit.evaluation.linear_probe import linear_probe_reference

    torch.manual_seed(1)
    trunk = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 8))
    return linear_probe_reference(trunk, _Items(16), _Items(16), n_classes=2, epochs=3, batch_size=8, lr=25.6,
                                  num_workers=0, progress=False, checkpoint=checkpoint, checkpoint_every_minutes=0.0)


def _probe_worker(rank, world, port, out_dir):
    from test_distributed import _set_env

    from swavkit.runtime import distributed

    _set_env(rank, world, port)
    distributed.init("cpu")
    metrics = _probe(os.path.join(out_dir, "two.pt"))
    torch.save(metrics, os.path.join(out_dir, f"metrics{rank}.pt"))
    distributed.shutdown()


@pytest.mark.slow
def test_the_probe_on_two_gloo_processes_equals_one_process(tmp_path):
    import torch.multiprocessing as mp
    from test_distributed import free_port

    one = _probe(tmp_path / "one.pt")
    # forked, not spawned: the workers need no second import of torch
    mp.start_processes(_probe_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    two = [torch.load(tmp_path / f"metrics{rank}.pt") for rank in range(2)]
    assert two[0] == two[1]  # every process reports the same
    assert two[0]["top1"] == one["top1"] and two[0]["steps"] == one["steps"] == 6
    assert two[0]["final_train_loss"] == pytest.approx(one["final_train_loss"], abs=1e-4)
    head_one, head_two = load_state(tmp_path / "one.pt")["model"], load_state(tmp_path / "two.pt")["model"]
    assert all(torch.allclose(head_one[k], head_two[k], atol=1e-5) for k in head_one)  # the same global batches
    assert load_state(tmp_path / "two.pt")["history"] == load_state(tmp_path / "one.pt")["history"]
