"""SwAV must learn something: the quickstart recipe, shortened, beats its own random init by a margin."""

from __future__ import annotations

import pytest

from swavkit.api import quickstart_config_path
from swavkit.config import load_config
from swavkit.data import BUNDLED_SAMPLE
from swavkit.evaluation.knn import evaluate_knn
from swavkit.training.trainer import train

# Measured on the bundled sample (2,000 train / 1,000 val Fashion-MNIST images, 32 px, 20-NN): random
# resnet10t 67.2 %, the quickstart after 4 epochs ~73 %, raw pixels 79.8 %. The margin leaves room for
# run-to-run noise while still failing when nothing is learned (a collapsed run sits at the random init).
MARGIN_POINTS = 3.0


@pytest.mark.slow
def test_quickstart_backbone_beats_its_random_init(tmp_path):
    cfg = load_config([quickstart_config_path()], [f"out_dir={tmp_path / 'run'}", "train.epochs=4",
                                                   "monitor.knn_data=", "data.num_workers=0"])
    result = train(cfg, progress=False)
    common = dict(image_size_px=32, num_workers=0, device="cpu", progress=False)
    split = (BUNDLED_SAMPLE / "train", BUNDLED_SAMPLE / "val")
    trained = evaluate_knn(result.backbone_dir, *split, out_json=tmp_path / "trained.json", **common)
    random_init = evaluate_knn("timm:resnet10t", *split, out_json=tmp_path / "random.json", **common)
    gain = trained["metrics"]["top1"] - random_init["metrics"]["top1"]
    assert gain >= MARGIN_POINTS, (trained["metrics"], random_init["metrics"])
