"""caloforge digitize: seeded, reproducible detector effects (noise, threshold, dead cells, calibration)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from caloforge.cli import main
from caloforge.conditions import Conditions
from caloforge.dataset import read_showers, write_showers
from caloforge.digitize import (
    DetectorEffects,
    EffectsError,
    calibration_factors,
    dead_cell_map,
    digitize_file,
    effects_of_file,
    load_effects,
)
from conftest_models import toy_detector, write_toy_file

NONE = dict(noise_mev=0.0, threshold_mev=0.0, dead_fraction=0.0, calibration="")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("dig") / "toy.h5"
    return path, write_toy_file(path, toy_detector(), 60, seed=4)


def _constant_file(path, value: float, n: int = 200, det=None):
    det = det or toy_detector()
    showers = np.full((n, det.n_cells()), value, np.float32)
    write_showers(path, det, Conditions.make(np.full(n, 5e4), np.zeros(n)), showers, attrs={"particle": "gamma"})
    return path


def _digitize(src, dst, **kw):
    digitize_file(src, dst, DetectorEffects(**kw))
    return read_showers(dst).showers


def test_same_seed_same_output_other_seed_differs(toy, tmp_path):
    src, _ = toy
    fx = dict(noise_mev=0.015, threshold_mev=0.075, dead_fraction=0.05, calibration="0-1=1.1")
    a = _digitize(src, tmp_path / "a.h5", seed=1, **fx)
    b = _digitize(src, tmp_path / "b.h5", seed=1, **fx)
    c = _digitize(src, tmp_path / "c.h5", seed=2, **fx)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # the noise of row i is its own stream: the output does not depend on the batch size
    digitize_file(src, tmp_path / "d.h5", DetectorEffects(seed=1, **fx), batch_size=7)
    np.testing.assert_array_equal(a, read_showers(tmp_path / "d.h5").showers)


def test_noise_has_the_configured_sigma(tmp_path):
    src = _constant_file(tmp_path / "const.h5", 10.0)
    out = _digitize(src, tmp_path / "noisy.h5", **{**NONE, "noise_mev": 0.5}, seed=3)
    resid = out.astype(np.float64) - 10.0  # 200 x 144 draws: the sigma is known to 0.4 %
    assert abs(resid.std() / 0.5 - 1) < 0.02
    assert abs(resid.mean()) < 0.01


def test_threshold_zeroes_at_and_below(toy, tmp_path):
    src, b = toy
    out = _digitize(src, tmp_path / "thr.h5", **{**NONE, "threshold_mev": 0.5})
    assert np.all(out[b.showers <= 0.5] == 0)
    np.testing.assert_array_equal(out[b.showers > 0.5], b.showers[b.showers > 0.5])
    assert (b.showers[(b.showers > 0) & (b.showers <= 0.5)]).size > 0  # the toy has cells below the cut


def test_dead_cells_read_zero_and_are_recorded(tmp_path):
    src = _constant_file(tmp_path / "const.h5", 1.0, n=20)
    out = _digitize(src, tmp_path / "dead.h5", **{**NONE, "dead_fraction": 0.1}, seed=5)
    dead = out[0] == 0
    assert 0.03 < dead.mean() < 0.2
    assert np.all(out[:, dead] == 0) and np.all(out[:, ~dead] == 1.0)  # a fixed map: the same cells in every row
    with h5py.File(tmp_path / "dead.h5") as f:
        cells = np.array(json.loads(f.attrs["dead_cells"]))
        assert json.loads(f.attrs["detector_effects"])["dead_fraction"] == 0.1
    shape = toy_detector().shape()
    assert sorted(np.ravel_multi_index(cells.T, shape)) == list(np.flatnonzero(dead))
    # an explicit map
    out = _digitize(src, tmp_path / "dead2.h5", **NONE, dead_cells=((0, 1, 2), (3, 0, 0)))
    assert np.flatnonzero(out[0] == 0).tolist() == [np.ravel_multi_index((0, 1, 2), shape),
                                                    np.ravel_multi_index((3, 0, 0), shape)]


def test_dead_map_shared_by_normal_and_angled_windows():
    det = toy_detector(n_y_angled=12)
    cells = dead_cell_map(DetectorEffects(dead_fraction=0.2, seed=9), det)
    assert cells[:, 2].max() >= 6  # drawn over the angled window; the normal window sees those with iy < 6
    again = dead_cell_map(DetectorEffects(dead_fraction=0.2, seed=9, noise_mev=1.0), det)
    np.testing.assert_array_equal(cells, again)


def test_calibration_scales_layers(toy, tmp_path):
    src, b = toy
    out = _digitize(src, tmp_path / "cal.h5", **{**NONE, "calibration": "0=1.1,2-3=0.9"})
    n_l = toy_detector().n_layers
    ratio = out.reshape(len(out), n_l, -1).sum((0, 2)) / b.showers.reshape(len(out), n_l, -1).sum((0, 2))
    np.testing.assert_allclose(ratio, [1.1, 1.0, 0.9, 0.9], rtol=1e-5)
    np.testing.assert_allclose(calibration_factors("1.02", 3), [1.02] * 3)
    np.testing.assert_allclose(calibration_factors((1.0, 2.0, 3.0), 3), [1, 2, 3])


@pytest.mark.parametrize("spec, match", [("0-9=1.1", "within 0-3"), ("a=1", "a layer"), ("0=-1", "factor"),
                                         ("0=nan", "factor"), ("1.1,2", "factor"), ("0:1.1", "factor")])
def test_bad_calibration_specs(spec, match):
    with pytest.raises(EffectsError, match=match):
        calibration_factors(spec, 4)


def test_toml_config_and_cli(toy, tmp_path, capsys):
    src, _ = toy
    cfg = tmp_path / "fx.toml"
    cfg.write_text('noise_mev = 0.02\nthreshold_mev = 0.1\ndead_fraction = 0.01\ncalibration = [1.1, 1, 1, 1]\n'
                   'seed = 7\n')
    fx = load_effects(cfg)
    assert fx.calibration == (1.1, 1, 1, 1) and fx.seed == 7
    out = tmp_path / "out.h5"
    assert main(["digitize", str(src), "-o", str(out), "--config", str(cfg), "--threshold-mev", "0.2", "-q"]) == 0
    got = effects_of_file(out)
    assert got.threshold_mev == 0.2 and got.noise_mev == 0.02 and got.seed == 7
    direct = tmp_path / "direct.h5"
    digitize_file(src, direct, DetectorEffects(noise_mev=0.02, threshold_mev=0.2, dead_fraction=0.01,
                                               calibration=(1.1, 1, 1, 1), seed=7))
    np.testing.assert_array_equal(read_showers(out).showers, read_showers(direct).showers)
    # refusals: one line, exit status 2
    capsys.readouterr()
    assert main(["digitize", str(out), "-o", str(tmp_path / "again.h5")]) == 2
    assert "already digitized" in capsys.readouterr().err
    assert main(["digitize", str(src), "-o", str(out)]) == 2  # exists
    assert main(["digitize", str(src), "-o", str(tmp_path / "x.h5"), "--noise-mev", "-1"]) == 2
    assert "noise_mev" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text("nosie_mev = 0.1\n")
    assert main(["digitize", str(src), "-o", str(tmp_path / "x.h5"), "--config", str(tmp_path / "bad.toml")]) == 2
    assert "unknown key 'nosie_mev'" in capsys.readouterr().err
    assert main(["digitize", str(src), "-o", str(tmp_path / "x.h5"), "--calibration", "0-40=1.1"]) == 2
    assert "calibration" in capsys.readouterr().err
