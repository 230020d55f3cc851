"""The model registry, kept in the ``models`` table: one row per model version.

A model line is identified by its ``name`` (unique across tenants, e.g. ``acme-rnn``); versions
count up from 1 per name. ``promote`` makes a version the active one of its line and retires the
version it replaces, so a tenant's ensemble holds at most one active version per model line. Every
change is one Iceberg commit made against fresh metadata (``lakehouse.commits``): two processes
registering the same name at once cannot both get the same version, because the loser's commit is
refused and it re-counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import AlwaysTrue, And, BooleanExpression, EqualTo, In
from pyiceberg.table import Table

from lakehouse.commits import retry_on_conflict
from lakehouse.errors import LakehouseError
from lakehouse.tables import MODELS, to_arrow
from rtml.schemas import ModelStatus, ModelVersion


class ModelRegistry:
    def __init__(self, load: Callable[[], Table], commit_retries: int):
        self._load = load
        self._attempts = commit_retries

    def register(self, model: ModelVersion) -> ModelVersion:
        """Store ``model`` as the next version of its name (its own ``version`` is ignored)."""

        def unit() -> ModelVersion:
            table = self._load()
            versions = _scan(table, EqualTo("name", model.name), ("version",))["version"]
            registered = model.model_copy(update={"version": (pc.max(versions).as_py() or 0) + 1})
            table.append(_rows([registered]))
            return registered

        return retry_on_conflict(MODELS.name, self._attempts, unit)

    def list(self, tenant: str | None = None, status: ModelStatus | str | None = None) -> list[ModelVersion]:
        """Model versions, newest first, optionally of one tenant and/or in one status."""
        condition: BooleanExpression = AlwaysTrue()
        if tenant is not None:
            condition = And(condition, EqualTo("tenant", tenant))
        if status is not None:
            condition = And(condition, EqualTo("status", ModelStatus(status).value))
        models = _models(_scan(self._load(), condition))
        return sorted(models, key=lambda model: (model.created_at, model.name, model.version), reverse=True)

    def get(self, name: str, version: int) -> ModelVersion:
        found = _models(_scan(self._load(), _version(name, version)))
        if not found:
            raise LakehouseError(f"model {name}@{version} is not registered")
        return found[0]

    def active(self, tenant: str) -> list[ModelVersion]:
        return self.list(tenant=tenant, status=ModelStatus.ACTIVE)

    def promote(self, name: str, version: int) -> ModelVersion:
        """Make ``name@version`` active and retire the version of ``name`` that was active before."""

        def change(model: ModelVersion) -> ModelVersion | None:
            if model.version == version:
                return model.model_copy(update={"status": ModelStatus.ACTIVE})
            if model.status == ModelStatus.ACTIVE:
                return model.model_copy(update={"status": ModelStatus.RETIRED})
            return None

        self._rewrite(name, version, EqualTo("name", name), change)
        return self.get(name, version)

    def retire(self, name: str, version: int) -> ModelVersion:
        self._rewrite(
            name,
            version,
            _version(name, version),
            lambda model: model.model_copy(update={"status": ModelStatus.RETIRED}),
        )
        return self.get(name, version)

    def set_weights(self, tenant: str, weights: Mapping[str, float]) -> None:
        """Persist a tenant's ensemble weights by model key (``name@version``), so that the router's
        online re-weighting survives restarts. Unknown keys are an error and change nothing."""
        bad = {key: weight for key, weight in weights.items() if not (weight >= 0.0 and weight != float("inf"))}
        if bad:
            raise LakehouseError(f"ensemble weights must be finite and non-negative: {bad}")

        def unit() -> None:
            table = self._load()
            models = _models(_scan(table, EqualTo("tenant", tenant)))
            unknown = set(weights) - {model.key for model in models}
            if unknown:
                raise LakehouseError(f"tenant {tenant!r} has no registered model(s) {sorted(unknown)}")
            changed = [
                model.model_copy(update={"ensemble_weight": float(weights[model.key])})
                for model in models
                if model.key in weights
            ]
            table.overwrite(_rows(changed), overwrite_filter=_any_of(changed))

        retry_on_conflict(MODELS.name, self._attempts, unit)

    def _rewrite(
        self,
        name: str,
        version: int,
        condition: BooleanExpression,
        change: Callable[[ModelVersion], ModelVersion | None],
    ) -> None:

        def unit() -> None:
            table = self._load()
            models = _models(_scan(table, condition))
            if not any(model.version == version and model.name == name for model in models):
                raise LakehouseError(f"model {name}@{version} is not registered")
            changed = [new for model in models if (new := change(model)) is not None and new != model]
            if changed:
                table.overwrite(_rows(changed), overwrite_filter=_any_of(changed))

        retry_on_conflict(MODELS.name, self._attempts, unit)


def _version(name: str, version: int) -> BooleanExpression:
    return And(EqualTo("name", name), EqualTo("version", version))


def _any_of(models: list[ModelVersion]) -> BooleanExpression:
    return In("model_key", {model.key for model in models})


def _scan(table: Table, condition: BooleanExpression, columns: tuple[str, ...] = ("*",)) -> pa.Table:
    return table.scan(row_filter=condition, selected_fields=columns).to_arrow()


def _rows(models: list[ModelVersion]) -> pa.Table:
    return to_arrow(MODELS, [{**model.model_dump(mode="python"), "model_key": model.key} for model in models])


def _models(rows: pa.Table) -> list[ModelVersion]:
    return [
        ModelVersion(
            **{
                **{column: value for column, value in row.items() if column != "model_key"},
                "metrics": dict(row["metrics"] or []),
                "training_snapshot_ids": dict(row["training_snapshot_ids"] or []),
                "feature_set_version": row["feature_set_version"] or "",
            }
        )
        for row in rows.to_pylist()
    ]
