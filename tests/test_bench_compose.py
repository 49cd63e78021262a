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


def test_calibration_holds_each_subject_against_the_base_objects_and_the_other_subjects():
    from types import SimpleNamespace

    import numpy as np

    refs = {"a": np.array([[1.0, 0.0]]), "b": np.array([[0.0, 1.0]])}
    obj = lambda x, y: SimpleNamespace(embedding=np.array([x, y]))  # noqa: E731
    positives = {"a": [obj(0.9, 0.1), obj(0.8, 0.2)], "b": [obj(0.1, 0.95), obj(0.6, 0.7)]}
    base = [obj(0.5, 0.5)]
    thresholds, calibration = bench_compose.calibrate(refs, positives, base)
    # a: its own 0.9, 0.8 against the base's 0.5 and b's objects' 0.1, 0.6: halfway between 0.8 and 0.6
    assert thresholds["a"] == pytest.approx(0.7) and calibration["a"][1:] == (1.0, 0.0)
    # b: its own 0.95, 0.7 against 0.5 and a's objects' 0.1, 0.2: halfway between 0.7 and 0.5
    assert thresholds["b"] == pytest.approx(0.6) and calibration["b"][1:] == (1.0, 0.0)
    # base objects more like a's references than a's own weakest raise a's threshold above them (TPR 1 with FPR 3/5
    # at 0.8 loses to TPR 1/2 with FPR 0 at 0.9)
    thresholds, calibration = bench_compose.calibrate(refs, positives, [obj(0.85, 0.0)] * 3)
    assert thresholds["a"] == pytest.approx((0.9 + 0.85) / 2) and calibration["a"][1:] == (0.5, 0.0)


def test_other_subjects_take_the_roles_and_train_apart_from_the_default_adapters(tmp_path):
    comps = bench_compose.compositions_of(["crescent", "heart", "cross"])
    assert [c[0] for c in comps][:3] == ["crescent + heart", "cross + heart", "crescent + heart + cross"]
    assert comps[2][1] == [("crescent", "left"), ("heart", "center"), ("cross", "right")]
    assert [c[0] for c in bench_compose.compositions_of(["star", "heart", "cross"])] == [c[0] for c in bench_compose.COMPOSITIONS]
    saved = dict(bench_compose.SUBJECTS)
    try:
        bench_compose.SUBJECTS.clear()
        bench_compose.SUBJECTS.update({"heart": ("sks", "red"), "star": ("zwx", "blue"), "cross": ("qpv", "green")})
        # the heart under the star's token is not the default heart adapter; the cross keeps its token and folder
        assert bench_compose.subject_dir(tmp_path, "heart") == tmp_path / "heart-sks"
        assert bench_compose.subject_dir(tmp_path, "cross") == tmp_path / "cross"
    finally:
        bench_compose.SUBJECTS.clear()
        bench_compose.SUBJECTS.update(saved)


def test_the_style_composition_draws_its_subject_large_and_its_adapter_trains_apart_by_learning_rate(tmp_path):
    star, heart = ("star", "center"), ("heart", "right")
    assert bench_compose.prompt_of([star], style=True) == "a large sks shape in the center, zxy"
    assert bench_compose.prompt_of([star], style=True, noun=True) == "a large shape in the center"
    assert bench_compose.prompt_of([star, heart], style=False) == "a sks shape in the center and a zwx shape on the right"
    saved = bench_compose.STYLE_LR
    try:
        folders = set()
        for lr in (1e-4, 1e-3, 3e-3):
            bench_compose.STYLE_LR = lr
            folders.add(bench_compose.style_dir(tmp_path))
        assert len(folders) == 3 and tmp_path / f"{bench_compose.STYLE}-lr0.001" in folders
    finally:
        bench_compose.STYLE_LR = saved
