"""CaloChallenge binning XML and file conversion."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from caloforge import observables as ob
from caloforge.calochallenge import from_calochallenge, parse_binning, read_binning, to_calochallenge
from caloforge.cli import main
from caloforge.dataset import ShowerFile, write_showers
from caloforge.detector import load_detector

XML = """<Bins>
  <Particle name="electron">
    <Layer id="0" r_edges="0,4.65,9.3,14" n_bin_alpha="4"/>
    <Layer id="1" r_edges="0,4.65,9.3,14" n_bin_alpha="4"/>
    <Layer id="2" r_edges="0,10,30" n_bin_alpha="1"/>
  </Particle>
  <Particle name="photon"><Layer id="0" r_edges="0,5" n_bin_alpha="2"/></Particle>
</Bins>"""


def test_binning_xml_gives_per_voxel_positions(tmp_path):
    path = tmp_path / "binning.xml"
    path.write_text(XML)
    g = read_binning(path, "electron")
    assert g.n_cells == 12 + 12 + 2 and g.n_layers == 3
    assert list(np.bincount(g.cell_layer)) == [12, 12, 2]
    assert g.cell_r[:3] == pytest.approx([2.325, 6.975, 11.65])  # radius fastest
    assert g.cell_alpha[0] == pytest.approx(-np.pi + np.pi / 4) and g.cell_alpha[3] == pytest.approx(-np.pi / 4)
    assert g.cell_x[:3] == pytest.approx(g.cell_r[:3] * np.cos(g.cell_alpha[:3]))
    assert np.all(g.cell_x[-2:] == 0) and np.all(g.cell_y[-2:] == 0)  # a single angular bin is a ring
    assert parse_binning(XML, "photon").n_cells == 2
    with pytest.raises(ValueError, match="muon"):
        parse_binning(XML, "muon")


def test_observables_run_on_a_calochallenge_geometry():
    g = parse_binning(XML)
    showers = np.zeros((2, g.n_cells), np.float32)
    showers[0, 5] = 3.0
    showers[1, [13, 15]] = 1.0  # layer 1, same radius, opposite angles
    o = ob.compute_observables(showers, np.full(2, 1e3), np.zeros(2), g)
    assert o["cog_x"][0] == pytest.approx(g.cell_x[5]) and o["cog_y"][0] == pytest.approx(g.cell_y[5])
    assert o["eratio_l00"][0] == pytest.approx(1.0)
    assert o["shower_depth"][1] == pytest.approx(1.0)
    assert o["cog_x_l01"][1] == pytest.approx(0.5 * (g.cell_x[13] + g.cell_x[15]))
    assert ob.layer_energies(showers, g)[1] == pytest.approx([0.0, 2.0, 0.0])


def test_round_trip_through_the_calochallenge_layout(tmp_path):
    det = load_detector("ild-ecal")
    rng = np.random.default_rng(0)
    n = 12
    showers = (rng.exponential(0.2, (n, det.n_cells())) * (rng.random((n, det.n_cells())) < 0.01))
    energies = rng.uniform(1e3, 1e5, n)
    write_showers(tmp_path / "cf.h5", det, energies, np.zeros(n), showers)
    assert main(["convert", str(tmp_path / "cf.h5"), str(tmp_path / "cc.h5"), "--to", "calochallenge",
                 "--max-showers", "10"]) == 0
    with h5py.File(tmp_path / "cc.h5") as f:
        assert f["incident_energies"].dtype == np.float64 and f["incident_energies"].shape == (10, 1)
        assert f["showers"].shape == (10, det.n_cells()) and f["showers"].compression == "gzip"
    from_calochallenge(tmp_path / "cc.h5", tmp_path / "back.h5", detector="ild-ecal")
    with ShowerFile(tmp_path / "back.h5") as f:
        b = f.read()
    assert b.energies == pytest.approx(energies[:10])
    assert np.allclose(b.showers, showers[:10].astype(np.float32))


def test_calochallenge_file_with_binning_is_readable(tmp_path):
    g = parse_binning(XML)
    (tmp_path / "binning.xml").write_text(XML)
    with h5py.File(tmp_path / "cc.h5", "w") as f:
        f["incident_energies"] = np.full((5, 1), 1e3)
        f["showers"] = np.ones((5, g.n_cells))
    assert to_calochallenge is not None
    from_calochallenge(tmp_path / "cc.h5", tmp_path / "cf.h5", binning=tmp_path / "binning.xml")
    from caloforge.evaluate import geometry_for

    with ShowerFile(tmp_path / "cf.h5") as f:
        assert f.detector is None and len(f) == 5
        assert geometry_for(f).n_cells == g.n_cells
    with pytest.raises(ValueError, match="describes"):
        from_calochallenge(tmp_path / "cc.h5", tmp_path / "x.h5", binning=tmp_path / "binning.xml",
                           particle="photon")
