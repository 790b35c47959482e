"""End to end: `caloforge evaluate` passes two samples of one configuration and flags a 5 % energy-scaled copy and
a 3-layer-shifted copy on the observables they affect; the HTML report is self-contained and renders.

The same checks run on toy showers (always) and on small Geant4 photon samples from the ``g4_pair`` fixture
(when tests/conftest.py provides it).
"""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from caloforge.cli import main
from caloforge.dataset import ShowerFile, ShowerWriter
from caloforge.detector import load_detector
from caloforge.evaluate import evaluate
from caloforge.metrics import flagged_observables
from conftest_models import load_script

ROOT = Path(__file__).resolve().parents[1]
ENERGY_OBSERVABLES = {"e_vis", "e_vis_weighted", "e_ratio", "e_ratio_weighted"}
RESPONSE = {"e_ratio_weighted"}  # the most sensitive to an energy scale; e_vis also spreads with E_inc
SCALE_INVARIANT = {"cog_x", "cog_y", "cog_z", "shower_depth", "axis_angle_y"}
DEPTH_OBSERVABLES = {"cog_z", "shower_depth"}
LATERAL_CENTRES = {"cog_x", "cog_y"}


def _bench_module():
    mod = load_script("bench_evaluate")
    return mod


def transformed_copy(src: Path, dst: Path, scale: float = 1.0, layer_shift: int = 0) -> Path:
    """A copy of ``src`` with every cell scaled by ``scale`` and/or moved ``layer_shift`` layers deeper."""
    with ShowerFile(src) as f, ShowerWriter(dst, f.detector, f.n_cells, {"source": "test-transform"}) as w:
        for b in f.iter_batches(500):
            s = b.showers.reshape(len(b), *f.shape) * np.float32(scale)
            if layer_shift:
                s = np.roll(s, layer_shift, axis=1)
                s[:, :layer_shift] = 0
            w.append(b.energies, b.angles, s.reshape(len(b), -1))
    return dst


def check_flags(results: dict) -> None:
    """The behaviour the evaluation promises: equal configurations pass, distortions flagged where they act."""
    same, scaled, shifted = (results["candidates"][k] for k in ("same", "scaled", "shifted"))
    assert same["flags"] == [], same["flags"]
    scaled_flags = flagged_observables(scaled)
    assert RESPONSE <= scaled_flags
    assert not scaled_flags & SCALE_INVARIANT
    assert not {n for n in scaled_flags if n.startswith(("cog_x_l", "cog_y_l"))}
    shifted_flags = flagged_observables(shifted)
    assert DEPTH_OBSERVABLES <= shifted_flags
    assert not shifted_flags & LATERAL_CENTRES
    assert shifted["profiles"]["longitudinal"]["flagged"]


@pytest.fixture(scope="module")
def toy_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    bench, det = _bench_module(), load_detector("ild-ecal")
    ref = bench.write_toy_file(tmp / "ref.h5", det, 800, seed=1)
    other = bench.write_toy_file(tmp / "other.h5", det, 800, seed=2)
    transformed_copy(other, tmp / "scaled.h5", scale=1.05)
    transformed_copy(other, tmp / "shifted.h5", layer_shift=3)
    argv = ["evaluate", "--reference", str(ref), "-o", str(tmp / "report"), "--quiet", "--classifier-max", "400"]
    for label in ("same", "scaled", "shifted"):
        argv += ["--candidate", str(tmp / f"{label}.h5" if label != "same" else other), "--label", label]
    assert main(argv) == 0
    return tmp / "report"


def test_toy_samples_pass_and_distortions_are_flagged(toy_report):
    results = json.loads((toy_report / "metrics.json").read_text())
    check_flags(results)
    assert ENERGY_OBSERVABLES <= flagged_observables(results["candidates"]["scaled"])  # two fixed toy energies


def test_metrics_json_holds_floors_sizes_seeds_and_classifiers(toy_report):
    res = json.loads((toy_report / "metrics.json").read_text())
    assert res["seed"] == 0 and res["threshold_mev"] == 0.075 and res["reference"]["n_used"] == 800
    cand = res["candidates"]["same"]
    assert cand["n_half"] == 400 and cand["n_reference"] == 800
    w1 = cand["observables"]["e_vis"]["wasserstein1"]
    assert {"value", "floor", "floor_std", "value_full", "n_half", "n_splits", "flagged"} <= set(w1)
    assert {"low_level", "high_level"} <= set(cand["classifier"])
    assert 0.3 < cand["classifier"]["low_level"]["auc"] < 0.7
    assert {"fpd", "kpd", "correlations", "profiles", "response"} <= set(cand)
    assert len(cand["response"]["e_ratio"]["reference"]) == 2  # the toy files hold 10 and 50 GeV


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "table":
            self.tables.append(attrs.get("class", ""))

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_is_self_contained_with_decodable_pngs(toy_report):
    import matplotlib.image

    page = _Collector()
    page.feed((toy_report / "report.html").read_text())
    assert "summary" in page.tables
    assert len(page.images) >= 30
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        raw = base64.b64decode(src.split(",", 1)[1])
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(io.BytesIO(raw), format="png").ndim == 3
    text = " ".join(page.text)
    assert "FLAG" in text and "scaled" in text and "shifted" in text


def test_match_conditions_selects_equal_energy_histograms(tmp_path):
    bench, det = _bench_module(), load_detector("ild-ecal")
    ref = bench.write_toy_file(tmp_path / "ref.h5", det, 200, energies_gev=(10.0, 50.0), seed=1)
    cand = bench.write_toy_file(tmp_path / "cand.h5", det, 200, energies_gev=(10.0,), seed=2)
    res = evaluate(str(ref), [("cand", str(cand))], tmp_path / "out", classifier=False, match_conditions=True,
                   n_splits=3, log=lambda msg: None)
    assert res["warnings"] and "differ" in res["warnings"][0]
    cand_res = res["candidates"]["cand"]
    assert cand_res["n_reference"] == cand_res["n_candidate"] < 200
    assert not cand_res["conditions"]["differ"]


def test_geant4_pair(request, tmp_path):
    """Same checks on real Geant4 photon samples (fixture ``g4_pair`` from tests/conftest.py)."""
    try:
        ref, other = request.getfixturevalue("g4_pair")
    except pytest.FixtureLookupError:
        pytest.skip("no g4_pair fixture (Geant4 samples) in tests/conftest.py")
    transformed_copy(Path(other), tmp_path / "scaled.h5", scale=1.05)
    transformed_copy(Path(other), tmp_path / "shifted.h5", layer_shift=3)
    results = evaluate(str(ref), [("same", str(other)), ("scaled", str(tmp_path / "scaled.h5")),
                                  ("shifted", str(tmp_path / "shifted.h5"))], tmp_path / "report",
                       classifier_max=2000, log=lambda msg: None)
    check_flags(results)


def test_headline_figures_of_one_candidate():
    """evaluate.headline_figures: what the zoo records and sample_spread.py compare; a figure not computed is None."""
    from caloforge.evaluate import headline_figures

    results = {"candidates": {
        "a": {"classifier": {"low_level": {"auc": 0.61}, "high_level": {"auc": 0.59}},
              "fpd": {"value": 0.9, "error": 0.4, "floor": 0.6}, "flags": [{"name": "x"}, {"name": "y"}]},
        "b": {"flags": []}}}
    assert headline_figures(results, "a") == {"auc_low": 0.61, "auc_high": 0.59, "fpd": 0.9, "fpd_error": 0.4,
                                              "fpd_floor": 0.6, "flags": 2}
    assert headline_figures(results, "b") == {"auc_low": None, "auc_high": None, "fpd": None, "fpd_error": None,
                                              "fpd_floor": None, "flags": 0}
