"""The stream's per-entity detector states (streaming.detection): each key's scores depend on its own
values only, in order, whatever else shares its batches and wherever the stream was cut and
restored from a checkpoint; fits become due once, named by what they are."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from pyiceberg.exceptions import CommitFailedException

from lakehouse.errors import LakehouseError
from models.detector import DetectorConfig, FitDue, ForecasterSpec

from models.scoring import artifact_path
from rtml.settings import Settings
from streaming.arrow_ipc import from_ipc, to_ipc
from streaming.detection import DueFit, EntityDetectors, EntityFitter, fit_uri
from streaming.failures import JudgedFailure

LEARNING = 120


def _settings(tmp_path) -> Settings:
    return Settings(home=tmp_path, detector={"learning_rows": LEARNING, "refit_every": 60})


def _series(seed: int, length: int = 400) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = np.sin(np.arange(length) / 7) + rng.normal(0, 0.1, length)
    values[300 % length] += 5
    return values


def _score(detectors: EntityDetectors, keys, values, partition: int = 0) -> tuple[np.ndarray, object]:
    """One batch through both states, each row forecast by a function of its own window (a stand-in
    for the served networks: the states, not the networks, are under test)."""
    batch = detectors.advance(np.asarray(keys, dtype=object), np.asarray(values, np.float64), np.full(len(keys), partition, np.int32))
    forecasts = [np.where(np.asarray(inputs.model_ids) != "", inputs.windows[:, -1], np.nan).astype(np.float32) for inputs in batch.forecast_inputs]
    return detectors.score(batch, forecasts), batch


def test_a_keys_scores_do_not_depend_on_the_other_keys_in_its_batches(tmp_path):
    a, b = _series(1), _series(2)
    alone = _score(EntityDetectors(_settings(tmp_path), "g"), ["t/a"] * len(a), a)[0]
    mixed = EntityDetectors(_settings(tmp_path), "g")
    interleaved_keys = [key for pair in zip(["t/a"] * len(a), ["u/a"] * len(b)) for key in pair]
    interleaved = [value for pair in zip(a, b) for value in pair]
    scores = np.concatenate([_score(mixed, interleaved_keys[i : i + 90], interleaved[i : i + 90])[0] for i in range(0, len(interleaved), 90)])
    np.testing.assert_array_equal(scores[0::2], alone)
    assert alone.max() > 0.9 and not alone[:LEARNING].any()


def test_states_restored_from_a_checkpoint_go_on_as_if_never_stopped(tmp_path):
    values = _series(3)
    whole = _score(EntityDetectors(_settings(tmp_path), "g"), ["t/a"] * len(values), values, 1)[0]
    first = EntityDetectors(_settings(tmp_path), "g")
    head = _score(first, ["t/a"] * 250, values[:250], 1)[0]
    saved = [from_ipc(to_ipc(table)) for table in (first.inputs_to_arrow(1), first.scoring_to_arrow(1))]
    restarted = EntityDetectors(_settings(tmp_path), "g")
    restarted.restore(1, *saved)
    tail = _score(restarted, ["t/a"] * 150, values[250:], 1)[0]
    np.testing.assert_array_equal(np.concatenate([head, tail]), whole)


def test_each_fit_becomes_due_once_named_by_group_key_forecaster_and_index(tmp_path):
    detectors = EntityDetectors(_settings(tmp_path), "group-1")
    values = _series(4)
    due = []
    for start in range(0, len(values), 37):
        chunk = values[start : start + 37]
        due += _score(detectors, ["t/pump 1"] * len(chunk), chunk)[1].fits
    assert [fit.due.index for fit in due] == list(range(len(due)))
    assert [fit.due.boundary for fit in due] == [LEARNING // 2, LEARNING, *range(LEARNING + 60, len(values), 60)]
    where = tmp_path.resolve() / "models" / "t" / "detector" / "group-1" / "pump%201" / "cnn-300-1"
    assert [artifact_path(fit.model_id) for fit in due] == [where / f"fit-{fit.due.index}" for fit in due]
    assert [fit.previous_model_id for fit in due[1:]] == [fit.model_id for fit in due[:-1]] and due[0].previous_model_id == ""
    assert len({fit.model_id for fit in due}) == len(due)


def test_a_partition_without_a_checkpoint_starts_empty(tmp_path):
    detectors = EntityDetectors(_settings(tmp_path), "g")
    _score(detectors, ["t/a"] * 50, _series(5)[:50])
    detectors.restore(0, None, None)
    assert detectors.inputs_to_arrow(0).num_rows == 0 and detectors.scoring_to_arrow(0).num_rows == 0
    assert isinstance(detectors.inputs_to_arrow(0), pa.Table)


class FlakyRegistry:
    """Fails its first ``failures`` registrations with ``error`` (raised from ``cause``)."""

    def __init__(self, failures: int, error: Exception, cause: Exception | None = None):
        self.calls, self._failures, self._error, self._cause = 0, failures, error, cause

    def register(self, model, client_token=None):
        self.calls += 1
        if self.calls <= self._failures:
            raise self._error from self._cause
        return model


def _fitter_and_fit(tmp_path, registry) -> tuple[EntityFitter, DueFit, DetectorConfig, Settings]:
    config = DetectorConfig(forecasters=(ForecasterSpec("cnn", 8, hparams={"channels": 2, "levels": 2}),), initial_epochs=1)
    settings = Settings(home=tmp_path, streaming={"give_up_after_s": 30})
    past = _series(6, 60)
    fit = DueFit("t/a", FitDue(0, 0, 60, past, float(np.median(past)), float(np.std(past))), fit_uri(settings, "g", "t/a", "cnn-8-1", 0), "")
    fitter = EntityFitter()
    fitter._lakehouse = SimpleNamespace(registry=registry)  # the registry under test, instead of a lakehouse's
    return fitter, fit, config, settings


def test_a_registration_that_loses_commit_races_for_a_while_is_retried(tmp_path):
    # Many entities refitting at once on two consumers' fitters: appends to the registry race.
    races = FlakyRegistry(3, LakehouseError("table 'models': the commit kept conflicting"), CommitFailedException("branch main has changed"))
    fitter, fit, config, settings = _fitter_and_fit(tmp_path, races)
    assert fitter.fit(settings, config, fit) == fit.model_id
    assert races.calls == 4


def test_a_registration_failing_for_good_reaches_the_consumer_judged_permanent(tmp_path):
    broken = FlakyRegistry(99, LakehouseError("table 'models': column 'kind' does not fit"))
    fitter, fit, config, settings = _fitter_and_fit(tmp_path, broken)
    with pytest.raises(JudgedFailure) as raised:
        fitter.fit(settings, config, fit)
    assert not raised.value.transient and broken.calls == 1 and "does not fit" in str(raised.value)
