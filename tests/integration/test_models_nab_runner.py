"""`rtml nab` over a small NAB-layout corpus (series in parallel as Ray tasks), then `rtml nab score`
on what it wrote."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from models.nab.runner import run_corpus
from rtml.cli import app
from rtml.errors import RtmlError


def write_series(path, values, start="2024-01-01"):
    path.parent.mkdir(parents=True, exist_ok=True)
    stamps = pd.date_range(start, periods=len(values), freq="5min").strftime("%Y-%m-%d %H:%M:%S")
    pd.DataFrame({"timestamp": stamps, "value": values}).to_csv(path, index=False)
    return list(stamps)


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    steps = np.arange(500)
    spiky = 10 + np.sin(steps / 6) + rng.normal(0, 0.1, 500)
    spiky[400] = 30
    stamps = write_series(tmp_path / "data" / "cat" / "spiky.csv", spiky)
    write_series(tmp_path / "data" / "other" / "flat.csv", np.full(300, 5.0))
    labels = tmp_path / "windows.json"
    labels.write_text(json.dumps({"cat/spiky.csv": [[stamps[390], stamps[420]]], "other/flat.csv": []}))
    return tmp_path, labels


def test_results_keep_every_row_in_order_with_scores_in_range(ray_cluster, corpus):
    root, _ = corpus
    done = []
    names = run_corpus(root / "data", root / "out", workers=2, on_done=done.append)
    assert sorted(done) == names == ["cat/spiky.csv", "other/flat.csv"]
    for name in names:
        source = pd.read_csv(root / "data" / name)
        result = pd.read_csv(root / "out" / name)
        assert list(result.columns) == ["timestamp", "value", "anomaly_score"]
        assert result["timestamp"].tolist() == source["timestamp"].tolist()
        assert np.allclose(result["value"], source["value"])
        assert result["anomaly_score"].between(0, 1).all()
    spiky = pd.read_csv(root / "out" / "cat" / "spiky.csv")["anomaly_score"]
    assert spiky[400] == spiky.max() and spiky[400] > 0.9
    assert spiky.median() < 0.1


def test_score_command_reports_the_three_profiles(corpus):
    root, labels = corpus
    run_corpus(root / "data", root / "out", workers=1)
    report = root / "report.json"
    outcome = CliRunner().invoke(
        app, ["nab", "score", "--results", str(root / "out"), "--labels", str(labels), "--report", str(report)]
    )
    assert outcome.exit_code == 0, outcome.output
    figures = json.loads(report.read_text())
    assert set(figures) == {"standard", "reward_low_FP_rate", "reward_low_FN_rate"}
    # One window, caught 10 rows into its 31: well above the null detector's 0.
    assert figures["standard"]["score"] > 50


def test_a_value_that_is_not_a_number_is_named(tmp_path):
    path = tmp_path / "data" / "cat" / "bad.csv"
    write_series(path, [1.0, 2.0, 3.0])
    path.write_text(path.read_text().replace(",2.0", ",two"))
    with pytest.raises(RtmlError, match="line 3: value 'two'"):
        run_corpus(tmp_path / "data", tmp_path / "out", workers=1)
