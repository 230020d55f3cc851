"""Drift (observability.drift): the incremental live window against a slow, obviously-correct
reference that keeps the last N values and recomputes PSI and KS from them in plain Python, one
value at a time; random streams, batch cuts and window sizes (hypothesis). Then what the
thresholds separate: the same distribution stays under them, one shifted by a standard deviation
goes over; the sustained logic on an injected clock; a reference's round trip through a dict."""

from __future__ import annotations

import bisect
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from observability import metrics
from observability.drift import PSI_EPSILON, DriftMonitor, LiveWindow, Reference
from rtml.settings import ObservabilitySettings


class SlowWindow:
    """The specification: the last ``size`` values, PSI and KS computed from them afresh."""

    def __init__(self, reference: Reference, size: int):
        self.reference, self.size, self.values = reference, size, []

    def add(self, value: float) -> None:
        self.values = (self.values + [value])[-self.size :]

    def psi(self) -> float:
        edges = self.reference.psi_edges.tolist()
        counts = [0] * (len(edges) + 1)
        for value in self.values:
            counts[bisect.bisect_right(edges, value)] += 1
        total = 0.0
        for count, expected in zip(counts, self.reference.psi_proportions.tolist()):
            live, expected = max(count / len(self.values), PSI_EPSILON), max(expected, PSI_EPSILON)
            total += (live - expected) * math.log(live / expected)
        return total

    def ks(self) -> float:
        return max(
            abs(sum(value <= edge for value in self.values) / len(self.values) - expected)
            for edge, expected in zip(self.reference.ks_edges.tolist(), self.reference.ks_cdf.tolist())
        )


# Few distinct values make ties at the edges (where the bin conventions matter) likely.
values = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0]),
)


@given(
    reference_values=st.lists(values, min_size=1, max_size=60),
    stream=st.lists(values, min_size=1, max_size=120),
    cuts=st.lists(st.integers(0, 120), max_size=12),
    size=st.integers(1, 25),
    bins=st.integers(2, 8),
    ks_points=st.integers(1, 12),
)
@settings(max_examples=300, deadline=None)
def test_the_incremental_window_matches_a_recomputation_of_the_last_values(reference_values, stream, cuts, size, bins, ks_points):
    reference = Reference.from_values(np.array(reference_values), bins, ks_points)
    window, slow = LiveWindow(reference, size), SlowWindow(reference, size)
    bounds = [0, *sorted(c for c in cuts if c < len(stream)), len(stream)]
    for start, end in zip(bounds, bounds[1:]):
        window.add(np.array(stream[start:end], dtype=np.float64))
        for value in stream[start:end]:
            slow.add(value)
        assert window.events == len(slow.values)
        if slow.values:
            assert window.psi() == pytest.approx(slow.psi(), rel=1e-9, abs=1e-12)
            assert window.ks() == pytest.approx(slow.ks(), rel=1e-9, abs=1e-12)


def test_the_reference_bins_are_its_quantiles_and_open_at_both_ends():
    reference = Reference.from_values(np.arange(1000, dtype=np.float64), bins=10)
    assert len(reference.psi_edges) == 9 and reference.psi_proportions == pytest.approx([0.1] * 10)
    assert reference.ks_edges[0] == 0 and reference.ks_edges[-1] == 999 and reference.ks_cdf[-1] == 1.0
    window = LiveWindow(reference, 10)
    window.add(np.array([-1e9] * 5 + [1e9] * 5))  # far outside the reference: the outer bins take them
    assert window.events == 10 and window.psi() > 1.0 and window.ks() == pytest.approx(0.5)


def test_repeated_quantiles_give_one_edge_and_a_constant_reference_still_compares():
    reference = Reference.from_values(np.array([3.0] * 90 + [4.0] * 10), bins=10)
    # The quantiles at 1/10 .. 8/10 are all 3.0; the one at 9/10 lies between the two values.
    assert reference.psi_edges.tolist() == pytest.approx([3.0, 3.1])
    window = LiveWindow(reference, 100)
    window.add(np.array([3.0] * 90 + [4.0] * 10))
    assert window.psi() == pytest.approx(0.0) and window.ks() == pytest.approx(0.0)


def test_a_reference_without_values_is_refused():
    with pytest.raises(ValueError, match="needs at least one value"):
        Reference.from_values(np.array([np.nan]), bins=10)


def test_a_reference_round_trips_through_a_plain_dict():
    reference = Reference.from_values(np.random.default_rng(0).normal(size=500), bins=10)
    plain = reference.to_dict()
    assert all(isinstance(plain[name], list) for name in ("psi_edges", "psi_proportions", "ks_edges", "ks_cdf"))
    again = Reference.from_dict(plain)
    assert again == reference
    window, twin = LiveWindow(reference, 200), LiveWindow(again, 200)
    live = np.random.default_rng(1).normal(0.3, 1.0, 300)
    window.add(live)
    twin.add(live)
    assert (window.psi(), window.ks()) == (twin.psi(), twin.ks())


# what the default thresholds separate ----------------------------------------------------------

DEFAULTS = ObservabilitySettings()


def _statistics(shift: float, seed: int) -> tuple[float, float]:
    """PSI and KS of a full default window of N(shift, 1) against a default-sized N(0, 1) reference."""
    rng = np.random.default_rng(seed)
    reference = Reference.from_values(rng.normal(0.0, 1.0, DEFAULTS.drift_reference_rows), DEFAULTS.drift_bins)
    window = LiveWindow(reference, DEFAULTS.drift_window_events)
    for batch in np.array_split(rng.normal(shift, 1.0, 3 * DEFAULTS.drift_window_events), 30):
        window.add(batch)
    return window.psi(), window.ks()


@pytest.mark.parametrize("seed", range(5))
def test_the_same_distribution_stays_under_the_thresholds(seed):
    psi, ks = _statistics(0.0, seed)
    # Far under, not just under: sampling noise alone gives PSI ~ bins / window and KS ~ 1 / sqrt(window).
    assert psi < DEFAULTS.drift_psi_threshold / 4 and ks < DEFAULTS.drift_ks_threshold / 2


@pytest.mark.parametrize("seed", range(5))
def test_a_mean_shifted_by_one_standard_deviation_goes_over_both_thresholds(seed):
    psi, ks = _statistics(1.0, seed)
    assert psi > 2 * DEFAULTS.drift_psi_threshold and ks > 1.5 * DEFAULTS.drift_ks_threshold


# the monitor ----------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _monitor(**overrides) -> tuple[DriftMonitor, Clock]:
    knobs = {"drift_window_events": 100, "drift_min_events": 50, "drift_check_every_s": 10.0, "drift_sustained_checks": 3, **overrides}
    clock = Clock()
    monitor = DriftMonitor(ObservabilitySettings(**knobs), clock=clock)
    monitor.set_reference("acme", "value", Reference.from_values(np.random.default_rng(0).normal(size=5000), bins=10))
    return monitor, clock


def _normal(shift: float, count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, 1.0, count)


def test_checks_wait_for_enough_live_values_and_then_come_at_most_every_interval():
    monitor, clock = _monitor()
    assert monitor.update("acme", "value", _normal(0, 49, 1)) == []
    (check,) = monitor.update("acme", "value", _normal(0, 1, 2))
    assert (check.tenant, check.feature, check.live_events, check.at) == ("acme", "value", 50, clock.now)
    clock.now += 9.9
    assert monitor.update("acme", "value", _normal(0, 10, 3)) == []
    clock.now += 0.1
    (check,) = monitor.update("acme", "value", _normal(0, 10, 4))
    assert check.live_events == 70


def test_drift_is_sustained_after_enough_consecutive_checks_over_a_threshold_and_resets_under_it():
    monitor, clock = _monitor()
    seen = []
    for step, shift in enumerate([2, 2, 2, 2, 0, 2]):
        clock.now += 10
        # A full window of each step's distribution, so that each check judges only it.
        (check,) = monitor.update("acme", "value", _normal(shift, 100, step))
        seen.append((check.over, check.sustained))
    assert seen == [(True, False), (True, False), (True, True), (True, True), (False, False), (True, False)]


def test_a_check_sets_the_tenants_gauges():
    monitor, clock = _monitor(drift_check_every_s=0.0)
    (check,) = monitor.update("acme", "value", _normal(3, 100, 0))
    exposed = metrics.exposition().decode()
    assert f'rtml_drift_psi{{feature="value",tenant="acme"}} {check.psi}' in exposed
    assert f'rtml_drift_ks{{feature="value",tenant="acme"}} {check.ks}' in exposed
    assert check.psi > 1 and check.ks > 0.5


def test_a_new_reference_starts_the_window_again_and_nan_values_are_skipped():
    monitor, clock = _monitor(drift_check_every_s=0.0)
    monitor.update("acme", "value", _normal(0, 60, 0))
    monitor.set_reference("acme", "value", Reference.from_values(_normal(0, 1000, 1), bins=10))
    assert monitor.update("acme", "value", np.array([np.nan] * 60 + [0.0] * 49)) == []
    (check,) = monitor.update("acme", "value", np.array([0.0]))
    assert check.live_events == 50


def test_values_of_a_key_without_reference_are_an_error_naming_the_fix():
    monitor, _ = _monitor()
    with pytest.raises(KeyError, match="call set_reference first"):
        monitor.update("globex", "value", _normal(0, 10, 0))


def test_a_minimum_above_the_window_is_refused():
    with pytest.raises(ValueError, match="drift_min_events"):
        DriftMonitor(ObservabilitySettings(drift_window_events=100, drift_min_events=200))
