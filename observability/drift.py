"""Drift of a feature's live values from its reference: the population stability index (PSI) and
a Kolmogorov-Smirnov statistic (KS), per tenant and feature, kept incrementally.

    reference = Reference.from_values(training_values, bins=10)   # a plain dict on the wire: to_dict/from_dict
    monitor = DriftMonitor(settings.observability)
    monitor.set_reference("acme", "value", reference)
    for check in monitor.update("acme", "value", batch_values):   # at most one check per call
        ...                                                        # DriftCheck(psi, ks, over, sustained, ...)

The reference fixes the bins once: ``drift_bins`` quantile bins for PSI (interior edges at the
reference's quantiles, repeated edges merged; the first and last bin are open-ended, so no live
value falls outside) and a finer grid of ``KS_GRID_POINTS`` + 1 quantiles (minimum and maximum
included) for KS, with the reference's proportion per PSI bin and its CDF at each grid edge.

The live window of a key is its last ``drift_window_events`` values, held as their bin indices
in a ring (one per bin set) beside a count per bin: an update bins the new values
(``np.searchsorted``), subtracts the counts of the indices it overwrites in the ring and adds its
own (``np.bincount``): O(batch + bins) per update, never a scan of the window. PSI and KS are
then read off the counts, O(bins).

Pure numpy: no Ray, no lakehouse; ``streaming.drift`` feeds it from the stream.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from observability import metrics
from rtml.settings import ObservabilitySettings

# Edges of the KS grid: quantiles at 0, 1/KS_GRID_POINTS, ..., 1 of the reference.
KS_GRID_POINTS = 100
# The proportion an empty bin counts with in PSI (either side), so that its log term stays finite:
# an empty live bin whose reference share is 1/10 then adds about 0.69, the size of a clear shift.
PSI_EPSILON = 1e-4


@dataclass(frozen=True, eq=False)
class Reference:
    """What live values are compared with (see the module docstring). ``psi_edges``: the interior
    edges of the PSI bins, ascending; bin ``i`` holds ``psi_edges[i-1] <= v < psi_edges[i]``.
    ``psi_proportions``: the reference's share per bin (``len(psi_edges) + 1`` of them).
    ``ks_edges``: the KS grid, ascending; ``ks_cdf[j]``: the reference's share ``<= ks_edges[j]``.
    ``rows``: how many reference values it was made of."""

    psi_edges: np.ndarray
    psi_proportions: np.ndarray
    ks_edges: np.ndarray
    ks_cdf: np.ndarray
    rows: int

    @classmethod
    def from_values(cls, values: np.ndarray, bins: int, ks_points: int = KS_GRID_POINTS) -> Reference:
        """The reference of a sample (NaNs are left out). Raises ``ValueError`` when no value is left."""
        sample = np.sort(np.asarray(values, dtype=np.float64))
        sample = sample[~np.isnan(sample)]
        if not len(sample):
            raise ValueError("a drift reference needs at least one value; the reference sample has none")
        psi_edges = np.unique(np.quantile(sample, np.arange(1, bins) / bins))
        psi_counts = np.bincount(np.searchsorted(psi_edges, sample, side="right"), minlength=len(psi_edges) + 1)
        ks_edges = np.unique(np.quantile(sample, np.linspace(0.0, 1.0, ks_points + 1)))
        ks_cdf = np.searchsorted(sample, ks_edges, side="right") / len(sample)
        return cls(psi_edges, psi_counts / len(sample), ks_edges, ks_cdf, len(sample))

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers: how a reference travels (to Ray actors, into JSON)."""
        return {
            "psi_edges": self.psi_edges.tolist(),
            "psi_proportions": self.psi_proportions.tolist(),
            "ks_edges": self.ks_edges.tolist(),
            "ks_cdf": self.ks_cdf.tolist(),
            "rows": self.rows,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reference:
        return cls(
            np.asarray(data["psi_edges"], dtype=np.float64),
            np.asarray(data["psi_proportions"], dtype=np.float64),
            np.asarray(data["ks_edges"], dtype=np.float64),
            np.asarray(data["ks_cdf"], dtype=np.float64),
            int(data["rows"]),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reference):
            return NotImplemented
        return self.to_dict() == other.to_dict()


class _BinnedRing:
    """The bin indices (``np.searchsorted(edges, v, side)``) of the last ``size`` values added, in
    a ring, and how many of them fall in each bin."""

    def __init__(self, edges: np.ndarray, size: int, side: str):
        self._edges, self._side = edges, side
        self._ring = np.zeros(size, dtype=np.int32)
        self._next = 0  # the slot the next value goes to
        self.filled = 0
        self.counts = np.zeros(len(edges) + 1, dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        size = len(self._ring)
        values = values[-size:]  # of a batch longer than the window, only its last values stay
        indices = np.searchsorted(self._edges, values, side=self._side).astype(np.int32)
        slots = (self._next + np.arange(len(indices))) % size
        # Slots below ``filled`` hold a value that now leaves the window (the ring fills from slot 0).
        leaving = self._ring[slots[slots < self.filled]]
        bins = len(self.counts)
        self.counts += np.bincount(indices, minlength=bins) - np.bincount(leaving, minlength=bins)
        self._ring[slots] = indices
        self._next = (self._next + len(indices)) % size
        self.filled = min(size, self.filled + len(indices))


class LiveWindow:
    """The last ``size`` values of one key, binned against ``reference`` (module docstring)."""

    def __init__(self, reference: Reference, size: int):
        self.reference = reference
        # PSI bins are [e_{i-1}, e_i) (side right); the KS grid counts v <= e_j (side left).
        self._psi = _BinnedRing(reference.psi_edges, size, "right")
        self._ks = _BinnedRing(reference.ks_edges, size, "left")

    def add(self, values: np.ndarray) -> None:
        self._psi.add(values)
        self._ks.add(values)

    @property
    def events(self) -> int:
        return self._psi.filled

    def psi(self) -> float:
        """sum((p_live - p_ref) * ln(p_live / p_ref)) over the PSI bins, each share at least
        ``PSI_EPSILON``. NaN for an empty window."""
        if not self.events:
            return math.nan
        live = np.maximum(self._psi.counts / self.events, PSI_EPSILON)
        reference = np.maximum(self.reference.psi_proportions, PSI_EPSILON)
        return float(np.sum((live - reference) * np.log(live / reference)))

    def ks(self) -> float:
        """max |CDF_live - CDF_ref| over the edges of the reference's KS grid: exact at those edges
        (both CDFs are the samples' own there), so a lower bound of the exact two-sample statistic,
        which also looks between them. NaN for an empty window."""
        if not self.events:
            return math.nan
        live_cdf = np.cumsum(self._ks.counts)[: len(self.reference.ks_edges)] / self.events
        return float(np.max(np.abs(live_cdf - self.reference.ks_cdf)))


@dataclass(frozen=True)
class DriftCheck:
    """One check of a key's live window. ``over``: PSI or KS above its threshold; ``sustained``:
    this and the ``drift_sustained_checks`` - 1 checks before it were all over. ``at``: Unix time."""

    tenant: str
    feature: str
    psi: float
    ks: float
    live_events: int
    over: bool
    sustained: bool
    at: float


@dataclass
class _Key:
    window: LiveWindow
    next_check_at: float = -math.inf
    over_in_a_row: int = 0


class DriftMonitor:
    """Live windows per (tenant, feature) against their references, checked now and then.

    ``clock`` gives the time in seconds (``time.time``: the checks' ``at`` is then a Unix time
    that other processes can read); tests pass their own."""

    def __init__(self, settings: ObservabilitySettings, clock: Callable[[], float] = time.time):
        if settings.drift_min_events > settings.drift_window_events:
            raise ValueError(
                f"observability.drift_min_events ({settings.drift_min_events}) exceeds drift_window_events "
                f"({settings.drift_window_events}), so no window would ever be checked; lower the one or raise the other"
            )
        self._settings = settings
        self._clock = clock
        self._keys: dict[tuple[str, str], _Key] = {}

    def set_reference(self, tenant: str, feature: str, reference: Reference) -> None:
        """Compare ``(tenant, feature)`` with ``reference`` from now on: its window starts empty."""
        self._keys[(tenant, feature)] = _Key(LiveWindow(reference, self._settings.drift_window_events))

    def forget(self, tenant: str, feature: str) -> None:
        """Stop tracking ``(tenant, feature)`` (e.g. its model is gone); unknown keys are fine."""
        self._keys.pop((tenant, feature), None)

    def reference(self, tenant: str, feature: str) -> Reference | None:
        key = self._keys.get((tenant, feature))
        return None if key is None else key.window.reference

    def update(self, tenant: str, feature: str, values: np.ndarray) -> list[DriftCheck]:
        """Add ``values`` (in arrival order; NaNs are skipped) to the key's window; check it when
        it holds ``drift_min_events`` values and ``drift_check_every_s`` passed since its last
        check: then set the PSI and KS gauges and return the check (else nothing). A key without a
        reference (``set_reference``) is an error."""
        key = self._keys.get((tenant, feature))
        if key is None:
            raise KeyError(f"no drift reference for tenant {tenant!r}, feature {feature!r}: call set_reference first")
        values = np.asarray(values, dtype=np.float64)
        key.window.add(values[~np.isnan(values)])
        now = self._clock()
        if key.window.events < self._settings.drift_min_events or now < key.next_check_at:
            return []
        key.next_check_at = now + self._settings.drift_check_every_s
        psi, ks = key.window.psi(), key.window.ks()
        over = psi > self._settings.drift_psi_threshold or ks > self._settings.drift_ks_threshold
        key.over_in_a_row = key.over_in_a_row + 1 if over else 0
        metrics.DRIFT_PSI.labels(tenant=tenant, feature=feature).set(psi)
        metrics.DRIFT_KS.labels(tenant=tenant, feature=feature).set(ks)
        sustained = key.over_in_a_row >= self._settings.drift_sustained_checks
        return [DriftCheck(tenant, feature, psi, ks, key.window.events, over, sustained, now)]
