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
