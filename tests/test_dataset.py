"""The HDF5 dataset format: round trip, streaming, and a clear error for each kind of bad file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from caloforge.dataset import (
    DatasetError,
    ShowerFile,
    ShowerWriter,
    describe,
    read_showers,
    torch_dataset,
    write_showers,
)
from caloforge.detector import Detector, load_detector
from conftest_models import load_script

DET = load_detector("ild-ecal")
N_CELLS = DET.n_cells()


def _toy(n: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    showers = np.where(rng.random((n, N_CELLS)) < 0.02, rng.exponential(1.0, (n, N_CELLS)), 0).astype(np.float32)
    return rng.uniform(1e4, 1e5, n), np.zeros(n), showers


def _write(path, **override):
    e, a, s = _toy()
    with h5py.File(path, "w") as f:
        f["incident_energies"] = override.get("energies", e[:, None])
        f["showers"] = override.get("showers", s)
        f["incident_angles"] = override.get("angles", a[:, None])
        f.attrs["detector_json"] = override.get("detector_json", DET.to_json())
    return path


def test_round_trip_and_streaming(tmp_path):
    e, a, s = _toy(250)
    path = tmp_path / "ok.h5"
    write_showers(path, DET, e, a, s, {"particle": "gamma", "seed": 3})
    with ShowerFile(path, expected_detector="ild-ecal") as f:
        assert len(f) == 250 and f.shape == (30, 30, 30) and f.attrs["particle"] == "gamma"
        np.testing.assert_array_equal(f.energies, e)
        parts = [b.showers for b in f.iter_batches(100)]
        assert [len(p) for p in parts] == [100, 100, 50]
        np.testing.assert_array_equal(np.concatenate(parts), s)
        np.testing.assert_array_equal(f.read(index=np.array([7, 3])).showers, s[[7, 3]])
    with h5py.File(path) as h5:  # the CaloChallenge convention, readable with plain h5py
        assert h5["incident_energies"].dtype == np.float64 and h5["incident_energies"].shape == (250, 1)
        assert h5["showers"].dtype == np.float32 and h5["showers"].compression == "gzip"
        assert h5["showers"].chunks is not None
    assert "250 x 27000" in describe(path)
    ds = torch_dataset(path)
    cond, shower = ds[5]
    assert shower.shape == (N_CELLS,) and float(cond[0]) == pytest.approx(e[5], rel=1e-6)
    assert cond.shape == (5,) and float(cond[4]) == 22  # the file's particle attribute: gamma


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"showers": np.zeros((12, 100), np.float32)}, "match neither window"),
        ({"energies": np.ones((12, 2))}, "expected \\(N, 1\\)"),
        ({"energies": np.ones((11, 1))}, "has 12 rows but"),
        ({"energies": -np.ones((12, 1))}, "incident_energies.*<= 0"),
        ({"angles": np.zeros((12, 2))}, "incident_angles"),
    ],
)
def test_bad_structure_is_refused(tmp_path, override, message):
    path = _write(tmp_path / "bad.h5", **override)
    with pytest.raises(DatasetError, match=message) as err:
        ShowerFile(path).energies  # noqa: B018
    assert str(path) in str(err.value)


@pytest.mark.parametrize(("value", "message"), [(np.nan, "NaN or inf"), (np.inf, "NaN or inf"), (-1.0, "negative")])
def test_bad_values_are_refused(tmp_path, value, message):
    _, _, s = _toy()
    s[4, 17] = value
    path = _write(tmp_path / "bad.h5", showers=s)
    with pytest.raises(DatasetError, match=f"'showers'.*{message}.*row 4") as err:
        read_showers(path)
    assert str(path) in str(err.value)


def test_missing_key_and_missing_file(tmp_path):
    path = tmp_path / "nokey.h5"
    with h5py.File(path, "w") as f:
        f["showers"] = np.zeros((2, N_CELLS), np.float32)
    with pytest.raises(DatasetError, match="missing dataset 'incident_energies'"):
        ShowerFile(path)
    with pytest.raises(DatasetError, match="not found"):
        ShowerFile(tmp_path / "absent.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(DatasetError, match="not a readable HDF5"):
        ShowerFile(tmp_path / "text.h5")


def test_detector_mismatch(tmp_path):
    other = Detector.from_dict({**DET.to_dict(), "name": "other", "layers": [
        {"count": 30, "absorber": "G4_Pb", "absorber_mm": 3.0, "active": "G4_Si", "active_mm": 0.5}]})
    path = _write(tmp_path / "other.h5", detector_json=other.to_json())
    with pytest.raises(DatasetError, match="attribute 'detector'.*'other'.*expected detector 'ild-ecal'"):
        ShowerFile(path, expected_detector="ild-ecal")


def test_interrupted_write_leaves_no_final_file(tmp_path):
    path = tmp_path / "out.h5"
    e, a, s = _toy()
    with pytest.raises(RuntimeError):
        with ShowerWriter(path, DET, N_CELLS) as w:
            w.append(e, a, s)
            raise RuntimeError("killed")
    assert not path.exists() and not (tmp_path / "out.h5.tmp").exists()
    # a .tmp left by a hard kill is marked incomplete inside
    w = ShowerWriter(path, DET, N_CELLS)
    w.append(e, a, s)
    w._h5.flush()
    assert not path.exists()
    w._h5.close()
    with pytest.raises(DatasetError, match="incomplete"):
        ShowerFile(str(path) + ".tmp")


def test_writer_refuses_bad_values(tmp_path):
    e, a, s = _toy()
    s[0, 0] = np.nan
    with pytest.raises(DatasetError, match="NaN"):
        write_showers(tmp_path / "x.h5", DET, e, a, s)


def test_merge_sets_widens_normal_windows_and_keeps_conditions(tmp_path):
    """scripts/merge_sets.py: a normal-window file and an angled-window file of one detector become one angled file,
    every row's conditions and cells intact (the normal window's cells are the angled window's first y columns)."""

    from caloforge.conditions import Conditions
    from caloforge.dataset import write_showers
    from conftest_models import toy_detector

    merge = load_script("merge_sets")
    det = toy_detector(n_layers=3, n_xy=4, n_y_angled=8)
    rng = np.random.default_rng(0)
    normal = rng.exponential(1.0, (5, 3 * 4 * 4)).astype(np.float32)
    angled = rng.exponential(1.0, (4, 3 * 4 * 8)).astype(np.float32)
    c_n = Conditions(np.full(5, 2e4), np.zeros(5), np.zeros(5), np.zeros(5), "gamma")
    c_a = Conditions(np.full(4, 3e4), np.full(4, 30.0), np.full(4, 1.0), np.full(4, 2.0), "e-")
    write_showers(tmp_path / "n.h5", det, c_n, normal, attrs={"source": "toy", "particle": "gamma",
                                                              "energy_spec": "10:100", "angle_spec": "0"})
    write_showers(tmp_path / "a.h5", det, c_a, angled, attrs={"source": "toy", "particle": "e-",
                                                              "energy_spec": "20:50", "angle_spec": "0:60"})
    assert merge.main(["-o", str(tmp_path / "m.h5"), str(tmp_path / "n.h5"), str(tmp_path / "a.h5")]) == 0
    with ShowerFile(tmp_path / "m.h5", expected_detector=det) as f:
        b = f.read()
        assert (f.attrs["energy_spec"], f.attrs["angle_spec"]) == ("10:100", "0:60")  # the union of the inputs'
    assert b.showers.shape == (9, 3 * 4 * 8)
    wide = b.showers[:5].reshape(5, 3, 4, 8)
    assert np.array_equal(wide[..., :4].reshape(5, -1), normal) and not wide[..., 4:].any()
    assert np.array_equal(b.showers[5:], angled)
    assert np.array_equal(b.conditions.pdg, np.r_[np.full(5, 22), np.full(4, 11)])
    assert np.array_equal(b.conditions.angle, np.r_[np.zeros(5), np.full(4, 30.0)])
    assert np.array_equal(b.conditions.x, np.r_[np.zeros(5), np.ones(4)])
    # PATH:N takes the first N showers of PATH
    assert merge.main(["-o", str(tmp_path / "h.h5"), str(tmp_path / "a.h5") + ":3", str(tmp_path / "n.h5:2")]) == 0
    with ShowerFile(tmp_path / "h.h5", expected_detector=det) as f:
        h = f.read()
    assert np.array_equal(h.showers[:3], angled[:3]) and len(h) == 5
    assert np.array_equal(h.showers[3:].reshape(2, 3, 4, 8)[..., :4].reshape(2, -1), normal[:2])


def test_centroid_bias_script_measures_a_known_shift(tmp_path, capsys):
    """scripts/centroid_bias.py: a candidate whose layer energy sits one cell above the reference's (same conditions)
    has a bias of exactly +1 cell in that layer; an identical candidate has 0."""

    from caloforge.conditions import Conditions
    from caloforge.dataset import write_showers
    from conftest_models import toy_detector

    script = load_script("centroid_bias")
    det = toy_detector(n_layers=3, n_xy=4, n_y_angled=8)
    n = 30
    ref = np.zeros((n, 3, 4, 4), np.float32)
    ref[:, :, 1:3, 1:3] = 1.0  # symmetric about the window's centre in every layer
    shifted = np.zeros_like(ref)
    shifted[:, 0, 1:3, 2:4] = 1.0  # layer 0 one cell up in y
    shifted[:, 1:] = ref[:, 1:]
    c = Conditions(np.full(n, 2e4), np.zeros(n), np.zeros(n), np.zeros(n), "gamma")
    for name, s in (("ref", ref), ("same", ref), ("up", shifted)):
        write_showers(tmp_path / f"{name}.h5", det, c, s.reshape(n, -1), attrs={"source": "toy", "particle": "gamma"})
    assert script.main([str(tmp_path / "ref.h5"), str(tmp_path / "up.h5"), "--layers", "0,1,2"]) == 0
    assert "+1.000±0.000  +0.000±0.000  +0.000±0.000" in capsys.readouterr().out
    assert script.main([str(tmp_path / "ref.h5"), str(tmp_path / "same.h5"), "--layers", "0"]) == 0
    assert "+0.000±0.000" in capsys.readouterr().out
