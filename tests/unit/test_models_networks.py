"""The networks' input contracts, save/load round-trips (state_dict and torch.export), and the
serving scorer's calibration."""

import numpy as np
import pytest
import torch

from models.networks import NETWORKS, build_network, example_input, export_program, load_network, save_network
from models.scoring import fit_scorer, load_scorer, save_scorer
from rtml.errors import RtmlError

SMALL = {
    "rnn": dict(context_length=12, hidden=8),
    "cnn": dict(context_length=12, channels=8, levels=2),
    "hybrid": dict(context_length=12, channels=8, hidden=8),
    "image_cnn": dict(height=8, width=12, channels=4),
}


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_output_shape_follows_the_input_contract(kind):
    network = build_network(kind, **SMALL[kind]).eval()
    batch = example_input(network, batch=5)
    out = network(batch)
    expected = (5,) if kind != "image_cnn" else (5, 8, 12)
    assert tuple(out.shape) == expected


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_state_dict_round_trip_gives_identical_outputs(kind, tmp_path):
    torch.manual_seed(1)
    network = build_network(kind, **SMALL[kind]).eval()
    batch = example_input(network, batch=4)
    save_network(network, tmp_path / kind)
    loaded = load_network(tmp_path / kind)
    assert torch.equal(loaded(batch), network(batch))


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_exported_program_runs_without_rtml_and_any_batch_size(kind, tmp_path):
    network = build_network(kind, **SMALL[kind]).eval()
    path = export_program(network, tmp_path / f"{kind}.pt2")
    program = torch.export.load(str(path)).module()
    for batch_size in (1, 7):
        batch = example_input(network, batch=batch_size)
        assert torch.allclose(program(batch), network(batch), atol=1e-6)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown model kind"):
        build_network("transformer", context_length=4)


def _noisy_sine(length=1500, seed=0):
    rng = np.random.default_rng(seed)
    steps = np.arange(length)
    return 50 + 10 * np.sin(steps / 15) + rng.normal(0, 0.3, length)


@pytest.mark.parametrize("kind", ["rnn", "cnn", "hybrid"])
def test_trained_scorer_is_calibrated_and_survives_save_load(kind, tmp_path):
    series = _noisy_sine()
    scorer = fit_scorer(kind, [series], window_length=24, epochs=3)
    windows = np.lib.stride_tricks.sliding_window_view(_noisy_sine(seed=1), 24)[:400].copy()
    normal = scorer.score(windows)
    spiked = windows.copy()
    spiked[:, -1] += 15.0
    assert normal.dtype == np.float32 and normal.shape == (400,)
    assert ((normal >= 0) & (normal <= 1)).all()
    assert np.median(normal) < 0.15
    assert np.median(scorer.score(spiked)) > 0.9

    loaded = load_scorer(save_scorer(scorer, tmp_path / "s"))
    assert loaded.kind == kind and loaded.window_length == 24
    np.testing.assert_allclose(loaded.score(windows), normal, atol=1e-6)


def test_image_scorer_flags_frames_unlike_training():
    rng = np.random.default_rng(0)
    frames = (0.3 + 0.05 * rng.random((300, 16, 16))).astype(np.float32)
    scorer = fit_scorer("image_cnn", [frames], epochs=8)
    damaged = frames[:20].copy()
    damaged[:, 4:10, 4:10] = 1.0
    assert np.median(scorer.score(frames[:20])) < 0.3
    assert scorer.score(damaged).min() > 0.9


def test_scorer_refuses_wrong_shapes_and_nan():
    scorer = fit_scorer("cnn", [_noisy_sine(300)], window_length=8, epochs=1)
    with pytest.raises(RtmlError, match=r"expects windows \[B, 8\]"):
        scorer.score(np.zeros((2, 9), dtype=np.float32))
    bad = np.zeros((2, 8), dtype=np.float32)
    bad[0, 3] = np.nan
    with pytest.raises(RtmlError, match="NaN"):
        scorer.score(bad)


def test_load_scorer_names_a_missing_artifact(tmp_path):
    with pytest.raises(RtmlError, match="no model artifact"):
        load_scorer((tmp_path / "nothing").as_uri())
