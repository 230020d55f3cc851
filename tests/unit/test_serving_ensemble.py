"""The router's ensemble logic without Ray: plans, combination, canary/shadow, re-weighting."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deployments.ensemble import Member, OnlineAccuracy, Rollout, TenantEnsemble, combine, reweight
from deployments.records import new_batch_id, prediction_ids, split_prediction_id


def member(name: str, version: int = 1, kind: str = "rnn", weight: float = 1.0) -> Member:
    shape = (8, 8) if kind == "image_cnn" else (32,)
    return Member(name, version, kind, f"file:///models/{name}/{version}", weight, shape)


RNN, CNN, IMAGE = member("acme-rnn"), member("acme-cnn", kind="cnn"), member("acme-img", kind="image_cnn")


def test_plan_picks_the_members_that_fit_the_data_type():
    ensemble = TenantEnsemble("acme", (RNN, CNN, IMAGE))
    assert {m.key for m in ensemble.plan("metric").members} == {"acme-rnn@1", "acme-cnn@1"}
    assert [m.key for m in ensemble.plan("image").members] == ["acme-img@1"]
    assert ensemble.input_shape("metric") == (32,)
    assert ensemble.input_shape("image") == (8, 8)


def test_plan_leaves_unhealthy_models_out():
    ensemble = TenantEnsemble("acme", (RNN, CNN))
    assert [m.key for m in ensemble.plan("metric", unhealthy={"acme-rnn@1"}).members] == ["acme-cnn@1"]
    assert ensemble.plan("metric", unhealthy={"acme-rnn@1", "acme-cnn@1"}).members == ()


def test_canary_replaces_its_line_for_about_its_fraction_of_requests():
    candidate = member("acme-rnn", version=2)
    ensemble = TenantEnsemble("acme", (RNN, CNN), (Rollout(candidate, "canary", 0.25),))
    draw = random.Random(7)
    plans = [ensemble.plan("metric", draw=draw) for _ in range(4000)]
    canary = [plan for plan in plans if "acme-rnn@2" in {m.key for m in plan.members}]
    assert 0.2 < len(canary) / len(plans) < 0.3
    for plan in canary:  # the candidate takes the line's place, it is not added beside it
        assert {m.key for m in plan.members} == {"acme-rnn@2", "acme-cnn@1"}
        assert plan.model_versions == {"acme-rnn": "2", "acme-cnn": "1"}


def test_an_unhealthy_canary_falls_back_to_the_active_version():
    candidate = member("acme-rnn", version=2)
    ensemble = TenantEnsemble("acme", (RNN, CNN), (Rollout(candidate, "canary", 1.0),))
    assert {m.key for m in ensemble.plan("metric", unhealthy={"acme-rnn@2"}).members} == {"acme-rnn@1", "acme-cnn@1"}


def test_shadow_is_scored_beside_the_ensemble_not_in_it():
    candidate = member("acme-rnn", version=2)
    ensemble = TenantEnsemble("acme", (RNN, CNN), (Rollout(candidate, "shadow", 1.0),))
    plan = ensemble.plan("metric")
    assert {m.key for m in plan.members} == {"acme-rnn@1", "acme-cnn@1"}
    assert [m.key for m in plan.shadows] == ["acme-rnn@2"]


def test_members_of_different_input_shapes_are_an_error():
    other = Member("acme-cnn64", 1, "cnn", "file:///x", 1.0, (64,))
    with pytest.raises(ValueError, match="different input shapes"):
        TenantEnsemble("acme", (RNN, other)).input_shape("metric")


def test_combine_is_the_weighted_mean():
    scores = np.array([[0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(combine(scores, np.array([3.0, 1.0])), [0.25, 1.0])
    np.testing.assert_allclose(combine(scores, np.array([0.0, 0.0])), [0.5, 1.0])


def test_feedback_moves_weight_to_the_model_that_was_right():
    weights = {"a": 1.0, "b": 1.0}
    learned = reweight(weights, {"a": 0.9, "b": 0.1}, is_anomaly=True, rate=0.5)
    assert learned["a"] > 1.0 > learned["b"]
    assert sum(learned.values()) == pytest.approx(2.0)
    learned = reweight(weights, {"a": 0.9, "b": 0.1}, is_anomaly=False, rate=0.5)
    assert learned["b"] > 1.0 > learned["a"]


@given(
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6),
    st.lists(st.floats(0.01, 10.0), min_size=6, max_size=6),
    st.booleans(),
)
def test_reweighting_keeps_the_total_and_never_zeroes_a_model(scores, weights, is_anomaly):
    keys = [f"m{i}" for i in range(len(scores))]
    before = dict(zip(keys, weights))
    after = reweight(before, dict(zip(keys, scores)), is_anomaly, rate=2.0)
    assert sum(after.values()) == pytest.approx(sum(before.values()), rel=0.05)
    assert min(after.values()) > 0.0


def test_with_weights_changes_only_the_given_keys():
    candidate = member("acme-rnn", version=2)
    ensemble = TenantEnsemble("acme", (RNN, CNN), (Rollout(candidate, "canary", 0.5),))
    changed = ensemble.with_weights({"acme-cnn@1": 0.5, "acme-rnn@2": 2.0})
    assert changed.weight_of("acme-cnn@1") == 0.5
    assert changed.weight_of("acme-rnn@1") == 1.0
    assert changed.weight_of("acme-rnn@2") == 2.0
    assert changed.weight_of("nope@1") is None


def test_online_accuracy_counts_each_models_own_decision():
    accuracy = OnlineAccuracy()
    accuracy.record({"a": 0.9, "b": 0.2}, is_anomaly=True, threshold=0.5)
    accuracy.record({"a": 0.7, "b": 0.1}, is_anomaly=False, threshold=0.5)
    assert accuracy.of(["a", "b", "c"]) == {"a": 0.5, "b": 0.5}


def test_prediction_ids_lead_back_to_their_batch_and_position():
    batch_id = new_batch_id()
    ids = prediction_ids(batch_id, 0, 300)
    assert len(set(ids)) == 300 and all(len(i) == 32 for i in ids)
    assert split_prediction_id(ids[257]) == (batch_id, 257)
    assert split_prediction_id("not-one-of-ours") is None
    assert split_prediction_id("z" * 32) is None
