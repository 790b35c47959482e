"""Fast simulation inside a Geant4 run: which particles the model replaces, where their energy lands, the files."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from caloforge.cli import main
from caloforge.dataset import read_showers
from caloforge.detector import load_detector
from caloforge.fastsim import FastSim
from caloforge.models import load_model

DET = load_detector("ild-ecal")

# One Geant4 per process: the in-process checks run in a fresh interpreter that prints JSON.
_EVENTS = r"""
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
from caloforge.conditions import Conditions
from caloforge.detector import load_detector
from caloforge.fastsim import FastSim
from caloforge.geant4_app import Geant4App
det = load_detector("ild-ecal")
fs = FastSim.load("multi", det, seed=11)
app = Geant4App(det, fastsim=fs)
# event 0: a 40 GeV photon (fast) and a 3 GeV photon (below the 10 GeV threshold: Geant4)
# event 1: a 10 GeV positron (the model knows gamma and e- only: Geant4) and a 20 GeV electron at 30 degrees (fast)
c = Conditions(np.array([40e3, 3e3, 10e3, 20e3]), np.array([0, 0, 0, 30.0]), np.array([2.0, -40.0, 40.0, -2.0]),
               np.array([1.0, -40.0, 0.0, 3.0]), np.array([22, 22, -11, 11]))
out = app.simulate(c, seed=5, angled=True, multiplicity=2)
rec = app.last_records
fs._calls = 0  # the same model call again: the fast showers alone
model = fs.showers(rec, angled=True)
fast_event = rec["event"][rec["reason"] == 0]
fs.enabled = False
full = app.simulate(c, seed=5, angled=True, multiplicity=2)
json.dump({"out": out.tolist(), "model": model.tolist(), "fast_event": fast_event.tolist(),
           "records": {k: v.tolist() for k, v in rec.items()}, "full_reasons": app.last_records["reason"].tolist(),
           "full": full.tolist()}, sys.stdout)
"""


@pytest.fixture(scope="module")
def events():
    proc = subprocess.run([sys.executable, "-c", _EVENTS], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(proc.stdout[proc.stdout.index("{"):])
    return {k: (np.asarray(v) if not isinstance(v, dict) else {a: np.asarray(b) for a, b in v.items()})
            for k, v in d.items()}


def _cells(showers: np.ndarray) -> np.ndarray:
    return showers.reshape(len(showers), DET.n_layers, *DET.shape(True)[1:])


def test_particles_above_threshold_are_replaced_the_others_tracked(events):
    rec = events["records"]
    by_pdg_energy = {(int(p), round(float(e))): int(r) for p, e, r in zip(rec["pdg"], rec["energy"], rec["reason"])}
    assert by_pdg_energy == {(22, 40000): 0, (22, 3000): 2, (-11, 10000): 1, (11, 20000): 0}
    assert sorted(rec["event"].tolist()) == [0, 0, 1, 1]
    i = int(np.flatnonzero(rec["pdg"] == 11)[0])  # the electron came in at 30 degrees, at its impact point
    assert rec["angle"][i] == pytest.approx(30.0, abs=1e-6) and abs(rec["xtilt"][i]) < 1e-6
    assert (rec["x"][i], rec["y"][i]) == pytest.approx((-2.0, 3.0), abs=1e-6)
    assert set(events["full_reasons"].tolist()) == {6}  # the same application with fast simulation off


def test_fast_energy_is_the_models_and_lands_at_the_impact(events):
    out, model, fast_event = events["out"], events["model"], events["fast_event"]
    assert len(model) == 2 and sorted(fast_event.tolist()) == [0, 1]
    rec = events["records"]
    # Geant4 deposits nothing for a killed particle: what the event holds beyond its Geant4-tracked particles is
    # the model's shower. The Geant4-tracked particles hit 40 mm away, so near the fast impact point the event is
    # the model's shower (but for a few stray photons of the other shower).
    cell = DET.cell_size_mm
    nx, ny = DET.shape(True)[1:]
    xs = DET.readout.x_min_mm + cell * (np.arange(nx) + 0.5)
    ys = DET.readout.y_min_mm + cell * (np.arange(ny) + 0.5)
    for k, ev in enumerate(fast_event):
        j = np.flatnonzero(rec["reason"] == 0)[k]
        near = (np.abs(xs[:, None] - rec["x"][j]) < 20) & (np.abs(ys[None, :] - rec["y"][j] - 60) < 80)
        ev_cells, m_cells = _cells(out[ev:ev + 1])[0], _cells(model[k:k + 1])[0]
        assert m_cells[:, near].sum() > 0.9 * m_cells.sum()
        assert np.abs(ev_cells[:, near] - m_cells[:, near]).sum() < 0.01 * m_cells[:, near].sum()
        # the first ten layers are centred on the particle's line of flight: their energy-weighted offset from it
        # (each layer against the axis at its depth) within a cell (one shower: a sparse front layer alone scatters
        # by a cell or more)
        sx = sy = total = 0.0
        for layer, z in enumerate(DET.layer_z_mm()[:10]):
            e = m_cells[layer]
            y_axis = rec["y"][j] + np.tan(np.radians(rec["angle"][j])) * z
            sx += (e.sum(1) * (xs - rec["x"][j])).sum()
            sy += (e.sum(0) * (ys - y_axis)).sum()
            total += e.sum()
        assert total > 10.0 and abs(sx / total) < cell and abs(sy / total) < cell, (sx / total, sy / total)


def test_tracked_particles_deposit_through_geant4(events):
    out, full = events["out"], events["full"]
    cell = DET.cell_size_mm
    nx, ny = DET.shape(True)[1:]
    xs = DET.readout.x_min_mm + cell * (np.arange(nx) + 0.5)
    ys = DET.readout.y_min_mm + cell * (np.arange(ny) + 0.5)
    c0 = _cells(out[:1])[0]
    around = (np.abs(xs[:, None] + 40) < 15) & (np.abs(ys[None, :] + 40) < 15)  # the 3 GeV photon's region
    assert c0[:, around].sum() > 0.01 * 3000  # a Geant4 shower (visible fraction ~3 %), not the model's
    c1 = _cells(out[1:2])[0]
    around = (np.abs(xs[:, None] - 40) < 15) & (np.abs(ys[None, :]) < 15)  # the positron's region
    assert c1[:, around].sum() > 0.01 * 10000
    # full simulation of the same events in the same application puts Geant4 showers where the model's were
    assert full.sum(1) == pytest.approx(out.sum(1), rel=0.3)


def test_fastsim_acceptance_rules(model_dir):
    fs = FastSim(load_model("multi"), max_xtilt_deg=1.0)
    assert fs.threshold_mev == 10e3 and fs.pdgs == {22, 11}
    assert fs.reason(22, 50e3, 10.0, 0.0, 1.0, 1.0) == 0
    assert fs.reason(-11, 50e3, 10.0, 0.0, 1.0, 1.0) == 1  # e+: not trained
    assert fs.reason(22, 5e3, 10.0, 0.0, 1.0, 1.0) == 2
    assert fs.reason(22, 150e3, 10.0, 0.0, 1.0, 1.0) == 3
    assert fs.reason(22, 50e3, 70.0, 0.0, 1.0, 1.0) == 4
    assert fs.reason(22, 50e3, -5.0, 0.0, 1.0, 1.0) == 4
    assert fs.reason(22, 50e3, 10.0, 3.0, 1.0, 1.0) == 4
    assert fs.reason(22, 50e3, 10.0, 0.0, 500.0, 1.0) == 5
    default = FastSim(load_model("default"))  # trained at the origin only
    assert default.reason(22, 50e3, 0.0, 0.0, 0.0, 0.0) == 0 and default.reason(22, 50e3, 0.0, 0.0, 1.0, 0.0) == 5
    with pytest.raises(ValueError, match="threshold"):
        FastSim(load_model("multi"), threshold_mev=-1.0)
    with pytest.warns(UserWarning, match="extrapolations"):
        FastSim(load_model("multi"), threshold_mev=1e3)


def test_simulate_fastsim_file_is_reproducible_and_records_particles(tmp_path):
    args = ["simulate", "--fastsim", "multi", "--energy", "5,50", "--angle", "0,20", "--position", "cell", "-n", "6",
            "--chunk-size", "3", "--seed", "4", "--quiet"]
    assert main([*args, "--workers", "1", "-o", str(tmp_path / "a.h5")]) == 0
    assert main([*args, "--workers", "2", "-o", str(tmp_path / "b.h5")]) == 0
    a, b = read_showers(tmp_path / "a.h5"), read_showers(tmp_path / "b.h5")
    assert np.array_equal(a.showers, b.showers) and a.showers.shape == (6, DET.n_cells(True))
    with h5py.File(tmp_path / "a.h5") as f:
        assert f.attrs["source"] == "geant4+fastsim" and f.attrs["fastsim_model"] == "multi"
        g = f["fastsim"]
        assert g["event"][:].tolist() == list(range(6))
        # energies cycle 5, 50 GeV: 5 GeV is below the model's 10 GeV threshold
        assert g["reason"][:].tolist() == [2, 0, 2, 0, 2, 0]
        assert json.loads(g.attrs["reasons"])["0"].startswith("fast")
    vis = a.showers.sum(1) / a.conditions.energy
    assert np.all(vis > 0.01) and np.all(vis < 0.05)  # ~3 % visible, fast or full


def test_fastsim_refuses_a_model_of_another_detector(model_dir, tmp_path, capsys):
    assert main(["simulate", "--fastsim", str(model_dir), "-n", "2", "--quiet", "-o", str(tmp_path / "x.h5")]) == 2
    assert "detector" in capsys.readouterr().err
    assert main(["simulate", "--fastsim-threshold", "5", "-n", "2", "--quiet", "-o", str(tmp_path / "y.h5")]) == 2
    for bad in ("inf", "nan", "0", "-3"):
        assert main(["simulate", "--fastsim", "multi", f"--fastsim-threshold={bad}", "-n", "2", "--quiet", "-o",
                     str(tmp_path / "z.h5")]) == 2
    assert "--fastsim-threshold" in capsys.readouterr().err
