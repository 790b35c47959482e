"""scripts/response_table.py: mu90 offsets and sigma90 ratios per energy point, with propagated errors."""

from __future__ import annotations

import json

import pytest

from conftest_models import load_script


def test_response_table_offsets_and_ratios(tmp_path, capsys):
    point = dict(energy=50000.0, n=200, mu90=0.02, mu90_err=0.0002, sigma90=0.001, sigma90_err=0.0001)
    cand = dict(point, mu90=0.0204, sigma90=0.003)
    metrics = {"candidates": {"m": {"response": {"e_ratio": {"reference": [point], "candidate": [cand]}}},
                              "no-response": {}}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert load_script("response_table").main([str(tmp_path / "metrics.json")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("m: 50 GeV: mu90 +2.0 +- 1.4 %, sigma90 x3.00 +- 0.32")
    # errors: 102 % x hypot(0.0002/0.0204, 0.0002/0.02) = 1.43 %; 3 x hypot(1/30, 1/10) = 0.316
    assert pytest.approx(3 * (1 / 30 ** 2 + 1 / 10 ** 2) ** 0.5, abs=5e-3) == 0.32
