"""The HGCAL recipe of ``wgan`` (issue 9): the WGAN-GP on a hexagon readout, in frame "cells", each layer's hexagons
on calogan's Cartesian image, conditioned on energy and the impact point (x, y), with energy and position
regressors. On a tiny hexagon detector (2 rings: 19 hexagons per layer on a 5 x 5 image), so it runs in seconds."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from caloforge.cli import main
from caloforge.conditions import Conditions
from caloforge.dataset import Batch, ShowerFile, write_showers
from caloforge.detector import Detector, load_detector
from caloforge.models import ModelError, get_family, load_model, save_model
from caloforge.models.base import ConditionsWarning, TrainBatch
from conftest_models import TINY_CONFIGS, toy_layered_detector

WGAN = get_family("wgan")
TINY = {**TINY_CONFIGS["wgan"], "n_critic": 1}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def hex_detector(n_layers: int = 3) -> Detector:
    """A tiny Si-W stack with 19 hexagons of 10 mm per layer (2 rings), the same lattice in every layer."""
    return Detector.from_dict({"name": "toy-hexes", "size_x_mm": 200.0, "size_y_mm": 200.0, "layers": [
        {"absorber": "G4_W", "absorber_mm": 3.0, "active": "G4_Si", "active_mm": 0.3, "count": n_layers,
         "cells": {"kind": "hex", "rings": 2, "pitch_mm": 10.0}}]})


def hex_showers(det: Detector, n: int, seed: int = 0) -> Batch:
    """Toy electron showers centred on impact points uniform in [-5, 5] mm: a longitudinal profile deepening with
    energy, exponential in the distance from the impact point, lognormal cell fluctuations."""
    rng = np.random.default_rng(seed)
    t = det.cell_table()
    e = rng.uniform(20e3, 90e3, n)
    pos = rng.uniform(-5.0, 5.0, (n, 2))
    n_l = det.n_layers
    showers = np.zeros((n, len(t["x"])), np.float32)
    for i in range(n):
        prof = np.exp(-0.5 * ((np.arange(n_l) - 1.0 - 0.3 * np.log(e[i] / 5e4)) / 1.0) ** 2)
        prof = prof / prof.sum() * 0.005 * e[i]
        w = np.exp(-np.hypot(t["x"] - pos[i, 0], t["y"] - pos[i, 1]) / 6.0) * rng.lognormal(0, 0.3, len(t["x"]))
        for layer in range(n_l):
            m = t["layer"] == layer
            showers[i, m] = prof[layer] * w[m] / w[m].sum()
        showers[i, showers[i] < 1e-3 * showers[i].max()] = 0.0
    return Batch(Conditions.make(e, np.zeros(n), pos, particle=11), showers)


@pytest.fixture(scope="module")
def det() -> Detector:
    return hex_detector()


@pytest.fixture(scope="module")
def data(det) -> Batch:
    return hex_showers(det, 32)


def tiny(det: Detector, data: Batch):
    torch.manual_seed(0)
    model = WGAN(det, None, WGAN.Config.from_dict(TINY))
    model.meta["conditions"] = {"energy_mev": [20e3, 90e3], "angle_deg": [0.0, 0.0], "x_mm": [-5.0, 5.0],
                                "y_mm": [-5.0, 5.0]}
    model.fit_preprocessing(data)
    return model


def test_frame_features_and_image_map(det, data):
    from caloforge.models.calogan import layer_images

    model = tiny(det, data)
    assert model.frame == "cells" and model.n_cells == det.n_cells() == 3 * 19 and model.shape == (57,)
    assert model.features == ("log_e", "pos_x", "pos_y", "is_photon", "charge")
    assert "position" in model.condition_names and "angle" not in model.condition_names
    assert model.image_shape == (3, 5, 5)
    h, w, pixels = layer_images(det)[0]  # calogan's map, imported: each layer's hexagons on the same image
    np.testing.assert_array_equal(model.cell_pixels[:19].numpy(), pixels)
    np.testing.assert_array_equal(model.cell_pixels[19:38].numpy(), pixels + h * w)
    assert int(model.pixel_mask.sum()) == 57 and len(set(model.cell_pixels.tolist())) == 57
    # energy and position regressors (the talk's E and P networks), none for the particle features
    assert [model.features[i] for i in model.regressed] == ["log_e", "pos_x", "pos_y"]
    assert len(model.regressors) == 3
    # cells -> image -> cells is the identity on the sensor; the image is zero off it
    showers, e = torch.as_tensor(data.showers), torch.as_tensor(data.conditions.energy, dtype=torch.float32)
    y = model.to_image(showers, e)
    assert y.shape == (32, 3, 5, 5) and float((y * (1 - model.pixel_mask)).abs().max()) == 0.0
    torch.testing.assert_close(model.from_image(y, e), showers, rtol=1e-4, atol=1e-4)


def test_shapes_non_negative_and_gradients_flow(det, data):
    model = tiny(det, data)
    out = model.sample(data.conditions, seed=1)
    assert out.shape == (32, det.n_cells()) and bool(torch.isfinite(out).all()) and float(out.min()) >= 0.0
    opts = model.configure_optimizers(1e-3)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    batch = TrainBatch(torch.as_tensor(data.conditions.as_array(), dtype=torch.float32), torch.as_tensor(data.showers))
    model.train()
    for step in range(2):
        losses = model.training_step(batch, opts, step)
        assert all(np.isfinite(v) for v in losses.values())
    moved = {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}
    for part in ("generator.", "critic.", "regressors.0.", "regressors.1.", "regressors.2."):
        assert any(k.startswith(part) for k in moved), part
    # the generator's gradient reaches through the position regressors' loss difference too
    model.zero_grad()
    cf = model.condition_features(batch.cond)
    y = model._generate(torch.randn(32, model.config.latent_dim), cf)
    model._regression_loss(y, batch.energies, cf)[1:].sum().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.generator.parameters())
    assert float(model.generator.out.weight.grad.abs().sum()) > 0


def test_save_load_same_samples(det, data, tmp_path):
    model = tiny(det, data)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m", expected_detector=det)
    assert again.frame == "cells" and again.features == model.features
    cond = Conditions.make(np.full(6, 5e4), np.zeros(6), np.tile([[2.0, -3.0]], (6, 1)), particle=11)
    np.testing.assert_array_equal(again.sample(cond, seed=4).numpy(), model.eval().sample(cond, seed=4).numpy())


def test_positions_are_conditions(det, data):
    model = tiny(det, data)
    n = 8
    left = Conditions.make(np.full(n, 5e4), np.zeros(n), np.tile([[-4.0, 0.0]], (n, 1)), particle=11)
    right = Conditions.make(np.full(n, 5e4), np.zeros(n), np.tile([[4.0, 0.0]], (n, 1)), particle=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inside the training range: no warning
        a, b = model.sample(left, seed=3), model.sample(right, seed=3)
    assert not torch.equal(a, b)  # same noise, other impact point: another shower
    (lo_x, hi_x), _ = det.impact_region()
    with pytest.warns(ConditionsWarning, match="impact x"):  # inside the region, outside the training range
        model.sample(Conditions.make([5e4], [0.0], [[0.8 * hi_x, 0.0]], particle=11), seed=1)
    with pytest.raises(ModelError, match="lies outside"):  # outside the impact region: refused as for any model
        model.sample(Conditions.make([5e4], [0.0], [[hi_x + 1.0, 0.0]], particle=11), seed=1)
    with pytest.raises(ModelError, match="normal incidence only"):
        model.sample(Conditions.make([5e4], [10.0], [[0.0, 0.0]], particle=11), seed=1)


def test_readouts_it_refuses_and_grid_behaviour_kept():
    with pytest.raises(ModelError, match="has per-layer cells"):
        WGAN(toy_layered_detector(), None, WGAN.Config.from_dict(TINY))  # grids of different sizes per layer
    with pytest.raises(ModelError, match="detector 'cc-ds2' has per-layer cells"):
        WGAN(load_detector("cc-ds2"), None, WGAN.Config.from_dict(TINY))  # (r, phi) bins
    from conftest_models import toy_detector

    grid = WGAN(toy_detector(), None, WGAN.Config.from_dict(TINY))  # a uniform grid: the shower-axis frame as before
    assert grid.frame == "axis" and "sin_x" in grid.features and "pos_x" not in grid.features
    with pytest.raises(ModelError, match="frame 'cells'"):
        WGAN(toy_detector(), None, WGAN.Config.from_dict(TINY), frame="cells")
    for family in ("calogan", "densewgan"):  # they take the impact point too (cells_positions), never an angle
        cls = get_family(family)
        cfg = cls.Config.from_dict(TINY_CONFIGS[family])
        assert cls(hex_detector(), None, cfg, features=("log_e", "pos_x", "pos_y")).condition_names == (
            "energy", "position")
        with pytest.raises(ModelError, match="energy or particle features only"):
            cls(hex_detector(), None, cfg, features=("log_e", "angle"))


def test_onnx_graph_matches_torch(det, data, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from caloforge.export import _wrapper

    model = tiny(det, data).eval()
    cond = torch.as_tensor(Conditions.make(np.linspace(2e4, 9e4, 5), np.zeros(5), np.linspace(-4, 4, 10).reshape(5, 2),
                                           particle=11).as_array(), dtype=torch.float32)
    noise = model.draw_noise(5, torch.Generator().manual_seed(0))
    path = tmp_path / "m.onnx"
    with torch.no_grad():
        torch.onnx.export(_wrapper(model, False), (cond, *noise), str(path), input_names=["conditions", "noise"],
                          output_names=["showers"], dynamic_axes={"conditions": {0: "n"}, "noise": {0: "n"}},
                          opset_version=17, dynamo=False)
        ref = model.decode_window(cond, *noise).numpy()
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["showers"], {"conditions": cond.numpy(), "noise": noise[0].numpy()})[0]
    assert out.shape == (5, det.n_cells()) and float(np.abs(out - ref).max()) < 1e-3


def test_train_generate_export_through_the_command_line(det, tmp_path, capsys):
    b = hex_showers(det, 40, seed=2)
    write_showers(tmp_path / "train.h5", det, b.conditions, b.showers, attrs={"source": "toy", "particle": "e-"})
    cfg = tmp_path / "c.toml"
    opts = "\n".join(f"{k} = {v}" for k, v in TINY.items())
    cfg.write_text(f'family = "wgan"\n[train]\nbatch_size = 8\nmax_steps = 4\nval_every = 2\ncheckpoint_every = 2\n'
                   f'val_max_showers = 8\nlr = 1e-3\n[model]\n{opts}\n')
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "train.h5"), "--model", "wgan", "--config", str(cfg), "-o",
                 str(run), "-q"]) == 0
    model = load_model(run, expected_detector=det)
    assert model.frame == "cells" and model.meta["conditions"]["x_mm"][1] <= 5.0
    gen = tmp_path / "gen.h5"
    assert main(["generate", "--model", str(run), "--conditions-from", str(tmp_path / "train.h5"), "-o", str(gen),
                 "--seed", "1", "-q"]) == 0
    with ShowerFile(gen) as f:
        out = f.read()
    np.testing.assert_array_equal(out.conditions.position, b.conditions.position)
    assert out.showers.shape == (40, det.n_cells()) and np.all(out.showers >= 0)
    assert main(["export", "--model", str(run), "-o", str(tmp_path / "m.onnx")]) == 0  # example impact points
    assert "onnxruntime vs torch" in capsys.readouterr().err                            # from its training range


def test_critic_response_features_are_standardised_on_the_training_data(tmp_path):
    """critic_response: the critic's view of log(E_layer / E_inc) and log(E_vis / E_inc) has mean 0 and spread 1
    over the training showers (so a response off by one training spread moves it by one), the buffers save and
    load, and a shower scaled by 1.05 moves the total's feature by log(1.05) / its training spread."""
    from conftest_models import tiny_model, toy_detector, toy_showers

    det = toy_detector()
    data = toy_showers(det, 80, seed=5)
    model = tiny_model("wgan:critic_response", det, data)
    e = torch.as_tensor(data.energies)
    x = torch.as_tensor(data.showers)
    feats = model._response_features(model.cell_fractions(model.to_image(x, e)).sum(dim=(2, 3)))
    assert feats.shape == (80, model.image_shape[0] + 1)
    assert torch.allclose(feats.mean(0), torch.zeros(feats.shape[1]), atol=1e-3)
    assert torch.allclose(feats.std(0), torch.ones(feats.shape[1]), atol=1e-3)
    scaled = model._response_features(model.cell_fractions(model.to_image(1.05 * x, e)).sum(dim=(2, 3)))
    shift = float((scaled[:, -1] - feats[:, -1]).mean())
    assert shift == pytest.approx(float(np.log(1.05) / model.response_std[-1]), rel=1e-3)
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert torch.equal(back.response_mean, model.response_mean) and torch.equal(back.response_std, model.response_std)


def test_response_distance_is_the_sorted_feature_distance():
    """response_weight: the generator's extra term is zero for a batch against itself, grows with a scaled batch
    (a response off by 5 % moves the total's feature by log(1.05) / spread for every shower), and a training step
    logs it."""
    from conftest_models import tiny_model, toy_detector, toy_showers

    det = toy_detector()
    data = toy_showers(det, 64, seed=6)
    model = tiny_model("wgan:critic_response", det, data)
    e = torch.as_tensor(data.energies)
    y = model.to_image(torch.as_tensor(data.showers), e)
    assert float(model._response_distance(y, y)) == 0.0
    y_scaled = model.to_image(1.05 * torch.as_tensor(data.showers), e)
    d = float(model._response_distance(y_scaled, y))
    n_feat = model.image_shape[0] + 1
    assert d == pytest.approx(float((np.log(1.05) / model.response_std).sum()) / n_feat, rel=1e-2)
    from caloforge.models import TrainBatch
    opts = model.configure_optimizers(1e-3)
    cond = torch.as_tensor(data.conditions.as_array(), dtype=torch.float32)
    logs = [model.training_step(TrainBatch(cond, torch.as_tensor(data.showers)), opts, step) for step in range(2)]
    assert "resp" in logs[1] and logs[1]["resp"] > 0  # n_critic = 2: the generator steps at step 1


def test_response_z_scores_are_standard_at_each_energy():
    """response_by_energy: the z-scores of the log total at each shower's energy have mean 0 and spread 1 in every
    energy bin of the training data (the quadratic fits follow the energy dependence), so a batch of mixed energies
    compares spreads at each energy."""
    from conftest_models import tiny_model, toy_detector, toy_showers

    det = toy_detector()
    data = toy_showers(det, 400, seed=8)
    model = tiny_model("wgan:critic_response", det, data)
    e = torch.as_tensor(data.energies)
    frac = model.cell_fractions(model.to_image(torch.as_tensor(data.showers), e)).sum(dim=(2, 3))
    z = model._response_z(frac, e)[:, -1].numpy()
    edges = np.quantile(data.energies, [0, 0.5, 1])
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (data.energies >= lo) & (data.energies <= hi)
        n = int(sel.sum())
        assert abs(z[sel].mean()) < 4 / np.sqrt(n) + 0.1 and abs(z[sel].std() - 1) < 0.25, (lo, hi, z[sel].mean(),
                                                                                              z[sel].std())


@pytest.mark.parametrize("variant", ["wgan", "wgan:cell_power"])
def test_cell_representation_round_trips_and_scales(variant):
    """Both cell representations map showers to y in [0, 1] (0 empty, 1 the hottest training cell) and back to the
    same MeV; under the power law p a shower scaled by 1.05 scales every y by 1.05^p, under the logarithm it shifts
    the hot cells' y by about log(1.05) / y_scale."""
    from conftest_models import tiny_model, toy_detector, toy_showers

    det = toy_detector()
    data = toy_showers(det, 40, seed=6)
    model = tiny_model(variant, det, data)
    e = torch.as_tensor(data.energies)
    x = torch.as_tensor(data.showers)
    y = model.to_image(x, e)
    assert float(y.min()) == 0.0 and float(y.max()) == pytest.approx(1.0, abs=1e-5)
    back = model.from_image(y, e)
    assert torch.allclose(back, x.float(), rtol=1e-4, atol=1e-3)
    assert torch.equal(model.from_image(torch.zeros_like(y), e), torch.zeros_like(back))
    y2 = model.to_image(1.05 * x, e)
    hot = y > 0.5
    if variant == "wgan:cell_power":
        assert torch.allclose(y2[y > 0], y[y > 0] * 1.05 ** 0.5, rtol=1e-4)
    else:
        assert torch.allclose(y2[hot] - y[hot], torch.full_like(y[hot], float(np.log(1.05) / model.y_scale)),
                              atol=2e-3)


@pytest.mark.parametrize("power", [0.0, 0.5])
def test_layer_energies_set_each_generated_layer(det, data, power):
    """layer_energies on hexagons: each non-empty generated layer holds the layer head's energy exactly, pixels
    off the sensor stay zero, and sampling goes through the same path (decode = _generate)."""
    cfg = dict(TINY, cell_power=power, layer_energies=True)
    torch.manual_seed(0)
    model = WGAN(det, None, WGAN.Config.from_dict(cfg))
    model.meta["conditions"] = {"energy_mev": [20e3, 90e3], "angle_deg": [0.0, 0.0], "x_mm": [-5.0, 5.0],
                                "y_mm": [-5.0, 5.0]}
    model.fit_preprocessing(data)
    model.eval()
    cond = torch.as_tensor(data.conditions.as_array()[:8], dtype=torch.float32)
    cf = model.condition_features(cond)
    z = torch.randn(8, cfg["latent_dim"])
    with torch.no_grad():
        y = model._generate(z, cf)
        n_l = model.image_shape[0]
        want = torch.exp((model.generator.layer_energies(z, cf) * model.response_std[:n_l]
                          + model.response_mean[:n_l]).clamp(max=0.0))
        raw = model.cell_fractions(model.generator(z, cf) * model.pixel_mask).sum(dim=(2, 3))
        got = model.cell_fractions(y).sum(dim=(2, 3))
        assert bool((raw > 0).any())
        assert torch.allclose(got[raw > 0], want[raw > 0], rtol=1e-3)
        assert float((y * (1 - model.pixel_mask)).abs().max()) == 0.0
        showers = model.decode(cond, z)
        assert torch.allclose(showers, model.from_image(y.clamp(max=1.0), cond[:, 0]))
