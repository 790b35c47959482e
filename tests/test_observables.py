"""Observables on hand-built showers with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from caloforge import observables as ob
from caloforge.detector import load_detector

DET = load_detector("ild-ecal")
SHAPE = DET.shape(False)
X, Y, Z = DET.cell_centers_mm(False)


def empty(n: int = 1, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    return np.zeros((n, *shape), np.float32)


def compute(cells: np.ndarray, shape=SHAPE, energies=None, threshold=ob.DEFAULT_THRESHOLD_MEV):
    n = len(cells)
    energies = np.full(n, 1e4) if energies is None else energies
    return ob.compute_observables(cells.reshape(n, -1), energies, np.zeros(n), DET, shape, threshold)


def test_single_hot_cell_is_its_own_centre_of_gravity():
    cells = empty()
    cells[0, 7, 3, 20] = 5.0
    o = compute(cells)
    assert o["cog_x"][0] == pytest.approx(X[3])
    assert o["cog_y"][0] == pytest.approx(Y[20])
    assert o["cog_z"][0] == pytest.approx(Z[7])
    assert o["shower_depth"][0] == pytest.approx(7.0)
    assert o["shower_depth_width"][0] == pytest.approx(0.0)
    assert o["deepest_layer"][0] == 7
    assert o["eratio_l07"][0] == pytest.approx(1.0)
    assert o["width_x_l07"][0] == pytest.approx(0.0)
    assert o["n_hits"][0] == 1
    assert o["e_vis"][0] == pytest.approx(5.0)
    assert o["e_ratio"][0] == pytest.approx(5.0 / 1e4)
    assert o["frac_l07"][0] == pytest.approx(1.0)
    assert np.isnan(o["eratio_l08"][0]) and np.isnan(o["cog_x_l08"][0])


def test_two_symmetric_cells_give_midpoint_and_half_distance_width():
    cells = empty()
    cells[0, 4, 10, 15] = 2.0
    cells[0, 4, 19, 15] = 2.0
    o = compute(cells)
    assert o["cog_x_l04"][0] == pytest.approx(0.5 * (X[10] + X[19]))
    assert o["width_x_l04"][0] == pytest.approx(0.5 * (X[19] - X[10]))
    assert o["width_y_l04"][0] == pytest.approx(0.0, abs=1e-9)
    assert o["eratio_l04"][0] == pytest.approx(0.0)


def test_eratio_of_unequal_hottest_cells():
    cells = empty()
    cells[0, 2, 5, 5], cells[0, 2, 6, 5], cells[0, 2, 9, 9] = 3.0, 1.0, 0.5
    assert compute(cells)["eratio_l02"][0] == pytest.approx((3.0 - 1.0) / 4.0)


def test_exponential_longitudinal_profile_has_the_analytic_mean_layer():
    lam, n_l = 4.0, SHAPE[0]
    q = np.exp(-1.0 / lam)
    expected = q / (1 - q) - n_l * q**n_l / (1 - q**n_l)  # mean of a truncated geometric distribution
    cells = empty()
    cells[0, :, 15, 15] = np.exp(-np.arange(n_l) / lam)
    assert ob.longitudinal_cog(cells.reshape(1, -1), DET, SHAPE)[0] == pytest.approx(expected, rel=1e-6)
    assert compute(cells, threshold=0.0)["shower_depth"][0] == pytest.approx(expected, rel=1e-6)
    assert ob.layer_energies(cells.reshape(1, -1), SHAPE)[0] == pytest.approx(cells[0, :, 15, 15])


def test_n_hits_and_threshold_are_applied_to_every_observable():
    cells = empty()
    cells[0, 0, 0, 0], cells[0, 0, 0, 1], cells[0, 1, 0, 2] = 0.05, 0.1, 0.2
    flat = cells.reshape(1, -1)
    assert ob.n_hits(flat, 0.075)[0] == 2
    assert ob.n_hits(flat, 0.0)[0] == 3
    assert ob.visible_energy(flat)[0] == pytest.approx(0.35)
    o = compute(cells, threshold=0.075)
    assert o["e_vis"][0] == pytest.approx(0.3)
    assert o["n_hits"][0] == 2


def test_sampling_weighted_energy_uses_detector_weights():
    cells = empty()
    cells[0, 5, 1, 1], cells[0, 25, 1, 1] = 1.0, 1.0
    o = compute(cells)
    assert o["e_vis"][0] == pytest.approx(2.0)
    assert o["e_vis_weighted"][0] == pytest.approx(1.0 + 2.0)  # layers 20-29 have twice the absorber


@pytest.mark.parametrize("angle", [10.0, 30.0])
def test_angle_is_recovered_from_layer_centroids(angle):
    shape = DET.shape(True)
    _, y_angled, _ = DET.cell_centers_mm(True)
    cells = empty(1, shape)
    pitch = DET.cell_size_mm
    for layer, z in enumerate(Z):
        y_true = z * np.tan(np.radians(angle)) + 1.0
        j = int(np.searchsorted(y_angled, y_true)) - 1  # y_true lies between centres j and j + 1
        w = (y_true - y_angled[j]) / pitch
        cells[0, layer, 15, j], cells[0, layer, 15, j + 1] = 1.0 - w, w
    o = compute(cells, shape=shape, threshold=0.0)
    assert o["axis_angle_y"][0] == pytest.approx(angle, abs=1e-6)


def test_radial_profile_and_spectrum_sum_to_the_energy_and_cell_count():
    rng = np.random.default_rng(0)
    cells = (rng.exponential(0.2, (5, *SHAPE)) * (rng.random((5, *SHAPE)) < 0.02)).astype(np.float32)
    prof = ob.compute_profiles(cells.reshape(5, -1), DET, SHAPE, threshold_mev=0.075)
    e_vis = compute(cells)["e_vis"]
    assert prof["radial"].sum(1) == pytest.approx(e_vis, rel=1e-5)
    assert prof["longitudinal"].sum(1) == pytest.approx(e_vis, rel=1e-5)
    edges = ob.spectrum_edges(0.075)
    flat = cells.reshape(5, -1)
    assert prof["spectrum"].sum(1) == pytest.approx(((flat >= edges[0]) & (flat < edges[-1])).sum(1))


def test_summary_streams_batches_and_subsets():
    rng = np.random.default_rng(1)

    class B:
        def __init__(self, n):
            self.energies, self.angles = np.full(n, 1e4), np.zeros(n)
            self.showers = (rng.exponential(0.2, (n, DET.n_cells())) * (rng.random((n, DET.n_cells())) < 0.02))

    s = ob.summarise([B(3), B(4)], DET, SHAPE)
    assert s.n == 7 and s.observables["e_vis"].shape == (7,)
    assert s.subset(np.array([0, 2])).n == 2
    assert s.mean_image().shape == (DET.n_cells(),)


def test_feature_matrices_standardise_and_drop_constant_columns():
    ref = {"a": np.array([1.0, 2.0, 3.0]), "b": np.ones(3), "c": np.array([0.0, np.nan, 2.0])}
    xr, xc, names = ob.feature_matrices(ref, ref, ["a", "b", "c"])
    assert names == ["a", "c"]
    assert xr.mean(0) == pytest.approx([0.0, 0.0], abs=1e-12)
    assert np.all(np.isfinite(xc))
