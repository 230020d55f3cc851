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
   refits a model is frozen: fit k forecasts the values from its boundary to the next one.
2. Errors. |value - forecast| divided by the spread of the values the fit was trained on.
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

On a stream the detector runs in three steps per chunk of a series' values, with two states per
series that serialise to plain rows (``to_row`` / ``from_row``) for checkpoints:

    rows, fits = inputs.advance(chunk)        # SeriesInput: needs only values (read time)
    network_k = fit_forecaster(spec, config, due, network_k_minus_1)   # for each FitDue
    forecasts = [forecast(network of each row's fit, rows.windows[j]) ...]
    scores = scoring.advance(rows, forecasts) # SeriesScoring: in order, once forecasts are back

Every rolling statistic is computed over its fixed window of values (not by adding and removing
from running sums), so a value's score depends only on the values before it, never on where the
stream was cut into chunks: a replay after a crash gives the same scores bit for bit. ``detect`` is
these steps over one chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import nn

from models import _fit
from models.networks import build_network
from models.scoring import tail_score

# Rolling statistics are computed over at most this many rows at a time (memory: rows x window).
_STATISTICS_BLOCK = 2048


@dataclass(frozen=True)
class ForecasterSpec:
    kind: str
    context_length: int
    horizon: int = 1
    hparams: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Names the forecaster in model ids: its kind, context and horizon."""
        return f"{self.kind}-{self.context_length}-{self.horizon}"


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

    def fit_boundary(self, learning_rows: int, index: int) -> int:
        """The position from which fit ``index`` forecasts (and the end of what it is trained on)."""
        if index == 0:
            return learning_rows // 2
        return learning_rows + (index - 1) * self.refit_every

    def fit_index(self, learning_rows: int, positions: np.ndarray) -> np.ndarray:
        """The fit that forecasts each position (-1: none yet, the first half of learning)."""
        after = np.maximum(positions - learning_rows, 0) // self.refit_every + 1
        return np.where(positions < learning_rows // 2, -1, np.where(positions < learning_rows, 0, after)).astype(np.int64)


@dataclass(frozen=True)
class FitDue:
    """Fit ``index`` of forecaster ``forecaster`` of a series became due: trained on ``past`` (the
    raw values before ``boundary``), normalised by ``center`` and ``scale``."""

    forecaster: int
    index: int
    boundary: int
    past: np.ndarray
    center: float
    scale: float


@dataclass
class InputRows:
    """Per value of a chunk: what the forecasters need and the members that need no forecast."""

    positions: np.ndarray  # int64 [m]
    fits: list[np.ndarray]  # per forecaster: int64 [m], the fit that forecasts it (-1: none)
    windows: list[np.ndarray]  # per forecaster: float32 [m, context], normalised by the row's fit
    targets: list[np.ndarray]  # per forecaster: float64 [m], the value normalised the same way
    seasonal: np.ndarray  # float64 [m], the seasonal member's score (0 without a period)
    novelty: np.ndarray  # float64 [m], 1 where the value leaves the range seen before


def _serialisable(cls):
    """``to_row`` / ``from_row`` for a state dataclass of ints, floats and float64 arrays."""

    def to_row(self) -> dict:
        return {f.name: (getattr(self, f.name).tolist() if isinstance(getattr(self, f.name), np.ndarray) else getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_row(klass, row: dict):
        return klass(**{f.name: (np.asarray(row[f.name], np.float64) if f.type == "np.ndarray" else row[f.name]) for f in fields(klass)})

    cls.to_row, cls.from_row = to_row, from_row
    return cls


@_serialisable
@dataclass
class SeriesInput:
    """What a series' detector needs from its values alone, as of ``position`` values seen."""

    learning_rows: int
    position: int
    recent: np.ndarray  # the last values (as many as any step needs)
    first: float
    low: float
    high: float
    fit_index: list  # per forecaster: the current fit (-1: none)
    fit_center: list
    fit_scale: list
    period: int  # the seasonal lag; 0: none; -1: not known before learning_rows values
    seasonal_spread: float
    seasonal_errors: np.ndarray  # likelihood tail of the seasonal errors
    seasonal_recents: np.ndarray

    @classmethod
    def start(cls, learning_rows: int, config: DetectorConfig) -> SeriesInput:
        tail = _LikelihoodTail.empty(config.seasonal_short_window, config.long_window)
        count = len(config.forecasters)
        return cls(max(2, int(learning_rows)), 0, np.empty(0), math.nan, math.nan, math.nan, [-1] * count, [0.0] * count, [1.0] * count, -1, 1.0, tail.errors, tail.recents)

    def advance(self, chunk: np.ndarray, config: DetectorConfig) -> tuple[InputRows, list[FitDue]]:
        """Take the next values of the series; their rows and the fits that became due, in order."""
        chunk = np.asarray(chunk, dtype=np.float64)
        if not np.isfinite(chunk).all():
            raise ValueError("values must be finite numbers")
        m = len(chunk)
        if self.position == 0 and m:
            self.first = self.low = self.high = float(chunk[0])
        start = self.position - len(self.recent)  # the position of known[0]
        known = np.concatenate([self.recent, chunk])
        positions = np.arange(self.position, self.position + m, dtype=np.int64)
        novelty = self._novelty(chunk, config.spatial_tolerance)
        seasonal = self._seasonal(known, start, m, config)
        fits, windows, targets, due = [], [], [], []
        for j, spec in enumerate(config.forecasters):
            rows_fit, rows_windows, rows_targets, rows_due = self._forecaster_rows(j, spec, known, start, positions, config)
            fits.append(rows_fit)
            windows.append(rows_windows)
            targets.append(rows_targets)
            due.extend(rows_due)
        self.position += m
        keep = max(config.history, self.learning_rows, *(s.context_length + s.horizon for s in config.forecasters))
        self.recent = known[-keep:].copy()
        due.sort(key=lambda fit: (fit.boundary, fit.forecaster))
        return InputRows(positions, fits, windows, targets, seasonal, novelty), due

    def _novelty(self, chunk: np.ndarray, tolerance: float) -> np.ndarray:
        if not len(chunk):
            return np.zeros(0)
        previous_high = np.maximum.accumulate(np.concatenate([[self.high], chunk]))[:-1]
        previous_low = np.minimum.accumulate(np.concatenate([[self.low], chunk]))[:-1]
        self.high, self.low = float(max(previous_high[-1], chunk[-1])), float(min(previous_low[-1], chunk[-1]))
        margin = (previous_high - previous_low) * tolerance
        outside = (chunk > previous_high + margin) | (chunk < previous_low - margin)
        return (outside & (previous_high > previous_low)).astype(np.float64)

    def _seasonal(self, known: np.ndarray, start: int, m: int, config: DetectorConfig) -> np.ndarray:
        """The seasonal member's scores of the chunk's values (the last ``m`` of ``known``)."""
        scores = np.zeros(m)
        L = self.learning_rows
        end = self.position + m
        if self.period == -1 and end > L:
            # The period is chosen once, on the learning values (all still in known: keep >= L);
            # the likelihood's tail starts from the seasonal errors of the whole stream so far.
            assert start == 0, "the learning values are kept until the period is chosen"
            learning = known[:L]
            self.period = seasonal_lag(learning, config.seasonal_min_autocorrelation) or 0
            self.seasonal_spread = _spread(learning)
            if self.period:
                errors = np.full(end, np.nan)
                errors[self.period :] = np.abs(known[self.period :] - known[: end - self.period]) / self.seasonal_spread
                tail = _LikelihoodTail.empty(config.seasonal_short_window, config.long_window)
                seasonal = tail.advance(errors, config.seasonal_short_window, config.long_window, config.likelihood_min_spread)
                self.seasonal_errors, self.seasonal_recents = tail.errors, tail.recents
                scores[:] = seasonal[self.position :]
            return scores
        if self.period > 0 and self.position >= L:
            now = known[len(known) - m :]
            before = known[len(known) - m - self.period : len(known) - self.period]
            tail = _LikelihoodTail(self.seasonal_errors, self.seasonal_recents)
            scores = tail.advance(np.abs(now - before) / self.seasonal_spread, config.seasonal_short_window, config.long_window, config.likelihood_min_spread)
            self.seasonal_errors, self.seasonal_recents = tail.errors, tail.recents
        return scores

    def _forecaster_rows(self, j: int, spec: ForecasterSpec, known: np.ndarray, start: int, positions: np.ndarray, config: DetectorConfig):
        m = len(positions)
        L = self.learning_rows
        fit_of = config.fit_index(L, positions)
        due = []
        for index in np.unique(fit_of[fit_of > self.fit_index[j]]).tolist():
            boundary = config.fit_boundary(L, index)
            past = known[max(0, boundary - config.history) - start : boundary - start]
            center, scale = float(np.median(past)), _spread(past)
            due.append(FitDue(j, index, boundary, past.copy(), center, scale))
        lead = spec.context_length + spec.horizon - 1
        windows = np.zeros((m, spec.context_length), np.float32)
        targets = np.full(m, np.nan)
        # Before the stream's first value a window repeats it (as the offline padding did).
        padding = lead if start == 0 else 0
        padded = np.concatenate([np.full(padding, self.first), known]) if padding else known
        first_row = len(padded) - m  # the index in padded of the chunk's first value
        params = {fit.index: (fit.center, fit.scale) for fit in due}
        params[self.fit_index[j]] = (self.fit_center[j], self.fit_scale[j])
        for index in np.unique(fit_of[fit_of >= 0]).tolist():
            rows = np.flatnonzero(fit_of == index)
            center, scale = params[index]
            span = padded[first_row + rows[0] - lead : first_row + rows[-1] + 1]
            normalised = (span - center) / scale
            windows[rows] = _fit.sliding_windows(normalised, spec.context_length)[rows - rows[0]]
            targets[rows] = normalised[lead + rows - rows[0]]
        if due:
            self.fit_index[j], self.fit_center[j], self.fit_scale[j] = due[-1].index, due[-1].center, due[-1].scale
        return fit_of, windows, targets, due


@_serialisable
@dataclass
class SeriesScoring:
    """What a series' detector keeps from the forecasts: the likelihood tails and the positions of
    the last reports."""

    learning_rows: int
    forecaster_errors: list  # per forecaster: likelihood tail (lists of floats)
    forecaster_recents: list
    forecasters_reported: float  # position of the forecasters' last report (-inf: none)
    reported: float  # position of the last report

    @classmethod
    def start(cls, learning_rows: int, config: DetectorConfig) -> SeriesScoring:
        tails = [_LikelihoodTail.empty(config.short_window, config.long_window) for _ in config.forecasters]
        return cls(max(2, int(learning_rows)), [t.errors.tolist() for t in tails], [t.recents.tolist() for t in tails], -math.inf, -math.inf)

    def advance(self, rows: InputRows, forecasts: list[np.ndarray], config: DetectorConfig) -> np.ndarray:
        """The scores of ``rows`` (the next rows of the series, in order) given each forecaster's
        forecasts of them (float32, ignored where a row has no fit)."""
        member_scores = []
        for j, forecast in enumerate(forecasts):
            errors = np.where(rows.fits[j] >= 0, np.abs(rows.targets[j] - np.asarray(forecast, np.float32)), np.nan)
            tail = _LikelihoodTail(np.asarray(self.forecaster_errors[j]), np.asarray(self.forecaster_recents[j]))
            member_scores.append(tail.advance(errors, config.short_window, config.long_window, config.likelihood_min_spread))
            self.forecaster_errors[j], self.forecaster_recents[j] = tail.errors.tolist(), tail.recents.tolist()
        scores = np.mean(member_scores, axis=0) if member_scores else np.zeros(len(rows.positions))
        quiet = int(config.forecaster_quiet_learning_periods * self.learning_rows)
        scores, self.forecasters_reported = _report_once(scores, rows.positions, config.high_score, quiet, self.forecasters_reported)
        scores = np.maximum(np.maximum(scores, rows.seasonal), rows.novelty)
        scores[rows.positions < self.learning_rows] = 0.0
        scores, self.reported = _report_once(scores, rows.positions, config.high_score, config.quiet_after, self.reported)
        return scores


@dataclass
class _LikelihoodTail:
    """The last ``short - 1`` errors and the last ``long`` recent means before the next value."""

    errors: np.ndarray
    recents: np.ndarray

    @classmethod
    def empty(cls, short: int, long: int) -> _LikelihoodTail:
        return cls(np.full(short - 1, np.nan), np.full(long, np.nan))

    def advance(self, errors: np.ndarray, short: int, long: int, min_spread: float) -> np.ndarray:
        """Numenta-style anomaly likelihood of the recent mean error, on NAB's log scale (NaN
        errors: no error yet). Each statistic is taken over its own window's values."""
        extended = np.concatenate([self.errors, errors])
        recent = _window_means(extended, short)
        history = np.concatenate([self.recents, recent])
        scores = np.empty(len(errors))
        for block in range(0, len(errors), _STATISTICS_BLOCK):
            stop = min(block + _STATISTICS_BLOCK, len(errors))
            windows = np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(history[block : stop + long - 1], long))
            present = ~np.isnan(windows)
            count = present.sum(axis=1)
            filled = np.where(present, windows, 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = filled.sum(axis=1) / count
                deviations = np.where(present, windows - mean[:, None], 0.0)
                std = np.sqrt((deviations * deviations).sum(axis=1) / (count - 1))
                z = (recent[block:stop] - mean) / np.maximum(std, min_spread)
            z[count < max(10, short * 2)] = np.nan
            z = np.nan_to_num(z, nan=0.0)
            scores[block:stop] = tail_score(torch.as_tensor(z)).numpy() * (z > 0)
        self.errors = extended[len(extended) - (short - 1) :] if short > 1 else np.empty(0)
        self.recents = history[len(history) - long :]
        return scores


def _window_means(extended: np.ndarray, short: int) -> np.ndarray:
    """Mean of the present (non-NaN) values of each run of ``short`` values (NaN: none present)."""
    windows = np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(extended, short))
    present = ~np.isnan(windows)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present, windows, 0.0).sum(axis=1) / present.sum(axis=1)


def fit_forecaster(spec: ForecasterSpec, config: DetectorConfig, due: FitDue, previous: nn.Module | None) -> nn.Module:
    """Fit ``due`` of ``spec``: a fresh network (seeded) for the first fit, else a copy of the
    previous fit trained further (warm start). Deterministic given its inputs (one torch thread)."""
    if previous is None:
        torch.manual_seed(config.seed)
        network = build_network(spec.kind, context_length=spec.context_length, horizon=spec.horizon, **spec.hparams)
    else:
        network = build_network(spec.kind, context_length=spec.context_length, horizon=spec.horizon, **spec.hparams)
        network.load_state_dict(previous.state_dict())
    normalised = (due.past - due.center) / due.scale
    inputs, targets = _fit.forecasting_pairs(_padded(normalised, spec.context_length + spec.horizon), spec.context_length, spec.horizon)
    epochs = config.initial_epochs if previous is None else config.refit_epochs
    return _fit.train(network, inputs, targets, epochs=epochs, seed=config.seed + due.boundary)


def forecast_rows(rows: InputRows, j: int, networks: dict[int, nn.Module]) -> np.ndarray:
    """Forecaster ``j``'s forecasts of ``rows`` with the networks of its fits (0 where none)."""
    forecasts = np.zeros(len(rows.positions), np.float32)
    for index in np.unique(rows.fits[j][rows.fits[j] >= 0]).tolist():
        selected = np.flatnonzero(rows.fits[j] == index)
        forecasts[selected] = _fit.predict(networks[index], rows.windows[j][selected])
    return forecasts


def detect(values: np.ndarray, learning_rows: int, config: DetectorConfig = DetectorConfig()) -> np.ndarray:
    """Anomaly scores in [0, 1] for ``values`` (see the module docstring): the stream's steps over
    one chunk, fitting in this process."""
    inputs = SeriesInput.start(learning_rows, config)
    rows, due = inputs.advance(values, config)
    networks: list[dict[int, nn.Module]] = [{} for _ in config.forecasters]
    for fit in due:
        previous = networks[fit.forecaster].get(fit.index - 1)
        networks[fit.forecaster][fit.index] = fit_forecaster(config.forecasters[fit.forecaster], config, fit, previous)
    forecasts = [forecast_rows(rows, j, networks[j]) for j in range(len(config.forecasters))]
    return SeriesScoring.start(learning_rows, config).advance(rows, forecasts, config)


def _padded(series: np.ndarray, length: int) -> np.ndarray:
    """``series`` with its first value repeated in front until it is at least ``length`` long."""
    missing = length - len(series)
    return np.concatenate([np.full(missing, series[0]), series]) if missing > 0 else series


def _spread(past: np.ndarray) -> float:
    spread = float(np.std(past))
    floor = 1e-3 * max(float(np.abs(past).mean()), 1.0)
    return max(spread, floor)


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


def _report_once(scores: np.ndarray, positions: np.ndarray, high: float, quiet: int, last_report: float) -> tuple[np.ndarray, float]:
    """Scores at or above ``high`` within ``quiet`` positions of the last reported one are lowered
    to just under ``high`` (Numenta's red-to-yellow filter, with a longer memory); returns them and
    the position of the last report."""
    out = scores.copy()
    for row in np.flatnonzero(scores >= high).tolist():
        if positions[row] - last_report <= quiet:
            out[row] = min(out[row], high * 0.99)
        else:
            last_report = float(positions[row])
    return out, last_report
