"""The NAB scorer pinned on hand-made cases: 100 rows (probationary period 15 rows), one label
window over rows 40..49 (width 10); and checked against NAB's own algorithm (numenta/NAB
nab/sweeper.py: one row at a time, then a sweep of thresholds over the whole corpus) on random
corpora."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_window_limits_are_the_first_rows_stamped_so_when_the_clock_steps_back():
    # The clock steps back an hour at row 20 (machine_temperature_system_failure does this), so
    # rows 21..30 carry the timestamps of rows 9..18 again; NAB takes the first rows stamped so.
    stamps = pd.Series([t - pd.Timedelta(hours=1) if i >= 20 else t for i, t in enumerate(STAMPS)])
    scored = prepare_file("f.csv", stamps, np.zeros(100), [[str(stamps[21]), str(stamps[30])]])
    inside = np.flatnonzero(scored.window == 0) + probationary_length(100)
    assert inside.tolist() == list(range(15, 19))  # rows 9..18, cut at the end of probation
    assert scored.weight[scored.window == 0][0] == pytest.approx(nab_sigmoid(-(18 - 15 + 1) / 10) / nab_sigmoid(-1))


def test_window_boundary_that_is_no_row_timestamp_is_named():
    with pytest.raises(RtmlError, match="2030-01-01"):
        prepare_file("f.csv", STAMPS, np.zeros(100), [[str(STAMPS[40]), "2030-01-01 00:00:00"]])


def nab_sweep(files, profile):
    """NAB v1.1's optimiser, written after its row-at-a-time description: each scorable row gets a
    sweep score (window rows as true positives, others as false positives relative to the preceding
    window), rows are taken in decreasing anomaly score, and the corpus score is recorded at each
    distinct score (threshold 1.1: nothing detected). Returns the best (threshold, score), the
    first (highest threshold) among ties. ``files`` holds (scores, [(first_row, last_row), ...])."""
    rows = []
    for number, (scores, windows) in enumerate(files):
        probation = min(math.floor(0.15 * len(scores)), 0.15 * 5000)
        current, previous = None, None
        for i, score in enumerate(scores):
            current = current or next((w for w in windows if w[0] == i), None)
            if current is not None:
                first, last = current
                sweep = nab_sigmoid(-(last - i + 1) / (last - first + 1)) * profile.tp / nab_sigmoid(-1)
            else:
                position = 3.0 if previous is None else (i - previous[1]) / (previous[1] - previous[0])
                sweep = (-1.0 if position >= 3 else nab_sigmoid(position)) * profile.fp
            if i >= probation:
                rows.append((score, sweep, None if current is None else (number, current)))
            if current is not None and i == current[1]:
                current, previous = None, current
    parts = {"fp": 0.0} | {window: -profile.fn for _, _, window in rows if window is not None}
    best = (1.1, sum(parts.values()))
    rows.sort(key=lambda row: -row[0])
    for position, (score, sweep, window) in enumerate(rows):
        if window is None:
            parts["fp"] += sweep
        else:
            parts[window] = max(parts[window], sweep)
        if position + 1 == len(rows) or rows[position + 1][0] != score:
            total = sum(parts.values())
            if total > best[1] + 1e-9:
                best = (score, total)
    return best


@st.composite
def corpora(draw):
    files = []
    for _ in range(draw(st.integers(1, 3))):
        length = draw(st.integers(20, 120))
        windows, row = [], draw(st.integers(0, 30))
        while row + 2 <= length and draw(st.booleans()):
            last = min(length - 1, row + draw(st.integers(1, 15)))
            windows.append((row, last))
            row = last + 1 + draw(st.integers(0, 40))
        scores = draw(st.lists(st.sampled_from([0.0, 0.2, 0.5, 0.7, 0.9, 1.0]), min_size=length, max_size=length))
        files.append((scores, windows))
    return files


@settings(max_examples=200, deadline=None)
@given(corpora(), st.sampled_from(PROFILES))
def test_threshold_sweep_agrees_with_nab_row_by_row(files, profile):
    scored = []
    for number, (scores, windows) in enumerate(files):
        stamps = pd.Series(pd.date_range("2024-01-01", periods=len(scores), freq="5min"))
        limits = [[str(stamps[first]), str(stamps[last])] for first, last in windows]
        scored.append(prepare_file(f"f{number}.csv", stamps, np.array(scores), limits))
    threshold, raw = optimise_threshold(scored, profile)
    expected_threshold, expected_raw = nab_sweep(files, profile)
    assert raw == pytest.approx(expected_raw, abs=1e-9)
    assert threshold == (expected_threshold if expected_threshold <= 1 else float("inf"))


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


def test_a_split_is_scored_alone_with_its_own_threshold(tmp_path):
    write_results(tmp_path / "out", detections_at(40))
    other = tmp_path / "out" / "other"
    other.mkdir()
    pd.DataFrame({"timestamp": STAMPS.astype(str), "value": 1.0, "anomaly_score": np.zeros(100)}).to_csv(other / "g.csv", index=False)
    labels = tmp_path / "windows.json"
    window = [[s + ".000000" for s in WINDOW[0]]]
    labels.write_text(json.dumps({"cat/f.csv": window, "other/g.csv": window}))
    both = score_corpus(*load_results(tmp_path / "out", labels))
    detected = score_corpus(*load_results(tmp_path / "out", labels, ["cat"]))
    missed = score_corpus(*load_results(tmp_path / "out", labels, ["other"]))
    assert [r.normalized for r in detected] == pytest.approx([100.0, 100.0, 100.0])
    assert [r.normalized for r in missed] == pytest.approx([0.0, 0.0, 0.0])
    assert 0.0 < both[0].normalized < 100.0
    with pytest.raises(RtmlError, match="no category nope.*cat, other"):
        load_results(tmp_path / "out", labels, ["nope"])
