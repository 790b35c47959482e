"""Metrics on analytic cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from caloforge import metrics as m

RNG = np.random.default_rng(42)


def test_identical_samples_give_zero():
    a = RNG.normal(size=2000)
    assert m.wasserstein1(a, a) == 0.0
    assert m.ks_statistic(a, a) == 0.0
    assert m.separation_power(a, a, m.common_edges(a)) == 0.0


def test_separation_power_of_disjoint_samples_is_one():
    a, b = RNG.uniform(0, 1, 1000), RNG.uniform(5, 6, 1000)
    assert m.separation_power(a, b, np.linspace(0, 6, 13)) == pytest.approx(1.0)


@pytest.mark.parametrize("shift", [0.5, 2.0])
def test_shifted_gaussians_give_the_shift_as_w1(shift):
    n = 20000
    a, b = RNG.normal(size=n), RNG.normal(size=n) + shift
    assert m.wasserstein1(a, b) == pytest.approx(shift, abs=5 * np.sqrt(2.0 / n))
    assert m.ks_statistic(a, b) == pytest.approx(2 * stats.norm.cdf(shift / 2) - 1, abs=0.03)


def test_frechet_distance_of_unit_gaussians_is_shift_squared():
    d, shift = 4, 1.5
    mu2 = np.zeros(d)
    mu2[0] = shift
    assert m.frechet_distance(np.zeros(d), np.eye(d), mu2, np.eye(d)) == pytest.approx(shift**2)
    a = RNG.normal(size=(20000, d))
    b = RNG.normal(size=(20000, d)) + mu2
    value, err = m.fpd(a, b, n_min=2000, n_max=20000, seed=1)
    assert value == pytest.approx(shift**2, abs=max(5 * err, 0.1))
    same, same_err = m.fpd(a, RNG.normal(size=(20000, d)), n_min=2000, n_max=20000, seed=1)
    assert abs(same) < max(5 * same_err, 0.02)


def test_frechet_distance_with_singular_covariances_matches_the_reduced_problem():
    """Layer fractions that sum to one make the covariance singular; a feature constant in both samples adds
    nothing: the distance equals the one without the dependent and the constant columns."""
    rng = np.random.default_rng(7)  # its own stream: the later tests keep theirs
    x, y = rng.dirichlet(np.ones(4), 500), rng.dirichlet([1.0, 1.2, 0.8, 1.0], 500)
    x, y = np.c_[x, np.full(500, 3.0)], np.c_[y, np.full(500, 3.0)]
    full = m.frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    xr, yr = x[:, :3], y[:, :3]
    reduced = m.frechet_distance(xr.mean(0), np.cov(xr, rowvar=False), yr.mean(0), np.cov(yr, rowvar=False))
    # the dropped fraction is minus the sum of the others: its mean and variance terms are added back
    extra_mu = (x[:, 3].mean() - y[:, 3].mean()) ** 2
    s1, s2 = np.std(x[:, 3], ddof=1), np.std(y[:, 3], ddof=1)
    assert full >= reduced - 1e-9 and full <= reduced + extra_mu + (s1 - s2) ** 2 + 1e-3
    assert np.isfinite(full)


def test_fpd_floor_with_a_feature_constant_in_one_half():
    """A feature with one value in the reference but a few others in the candidate (the deepest layer of a
    4-layer calorimeter) is scaled by 1, not by the round-off std of ~1e-17 (which made FPD floors of 1e31)."""
    rng = np.random.default_rng(8)
    a = rng.normal(size=(300, 5))
    b = rng.normal(size=(300, 5))
    a[:, 2] = np.where(np.arange(300) % 2 == 0, 0.1, np.nextafter(0.1, 1.0))  # constant up to round-off
    b[:, 2] = 0.1
    b[:3, 2] = 1.5
    value, err = m.fpd(a, b, seed=0)
    assert abs(value) < 1.0 and err < 1.0


def test_kpd_is_zero_for_equal_and_positive_for_shifted():
    a, b = RNG.normal(size=(3000, 3)), RNG.normal(size=(3000, 3))
    value, err = m.kpd(a, b, batch_size=1000, n_batches=10)
    assert abs(value) < 4 * err + 1e-3
    shifted, s_err = m.kpd(a, b + 1.0, batch_size=1000, n_batches=10)
    assert shifted > 10 * max(s_err, abs(value))


def test_mu90_sigma90_of_a_gaussian():
    a = stats.norm.ppf(0.95)
    frac = np.sqrt(1 - 2 * a * stats.norm.pdf(a) / (2 * stats.norm.cdf(a) - 1))  # sd of the central 90 %
    x = RNG.normal(10.0, 2.0, 200000)
    mu, sig = m.mu90_sigma90(x)
    assert mu == pytest.approx(10.0, abs=0.02)
    assert sig == pytest.approx(2.0 * frac, rel=0.01)
    lo, hi = m.narrowest_interval(x)
    assert (hi - lo) / 2 == pytest.approx(2.0 * a, rel=0.01)
    boot = m.bootstrap_mu90(x[:5000], n_boot=50)
    assert 0 < boot["mu90_err"] < 0.1 and 0 < boot["sigma90_err"] < 0.1


def _correlated(n: int, rho: float) -> np.ndarray:
    cov = np.array([[1.0, rho, 0.0], [rho, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return RNG.multivariate_normal(np.zeros(3), cov, n)


def test_fisher_z_detects_changed_correlation_only():
    same = m.fisher_z_test(_correlated(5000, 0.5), _correlated(5000, 0.5))
    assert same["ndf"] == 3
    assert same["p_value"] > 1e-3 and same["max_abs_z"] < 4
    changed = m.fisher_z_test(_correlated(5000, 0.5), _correlated(5000, 0.2))
    assert changed["max_abs_z"] > 10 and changed["p_value"] < 1e-6
    assert abs(changed["z"][0, 1]) == pytest.approx(changed["max_abs_z"])


def test_floor_comparison_flags_a_shift_but_not_an_equal_sample():
    ref, same, shifted = RNG.normal(size=4000), RNG.normal(size=4000), RNG.normal(size=4000) + 0.3
    splits = m.half_splits(len(ref), len(same), 10, np.random.default_rng(0))
    for metric in ("separation_power", "wasserstein1", "ks"):
        assert not m.compare_observable(ref, same, splits)[metric]["flagged"]
        assert m.compare_observable(ref, shifted, splits)[metric]["flagged"]
    res = m.compare_observable(ref, same, splits)["wasserstein1"]
    assert res["n_half"] == 2000 and res["floor"] > 0 and res["floor_std"] > 0


def test_corrected_sigmas_grow_with_the_number_of_tests():
    assert m.corrected_sigmas(1) == pytest.approx(3.0)
    assert 4.5 < m.corrected_sigmas(700) < 4.9


def test_energy_points_and_response_pulls():
    e = np.repeat([1e4, 5e4], 500)
    assert list(m.energy_points(e)) == [1e4, 5e4]
    assert m.energy_points(RNG.uniform(1e3, 1e5, 1000)) is None
    ref = m.energy_response(e, RNG.normal(0.03, 0.003, 1000), np.array([1e4, 5e4]))
    same = m.energy_response(e, RNG.normal(0.03, 0.003, 1000), np.array([1e4, 5e4]))
    scaled = m.energy_response(e, 1.05 * RNG.normal(0.03, 0.003, 1000), np.array([1e4, 5e4]))
    assert not any(r["flagged"] for r in m.compare_response(ref, same))
    assert all(r["flagged"] for r in m.compare_response(ref, scaled))


def test_matched_indices_equalise_condition_histograms():
    ref_e = np.repeat([1e4, 2e4, 5e4], [100, 300, 200])
    cand_e = np.repeat([1e4, 2e4, 5e4, 8e4], [250, 50, 200, 40])
    ir, ic = m.matched_indices(ref_e, np.zeros(600), cand_e, np.zeros(540))
    assert sorted(ref_e[ir]) == sorted(cand_e[ic])
    assert len(ir) == 100 + 50 + 200
    assert m.compare_conditions(ref_e, cand_e, np.zeros(600), np.zeros(540))["differ"]
