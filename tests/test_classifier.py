"""Classifier two-sample test: ~0.5 for equal samples, ~1 for clearly different ones."""

from __future__ import annotations

import numpy as np
import pytest

from caloforge import classifier as c
from caloforge.dataset import ShowerFile, write_showers
from caloforge.detector import load_detector

FAST = c.config_for("small", hidden=(32, 32), epochs=8)


def _rows(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.vstack([a, b]).astype(np.float32), np.repeat(np.array([0.0, 1.0], np.float32), [len(a), len(b)])


def test_equal_distributions_give_auc_near_half():
    rng = np.random.default_rng(0)
    x, y = _rows(rng.normal(size=(2000, 10)), rng.normal(size=(2000, 10)))
    r = c.two_sample_test(x, y, FAST, seed=3)
    assert abs(r.auc - 0.5) < 4 * r.auc_null_std
    assert r.jsd < 0.05
    assert not r.flagged
    assert (r.n_train, r.n_val, r.n_test) == (2400, 800, 800)


def test_different_distributions_give_auc_near_one():
    rng = np.random.default_rng(1)
    x, y = _rows(rng.normal(size=(2000, 10)), rng.normal(size=(2000, 10)) + 3.0)
    r = c.two_sample_test(x, y, FAST, seed=3)
    assert r.auc > 0.98 and r.jsd > 0.8 and r.flagged
    assert 1 <= r.best_epoch <= r.epochs_run


def test_split_is_seeded_and_disjoint():
    a, b = c.split_indices(100, 7), c.split_indices(100, 7)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert len(np.unique(np.concatenate(a))) == 100 and [len(p) for p in a] == [60, 20, 20]


def test_calibrated_jsd_limits():
    y = np.repeat([0.0, 1.0], 500)
    assert c.calibrated_jsd(y.copy(), y) == pytest.approx(1.0, abs=1e-3)
    assert c.calibrated_jsd(np.full(1000, 0.5), y) == pytest.approx(0.0, abs=1e-6)


def test_challenge_size_matches_the_calochallenge_setup():
    cfg = c.SIZES["challenge"]
    assert cfg.hidden == (2048, 2048) and cfg.lr == 2e-4 and cfg.epochs == 50 and cfg.batch_size == 1000


def test_low_level_inputs_stream_balanced_rows(tmp_path):
    det = load_detector("ild-ecal")
    rng = np.random.default_rng(2)
    for name, n in (("a.h5", 30), ("b.h5", 20)):
        showers = (rng.exponential(0.2, (n, det.n_cells())) * (rng.random((n, det.n_cells())) < 0.01))
        write_showers(tmp_path / name, det, rng.choice([1e4, 5e4], n), np.zeros(n), showers)
    with ShowerFile(tmp_path / "a.h5") as fa, ShowerFile(tmp_path / "b.h5") as fb:
        x, y = c.low_level_inputs(fa, fb, n_max=100, seed=0)
    assert x.shape == (40, det.n_cells() + 1) and x.dtype == np.float32
    assert y.sum() == 20
    assert x[:, -1].mean() == pytest.approx(0.0, abs=1e-5) and x[:, -1].std() == pytest.approx(1.0, rel=1e-4)
