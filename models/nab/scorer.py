"""The NAB scorer (Lavin & Ahmad 2015; Ahmad et al. 2017), with NAB v1.1's own semantics.

Per file, rows before the probationary length ``min(floor(0.15 n), 750)`` are ignored. A label
window spans the first row stamped with its start to the first row stamped with its end. A row
inside a window ``[s, e]`` (width ``w = e - s + 1``) is worth, if detected, ``A_TP · σ(-(e - i + 1)/w)
/ σ(-1)`` where ``σ(x) = 2/(1 + exp(5x)) - 1`` is NAB's scaled sigmoid: the window's first row earns
the full ``A_TP``, its last row almost nothing; only a window's best (earliest) detection counts and
a window with none costs ``A_FN``. A detected row outside every window costs ``A_FP · σ((i - e)/(w -
1))`` relative to the preceding window (so just after a window it costs little), or the full
``A_FP`` when no window precedes it or it is three window widths past one.

A row is detected when its anomaly score is ``>=`` the threshold. One threshold per profile is chosen
for the whole corpus: every distinct score is tried (and "detect nothing"), and the best total wins,
the highest threshold among ties. The total is normalised as ``100 · (raw - null) / (perfect - null)``
where null (no detection at all) scores ``-A_FN`` per scored window and perfect ``A_TP`` per window.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rtml.errors import RtmlError

PROBATIONARY_FRACTION = 0.15
PROBATIONARY_CAP_ROWS = 5000  # NAB caps the probationary period at 15% of 5000 rows


@dataclass(frozen=True)
class CostProfile:
    name: str
    tp: float
    fp: float
    fn: float


PROFILES = (
    CostProfile("standard", tp=1.0, fp=0.11, fn=1.0),
    CostProfile("reward_low_FP_rate", tp=1.0, fp=0.22, fn=1.0),
    CostProfile("reward_low_FN_rate", tp=1.0, fp=0.11, fn=2.0),
)


def scaled_sigmoid(position: np.ndarray) -> np.ndarray:
    """NAB's weighting: +0.987 at -1 (window start), 0 at 0 (window end), -1 from 3 on."""
    position = np.asarray(position, dtype=np.float64)
    return np.where(position >= 3.0, -1.0, 2.0 / (1.0 + np.exp(5.0 * position)) - 1.0)


_MAX_TP = float(scaled_sigmoid(-1.0))


def probationary_length(rows: int) -> int:
    return int(min(math.floor(PROBATIONARY_FRACTION * rows), PROBATIONARY_FRACTION * PROBATIONARY_CAP_ROWS))


@dataclass
class ScoredFile:
    """One file's scorable rows (after the probationary period), with the profile-free weights:
    ``weight`` is σ(...)/σ(-1) in (0, 1] inside window ``window`` and σ(...) in [-1, 0) outside
    (``window == -1``)."""

    name: str
    scores: np.ndarray
    window: np.ndarray
    weight: np.ndarray
    window_count: int  # windows with at least one scorable row


def prepare_file(name: str, timestamps: pd.Series, scores: np.ndarray, windows: list[list[str]]) -> ScoredFile:
    """Weights for each row of one file given its label windows ``[[start, end], ...]``."""
    stamps = pd.to_datetime(timestamps).to_numpy()
    rows = len(stamps)
    window_id = np.full(rows, -1)
    weight = np.empty(rows)
    bounds = []
    for start, end in windows:
        first, last = _row_of(name, stamps, start), _row_of(name, stamps, end)
        if last >= first:
            bounds.append((first, last))
    bounds.sort()
    index = np.arange(rows)
    for number, (first, last) in enumerate(bounds):
        width = last - first + 1
        inside = slice(first, last + 1)
        window_id[inside] = number
        weight[inside] = scaled_sigmoid(-(last - index[inside] + 1) / width) / _MAX_TP
        following = bounds[number + 1][0] if number + 1 < len(bounds) else rows
        after = slice(last + 1, following)
        weight[after] = scaled_sigmoid((index[after] - last) / max(width - 1, 1))
    before_any = index < (bounds[0][0] if bounds else rows)
    weight[before_any] = -1.0
    scorable = index >= probationary_length(rows)
    scored_windows = np.unique(window_id[scorable & (window_id >= 0)])
    # Renumber so that windows wholly inside the probationary period vanish.
    renumber = {old: new for new, old in enumerate(scored_windows)}
    ids = np.array([renumber.get(w, -1) for w in window_id[scorable]], dtype=np.int64)
    return ScoredFile(name, np.asarray(scores, dtype=np.float64)[scorable], ids, weight[scorable], len(scored_windows))


def _row_of(name: str, stamps: np.ndarray, boundary: str) -> int:
    """The first row stamped ``boundary``, as NAB finds window limits. Not a search in sorted order:
    some files' clocks step back (machine_temperature_system_failure repeats an hour)."""
    matches = np.flatnonzero(stamps == np.datetime64(pd.Timestamp(boundary)))
    if len(matches) == 0:
        raise RtmlError(f"{name}: label window boundary {boundary} is not the timestamp of any row")
    return int(matches[0])


@dataclass(frozen=True)
class ProfileResult:
    profile: CostProfile
    threshold: float
    raw: float
    null: float
    perfect: float

    @property
    def normalized(self) -> float:
        return 100.0 * (self.raw - self.null) / (self.perfect - self.null)


def file_score(scored: ScoredFile, profile: CostProfile, threshold: float) -> tuple[float, int, int]:
    """(raw score, detected windows, false positive rows) of one file at ``threshold``."""
    detected = scored.scores >= threshold
    outside = scored.window < 0
    raw = profile.fp * float(scored.weight[detected & outside].sum())
    hits = 0
    for window in range(scored.window_count):
        in_window = detected & (scored.window == window)
        if in_window.any():
            hits += 1
            raw += profile.tp * float(scored.weight[in_window].max())
        else:
            raw -= profile.fn
    return raw, hits, int((detected & outside).sum())


def optimise_threshold(files: list[ScoredFile], profile: CostProfile) -> tuple[float, float]:
    """The corpus-wide (threshold, raw score) maximising the total, by one sweep over all scores."""
    scores = np.concatenate([f.scores for f in files])
    windows = np.concatenate([np.where(f.window >= 0, f.window + offset, -1) for f, offset in _window_offsets(files)])
    weights = np.concatenate([f.weight for f in files])
    window_total = sum(f.window_count for f in files)
    order = np.argsort(-scores, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    # Score change when each row joins the detections, in rank order.
    change = np.zeros(len(scores))
    outside = windows < 0
    change[rank[outside]] = profile.fp * weights[outside]
    inside_rows = np.flatnonzero(~outside)
    by_window = inside_rows[np.lexsort((rank[inside_rows], windows[inside_rows]))]
    boundaries = np.flatnonzero(np.diff(windows[by_window])) + 1
    for rows in np.split(by_window, boundaries):
        if len(rows) == 0:
            continue
        best = np.maximum.accumulate(np.concatenate([[-profile.fn], profile.tp * weights[rows]]))
        change[rank[rows]] = np.diff(best)
    totals = -profile.fn * window_total + np.cumsum(change)
    ranked_scores = scores[order]
    group_ends = np.flatnonzero(np.append(ranked_scores[1:] != ranked_scores[:-1], True))
    thresholds = np.concatenate([[np.inf], ranked_scores[group_ends]])
    candidates = np.concatenate([[-profile.fn * window_total], totals[group_ends]])
    best_index = int(np.argmax(candidates))
    return float(thresholds[best_index]), float(candidates[best_index])


def _window_offsets(files: list[ScoredFile]):
    offset = 0
    for scored in files:
        yield scored, offset
        offset += scored.window_count


def score_corpus(files: list[ScoredFile], total_windows: int, profiles=PROFILES) -> list[ProfileResult]:
    results = []
    for profile in profiles:
        threshold, raw = optimise_threshold(files, profile)
        null = -profile.fn * sum(f.window_count for f in files)
        results.append(ProfileResult(profile, threshold, raw, null, profile.tp * total_windows))
    return results


def load_results(results_dir: Path, labels_path: Path, categories: Sequence[str] = ()) -> tuple[list[ScoredFile], int]:
    """Read ``results_dir/<category>/<name>.csv`` for every file named in the labels (windows) JSON,
    or only for the files of ``categories`` (a split: its threshold is then optimised on it alone)."""
    try:
        labels = json.loads(Path(labels_path).read_text())
    except FileNotFoundError:
        raise RtmlError(f"labels file {labels_path} does not exist") from None
    except json.JSONDecodeError as error:
        raise RtmlError(f"labels file {labels_path} is not valid JSON: {error}") from None
    if categories:
        labels = _split(labels, categories, labels_path)
    results_dir = Path(results_dir)
    found = {str(p.relative_to(results_dir)) for p in results_dir.glob("*/*.csv")}
    if not found:
        raise RtmlError(f"no <category>/<name>.csv result files under {results_dir}; run `rtml nab` first")
    missing = sorted(set(labels) - found)
    if missing:
        raise RtmlError(f"{len(missing)} labelled file(s) have no results in {results_dir}, e.g. {missing[0]}")
    files = [_read_result(results_dir / name, name, labels[name]) for name in sorted(labels)]
    return files, sum(len(windows) for windows in labels.values())


def _split(labels: dict, categories: Sequence[str], labels_path: Path) -> dict:
    """The labels of the files whose category (the first path part) is one of ``categories``."""
    known = sorted({name.split("/", 1)[0] for name in labels})
    unknown = sorted(set(categories) - set(known))
    if unknown:
        raise RtmlError(f"no category {', '.join(unknown)} in {labels_path}; its categories are {', '.join(known)}")
    return {name: windows for name, windows in labels.items() if name.split("/", 1)[0] in set(categories)}


def _read_result(path: Path, name: str, windows: list[list[str]]) -> ScoredFile:
    frame = pd.read_csv(path)
    if not {"timestamp", "anomaly_score"} <= set(frame.columns):
        raise RtmlError(f"{path} needs the columns timestamp and anomaly_score, has {list(frame.columns)}")
    scores = pd.to_numeric(frame["anomaly_score"], errors="coerce").to_numpy()
    if not np.isfinite(scores).all() or (scores < 0).any() or (scores > 1).any():
        raise RtmlError(f"{path}: every anomaly_score must be a number in [0, 1]")
    return prepare_file(name, frame["timestamp"], scores, windows)
