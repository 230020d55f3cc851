"""Drift on the stream: each consumer compares its tenants' live metric values with what their
models were trained on (``observability.drift``), and one board per cluster keeps the latest
checks and starts candidate retraining runs when drift is sustained.

    drift = StreamDrift(settings, group)              # in a consumer (settings.observability.drift_enabled)
    drift.observe(scored_events.tenant, scored_events.value)   # per scored batch of metric events
    checks, retrains = board_view(settings, "acme")   # what GraphQL's `drift` shows

Reference: a tenant's newest active model version that names the ``events`` snapshot it was
trained on (``ModelVersion.training_snapshot_ids``, as ``rtml train`` records it); the tenant's
metric events' values at that snapshot (Iceberg time travel), the newest
``drift_reference_rows`` of them. A tenant without such a model is not tracked.

The board (``DriftBoard``) is one named, detached async actor per lakehouse in the ``rtml``
namespace (``board_name``: two apps or lakehouses on one Ray cluster never mix their tenants'
checks), so that every consumer group's consumers and the API of that lakehouse find the same one
and it outlives the pipelines whose consumers created it, and the retraining runs it owns with
it. Per tenant and feature it keeps each consumer's latest check and shows the worst of them (a
consumer sees only its partitions' share of a tenant's events). On a sustained check it starts
at most one retraining run per tenant per ``drift_retrain_cooldown_s`` (and none while one
runs): a Ray task that trains a candidate of each forecaster kind the tenant has an active
version of (``models.training.train_candidate``), registered as a candidate and never promoted:
that stays a person's decision (GraphQL ``promoteModel``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray
from pyiceberg.expressions import And, EqualTo, NotNull

from observability import metrics
from observability.drift import DriftCheck, DriftMonitor, Reference
from rtml.errors import RtmlError
from rtml.schemas import DataType, ModelVersion
from rtml.settings import Settings
from streaming.feeds.broadcast import NAMESPACE

log = logging.getLogger(__name__)

BOARD_PREFIX = "rtml-drift-board"
# The board only files reports and follows runs; the training runs ask for their own resources.
BOARD_CPUS = 0.05
# The one feature tracked: the metric value, which is what the forecasters read (window aggregates
# are features of the stream's feature table, not model inputs, and are not tracked).
FEATURE = "value"
# How often a consumer looks again at a tenant's active models (a registry scan): a promotion
# reaches the drift reference within this, and so does a model for a tenant that had none.
REFERENCE_RECHECK_S = 300.0
# A consumer's latest check is left out of the board's view once another consumer of the same
# tenant has reported this much later (it stopped, or its partitions moved).
SOURCE_STALE_S = 600.0
# How long a reader waits for the board's answer.
BOARD_READ_TIMEOUT_S = 10.0
# Retraining runs the board remembers per tenant.
KEPT_RUNS = 20

RUNNING, REGISTERED, FAILED = "running", "registered", "failed"


# the reference ----------------------------------------------------------------------------------


def trained_on(lakehouse, tenant: str) -> ModelVersion | None:
    """The tenant's newest active model version that names the ``events`` snapshot it was trained on."""
    return next((model for model in lakehouse.registry.active(tenant) if "events" in model.training_snapshot_ids), None)


def read_reference(lakehouse, tenant: str, snapshot_id: int, settings: Settings) -> Reference:
    """The reference of the tenant's metric values at ``snapshot_id``: the newest
    ``drift_reference_rows`` of them. Raises ``ValueError`` when the snapshot holds none."""
    drift = settings.observability
    rows = lakehouse.read(
        "events",
        tenant=tenant,
        snapshot_id=snapshot_id,
        columns=("event_time", "value"),
        where=And(EqualTo("data_type", DataType.METRIC.value), NotNull("value")),
        limit=drift.drift_reference_rows,
    )
    return Reference.from_values(rows["value"].to_numpy(), drift.drift_bins)


def load_reference(lakehouse, tenant: str, settings: Settings) -> tuple[Reference, int] | None:
    """The tenant's drift reference and the ``events`` snapshot it was read at (see the module
    docstring); None when the tenant has no active model that names its training snapshot."""
    model = trained_on(lakehouse, tenant)
    if model is None:
        return None
    snapshot_id = model.training_snapshot_ids["events"]
    return read_reference(lakehouse, tenant, snapshot_id, settings), snapshot_id


# the consumer's side --------------------------------------------------------------------------


@dataclass
class _Tracked:
    snapshot_id: int | None  # of the reference in use; None: the tenant is not tracked
    look_again_at: float


class StreamDrift:
    """A consumer's drift: its tenants' live windows of the metric value (``FEATURE``) against
    their references, checked by a ``DriftMonitor`` and reported to the board.

    A tenant's reference is loaded on its first batch (synchronously, once: the batch waits for
    one lakehouse read) and looked at again every ``REFERENCE_RECHECK_S``; a new training snapshot
    replaces it, and the window starts again. Drift is auxiliary to scoring: a reference that
    cannot be loaded is logged and the tenant left untracked until the next look, never an error
    of the stream. Reports to the board are fire-and-forget, one per check."""

    def __init__(self, settings: Settings, group: str, clock=time.time):
        self._settings = settings
        self._clock = clock
        self._monitor = DriftMonitor(settings.observability, clock)
        self._tracked: dict[str, _Tracked] = {}
        self._lake = None
        self._board = None
        actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
        # A restarted consumer actor keeps its id, so its reports replace its earlier ones.
        self.source = f"{group}/{actor or uuid.uuid4().hex}"

    def observe(self, tenants: np.ndarray, values: np.ndarray) -> list[DriftCheck]:
        """Add a scored batch of metric events (their tenants and values, in read order) to the
        tenants' windows; returns the checks it made (each also reported to the board)."""
        if not len(tenants):
            return []
        names, inverse = np.unique(tenants, return_inverse=True)
        rows_by_tenant = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
        checks = []
        for tenant, rows in zip(names.tolist(), rows_by_tenant):
            snapshot_id = self._reference_snapshot(tenant)
            if snapshot_id is None:
                continue
            for check in self._monitor.update(tenant, FEATURE, values[rows]):
                self._report(check, snapshot_id)
                checks.append(check)
        return checks

    def _reference_snapshot(self, tenant: str) -> int | None:
        """The snapshot of the tenant's reference in use (loading or replacing it when it is time
        to look); None while the tenant is not tracked."""
        now = self._clock()
        tracked = self._tracked.get(tenant)
        if tracked is not None and now < tracked.look_again_at:
            return tracked.snapshot_id
        snapshot_id = tracked.snapshot_id if tracked is not None else None
        try:
            model = trained_on(self._lakehouse(), tenant)
            found = None if model is None else model.training_snapshot_ids["events"]
            if found is None:
                self._monitor.forget(tenant, FEATURE)
            elif found != snapshot_id:
                self._monitor.set_reference(tenant, FEATURE, read_reference(self._lakehouse(), tenant, found, self._settings))
            snapshot_id = found
        except Exception as error:  # noqa: BLE001 - drift must never stop the stream (class docstring)
            log.warning(
                "drift of tenant %r: cannot load its reference (%s); %s until the next look in %.0f s",
                tenant,
                error,
                "the reference in use stays" if snapshot_id is not None else "it is not tracked",
                REFERENCE_RECHECK_S,
            )
        self._tracked[tenant] = _Tracked(snapshot_id, now + REFERENCE_RECHECK_S)
        return snapshot_id

    def _lakehouse(self):
        if self._lake is None:
            from lakehouse import Lakehouse

            self._lake = Lakehouse.open(self._settings)
        return self._lake

    def _report(self, check: DriftCheck, snapshot_id: int) -> None:
        if not ray.is_initialized():  # outside a Ray cluster there is no board: the gauges only
            return
        if self._board is None:
            self._board = drift_board(self._settings)
        # The settings travel only with a sustained check: the board retrains with them.
        report = {**asdict(check), "reference_snapshot_id": snapshot_id}
        self._board.report.remote(self.source, report, self._settings if check.sustained else None)


# the board --------------------------------------------------------------------------------------


def board_name(settings: Settings) -> str:
    """The name of the drift board of the lakehouse ``settings`` name (its catalog and warehouse)."""
    lakehouse = settings.lakehouse
    where = f"{lakehouse.catalog_type}|{lakehouse.catalog_uri}|{lakehouse.warehouse}|{settings.home_dir}"
    return f"{BOARD_PREFIX}-{hashlib.sha256(where.encode()).hexdigest()[:16]}"


def drift_board(settings: Settings):
    """The drift board (``DriftBoard``) of the lakehouse ``settings`` name, created by the first caller."""
    return (
        ray.remote(DriftBoard)
        .options(name=board_name(settings), namespace=NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=BOARD_CPUS, max_restarts=-1)
        .remote()
    )


class DriftBoardUnavailable(RtmlError):
    """The drift board runs but did not answer."""


def board_view(settings: Settings, tenant: str, timeout_s: float = BOARD_READ_TIMEOUT_S) -> tuple[list[dict], list[dict]]:
    """``(checks, retrains)`` of ``tenant`` from the running board of the lakehouse ``settings`` name (``DriftBoard.checks`` and
    ``.retrains``); empty when no board runs, or this process is not connected to Ray. Raises
    ``DriftBoardUnavailable`` when the board does not answer within ``timeout_s``."""
    if not ray.is_initialized():
        return [], []
    try:
        board = ray.get_actor(board_name(settings), namespace=NAMESPACE)
    except ValueError:  # none was started: nothing has drifted or been checked yet
        return [], []
    try:
        checks, retrains = ray.get([board.checks.remote(tenant), board.retrains.remote(tenant)], timeout=timeout_s)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as error:
        raise DriftBoardUnavailable(f"the drift board did not answer within {timeout_s:g} s ({type(error).__name__}); ask again shortly") from error
    return checks, retrains


def retrain_candidates(tenant: str, settings: Settings) -> list[str]:
    """Train and register a candidate of each forecaster kind the tenant has an active version of;
    returns the candidates' keys (``name@version``). The board runs it as a Ray task."""
    from lakehouse import Lakehouse
    from models.networks import FORECASTER_KINDS
    from models.training import train_candidate

    active = Lakehouse.open(settings).registry.active(tenant)
    kinds = sorted({model.kind for model in active if model.kind in FORECASTER_KINDS})
    if not kinds:
        raise RtmlError(f"tenant {tenant!r} has no active forecaster ({', '.join(FORECASTER_KINDS)}) to retrain; promote one first")
    return [train_candidate(tenant, kind, settings).key for kind in kinds]


class DriftBoard:
    """The actor (see the module docstring). Its methods run on one event loop, one at a time
    between awaits, so its dicts need no lock."""

    def __init__(self):
        self._checks: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}  # (tenant, feature) -> source -> latest check
        self._runs: dict[str, list[dict[str, Any]]] = {}  # tenant -> retraining runs, oldest first
        self._following: set[asyncio.Task] = set()

    async def report(self, source: str, check: dict[str, Any], settings: Settings | None = None) -> None:
        """File ``source``'s latest check; a sustained one (which carries the consumer's settings)
        may start a retraining run."""
        by_source = self._checks.setdefault((check["tenant"], check["feature"]), {})
        by_source[source] = check
        for stale in [name for name, earlier in by_source.items() if earlier["at"] < check["at"] - SOURCE_STALE_S]:
            del by_source[stale]
        if check["sustained"] and settings is not None and settings.observability.drift_retrain:
            self._retrain(check["tenant"], settings)

    async def checks(self, tenant: str) -> list[dict[str, Any]]:
        """Per feature of ``tenant``, the worst of its consumers' latest checks: the largest PSI,
        KS and live window, over or sustained if any consumer's is, and the time and reference
        snapshot of the newest."""
        views = []
        for (owner, feature), by_source in sorted(self._checks.items()):
            if owner != tenant:
                continue
            newest = max(by_source.values(), key=lambda check: check["at"])
            current = [check for check in by_source.values() if check["at"] >= newest["at"] - SOURCE_STALE_S]
            views.append(
                {
                    "tenant": tenant,
                    "feature": feature,
                    "psi": max(check["psi"] for check in current),
                    "ks": max(check["ks"] for check in current),
                    "live_events": max(check["live_events"] for check in current),
                    "over": any(check["over"] for check in current),
                    "sustained": any(check["sustained"] for check in current),
                    "at": newest["at"],
                    "reference_snapshot_id": newest["reference_snapshot_id"],
                }
            )
        return views

    async def retrains(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's retraining runs, newest first: ``started_at`` and ``finished_at`` (Unix
        times; None while running), ``status`` (running, registered, failed), the candidates'
        ``models`` (``name@version``) and the ``error`` of a failed run."""
        return [dict(run) for run in reversed(self._runs.get(tenant, []))]

    def _retrain(self, tenant: str, settings: Settings) -> None:
        runs = self._runs.setdefault(tenant, [])
        now = time.time()
        if runs and (runs[-1]["status"] == RUNNING or now - runs[-1]["started_at"] < settings.observability.drift_retrain_cooldown_s):
            return
        run = {"started_at": now, "finished_at": None, "status": RUNNING, "models": [], "error": None}
        runs.append(run)
        del runs[:-KEPT_RUNS]
        metrics.DRIFT_RETRAINS.labels(tenant=tenant, outcome="started").inc()
        # No CPU of its own: it waits for the training job, whose workers ask for theirs.
        training = ray.remote(retrain_candidates).options(num_cpus=0).remote(tenant, settings)
        follower = asyncio.get_running_loop().create_task(self._follow(tenant, run, training))
        self._following.add(follower)
        follower.add_done_callback(self._following.discard)

    async def _follow(self, tenant: str, run: dict[str, Any], training: ray.ObjectRef) -> None:
        try:
            run["models"] = await training
            run["status"] = REGISTERED
        except Exception as error:  # noqa: BLE001 - whatever failed, the run is over and says why
            cause = getattr(error, "cause", None) or error
            run["status"], run["error"] = FAILED, str(cause)
            log.warning("drift retraining of tenant %r failed: %s", tenant, cause)
        run["finished_at"] = time.time()
        metrics.DRIFT_RETRAINS.labels(tenant=tenant, outcome=run["status"]).inc()
