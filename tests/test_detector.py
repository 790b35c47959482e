"""Detectors described as data: the house detector's contract, user files, validation."""

from __future__ import annotations

import numpy as np
import pytest

from caloforge.detector import Detector, DetectorError, builtin_detectors, load_detector


def test_house_detector_matches_its_specification():
    d = load_detector("ild-ecal")
    assert "ild-ecal" in builtin_detectors()
    assert d.n_layers == 30 and d.depth_mm == pytest.approx(99.0)
    assert all(layer.absorber == "G4_W" and layer.active == "G4_Si" for layer in d.layers)
    assert [layer.absorber_mm for layer in d.layers] == [2.1] * 20 + [4.2] * 10
    assert all(layer.active_mm == 0.5 for layer in d.layers)
    assert d.shape() == (30, 30, 30) and d.shape(angled=True) == (30, 30, 60)
    x, y, z = d.cell_centers_mm(angled=True)
    assert x[0] == -72.5 and x[-1] == 72.5 and y[0] == -72.5 and y[-1] == 222.5
    assert z[0] == pytest.approx(2.35) and z[-1] == pytest.approx(99.0 - 0.25)
    np.testing.assert_array_equal(d.sampling_weights(), [1.0] * 20 + [2.0] * 10)
    assert d.production_cut_mm == 0.7 and d.world_material == "G4_Galactic"


def test_user_detector_from_toml_and_yaml(tmp_path):
    toml = tmp_path / "mini.toml"
    toml.write_text(
        'name = "mini"\nsize_x_mm = 100.0\nsize_y_mm = 100.0\ncell_size_mm = 10.0\n'
        '[[layers]]\ncount = 5\nabsorber = "G4_Pb"\nabsorber_mm = 3.0\nactive = "G4_PLASTIC_SC_VINYLTOLUENE"\n'
        'active_mm = 2.0\n[readout]\nx_min_mm = -50.0\nn_x = 10\ny_min_mm = -50.0\nn_y = 10\n'
    )
    d = load_detector(toml)
    assert d.shape() == (5, 10, 10) and d.depth_mm == pytest.approx(25.0)
    yaml = tmp_path / "mini.yaml"
    import yaml as pyyaml

    yaml.write_text(pyyaml.safe_dump(d.to_dict()))
    assert load_detector(yaml) == d
    assert Detector.from_json(d.to_json()) == d


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cell_size_mm": -1.0}, "cell_size_mm"),
        ({"readout": {"x_min_mm": -72.0, "n_x": 30, "y_min_mm": -75.0, "n_y": 30}}, "multiple of cell_size_mm"),
        ({"readout": {"x_min_mm": -75.0, "n_x": 300, "y_min_mm": -75.0, "n_y": 30}}, "leaves the detector"),
        ({"layers": []}, "empty"),
    ],
)
def test_invalid_descriptions_are_refused(change, message):
    d = {**load_detector("ild-ecal").to_dict(), **change}
    with pytest.raises(DetectorError, match=message):
        Detector.from_dict(d)


def test_missing_field_and_unknown_name(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n')
    with pytest.raises(DetectorError, match="bad.toml: missing field"):
        load_detector(bad)
    with pytest.raises(DetectorError, match="unknown detector"):
        load_detector("no-such-detector")
