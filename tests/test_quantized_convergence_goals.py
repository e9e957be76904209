"""The goal table of ``benchmarks/quantized_convergence.py`` (issue 20): per-format thresholds, paired
per-seed differences, the optax noise floor, and a diverged seed never counted as met."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import quantized_convergence as qc  # noqa: E402


def _runs(*losses):
    return [{"train_loss": v} for v in losses]


def test_goal_rows_thresholds_noise_floor_and_divergence():
    results = {
        "case": {
            "float32": _runs(1.0, 2.0),
            "optax float32": _runs(1.01, 2.02),  # +1% on the mean: the noise floor
            "8-bit": _runs(1.005, 2.01),  # +0.5%
            "fp8": _runs(1.015, 2.03),  # +1.5%: over fp8's 1%
            "4-bit": _runs(1.015, math.nan),  # within 2% on one seed, diverged on the other
        }
    }
    rows = {r["format"]: r for r in qc.goal_rows(results)}
    assert set(rows) == {"8-bit", "fp8", "4-bit"}
    assert rows["8-bit"]["met"] and rows["8-bit"]["within_noise_floor"]
    assert rows["8-bit"]["per_seed_pct"] == pytest.approx([0.5, 0.5])
    assert rows["fp8"]["goal_pct"] == 1.0 and not rows["fp8"]["met"] and not rows["fp8"]["within_noise_floor"]
    assert rows["fp8"]["control_pct"] == pytest.approx(1.0)
    assert rows["4-bit"]["goal_pct"] == 2.0 and not rows["4-bit"]["met"] and rows["4-bit"]["diverged_seeds"] == 1


def test_kinds_flag_refuses_unknown_kinds():
    with pytest.raises(SystemExit):
        qc.parse_args(["--kinds", "float32,fp16"])
    assert qc.parse_args(["--kinds", "float32,fp8", "--quick"]).kinds == ("float32", "fp8")
