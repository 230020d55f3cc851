"""The NAB scorer pinned on hand-made cases: 100 rows (probationary period 15 rows), one label
window over rows 40..49 (width 10)."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from models.nab.scorer import (
    PROFILES,
    file_score,
    load_results,
    optimise_threshold,
    prepare_file,
    probationary_length,
    scaled_sigmoid,
    score_corpus,
)
from rtml.errors import RtmlError

STANDARD, LOW_FP, LOW_FN = PROFILES
STAMPS = pd.Series(pd.date_range("2024-01-01", periods=100, freq="5min"))
WINDOW = [[str(STAMPS[40]), str(STAMPS[49])]]


def nab_sigmoid(x):
    return 2 / (1 + math.exp(5 * x)) - 1


def detections_at(*rows):
    scores = np.zeros(100)
    scores[list(rows)] = 1.0
    return scores


def raw(rows, profile=STANDARD, windows=WINDOW):
    scored = prepare_file("f.csv", STAMPS, detections_at(*rows), windows)
    return file_score(scored, profile, threshold=0.5)[0]


def test_probationary_period_is_15_percent_capped_at_750_rows():
    assert probationary_length(100) == 15
    assert probationary_length(4033) == 604
    assert probationary_length(22696) == 750


def test_scaled_sigmoid_matches_nab_reference_points():
    assert scaled_sigmoid(-1.0) == pytest.approx(0.98661, abs=1e-5)
    assert scaled_sigmoid(-0.5) == pytest.approx(0.84828, abs=1e-5)
    assert scaled_sigmoid(0.0) == pytest.approx(0.0)
    assert scaled_sigmoid(3.0) == -1.0


def test_detection_at_the_window_start_earns_the_full_true_positive():
    assert raw([40]) == pytest.approx(1.0)


def test_late_detection_earns_little():
    assert raw([49]) == pytest.approx(nab_sigmoid(-0.1) / nab_sigmoid(-1.0))
    assert raw([49]) < 0.25 < raw([45])


def test_only_the_earliest_detection_in_a_window_counts():
    assert raw([45, 41, 48]) == pytest.approx(raw([41]))


def test_empty_window_costs_the_false_negative_weight():
    assert raw([]) == -1.0
    assert raw([], profile=LOW_FN) == -2.0


def test_false_positive_right_after_a_window_costs_less_than_a_far_one():
    near = raw([50]) + 1.0  # remove the missed window's -1
    far = raw([90]) + 1.0
    assert near == pytest.approx(0.11 * nab_sigmoid(1 / 9))
    assert -0.11 < near < 0
    assert far == pytest.approx(-0.11)
    assert raw([90], profile=LOW_FP) + 1.0 == pytest.approx(-0.22)


def test_false_positive_before_any_window_costs_the_full_weight_and_probation_is_free():
    assert raw([20]) + 1.0 == pytest.approx(-0.11)
    assert raw([3]) == -1.0


def test_file_without_windows_only_loses_on_false_positives():
    assert raw([], windows=[]) == 0.0
    assert raw([30, 60], windows=[]) == pytest.approx(-0.22)


def test_corpus_threshold_is_chosen_over_all_files_and_normalised():
    # File a: the window starts at a score of 0.9, a false positive elsewhere scores 0.8.
    a = np.zeros(100)
    a[40], a[95] = 0.9, 0.8
    # File b: its window is only reached at 0.7, and noise in it scores 0.75 outside its window.
    b = np.zeros(100)
    b[42], b[80] = 0.7, 0.75
    files = [prepare_file(name, STAMPS, scores, WINDOW) for name, scores in (("a", a), ("b", b))]
    threshold, best = optimise_threshold(files, STANDARD)
    b_hit = nab_sigmoid(-(49 - 42 + 1) / 10) / nab_sigmoid(-1)
    # threshold 0.7 detects both windows at the cost of two full false positives.
    assert threshold == 0.7
    assert best == pytest.approx(1.0 + b_hit - 0.11 * 2)
    (result, *_) = score_corpus(files, total_windows=2, profiles=[STANDARD])
    assert result.null == -2 and result.perfect == 2
    assert result.normalized == pytest.approx(100 * (best + 2) / 4)


def test_detecting_nothing_can_be_the_best_threshold():
    noisy = np.full(100, 0.6)
    files = [prepare_file("a", STAMPS, noisy, [])]
    threshold, best = optimise_threshold(files, STANDARD)
    assert threshold == float("inf") and best == 0.0


def test_ties_choose_the_highest_threshold():
    scores = np.zeros(100)
    scores[40] = 0.9
    scores[41] = 0.5
    threshold, _ = optimise_threshold([prepare_file("a", STAMPS, scores, WINDOW)], STANDARD)
    assert threshold == 0.9


def write_results(directory, scores):
    (directory / "cat").mkdir(parents=True)
    pd.DataFrame({"timestamp": STAMPS.astype(str), "value": 1.0, "anomaly_score": scores}).to_csv(
        directory / "cat" / "f.csv", index=False
    )


def test_results_and_labels_are_read_from_nab_layout(tmp_path):
    write_results(tmp_path / "out", detections_at(40))
    labels = tmp_path / "windows.json"
    labels.write_text(json.dumps({"cat/f.csv": [[s + ".000000" for s in WINDOW[0]]]}))
    files, windows = load_results(tmp_path / "out", labels)
    results = score_corpus(files, windows)
    assert [r.normalized for r in results] == pytest.approx([100.0, 100.0, 100.0])


def test_missing_result_files_and_bad_scores_are_named(tmp_path):
    labels = tmp_path / "windows.json"
    labels.write_text(json.dumps({"cat/f.csv": [], "cat/g.csv": []}))
    write_results(tmp_path / "out", np.full(100, 1.5))
    with pytest.raises(RtmlError, match="cat/g.csv"):
        load_results(tmp_path / "out", labels)
    labels.write_text(json.dumps({"cat/f.csv": []}))
    with pytest.raises(RtmlError, match=r"\[0, 1\]"):
        load_results(tmp_path / "out", labels)
