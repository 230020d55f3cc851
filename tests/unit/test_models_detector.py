"""The streaming detector: causal (appending future values never changes earlier scores), the same
scores however the stream is cut into chunks and its state saved between them, calibrated to
[0, 1], and it flags what it should."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.detector import (
    DetectorConfig,
    ForecasterSpec,
    SeriesInput,
    SeriesScoring,
    _LikelihoodTail,
    detect,
    fit_forecaster,
    forecast_rows,
    seasonal_lag,
)

# Small and quick, but with every part of the default detector: forecasters of two kinds with
# refits, the seasonal member and novelty.
QUICK = DetectorConfig(
    forecasters=(
        ForecasterSpec("rnn", 12, hparams={"hidden": 8}),
        ForecasterSpec("cnn", 24, horizon=2, hparams={"channels": 4, "levels": 3}),
    ),
    initial_epochs=2,
    refit_epochs=1,
    refit_every=120,
    history=300,
    long_window=200,
)


def seasonal_series(length=900, period=40, seed=0):
    rng = np.random.default_rng(seed)
    steps = np.arange(length)
    return 10 + 3 * np.sin(2 * np.pi * steps / period) + rng.normal(0, 0.2, length)


def test_appending_future_values_never_changes_earlier_scores():
    values = seasonal_series()
    values[650:660] += 6  # an anomaly after the first cut, so later parts differ in kind
    full = detect(values, learning_rows=200, config=QUICK)
    for cut in (201, 333, 600, 700):
        np.testing.assert_array_equal(detect(values[:cut], learning_rows=200, config=QUICK), full[:cut])


def test_scores_are_in_range_zero_while_learning_and_peak_at_a_spike():
    values = seasonal_series()
    values[700] += 8
    scores = detect(values, learning_rows=200, config=QUICK)
    assert scores.shape == values.shape
    assert ((scores >= 0) & (scores <= 1)).all()
    assert not scores[:200].any()
    assert scores[700] == scores.max() and scores[700] > 0.9
    assert np.median(scores[200:]) < 0.1


def test_a_day_missing_its_pattern_is_flagged():
    values = seasonal_series(period=40)
    values[600:640] = 10.0  # one period flat at the mean: no new extreme, only a missing pattern
    scores = detect(values, learning_rows=200, config=QUICK)
    assert scores[600:650].max() > 0.7 > np.percentile(scores[250:600], 99)


def test_seasonal_lag_is_the_period_or_a_multiple_and_noise_has_none():
    assert seasonal_lag(seasonal_series(period=40)[:400], 0.5) in (40, 80, 120, 160)
    assert seasonal_lag(np.random.default_rng(1).normal(size=400), 0.5) is None
    assert seasonal_lag(np.full(400, 3.0), 0.5) is None


def test_a_week_whose_days_differ_is_the_period_not_the_day():
    # Half-hourly readings over 15.6 days (a learning period of NAB's nyc_taxi): a daily cycle,
    # weaker at weekends. The day repeats too, but only the week repeats exactly.
    steps = np.arange(750)
    weekend = (steps // 48) % 7 >= 5
    values = np.sin(2 * np.pi * steps / 48) * np.where(weekend, 0.4, 1.0) + np.random.default_rng(2).normal(0, 0.05, 750)
    assert seasonal_lag(values, 0.5) == 7 * 48


def likelihood(errors, short, long, min_spread):
    return _LikelihoodTail.empty(short, long).advance(errors, short, long, min_spread)


def test_a_rise_in_steady_errors_far_below_the_series_spread_is_no_anomaly():
    # A forecaster's error on a flat line is steady and shifts a little when it is refitted.
    errors = np.full(900, 0.03)
    errors[600:] = 0.036
    assert likelihood(errors, 8, 500, min_spread=0.01).max() < 0.1
    errors[800:] = 0.5
    assert likelihood(errors, 8, 500, min_spread=0.01)[800] > 0.9


def chunked_detect(values, learning_rows, config, cuts):
    """The detector as a stream runs it: chunk by chunk, each state saved to a row and loaded
    back between chunks (a checkpoint and a restart), fits made when they become due."""
    inputs = SeriesInput.start(learning_rows, config)
    scoring = SeriesScoring.start(learning_rows, config)
    networks = [{} for _ in config.forecasters]
    scores = []
    for start, end in zip([0, *cuts], [*cuts, len(values)]):
        inputs = SeriesInput.from_row(inputs.to_row())
        scoring = SeriesScoring.from_row(scoring.to_row())
        rows, due = inputs.advance(values[start:end], config)
        for fit in due:
            previous = networks[fit.forecaster].get(fit.index - 1)
            networks[fit.forecaster][fit.index] = fit_forecaster(config.forecasters[fit.forecaster], config, fit, previous)
        forecasts = [forecast_rows(rows, j, networks[j]) for j in range(len(config.forecasters))]
        scores.append(scoring.advance(rows, forecasts, config))
    return np.concatenate(scores)


SHORT = seasonal_series(520)
SHORT[430] += 5


@pytest.fixture(scope="module")
def short_scores():
    """The one-pass scores of SHORT, with one torch thread, as every fit runs (the training's
    arithmetic depends on the thread count; streaming.detection and models.nab.runner pin it)."""
    torch.set_num_threads(1)
    return detect(SHORT, learning_rows=150, config=QUICK)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(1, len(SHORT) - 1), max_size=8, unique=True).map(sorted))
def test_any_chunking_with_state_saved_between_chunks_gives_the_one_pass_scores(short_scores, cuts):
    np.testing.assert_array_equal(chunked_detect(SHORT, 150, QUICK, cuts), short_scores)


def test_one_value_at_a_time_gives_the_one_pass_scores(short_scores):
    cuts = list(range(1, 200)) + list(range(420, 440))  # the learning period's end, and the spike
    np.testing.assert_array_equal(chunked_detect(SHORT, 150, QUICK, cuts), short_scores)


def test_non_finite_values_are_refused():
    values = seasonal_series(300)
    values[10] = np.nan
    with pytest.raises(ValueError, match="finite"):
        detect(values, learning_rows=100, config=QUICK)
