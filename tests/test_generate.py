"""Condition specs, ``caloforge generate`` (seeded files in the dataset format) and ``caloforge bench``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from caloforge.cli import main
from caloforge.conditions import parse_angle_spec, parse_energy_spec
from caloforge.dataset import ShowerFile
from conftest_models import toy_detector, write_toy_file


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ---- condition specs ----------------------------------------------------------------------------------
def test_energy_specs():
    rng = np.random.default_rng(0)
    fixed = parse_energy_spec("50")
    assert fixed.kind == "fixed" and fixed.bounds == (50e3, 50e3) and fixed.text == "50"
    assert np.all(fixed.sample(4, rng) == 50e3)
    uni = parse_energy_spec("10:100").sample(1000, rng)
    assert uni.min() >= 10e3 and uni.max() <= 100e3 and 50e3 < np.mean(uni) < 60e3
    log = parse_energy_spec("log:10:100")
    assert log.bounds == (10e3, 100e3)
    assert 25e3 < np.median(log.sample(2000, rng)) < 40e3  # geometric mean 31.6 GeV
    pts = parse_energy_spec("20,50,80")
    assert list(pts.sample(5, rng)) == [20e3, 50e3, 80e3, 20e3, 50e3]
    assert list(pts.sample(2, rng, offset=5)) == [80e3, 20e3]
    assert pts.bounds == (20e3, 80e3)


@pytest.mark.parametrize("text, match", [("0", "> 0"), ("-5", "> 0"), ("100:10", "LO > HI"), ("abc", "not a number"),
                                         ("", "empty"), ("log:1", "log:LO:HI"), ("1:2:3", "LO:HI")])
def test_bad_energy_specs(text, match):
    with pytest.raises(ValueError, match=match):
        parse_energy_spec(text)


def test_angle_specs():
    assert parse_angle_spec("0").bounds == (0, 0)
    assert parse_angle_spec("0:30").unit == "deg"
    for bad in ("90", "-1", "10:95", "log:1:10"):
        with pytest.raises(ValueError):
            parse_angle_spec(bad)


# ---- generate -----------------------------------------------------------------------------------------
def test_generate_cli_writes_a_seeded_dataset(model_dir, tmp_path):
    args = ["generate", "--model", str(model_dir), "-n", "25", "--energy", "20,50,80", "--angle", "0",
            "--batch-size", "10", "--seed", "3", "--quiet", "--device", "cpu"]
    assert main([*args, "-o", str(tmp_path / "a.h5")]) == 0
    assert main([*args, "-o", str(tmp_path / "b.h5")]) == 0
    with ShowerFile(tmp_path / "a.h5", expected_detector=toy_detector()) as a, ShowerFile(tmp_path / "b.h5") as b:
        assert len(a) == 25 and a.attrs["source"] == "model:layerflow" and a.attrs["particle"] == "gamma"
        assert a.attrs["seed"] == 3 and a.attrs["model"] == str(model_dir)
        assert list(a.energies[:4]) == [20e3, 50e3, 80e3, 20e3]
        ra, rb = a.read(), b.read()
        assert np.array_equal(ra.showers, rb.showers)
        assert (ra.showers >= 0).all()


def test_generate_warns_outside_training_range(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(model_dir), "-n", "4", "--energy", "300", "-o",
                 str(tmp_path / "x.h5"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("outside the training range") == 1


def test_generate_conditions_from_reference(model_dir, tmp_path):
    ref = tmp_path / "ref.h5"
    b = write_toy_file(ref, toy_detector(), 12, seed=9)
    assert main(["generate", "--model", str(model_dir), "--conditions-from", str(ref), "-o",
                 str(tmp_path / "g.h5"), "--quiet"]) == 0
    with ShowerFile(tmp_path / "g.h5") as g:
        assert np.allclose(g.energies, b.energies) and len(g) == 12


def test_generate_errors(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(model_dir), "-n", "3", "--energy", "0", "-o", str(tmp_path / "e.h5"),
                 "--quiet"]) == 2
    assert "energies must be > 0" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "none"), "-n", "3", "-o", str(tmp_path / "e.h5")]) == 2
    assert "model not found" in capsys.readouterr().err


def test_bench_cli(model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(model_dir), "--batch-sizes", "1,8", "--energies", "20,50", "--repeats", "2",
                 "--no-geant4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["batch_size"] for r in res["batch_sizes"]] == [1, 8]
    assert all(r["ms_per_shower"] > 0 for r in res["batch_sizes"])
    assert [r["energy_gev"] for r in res["per_energy"]] == [20, 50]
    assert res["per_energy"][0]["geant4_ms_per_shower"] is None
    assert "ms/shower" in capsys.readouterr().out


def test_steps_and_solver_reach_ode_models_and_are_refused_elsewhere(tmp_path, capsys):
    """``generate --steps/--solver`` set the ODE steps of a cfm model (recorded in the file; other steps, other
    showers) and are refused with a clear error for one-pass families; ``bench`` takes them too."""
    import h5py

    from caloforge.models import save_model
    from conftest_models import tiny_model, toy_showers

    det = toy_detector()
    data = toy_showers(det, 20, seed=1)
    for family in ("cfm", "layerflow"):
        save_model(tiny_model(family, det, data), tmp_path / family)
    common = ["-n", "4", "--energy", "20:60", "--seed", "2", "--quiet", "--device", "cpu"]
    for steps in (1, 3):
        assert main(["generate", "--model", str(tmp_path / "cfm"), "--steps", str(steps), "--solver", "euler",
                     "-o", str(tmp_path / f"c{steps}.h5"), *common]) == 0
    with h5py.File(tmp_path / "c1.h5") as a, h5py.File(tmp_path / "c3.h5") as b:
        assert a.attrs["sampling_steps"] == 1 and b.attrs["sampling_steps"] == 3
        assert a.attrs["sampling_solver"] == "euler"
        assert not np.array_equal(a["showers"][:], b["showers"][:])
    assert main(["generate", "--model", str(tmp_path / "layerflow"), "--steps", "4", "-o", str(tmp_path / "l.h5"),
                 *common]) == 2
    assert "only families that integrate an ODE" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "cfm"), "--steps", "0", "-o", str(tmp_path / "z.h5"),
                 *common]) == 2
    assert main(["generate", "--model", str(tmp_path / "cfm"), "--solver", "rk99", "-o", str(tmp_path / "z.h5"),
                 *common]) == 2
    assert not (tmp_path / "z.h5").exists() and not (tmp_path / "l.h5").exists()
    assert main(["bench", "--model", str(tmp_path / "cfm"), "--steps", "2", "--batch-sizes", "2", "--energies", "30",
                 "--repeats", "2", "--no-geant4"]) == 0
