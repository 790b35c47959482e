"""Conditions (energy, angle, impact point, particle) as one structure: specs, files, models, export."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from caloforge.conditions import (
    Conditions,
    ConditionSampler,
    ConditionsError,
    canonical_particle,
    parse_particles,
    parse_position_spec,
)
from caloforge.dataset import Batch, DatasetError, ShowerFile, write_showers
from caloforge.models import ModelError, load_model, save_model
from caloforge.models.base import LEGACY_FEATURES
from conftest_models import GRID_VARIANTS, TINY_CONFIGS, family_of, tiny_model, toy_detector, toy_showers


def _rngs():
    return tuple(np.random.default_rng(i) for i in range(3))


# ---- specs -------------------------------------------------------------------------------------------------
def test_point_specs_form_a_grid_and_particles_cycle():
    s = ConditionSampler.parse("20,50,80", "10,30,50", "cell", "gamma,e-")
    assert s.grid_size == 18
    c = s.sample(36, _rngs())
    points = {(e, a, p) for e, a, p in zip(c.energy, c.angle, c.pdg)}
    assert len(points) == 18  # every combination appears
    counts = np.unique(np.stack([c.energy, c.angle, c.pdg]), axis=1, return_counts=True)[1]
    assert np.all(counts == 2)
    assert np.all((c.x >= 0) & (c.x < 5) & (c.y >= 0) & (c.y < 5))  # uniform over one 5 mm cell


def test_simulation_conditions_do_not_depend_on_the_run_length():
    from caloforge.simulate import RunConfig

    def cfg(n):
        return RunConfig(toy_detector().to_json(), "gamma,e-", "10:100", "0", n, 3, 50, "data-free", "cell")

    a, _ = cfg(60).chunk_conditions(1)  # a partial last chunk of 10 rows
    b, _ = cfg(100).chunk_conditions(1)
    np.testing.assert_array_equal(a.as_array(), b[:10].as_array())


@pytest.mark.parametrize("text, kind, lo_hi", [
    ("0,0", "fixed", ((0, 0), (0, 0))),
    ("cell", "uniform", ((0, 5), (0, 5))),
    ("-5:5,0:10", "uniform", ((-5, 5), (0, 10))),
    ("0,0;2.5,2.5", "points", ((0, 2.5), (0, 2.5))),
])
def test_position_specs(text, kind, lo_hi):
    spec = parse_position_spec(text, 5.0)
    assert spec.kind == kind and spec.bounds == lo_hi
    p = spec.sample(100, np.random.default_rng(0))
    assert p.shape == (100, 2)
    assert np.all(p[:, 0] >= lo_hi[0][0]) and np.all(p[:, 0] <= lo_hi[0][1])


@pytest.mark.parametrize("text", ["", "1", "a,b", "5:1,0", "1,2,3", "nan,0"])
def test_bad_position_specs_are_refused(text):
    with pytest.raises(ConditionsError, match="position spec"):
        parse_position_spec(text)


def test_particles():
    assert parse_particles("gamma, e-") == ("gamma", "e-")
    assert canonical_particle("photon") == "gamma" and canonical_particle("-11") == "e+"
    assert parse_particles("gamma,pi+,-211,p") == ("gamma", "pi+", "pi-", "proton")
    with pytest.raises(ConditionsError, match="'pi0' is not supported"):
        parse_particles("gamma,pi0")
    with pytest.raises(ConditionsError, match="twice"):
        parse_particles("e-,electron")


@pytest.mark.parametrize("field, value, match", [
    ("energy", np.nan, "energy is NaN"), ("energy", -1.0, "expected > 0 MeV"), ("angle", 95.0, "angle 95"),
    ("x", np.inf, "x is NaN or inf"), ("pdg", 111, "particle code 111"),
])
def test_invalid_conditions_are_refused(field, value, match):
    c = Conditions.make([1e4, 2e4], 10.0, (1.0, 2.0), "gamma")
    getattr(c, field)[1] = value
    with pytest.raises(ConditionsError, match=match):
        c.validate("test")


# ---- files ---------------------------------------------------------------------------------------------------
def test_conditions_round_trip_through_a_file(tmp_path):
    det = toy_detector(n_y_angled=12)
    c = ConditionSampler.parse("10:100", "0:40", "cell", "gamma,e-,e+").sample(12, _rngs())
    showers = np.random.default_rng(0).random((12, det.n_cells(True))).astype(np.float32)
    write_showers(tmp_path / "c.h5", det, c, showers, attrs={"particle": "gamma,e-,e+"})
    with ShowerFile(tmp_path / "c.h5") as f:
        back = f.conditions
        b = f.read(3, 7)
    np.testing.assert_array_equal(back.as_array(), c.as_array())
    np.testing.assert_array_equal(b.conditions.as_array(), c[3:7].as_array())
    assert set(back.particles) == {"gamma", "e-", "e+"}
    with h5py.File(tmp_path / "c.h5") as h:  # plain h5py sees the columns
        assert h["incident_positions"].shape == (12, 2) and h["incident_particles"].dtype == np.int32


def test_files_without_position_or_particle_columns_still_load(tmp_path):
    det = toy_detector()
    with h5py.File(tmp_path / "old.h5", "w") as h:  # a file as written before, or by another tool
        h["incident_energies"] = np.array([[1e4], [5e4]])
        h["showers"] = np.zeros((2, det.n_cells()), np.float32)
        h.attrs["detector_json"] = det.to_json()
        h.attrs["particle"] = "electron"
    with ShowerFile(tmp_path / "old.h5") as f:
        c = f.conditions
    assert np.all(c.x == 0) and np.all(c.y == 0) and np.all(c.angle == 0)
    assert c.particles == ["e-", "e-"]
    with h5py.File(tmp_path / "old.h5", "a") as h:
        del h.attrs["particle"]
    with ShowerFile(tmp_path / "old.h5") as f, pytest.raises(DatasetError, match="no field 'incident_particles'"):
        _ = f.conditions


# ---- models --------------------------------------------------------------------------------------------------
def _angled_toy(n: int, seed: int = 0, angle_hi: float = 40.0):
    """Toy showers in the angled window: the normal-incidence toy placed along the axis, layer by layer."""
    det = toy_detector(n_y_angled=12)
    base = toy_showers(toy_detector(), n, seed)
    rng = np.random.default_rng(seed + 1)
    c = Conditions.make(base.energies, rng.uniform(0, angle_hi, n), rng.uniform(0, 5, (n, 2)), "gamma")
    n_l, n_x, n_y = det.shape(False)
    z = det.layer_z_mm()
    out = np.zeros((n, n_l, n_x, det.shape(True)[2]), np.float32)
    local = base.showers.reshape(n, n_l, n_x, n_y)
    for i in range(n):
        for layer in range(n_l):
            sy = int(np.floor((c.y[i] + np.tan(np.radians(c.angle[i])) * z[layer]) / 5.0))
            sx = int(np.floor(c.x[i] / 5.0))
            shifted = np.roll(local[i, layer], sx, axis=0)
            out[i, layer, :, sy:sy + n_y] = shifted[:, :out.shape[3] - sy]
    return det, Batch(c, out.reshape(n, -1))


def _centroid_y(showers: np.ndarray, det, angled: bool) -> np.ndarray:
    """Energy-weighted y (mm) per layer, averaged over showers."""
    _, y, _ = det.cell_centers_mm(angled)
    s = showers.reshape(len(showers), *det.shape(angled))
    e_y = s.sum(axis=2)  # (n, L, ny)
    return (e_y @ y).sum(0) / np.maximum(e_y.sum(axis=(0, 2)), 1e-9)


@pytest.mark.parametrize("family", GRID_VARIANTS)
def test_axis_frame_round_trip(family):
    det, data = _angled_toy(8)
    model = tiny_model(family, det, Batch(data.conditions, np.zeros((8, det.n_cells()), np.float32)))
    local = model.to_local(data.showers, data.conditions.as_array())
    assert local.shape == (8, det.n_cells(False))
    back = model.to_window(torch.as_tensor(local), torch.as_tensor(data.conditions.as_array()), angled=True)
    np.testing.assert_allclose(back.numpy(), data.showers)  # the toy never leaves the local grid


def test_padded_local_grid_keeps_the_far_halo_of_an_inclined_shower(tmp_path):
    """``pad_y``: the shower-axis frame's local grid reaches further along y; it keeps window cells that the
    normal-incidence-sized grid drops, maps back exactly, and its models save, load and sample into the window."""
    from caloforge.models import get_family

    det, data = _angled_toy(20, seed=4)
    halo = data.showers.reshape(20, *det.shape(True)).copy()
    halo[:, :, :, -1] += 0.5  # energy in the last row of the angled window, far from most axes
    data = Batch(data.conditions, halo.reshape(20, -1))
    cls = get_family("layerflow")
    cfg = {**TINY_CONFIGS["layerflow:core"], "pad_y": 3}
    model = cls(det, None, cls.Config.from_dict(cfg))
    n_l, n_x, n_y = det.shape(False)
    assert model.frame == "axis" and model.shape == (n_l, n_x, n_y + 6)
    assert model.n_cells == cls.local_n_cells(det, model.config) == n_l * n_x * (n_y + 6)
    cond = data.conditions.as_array()
    plain = tiny_model("layerflow", det, Batch(data.conditions, np.zeros((20, det.n_cells()), np.float32)))
    kept = {name: m.to_local(data.showers, cond).sum() for name, m in (("padded", model), ("plain", plain))}
    assert kept["plain"] < kept["padded"] <= data.showers.sum() * (1 + 1e-6)
    local = model.to_local(data.showers, cond)
    back = model.to_window(torch.as_tensor(local), torch.as_tensor(cond), angled=True).numpy()
    np.testing.assert_allclose(back.reshape(20, -1)[back.reshape(20, -1) > 0], data.showers[back.reshape(20, -1) > 0])
    assert back.sum() == pytest.approx(kept["padded"], rel=1e-5)
    # the axis cell sits pad_y rows further into the local grid: its centre is still at the axis cell's centre
    x_mm, y_mm = model.local_cell_centers_mm()
    assert y_mm[n_y // 2 + 3] == pytest.approx(det.cell_size_mm / 2)
    model.fit_preprocessing(Batch(data.conditions, local))
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.pad_y == 3 and loaded.shape == model.shape
    pos = np.random.default_rng(1).uniform(0, 5, (6, 2))
    a = loaded.sample(np.full(6, 5e4), 30.0, seed=2, positions=pos, angled=True)
    assert a.shape == (6, det.n_cells(True)) and torch.equal(a, model.sample(np.full(6, 5e4), 30.0, seed=2,
                                                                               positions=pos, angled=True))
    assert torch.all(a >= 0) and torch.all(a.sum(1) > 0)
    import onnxruntime as ort

    from caloforge.export import export_onnx, noise_inputs

    sess = ort.InferenceSession(str(export_onnx(loaded, tmp_path / "m.onnx", angled=True)),
                                providers=["CPUExecutionProvider"])
    c = torch.as_tensor(cond[:4], dtype=torch.float32)
    noise = loaded.draw_noise(4, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = loaded.decode_window(c, *noise, angled=True).numpy()
    feeds = {"conditions": c.numpy(), **{name: t.numpy() for (name, _, _), t in zip(noise_inputs(loaded), noise)}}
    np.testing.assert_allclose(sess.run(["showers"], feeds)[0], ref, rtol=2e-3, atol=1e-4)
    with pytest.raises(ModelError, match="shower-axis frame"):
        cls(det, det.n_cells(True), cls.Config.from_dict({**cfg, "pad_y": 2}))  # the angled window, not a padded grid


@pytest.mark.parametrize("family", ["layerflow"])  # an untrained GAN's in-frame output varies arbitrarily
def test_angle_and_position_move_the_centroid(family):
    """Fitted to an angled toy sample (layerflow's preprocessing fits the conditional mean of the layer features),
    the model puts the shower where the angle and the impact point say."""
    det, data = _angled_toy(60)
    model = tiny_model(family, det, Batch(data.conditions, model_local(family, det, data)))
    n = 400
    pos = np.random.default_rng(3).uniform(0, 5, (n, 2))  # over one cell, as in training
    y0 = {}
    for angle in (0.0, 40.0):
        s = model.sample(np.full(n, 5e4), angle, seed=1, positions=pos, angled=True).numpy()
        y0[angle] = _centroid_y(s, det, True)
    z = det.layer_z_mm()
    slope = np.polyfit(z, y0[40.0] - y0[0.0], 1)[0]
    assert slope == pytest.approx(np.tan(np.radians(40.0)), rel=0.25)  # sign and slope of the angle
    shifted = model.sample(np.full(n, 5e4), 0.0, seed=1, positions=pos + [0.0, 5.0], angled=True).numpy()
    dy = _centroid_y(shifted, det, True) - y0[0.0]
    assert np.mean(dy) == pytest.approx(5.0, abs=1.0)  # a 5 mm shift of the impact point moves the shower


def model_local(family: str, det, data: Batch) -> np.ndarray:
    model = tiny_model(family, det, Batch(data.conditions, np.zeros((len(data), det.n_cells()), np.float32)))
    return model.to_local(data.showers, data.conditions.as_array())


def test_unknown_particle_and_impossible_angle_are_refused():
    det, data = _angled_toy(20)
    model = tiny_model("layerflow", det, Batch(data.conditions, model_local("layerflow", det, data)))
    assert model.meta["particles"] == ["gamma"]
    with pytest.raises(ModelError, match="trained for gamma only"):
        model.sample([5e4], 0.0, particles="e-")
    with pytest.raises(ModelError, match="angle 70 deg requested"):
        model.sample([5e4], 70.0)
    with pytest.raises(ModelError, match="outside x"):
        model.sample([5e4], 0.0, positions=(100.0, 0.0))
    with pytest.raises(ModelError, match="energy is NaN"):
        model.sample([np.nan], 0.0)


def test_models_saved_before_conditions_still_load(tmp_path):
    """A model.json without condition features or frame: the (log E, angle) window model it always was."""
    det = toy_detector()
    data = toy_showers(det, 30)
    from caloforge.models import get_family

    cls = get_family("layerflow")
    old = cls(det, det.n_cells(), cls.Config.from_dict(TINY_CONFIGS["layerflow"]), features=LEGACY_FEATURES,
              frame="window")
    old.fit_preprocessing(data)
    old.meta["particle"] = "gamma"
    old.meta.pop("particles")
    save_model(old, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    for key in ("condition_features", "frame", "particles"):
        meta.pop(key, None)
    meta["condition_names"] = ["energy", "angle"]
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    loaded = load_model(tmp_path / "m")
    assert loaded.features == LEGACY_FEATURES and loaded.frame == "window"
    assert torch.equal(loaded.sample(data.energies[:4], 0.0, seed=2), old.sample(data.energies[:4], 0.0, seed=2))
    with pytest.raises(ModelError, match="impact points other than"):
        loaded.sample([5e4], 0.0, positions=(2.0, 2.0))


@pytest.mark.parametrize("family", GRID_VARIANTS)
def test_onnx_export_of_an_angled_model(family, tmp_path):
    import onnxruntime as ort

    from caloforge.export import export_onnx, noise_inputs

    torch.set_num_threads(1)
    det, data = _angled_toy(30)
    model = tiny_model(family, det, Batch(data.conditions, model_local(family_of(family), det, data)))
    path = export_onnx(model, tmp_path / "m.onnx", angled=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cond = torch.as_tensor(data.conditions[:5].as_array(), dtype=torch.float32)
    noise = model.draw_noise(5, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.decode_window(cond, *noise, angled=True).numpy()
    feeds = {"conditions": cond.numpy()}
    feeds.update({name: t.numpy() for (name, _, _), t in zip(noise_inputs(model), noise)})
    out = sess.run(["showers"], feeds)[0]
    assert out.shape == (5, det.n_cells(True))
    np.testing.assert_allclose(out, ref, rtol=2e-3, atol=1e-4)


# ---- the chain on an angled, two-particle toy file: train, generate with every condition option ---------------
@pytest.fixture(scope="module")
def angled_run(tmp_path_factory):
    """A tiny layerflow trained by the CLI on an angled toy file with photons and electrons."""
    from caloforge.cli import main

    tmp = tmp_path_factory.mktemp("angled")
    det, data = _angled_toy(160, seed=3)
    c = data.conditions
    c.pdg[1::2] = 11  # every other shower an electron
    write_showers(tmp / "train.h5", det, c, data.showers, attrs={"particle": "gamma,e-"})
    cfg = tmp / "tiny.toml"
    cfg.write_text('family = "layerflow"\n[train]\nbatch_size = 32\nmax_steps = 40\nval_every = 20\n'
                   'val_max_showers = 32\nlr = 3e-3\n[model]\nflow_blocks = 2\nflow_hidden = 16\n')
    assert main(["train", "--data", str(tmp / "train.h5"), "--model", "layerflow", "--config", str(cfg),
                 "-o", str(tmp / "run"), "--seed", "1", "-q"]) == 0
    return det, tmp


def test_trained_model_records_its_conditions(angled_run):
    det, tmp = angled_run
    meta = json.loads((tmp / "run" / "model.json").read_text())
    assert meta["frame"] == "axis" and meta["particles"] == ["e-", "gamma"]
    assert meta["conditions"]["angle_deg"][1] == pytest.approx(40.0, abs=1.0)
    assert meta["condition_names"] == ["energy", "angle", "position", "particle"]
    model = load_model(tmp / "run")
    n = 300
    pos = np.random.default_rng(5).uniform(0, 5, (n, 2))
    y = {a: _centroid_y(model.sample(np.full(n, 5e4), a, seed=2, positions=pos, particles="e-", angled=True).numpy(),
                        det, True)
         for a in (0.0, 35.0)}
    slope = np.polyfit(det.layer_z_mm(), y[35.0] - y[0.0], 1)[0]
    assert slope == pytest.approx(np.tan(np.radians(35.0)), rel=0.3)


def test_generate_with_every_condition_option(angled_run):
    from caloforge.cli import main

    det, tmp = angled_run
    out = tmp / "g.h5"
    assert main(["generate", "--model", str(tmp / "run"), "-n", "12", "--energy", "20,50", "--angle", "0,30",
                 "--position", "cell", "--particle", "gamma,e-", "-o", str(out), "--seed", "3", "-q"]) == 0
    with ShowerFile(out) as f:
        c = f.conditions
        assert f.n_cells == det.n_cells(True)  # an angle > 0 asks for the angled window
        assert f.attrs["position_spec"] == "cell"
    assert len({(e, a, p) for e, a, p in zip(c.energy, c.angle, c.pdg)}) == 8  # the 2 x 2 x 2 grid
    assert np.all((c.x >= 0) & (c.x < 5))
    normal = tmp / "normal.h5"
    assert main(["generate", "--model", str(tmp / "run"), "-n", "5", "--energy", "50", "--particle", "e-",
                 "-o", str(normal), "-q"]) == 0
    with ShowerFile(normal) as f:
        assert f.n_cells == det.n_cells(False) and f.conditions.particles == ["e-"] * 5
    again = tmp / "again.h5"
    assert main(["generate", "--model", str(tmp / "run"), "--conditions-from", str(out), "-o", str(again),
                 "-q"]) == 0
    with ShowerFile(again) as f:
        np.testing.assert_array_equal(f.conditions.as_array(), c.as_array())
    assert main(["generate", "--model", str(tmp / "run"), "-n", "2", "--particle", "e+", "-o",
                 str(tmp / "x.h5"), "-q"]) == 2  # never trained on positrons: a clear error
    assert main(["generate", "--model", str(tmp / "run"), "-n", "2", "--angle", "70", "-o",
                 str(tmp / "y.h5"), "-q"]) == 2
