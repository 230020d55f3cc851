"""The streaming anomaly detector for one series: an ensemble of torch forecasters whose errors are
turned into a calibrated anomaly likelihood.

    scores = detect(values, learning_rows=600)   # float64 [n] in [0, 1], one per value

Causal: the score of value t uses only values 0..t (appending values never changes earlier scores;
``learning_rows`` is fixed by the caller, as NAB fixes every detector's probationary period). The
detector learns on the first ``learning_rows`` values and keeps adapting afterwards:

1. Forecasts. Each forecaster (GRU, TCN, CNN+GRU hybrid, with its own context length and horizon)
   is first trained on the first half of the learning period and forecasts its second half (so the
   error distribution starts from honest out-of-sample errors), then refitted every
   ``refit_every`` values on the most recent ``history`` values (warm start, few epochs). Between
   refits a model is frozen, so a whole segment is forecast in one batched forward pass.
2. Errors. |value - forecast| divided by the spread of the recent values (online normalisation).
3. Likelihood, as Numenta's anomaly likelihood: the mean of the last ``short_window`` errors is
   compared with the distribution of that mean over the last ``long_window`` values (mean and
   standard deviation, not including now, the deviation at least ``likelihood_min_spread``); the
   normal tail probability of the difference, on a log scale (``-log10(p) / 10``), is the model's
   score. Scores are averaged over the forecasters.
4. Seasonality: when the learning period has a clear period (the highest autocorrelation peak above
   ``seasonal_min_autocorrelation``, see ``seasonal_lag``), the error of the seasonal-naive
   forecast (the value one period ago) gets its own likelihood (over ``seasonal_short_window``
   values), and the score is the larger of the two. Short-context forecasters miss a day that
   lacks its usual pattern; this catches it.
5. Novelty: a value beyond the range seen so far by more than ``spatial_tolerance`` of that range
   scores 1, as in Numenta's detector (people label such values anomalous).
6. Only the first of consecutive high scores stays high (``quiet_after``): an anomaly is reported
   once, not at every value that follows it. The forecasters' own reports are spaced further apart,
   by ``forecaster_quiet_learning_periods`` learning periods: when their errors rise for good (the
   series became noisier), that is one change, and the refits need about a learning period to
   absorb it; reporting it again every ``quiet_after`` values was most of the false alarms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from models import _fit
from models.networks import build_network
from models.scoring import tail_score


@dataclass(frozen=True)
class ForecasterSpec:
    kind: str
    context_length: int
    horizon: int = 1
    hparams: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DetectorConfig:
    # One TCN whose receptive field (509 steps) spans a day of 5-minute data. The measurements
    # behind these choices are in benchmarks/RESULTS.md.
    forecasters: tuple[ForecasterSpec, ...] = (ForecasterSpec("cnn", 300, hparams={"channels": 8, "levels": 7}),)
    initial_epochs: int = 8
    refit_epochs: int = 2
    refit_every: int = 500
    history: int = 2000
    short_window: int = 8
    long_window: int = 500
    seasonal_short_window: int = 30
    seasonal_min_autocorrelation: float = 0.5
    # Errors are in units of the series' spread; a rise of the mean error by a few hundredths of
    # that spread is no anomaly, however steady the errors were before (Numenta bounds the
    # likelihood's variance from below for the same reason).
    likelihood_min_spread: float = 0.01
    spatial_tolerance: float = 0.01
    high_score: float = 0.7
    quiet_after: int = 50
    forecaster_quiet_learning_periods: float = 1.0
    seed: int = 0


def detect(values: np.ndarray, learning_rows: int, config: DetectorConfig = DetectorConfig()) -> np.ndarray:
    """Anomaly scores in [0, 1] for ``values`` (see the module docstring)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("values must be finite numbers")
    n = len(values)
    learning_rows = max(2, min(learning_rows, n))
    model_scores = [
        _likelihood(
            _forecast_errors(values, learning_rows, spec, config),
            config.short_window,
            config.long_window,
            config.likelihood_min_spread,
        )
        for spec in config.forecasters
    ]
    scores = np.mean(model_scores, axis=0) if model_scores else np.zeros(n)
    scores = _report_once(scores, config.high_score, int(config.forecaster_quiet_learning_periods * learning_rows))
    seasonal = _seasonal_errors(values, learning_rows, config.seasonal_min_autocorrelation)
    if seasonal is not None:
        seasonal_scores = _likelihood(seasonal, config.seasonal_short_window, config.long_window, config.likelihood_min_spread)
        scores = np.maximum(scores, seasonal_scores)
    scores = np.maximum(scores, _novelty(values, config.spatial_tolerance))
    scores[:learning_rows] = 0.0
    return _report_once(scores, config.high_score, config.quiet_after)


def _forecast_errors(values: np.ndarray, learning_rows: int, spec: ForecasterSpec, config: DetectorConfig) -> np.ndarray:
    """|value - forecast| / recent spread for every value from learning_rows // 2 on (NaN before)."""
    n = len(values)
    errors = np.full(n, np.nan)
    network = None
    first = learning_rows // 2
    boundaries = [first, learning_rows, *range(learning_rows + config.refit_every, n, config.refit_every), n]
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        if start >= end:
            continue
        past = values[max(0, start - config.history) : start]
        center, scale = float(np.median(past)), _spread(past)
        normalised = (past - center) / scale
        epochs = config.initial_epochs if network is None else config.refit_epochs
        if network is None:
            torch.manual_seed(config.seed)
            network = build_network(spec.kind, context_length=spec.context_length, horizon=spec.horizon, **spec.hparams)
        inputs, targets = _fit.forecasting_pairs(_padded(normalised, spec.context_length + spec.horizon), spec.context_length, spec.horizon)
        _fit.train(network, inputs, targets, epochs=epochs, seed=config.seed + start)
        # Forecast values start..end-1 from the windows ending `horizon` steps before each.
        lead = spec.context_length + spec.horizon - 1
        segment = (values[max(0, start - lead) : end] - center) / scale
        segment = _padded(segment, lead + (end - start))
        windows = _fit.sliding_windows(segment, spec.context_length)[: end - start]
        forecasts = _fit.predict(network, windows)
        errors[start:end] = np.abs(segment[lead:] - forecasts)
    return errors


def _padded(series: np.ndarray, length: int) -> np.ndarray:
    """``series`` with its first value repeated in front until it is at least ``length`` long."""
    missing = length - len(series)
    return np.concatenate([np.full(missing, series[0]), series]) if missing > 0 else series


def _spread(past: np.ndarray) -> float:
    spread = float(np.std(past))
    floor = 1e-3 * max(float(np.abs(past).mean()), 1.0)
    return max(spread, floor)


def _likelihood(errors: np.ndarray, short_window: int, long_window: int, min_spread: float) -> np.ndarray:
    """Numenta-style anomaly likelihood of the recent mean error, on NAB's log scale."""
    recent = pd.Series(errors).rolling(short_window, min_periods=1).mean()
    history = recent.shift(1).rolling(long_window, min_periods=max(10, short_window * 2))
    mean, std = history.mean(), history.std()
    z = ((recent - mean) / np.maximum(std.to_numpy(), min_spread)).to_numpy()
    z = np.nan_to_num(z, nan=0.0)
    return tail_score(torch.as_tensor(z)).numpy() * (z > 0)


def seasonal_lag(values: np.ndarray, min_autocorrelation: float, min_lag: int = 10) -> int | None:
    """The lag of the highest local autocorrelation peak above ``min_autocorrelation`` (lags from
    ``min_lag`` to half the length), or None when the values show no clear period: the period (or a
    multiple of it, which forecasts as well) whose seasonal-naive forecast fits ``values`` best.

    The autocorrelation at lag k is averaged over the n - k pairs that lag has. The common
    estimate divides by n instead, which shrinks long lags by (n - k) / n: a weekly period, whose
    days differ, would lose to the daily one only because fewer pairs are a week apart."""
    centred = values - values.mean()
    n = len(centred)
    if n < 2 * min_lag + 2 or not centred.any():
        return None
    spectrum = np.fft.rfft(centred, 2 * n)
    autocorrelation = np.fft.irfft(spectrum * np.conj(spectrum))[: n // 2] / (n - np.arange(n // 2))
    autocorrelation = autocorrelation / autocorrelation[0]
    inner = autocorrelation[min_lag:-1]
    is_peak = (inner >= autocorrelation[min_lag - 1 : -2]) & (inner >= autocorrelation[min_lag + 1 :])
    candidates = np.flatnonzero(is_peak & (inner > min_autocorrelation))
    if len(candidates) == 0:
        return None
    return int(min_lag + candidates[np.argmax(inner[candidates])])


def _seasonal_errors(values: np.ndarray, learning_rows: int, min_autocorrelation: float) -> np.ndarray | None:
    """|value - value one period ago| / learning spread, with the period found in the learning
    values; None when they show no clear period."""
    learning = values[:learning_rows]
    period = seasonal_lag(learning, min_autocorrelation)
    if period is None:
        return None
    errors = np.full(len(values), np.nan)
    errors[period:] = np.abs(values[period:] - values[:-period]) / _spread(learning)
    return errors


def _novelty(values: np.ndarray, tolerance: float) -> np.ndarray:
    """1 where a value leaves the range seen before it by more than ``tolerance`` of that range."""
    high = np.maximum.accumulate(values)
    low = np.minimum.accumulate(values)
    previous_high = np.concatenate([[values[0]], high[:-1]])
    previous_low = np.concatenate([[values[0]], low[:-1]])
    margin = (previous_high - previous_low) * tolerance
    outside = (values > previous_high + margin) | (values < previous_low - margin)
    return (outside & (previous_high > previous_low)).astype(np.float64)


def _report_once(scores: np.ndarray, high: float, quiet: int) -> np.ndarray:
    """Scores at or above ``high`` within ``quiet`` values of the last reported one are lowered to
    just under ``high`` (Numenta's red-to-yellow filter, with a longer memory)."""
    out = scores.copy()
    last_report = -math.inf
    for t in np.flatnonzero(scores >= high):
        if t - last_report <= quiet:
            out[t] = min(out[t], high * 0.99)
        else:
            last_report = t
    return out
