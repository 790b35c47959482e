"""The flag rule (caloforge.flags) at a small size: toy samples of one configuration raise (almost) no flag, a
10 % energy scale is flagged, the Holm-Bonferroni step is right, and the report prints the rule of the code."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from caloforge import flags
from caloforge.metrics import compare_summaries
from caloforge.observables import summarise
from conftest_models import load_script, toy_detector, toy_showers, write_toy_file

ROOT = Path(__file__).resolve().parents[1]
DET = toy_detector("toy-flags", n_layers=6, n_xy=8)


class _Scaled:
    def __init__(self, batch, scale: float):
        self.energies, self.angles = batch.energies, batch.angles
        self.showers = batch.showers * np.float32(scale)


def _summary(n: int, seed: int, scale: float = 1.0):
    return summarise([_Scaled(toy_showers(DET, n, seed), scale)], DET)


def test_holm_adjusted_p_values():
    p = [0.01, 0.04, 0.03, 0.005, float("nan")]
    adj = flags.holm_adjusted(p)
    # sorted: 0.005 (x4), 0.01 (x3), 0.03 (x2), 0.04 (x1); running maximum; the NaN is not a test
    np.testing.assert_allclose(adj[:4], [0.03, 0.06, 0.06, 0.02])
    assert np.isnan(adj[4])
    assert list(flags.holm(p, alpha=0.05)) == [True, False, False, True, False]
    assert not flags.holm([float("nan")]).any()


def test_z_and_p_values():
    assert flags.z_score(3.0, 1.0, 1.2, 1.6) == pytest.approx(1.0)
    assert flags.z_score(1.0, 1.0, 0.0, 0.0) != flags.z_score(1.0, 1.0, 0.0, 0.0)  # NaN: no difference, no error
    assert flags.z_score(2.0, 1.0, 0.0, 0.0) == np.inf
    assert flags.p_one_sided(0.0) == pytest.approx(0.5)
    assert flags.p_one_sided(-3.0) > 0.99  # below the floor: never significant
    assert flags.p_two_sided(-1.959964) == pytest.approx(0.05, abs=1e-6)
    assert np.isnan(flags.p_two_sided(None))


@pytest.fixture(scope="module")
def reference():
    return _summary(400, seed=1)


def test_toy_against_itself_raises_almost_no_flag(reference):
    """Five independent 400 vs 400 toy comparisons of one configuration: at most one flag in all of them (the
    rule allows a false flag in 5 % of comparisons)."""
    n_flags, n_tests = [], 0
    for seed in range(5):
        ref = reference if seed == 0 else _summary(400, seed=10 + seed)
        res = compare_summaries(ref, _summary(400, seed=100 + seed), n_splits=6, seed=seed)
        n_flags.append(res["n_flags"])
        n_tests = res["flag_rule"]["n_tests"]
        z = [m["z"] for o in res["observables"].values() for m in o.values()]
        assert np.nanmax(z) < 4.0, "no single observable far above its floor"
    assert n_tests > 100
    assert sum(n_flags) <= 1, n_flags


def test_energy_scale_of_ten_percent_is_flagged(reference):
    res = compare_summaries(reference, _summary(300, seed=7, scale=1.10), n_splits=6, seed=0)
    names = {f["name"] for f in res["flags"] if f["test"] == "observable"}
    assert {"e_ratio", "e_ratio_weighted"} <= names, names  # e_vis spreads with the incident energy
    assert all(f["p_adjusted"] <= flags.ALPHA for f in res["flags"])
    e = res["observables"]["e_ratio"]["wasserstein1"]
    assert e["flagged"] and e["z"] > 5 and e["err_value"] > 0 and e["err_floor"] > 0
    assert not {"cog_x", "cog_y"} & names  # a pure energy scale leaves the transverse centre alone


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rule, self._in_rule = [], False

    def handle_starttag(self, tag, attrs):
        self._in_rule = self._in_rule or (tag == "span" and ("class", "rule") in attrs)

    def handle_endtag(self, tag):
        if tag == "span":
            self._in_rule = False

    def handle_data(self, data):
        if self._in_rule:
            self.rule.append(data)


def test_report_states_the_rule_of_the_code(tmp_path):
    from caloforge.evaluate import evaluate

    ref = tmp_path / "ref.h5"
    write_toy_file(ref, DET, 120, seed=1)
    write_toy_file(tmp_path / "cand.h5", DET, 120, seed=2)
    res = evaluate(str(ref), [("cand", str(tmp_path / "cand.h5"))], tmp_path / "out", classifier=False,
                   n_splits=3, log=lambda msg: None)
    page = _Text()
    page.feed((tmp_path / "out" / "report.html").read_text())
    assert "".join(page.rule) == flags.rule_sentence()
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())["candidates"]["cand"]["flag_rule"]
    assert saved["rule"] == flags.rule_sentence() and saved["alpha"] == flags.ALPHA
    assert saved["n_tests"] == res["candidates"]["cand"]["flag_rule"]["n_tests"] > 100
    docs = " ".join((ROOT / "docs" / "evaluation.md").read_text().split())
    assert flags.rule_sentence() in docs, "docs/evaluation.md quotes the rule sentence"


def test_calibration_script_runs_on_a_small_file(tmp_path):
    mod = load_script("calibrate_flags")
    path = tmp_path / "toy.h5"
    write_toy_file(path, DET, 160, seed=3)
    out = tmp_path / "cal.json"
    assert mod.main([str(path), "--null-trials", "2", "--trials", "1", "--splits", "3", "--no-fpd-kpd",
                     "--energy-scale", "1.3", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"null", "energy", "lateral", "layer"}
    assert summary["energy"]["flagged"] == 1  # a 30 % energy scale, even at 80 vs 80 showers


def test_lateral_stretch_widens_every_shower_by_the_scale():
    mod = load_script("calibrate_flags")
    from caloforge.observables import as_geometry, compute_observables

    b = toy_showers(DET, 200, seed=4)
    geom = as_geometry(DET)
    wide = mod.Deformer(geom, b.showers.mean(axis=0)).lateral_geometry(geom, 1.05)
    o0 = compute_observables(b.showers, b.energies, None, geom)
    o1 = compute_observables(b.showers, b.energies, None, wide)
    np.testing.assert_allclose(o1["width_x_l02"], 1.05 * o0["width_x_l02"], rtol=1e-9)
    np.testing.assert_allclose(o1["width_y_l04"], 1.05 * o0["width_y_l04"], rtol=1e-9)
    assert np.nanmean(o1["r_mean"]) / np.nanmean(o0["r_mean"]) == pytest.approx(1.05, abs=0.01)
    for k in ("n_hits", "e_vis", "cog_z"):  # cells, energies and depth untouched
        np.testing.assert_array_equal(o1[k], o0[k])
