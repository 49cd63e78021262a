"""The composition benchmark's identity threshold (bench/compose.py), on hand-made similarities."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_compose", Path(__file__).parents[1] / "bench" / "compose.py")
bench_compose = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_compose)


def test_threshold_sits_halfway_in_the_gap_between_negatives_and_positives():
    t, tpr, fpr = bench_compose.youden_threshold([0.9, 0.95, 0.99], [0.1, 0.5, 0.7])
    assert (tpr, fpr) == (1.0, 0.0) and t == pytest.approx(0.8)


def test_threshold_with_overlap_keeps_the_best_tpr_minus_fpr():
    # at 0.6: TPR 3/4, FPR 1/4 (the negative 0.65); at 0.3: TPR 1, FPR 3/4; at 0.8: TPR 1/2, FPR 0 (a tie: the
    # lower threshold, found first, stays); halfway down to 0.5, the next value below 0.6
    t, tpr, fpr = bench_compose.youden_threshold([0.3, 0.6, 0.8, 0.9], [0.2, 0.4, 0.5, 0.65])
    assert (tpr, fpr) == (0.75, 0.25) and t == pytest.approx((0.6 + 0.5) / 2)


def test_threshold_without_anything_below_is_the_lowest_positive():
    assert bench_compose.youden_threshold([0.5, 0.7], []) == (0.5, 1.0, 0.0)
