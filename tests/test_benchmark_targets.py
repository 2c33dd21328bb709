"""Benchmarks state their target and exit non-zero when they miss it."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import run_eval_benchmark  # noqa: E402


def _row(knn: float, linear: float) -> dict:
    return {"knn": {"metrics": {"top1": knn}}, "linear": {"metrics": {"top1": linear}}}


def test_eval_benchmark_fails_when_swav_does_not_beat_random_init(capsys):
    pixels = _row(40.0, 38.0)
    assert run_eval_benchmark.verdict([_row(45.0, 50.0), _row(30.0, 35.0), pixels]) == 0
    assert run_eval_benchmark.verdict([_row(29.0, 50.0), _row(30.0, 35.0), pixels]) == 1
    assert "knn: 29.00 % <= random init 30.00 %" in capsys.readouterr().err
    assert run_eval_benchmark.verdict([_row(45.0, 35.0), _row(30.0, 35.0), pixels]) == 1


def test_eval_benchmark_fails_at_ln_k_and_below_a_knn_target(capsys):
    rows = [_row(45.0, 50.0), _row(30.0, 35.0)]
    healthy = {"final_loss": 3.0, "ln_k": 4.605}
    collapsed = {"final_loss": 4.60, "ln_k": 4.605}
    assert run_eval_benchmark.verdict(rows, healthy) == 0
    assert run_eval_benchmark.verdict(rows, collapsed) == 1
    assert "not below 0.97 ln K" in capsys.readouterr().err
    assert run_eval_benchmark.verdict(rows, healthy, min_knn=50.0) == 1
    assert "k-NN top-1 45.00 % < target 50 %" in capsys.readouterr().err
    assert run_eval_benchmark.verdict(rows, healthy, min_knn=45.0) == 0
