"""The seed-style reconstruction (axis, angle, impact point, calibrated energy), the grid-point rule, and the
grid-point and label checks of `caloforge evaluate`: hand-made showers with known answers, synthetic samples that
must pass or fail, and tiny Geant4 files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from caloforge.conditions import Conditions
from caloforge.detector import load_detector
from caloforge.gridpoints import (
    GRID_QUANTITIES,
    SampleData,
    evaluate_seed_manner,
    grid_points,
    label_fit,
    point_mask,
)
from caloforge.reconstruction import Reconstruction, Window, fit_axis, fit_calibration, reconstruct

DET = load_detector("ild-ecal")


def pencil_showers(window: Window, angles_deg, x0, y0, layer_energy: np.ndarray | None = None) -> np.ndarray:
    """Showers (N, L, X, Y) whose layer centroids lie exactly on the axis (x0 + 0 z, y0 + tan(a) z): each layer's
    energy is shared bilinearly between the four cell centres around the axis point."""
    n, (n_l, n_x, n_y) = len(angles_deg), window.shape
    e_l = np.linspace(5.0, 20.0, n_l) if layer_energy is None else layer_energy
    out = np.zeros((n, n_l, n_x, n_y), np.float64)
    pitch = window.x[1] - window.x[0]
    for i, (a, x, y) in enumerate(zip(angles_deg, x0, y0)):
        for layer, z in enumerate(window.z):
            px, py = x, y + np.tan(np.radians(a)) * z
            fx, fy = (px - window.x[0]) / pitch, (py - window.y[0]) / pitch
            ix, iy = int(np.floor(fx)), int(np.floor(fy))
            tx, ty = fx - ix, fy - iy
            for dx, wx in ((0, 1 - tx), (1, tx)):
                for dy, wy in ((0, 1 - ty), (1, ty)):
                    out[i, layer, ix + dx, iy + dy] += e_l[layer] * wx * wy
    return out.astype(np.float32)


@pytest.mark.parametrize("angled", [False, True])
def test_pencil_showers_give_back_angle_and_impact_point(angled):
    window = Window.from_detector(DET, DET.shape(angled))
    angles = np.array([0.0, 0.0, 3.0]) if not angled else np.array([10.0, 30.0, 50.0])
    x0, y0 = np.array([1.3, -7.2, 12.0]), np.array([2.7, 0.4, -3.3])
    reco = reconstruct(pencil_showers(window, angles, x0, y0), window, threshold_mev=0.0)
    np.testing.assert_allclose(reco.angle, angles, atol=1e-3)
    np.testing.assert_allclose(reco.x0, x0, atol=1e-3)
    np.testing.assert_allclose(reco.y0, y0, atol=1e-3)
    np.testing.assert_allclose(reco.slope_x, 0.0, atol=1e-5)
    assert np.all(reco.n_fit_layers == DET.n_layers)


def test_axis_fit_ignores_layers_below_one_percent():
    """A faint stray deposit far from the axis (0.5 % of the shower, alone in layer 0) is left out of the fit."""
    window = Window.from_detector(DET, DET.shape(True))
    e_l = np.linspace(5.0, 20.0, DET.n_layers)
    e_l[0] = 0.0
    cells = pencil_showers(window, [30.0], [2.0], [1.0], e_l)
    cells[0, 0, 0, -1] = 0.005 * cells.sum()
    reco = reconstruct(cells, window, threshold_mev=0.0)
    assert reco.angle[0] == pytest.approx(30.0, abs=1e-3) and reco.y0[0] == pytest.approx(1.0, abs=1e-3)
    naive = reconstruct(cells, window, threshold_mev=0.0, min_fraction=0.0)
    assert abs(naive.y0[0] - 1.0) > 1.0  # without the cut the stray deposit pulls the axis


def test_undefined_axis_is_nan():
    window = Window.from_detector(DET)
    cells = np.zeros((2, *window.shape), np.float32)
    cells[0, 5, 10, 10] = 3.0  # one layer only: no slope
    reco = reconstruct(cells, window)
    assert np.isnan(reco.angle).all() and np.isnan(reco.x0).all()
    assert reco.e_vis[0] == pytest.approx(3.0) and reco.e_vis[1] == 0.0


def test_weighted_energy_uses_sampling_weights_and_threshold():
    window = Window.from_detector(DET)
    cells = np.zeros((1, *window.shape), np.float32)
    cells[0, 0, 3, 3], cells[0, 25, 4, 4], cells[0, 10, 5, 5] = 1.0, 1.0, 0.05  # last one below 0.075 MeV
    reco = reconstruct(cells.reshape(1, -1), window)
    assert reco.e_vis[0] == pytest.approx(2.0) and reco.e_vis_weighted[0] == pytest.approx(3.0)  # weight 2 deep


def test_fit_axis_weights_by_layer_energy():
    """Centroids (z, y) = (0, 0), (10, 0), (20, 10) with energies 10, 10, 100: the weighted least-squares slope is
    300/510 (unweighted: 0.5); a fourth layer with 0.4 % of the energy, far off the line, is ignored."""
    z = np.array([0.0, 10.0, 20.0, 30.0])
    e = np.array([[10.0, 10.0, 100.0, 0.5]])
    out = fit_axis(e, np.zeros((1, 4)), np.array([[0.0, 0.0, 10.0, -50.0]]), z)
    assert out["slope_y"][0] == pytest.approx(300 / 510) and out["n_layers"][0] == 3
    assert out["y0"][0] == pytest.approx((1000 - 300 / 510 * 2100) / 120)


def test_calibration_recovers_known_scale_per_particle():
    rng = np.random.default_rng(1)
    e_true = rng.choice([20e3, 50e3, 80e3], 4000)
    pdg = np.repeat([22, 11], 2000)
    fraction = np.where(pdg == 22, 0.030, 0.034)
    e_w = e_true * fraction * rng.normal(1.0, 0.03, len(e_true))
    cal = fit_calibration(e_true, e_w, pdg)
    assert cal.constants[22] == pytest.approx(1 / 0.030, rel=2e-3)
    assert cal.constants[11] == pytest.approx(1 / 0.034, rel=2e-3)
    assert np.mean(cal.apply(e_w, pdg) / e_true) == pytest.approx(1.0, abs=1e-9)
    assert np.mean(cal.apply(1.05 * e_w, pdg) / e_true) == pytest.approx(1.05, abs=1e-9)  # judged with ref's c
    assert cal.apply(np.array([1.0]), np.array([-11]))[0] == pytest.approx(cal.pooled)  # unknown particle


def grid_conditions(energies=(20e3, 50e3, 80e3), angles=(10.0, 30.0, 50.0), pdgs=(22, 11), n=60) -> Conditions:
    e, a, p = (g.ravel() for g in np.meshgrid(energies, angles, pdgs, indexing="ij"))
    rng = np.random.default_rng(0)
    k = len(e) * n
    return Conditions(np.tile(e, n), np.tile(a, n), rng.uniform(0, 5, k), rng.uniform(0, 5, k), np.tile(p, n))


def test_grid_rule():
    c = grid_conditions()
    points, skipped = grid_points(c)
    assert len(points) == 18 and not skipped
    assert all(point_mask(c, p).sum() == 60 for p in points)
    extra = Conditions.concat([c, Conditions.make(np.full(10, 30e3), 10.0, particle="gamma")])
    points, skipped = grid_points(extra)
    assert len(points) == 18 and len(skipped) == 1 and skipped[0]["n"] == 10
    assert grid_points(grid_conditions(n=49)) is None  # no point with 50 showers
    assert grid_points(grid_conditions(n=49), min_showers=49) is not None
    e30 = np.linspace(10e3, 100e3, 30)
    assert len(grid_points(grid_conditions(energies=e30, angles=(0.0,), pdgs=(22,)))[0]) == 30
    e31 = np.linspace(10e3, 100e3, 31)
    assert grid_points(grid_conditions(energies=e31, angles=(0.0,), pdgs=(22,))) is None  # continuous
    float32_copy = Conditions(c.energy.astype(np.float32), c.angle.astype(np.float32), c.x, c.y, c.pdg)
    assert all(point_mask(float32_copy, p).sum() == 60 for p in points)  # round trip through float32


def synthetic_sample(c: Conditions, seed: int, angle_shift: float = 0.0, scale: float = 1.0) -> SampleData:
    """Per-row observables and reconstruction drawn around known truths (no showers needed)."""
    rng = np.random.default_rng(seed)
    n = len(c)
    e_w = 0.03 * c.energy * rng.normal(1.0, 0.02, n) * scale
    reco = Reconstruction(
        e_vis=e_w * 0.9, e_vis_weighted=e_w, angle=c.angle + angle_shift + rng.normal(0, 2.0, n),
        x0=c.x + rng.normal(0, 1.0, n), y0=c.y + rng.normal(0, 1.0, n), slope_x=np.zeros(n),
        slope_y=np.tan(np.radians(c.angle)), n_fit_layers=np.full(n, 20.0))
    obs = {"n_hits": rng.poisson(c.energy / 100).astype(float), "hit_e_mean": rng.normal(1.0, 0.1, n),
           "cog_z": rng.normal(40.0, 5.0, n), "r_mean": rng.normal(8.0, 1.0, n)}
    return SampleData(c, obs, reco)


def test_grid_and_label_checks_pass_equal_samples_and_flag_distortions():
    c = grid_conditions(energies=(20e3, 80e3), angles=(10.0, 40.0), n=100)
    ref = synthetic_sample(c, 1)
    cands = {"same": synthetic_sample(c, 2), "tilted": synthetic_sample(c, 3, angle_shift=1.5),
             "scaled": synthetic_sample(c, 4, scale=1.03)}
    out = evaluate_seed_manner(ref, cands, seed=0)
    assert len(out["grid"]["points"]) == 8
    point = out["grid"]["points"][0]
    assert set(point["stats"]) == {"reference", "same", "tilted", "scaled"}
    assert {q for q, _, _ in GRID_QUANTITIES} <= set(point["stats"]["reference"])
    same, tilted, scaled = (out["comparisons"][k] for k in ("same", "tilted", "scaled"))
    assert same["grid"]["n_flagged"] == 0 and same["labels"]["n_flagged"] == 0
    assert same["grid"]["n_tests"] == 8 * len(GRID_QUANTITIES)
    flagged = {(r["quantity"], r["statistic"]) for r in tilted["grid"]["rows"] if r["flagged"]}
    assert flagged == {("angle", "mean")}
    assert {(r["label"], r["statistic"]) for r in tilted["labels"]["rows"] if r["flagged"]} == {("angle", "bias")}
    flagged = {(r["quantity"], r["statistic"]) for r in scaled["grid"]["rows"] if r["flagged"]}
    assert ("e_cal_response", "mu90") in flagged and ("e_vis", "mu90") in flagged
    assert not flagged & {("angle", "mean"), ("n_hits", "mean"), ("cog_z", "mean")}
    labels = out["labels"]["fits"]["reference"]
    assert labels["x"]["slope"] == pytest.approx(1.0, abs=0.05)
    assert labels["x"]["residual_rms"] == pytest.approx(1.0, abs=0.05)
    assert labels["energy"]["slope"] == pytest.approx(1.0, abs=0.01)


def test_label_fit_without_spread_in_truth_reports_bias_and_spread():
    rng = np.random.default_rng(0)
    f = label_fit(np.zeros(500), 0.5 + rng.normal(0, 2.0, 500), rng)
    assert not f["truth_varies"] and np.isnan(f["slope"])
    assert f["bias"] == pytest.approx(0.5, abs=0.3) and f["residual_rms"] == pytest.approx(2.0, rel=0.1)


# ---- Geant4 ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def g4_angles(tmp_path_factory):
    """Two tiny Geant4 photon samples at 2 GeV, 10 and 40 degrees, impact uniform in one cell."""
    from caloforge.simulate import simulate

    root = tmp_path_factory.mktemp("g4grid")
    return [simulate("ild-ecal", "gamma", "2", "10,40", 24, seed, root / f"g{seed}.h5", workers=1, chunk_size=24,
                     quiet=True, position="cell") for seed in (1, 2)]


def test_geant4_reconstruction_follows_the_true_axis(g4_angles):
    from caloforge.dataset import ShowerFile

    with ShowerFile(g4_angles[0]) as f:
        b = f.read()
        reco = reconstruct(b.showers, Window.from_detector(f.detector, f.n_cells))
    c = b.conditions
    for angle in (10.0, 40.0):
        sel = c.angle == angle
        assert abs(np.nanmedian(reco.angle[sel]) - angle) < 6.0
    assert np.nanmedian(np.abs(reco.x0 - c.x)) < 3.0 and np.nanmedian(np.abs(reco.y0 - c.y)) < 4.0
    cal = fit_calibration(c.energy, reco.e_vis_weighted, c.pdg)
    assert 25.0 < cal.constants[22] < 36.0  # about 3 % sampling fraction (house-detector notes)


def test_geant4_grid_section_from_streamed_files(g4_angles):
    """The path `caloforge evaluate` takes (batches tapped while summarising), without the report."""
    from caloforge.dataset import ShowerFile
    from caloforge.evaluate import reconstruction_collector, summarise_file
    from caloforge.gridpoints import add_to_results
    from caloforge.observables import as_geometry

    samples = []
    for path in g4_angles:
        with ShowerFile(path) as f:
            collector = reconstruction_collector(f, None, 0.075)
            summary = summarise_file(f, as_geometry(f.detector, f.shape), 0.075, np.arange(len(f)), 10,
                                     on_batch=collector)
            samples.append(collector.sample_data(summary))
    results = {"reference": {"label": "reference"}, "candidates": {"b": {"flags": [], "n_flags": 0}}}
    add_to_results(results, samples[0], {"b": samples[1]}, min_showers=10)
    assert [(p["energy"], p["angle"]) for p in results["grid"]["points"]] == [(2000.0, 10.0), (2000.0, 40.0)]
    assert results["candidates"]["b"]["grid"]["n_tests"] == 2 * len(GRID_QUANTITIES)
    assert results["candidates"]["b"]["n_flags"] == len(results["candidates"]["b"]["flags"])


@pytest.mark.slow
def test_geant4_grid_section_through_caloforge_evaluate(g4_angles, tmp_path):
    from caloforge.cli import main

    out = tmp_path / "report"
    argv = ["evaluate", "--reference", str(g4_angles[0]), "--candidate", str(g4_angles[1]), "--label", "g4b",
            "--no-classifier", "--splits", "2", "--grid-min-showers", "10", "-o", str(out), "--quiet"]
    assert main(argv) == 0
    res = json.loads((out / "metrics.json").read_text())
    grid = res["grid"]
    assert [(p["particle"], p["angle"]) for p in grid["points"]] == [("gamma", 10.0), ("gamma", 40.0)]
    assert grid["points"][0]["n"] == {"reference": 12, "g4b": 12}
    assert grid["points"][1]["stats"]["reference"]["angle"]["mean"] > grid["points"][0]["stats"]["reference"][
        "angle"]["mean"] + 15
    assert res["candidates"]["g4b"]["grid"]["n_tests"] > 0
    assert set(res["labels"]["fits"]["g4b"]) == {"x", "y", "angle", "energy"}
    assert "22" in res["reconstruction"]["calibration"]["per_pdg"]
    page = (out / "report.html").read_text()
    assert "Grid points and label checks" in page and "angular response" in page
