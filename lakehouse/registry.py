"""The model registry, kept in the ``models`` table: one row per model version.

A model line is identified by its ``name`` (unique across tenants, e.g. ``acme-rnn``); versions
count up from 1 per name. ``promote`` makes a version the active one of its line and retires the
version it replaces, so a tenant's ensemble holds at most one active version per model line. Every
change is one Iceberg commit made against fresh metadata (``lakehouse.commits``): two processes
registering the same name at once cannot both get the same version, because the loser's commit is
refused and it re-counts.

Re-running a unit is also what a commit whose outcome is unknown gets (a connection lost after the
commit landed), which would register the model a second time. A registration with a
``client_token`` is therefore idempotent: the token is stored with the version, and a unit that
finds it returns that version instead of adding one (a resubmitted training job, a retried commit).

Ensemble weights change by ``update_weights(tenant, update)``: ``update`` maps the weights the
table holds to new ones inside the unit, so the commit is a compare-and-swap on the stored weights
and the loser of a race re-applies its update to the winner's. Router replicas each send their own
multiplicative updates, which commute: concurrent ones end where sequential ones would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import AlwaysTrue, And, BooleanExpression, EqualTo, In
from pyiceberg.table import Table

from lakehouse.commits import retry_on_conflict
from lakehouse.errors import LakehouseError
from lakehouse.tables import MODELS, conform, to_arrow
from rtml.schemas import ModelStatus, ModelVersion


class ModelRegistry:
    def __init__(self, load: Callable[[], Table], commit_retries: int):
        self._load = load
        self._attempts = commit_retries

    def register(self, model: ModelVersion, client_token: str | None = None) -> ModelVersion:
        """Store ``model`` as the next version of its name (its own ``version`` is ignored). With a
        ``client_token`` (the same for every attempt at the same registration), a token that is
        already stored returns the version it registered instead of adding one."""

        def unit() -> ModelVersion:
            table = self._load()
            if client_token is not None:
                known = _scan(table, EqualTo(_TOKEN, client_token))
                if known.num_rows:
                    return _registered_before(_models(known)[0], model, client_token)
            versions = _scan(table, EqualTo("name", model.name), ("version",))["version"]
            registered = model.model_copy(update={"version": (pc.max(versions).as_py() or 0) + 1})
            table.append(_rows(table, [registered], {registered.key: client_token}))
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
        """Set a tenant's ensemble weights by model key (``name@version``), whatever they were (an
        administrator's reset; the router's re-weighting uses ``update_weights``). Unknown keys are
        an error and change nothing."""
        self.update_weights(tenant, lambda _stored: weights)

    def update_weights(self, tenant: str, update: Callable[[dict[str, float]], Mapping[str, float]]) -> dict[str, float]:
        """Change a tenant's ensemble weights as one compare-and-swap: ``update`` gets the stored
        weights (model key ``name@version`` -> weight, every version of the tenant) and returns the
        new weights of the keys it changes; it is called again on the new stored weights whenever
        a concurrent change wins the race, so it must be a function of what it is given. Returns
        the tenant's weights after the change. Unknown keys or weights that are not finite and
        non-negative are an error and change nothing."""

        def unit() -> dict[str, float]:
            table = self._load()
            rows = _scan(table, EqualTo("tenant", tenant))
            models = _models(rows)
            stored = {model.key: model.ensemble_weight for model in models}
            weights = {key: float(weight) for key, weight in update(dict(stored)).items()}
            bad = {key: weight for key, weight in weights.items() if not 0.0 <= weight < float("inf")}
            if bad:
                raise LakehouseError(f"ensemble weights must be finite and non-negative: {bad}")
            unknown = set(weights) - set(stored)
            if unknown:
                raise LakehouseError(f"tenant {tenant!r} has no registered model(s) {sorted(unknown)}")
            changed = [
                model.model_copy(update={"ensemble_weight": weights[model.key]})
                for model in models
                if model.key in weights and weights[model.key] != model.ensemble_weight
            ]
            if changed:
                table.overwrite(_rows(table, changed, _tokens(rows)), overwrite_filter=_any_of(changed))
            return {**stored, **weights}

        return retry_on_conflict(MODELS.name, self._attempts, unit)

    def _rewrite(
        self,
        name: str,
        version: int,
        condition: BooleanExpression,
        change: Callable[[ModelVersion], ModelVersion | None],
    ) -> None:

        def unit() -> None:
            table = self._load()
            rows = _scan(table, condition)
            models = _models(rows)
            if not any(model.version == version and model.name == name for model in models):
                raise LakehouseError(f"model {name}@{version} is not registered")
            changed = [new for model in models if (new := change(model)) is not None and new != model]
            if changed:
                table.overwrite(_rows(table, changed, _tokens(rows)), overwrite_filter=_any_of(changed))

        retry_on_conflict(MODELS.name, self._attempts, unit)


def _version(name: str, version: int) -> BooleanExpression:
    return And(EqualTo("name", name), EqualTo("version", version))


def _any_of(models: list[ModelVersion]) -> BooleanExpression:
    return In("model_key", {model.key for model in models})


def _scan(table: Table, condition: BooleanExpression, columns: tuple[str, ...] = ("*",)) -> pa.Table:
    return table.scan(row_filter=condition, selected_fields=columns).to_arrow()


_TOKEN = "registration_token"


def _registered_before(found: ModelVersion, model: ModelVersion, client_token: str) -> ModelVersion:
    if found.name != model.name:
        raise LakehouseError(
            f"client token {client_token!r} already registered {found.key}, not a version of {model.name!r}; "
            "give each registration its own token"
        )
    return found


def _tokens(rows: pa.Table) -> dict[str, str | None]:
    """Model key -> registration token of scanned rows, so that rewriting a row keeps its token."""
    return dict(zip(rows["model_key"].to_pylist(), rows[_TOKEN].to_pylist(), strict=True))


def _rows(table: Table, models: list[ModelVersion], tokens: Mapping[str, str | None]) -> pa.Table:
    records = [{**model.model_dump(mode="python"), "model_key": model.key, _TOKEN: tokens.get(model.key)} for model in models]
    return conform(to_arrow(MODELS, records), table)


def _models(rows: pa.Table) -> list[ModelVersion]:
    return [
        ModelVersion(
            **{
                **{column: value for column, value in row.items() if column not in ("model_key", _TOKEN)},
                "metrics": dict(row["metrics"] or []),
                "training_snapshot_ids": dict(row["training_snapshot_ids"] or []),
                "feature_set_version": row["feature_set_version"] or "",
            }
        )
        for row in rows.to_pylist()
    ]
