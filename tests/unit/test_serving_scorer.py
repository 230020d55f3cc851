"""The model replica's forwards: a large merged batch is scored in bounded forwards, with the
same scores as one forward."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.scorer import score_in_forwards
from models.scoring import fit_scorer


@pytest.fixture(scope="module")
def scorer():
    steps = np.arange(600, dtype=np.float32)
    return fit_scorer("cnn", [np.sin(steps / 9.0) + 0.1 * np.random.default_rng(0).normal(size=600)], window_length=8, epochs=1)


@pytest.mark.parametrize("forward_windows", [None, 1, 32, 100, 500])
def test_scores_in_bounded_forwards_equal_one_forward(scorer, forward_windows):
    windows = np.random.default_rng(1).normal(size=(100, 8)).astype(np.float32)
    windows[::7, -1] += 6.0  # some windows the model should find unusual
    whole = scorer.score(windows)
    scores = score_in_forwards(scorer, windows, forward_windows)
    assert scores.shape == (100,)
    np.testing.assert_allclose(scores, whole, atol=1e-5)
    assert scores[::7].mean() > np.delete(scores, np.s_[::7]).mean()
