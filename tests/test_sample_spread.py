"""scripts/sample_spread.py: several samples of one model, each evaluated alike, and the spread of their figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest_models import load_script


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_two_samples_give_their_figures_and_spread(g4_pair, tmp_path, capsys):
    reference, _ = g4_pair
    spread = load_script("sample_spread")
    out = spread.main(["default", str(reference), "--seeds", "1,2", "-o", str(tmp_path / "s"), "--threads", "1"])
    a, b = out["samples"]["seed1"], out["samples"]["seed2"]
    for k in ("auc_low", "auc_high", "fpd"):
        assert 0.0 <= min(a[k], b[k])
        assert a[k] != b[k]  # two samples of one model: different numbers
        s = out["summary"][k]
        assert s["n"] == 2
        assert s["mean"] == pytest.approx((a[k] + b[k]) / 2)
        assert s["std"] == pytest.approx(abs(a[k] - b[k]) / np.sqrt(2))
    assert json.loads((tmp_path / "s" / "spread.json").read_text())["summary"] == out["summary"]
    table = capsys.readouterr().out.splitlines()
    assert table[:2] == ["| sample | auc_low | auc_high | fpd | flags |", "|---|---|---|---|---|"]
    assert table[-1].startswith("| mean ± std | ")
    # a rerun keeps the samples it made (the same seeds give the same files) and scores them alike
    stamp = (tmp_path / "s" / "sample-s1.h5").stat().st_mtime_ns
    again = spread.main(["default", str(reference), "--seeds", "1,2", "-o", str(tmp_path / "s"), "--threads", "1",
                         "--no-classifier"])
    assert (tmp_path / "s" / "sample-s1.h5").stat().st_mtime_ns == stamp
    assert again["summary"]["fpd"] == out["summary"]["fpd"] and "auc_low" not in again["summary"]


def test_one_seed_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        load_script("sample_spread").main(["default", "x.h5", "--seeds", "1", "-o", str(tmp_path)])
