"""The families on a detector's flat cell vector (frame "cells"): calogan's parts (locally connected layers, the
layer-to-layer transfer, minibatch discrimination, energy conservation), the frame's refusals, and train ->
generate -> export -> bench through the CLI on a per-layer toy readout."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from caloforge.cli import main
from caloforge.dataset import ShowerFile, write_showers
from caloforge.detector import Detector
from caloforge.models import ModelError, get_family, load_model, save_model
from caloforge.models.calogan import LocallyConnected2d, MinibatchDiscrimination
from conftest_models import (
    TINY_CONFIGS,
    load_script,
    tiny_model,
    toy_detector,
    toy_layered_detector,
    toy_layered_showers,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def det():
    return toy_layered_detector()


@pytest.fixture(scope="module")
def data(det):
    return toy_layered_showers(det, 40, seed=1)


def test_locally_connected_is_a_convolution_with_one_filter_per_position():
    torch.manual_seed(0)
    lc = LocallyConnected2d(3, 2, 5, 4)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    with torch.no_grad():  # the same filter at every position: exactly a convolution
        lc.weight.copy_(conv.weight.permute(1, 2, 3, 0).reshape(1, 27, 2).expand(20, 27, 2))
        lc.bias.copy_(conv.bias[:, None, None].expand(2, 5, 4))
    x = torch.randn(6, 3, 5, 4)
    torch.testing.assert_close(lc(x), conv(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # change the filter of position (2, 1) only: only that output moves
        lc.weight[2 * 4 + 1] += 1.0
    with torch.no_grad():
        diff = (lc(x) - conv(x)).abs().sum(dim=(0, 1))
    assert diff[2, 1] > 0.1 and float(diff.sum() - diff[2, 1]) < 1e-4


def test_minibatch_discrimination_sees_a_collapsed_batch():
    mbd = MinibatchDiscrimination(4, kernels=3, dims=2)
    same = mbd(torch.ones(5, 4))[:, 4:]  # five identical rows: each is close to the four others
    torch.testing.assert_close(same, torch.full((5, 3), 4.0))
    with torch.no_grad():
        spread = mbd(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)) * 50)[:, 4:]
    assert float(spread.max()) < 1.0


def test_calogan_layers_at_their_own_granularity_and_the_transfer(det, data):
    model = tiny_model("calogan", det, data)
    assert model.grids == [(8, 2), (4, 4), (2, 4)] and model.frame == "cells"
    assert [len(list(g.parameters())) for g in model.generators][0] < len(list(model.generators[1].parameters()))
    z = torch.randn(3, model.config.latent_dim)
    cf = model.condition_features(torch.as_tensor(data.conditions[:3].as_array(), dtype=torch.float32))
    y0 = model.generators[0](z, cf, None).detach().requires_grad_(True)
    y1 = model.generators[1](z, cf, y0)
    assert y0.shape == (3, 16) and y1.shape == (3, 16)
    grad, = torch.autograd.grad(y1.sum(), y0, allow_unused=True)
    assert grad is not None and float(grad.abs().sum()) > 0, "layer 1 must see layer 0's image"
    y = model.generate_y(z, cf)
    assert y.shape == (3, det.n_cells()) and list(det.layer_offsets()) == [0, 16, 32, 40]


def test_energy_conservation_term(det, data):
    model = tiny_model("calogan", det, data)
    model.config.response_weight = 0.0
    f_max = float(model.max_visible_fraction)
    assert f_max == pytest.approx(float((data.showers.sum(1) / data.energies).max()), rel=1e-5)
    batch = type("B", (), {"showers": torch.as_tensor(data.showers[:4]),
                           "energies": torch.as_tensor(data.energies[:4], dtype=torch.float32)})()
    real = model.to_y(batch.showers, batch.energies)
    assert float(model._generator_extra(real, batch)) < 1e-6  # real showers conserve energy
    over = model.to_y(batch.showers * 3 * f_max / (batch.showers.sum(1, keepdim=True) / batch.energies[:, None]),
                      batch.energies)  # visible fraction 3 f_max
    assert float(model._generator_extra(over, batch)) == pytest.approx(2 * f_max, rel=1e-3)


@pytest.mark.parametrize("family", ["calogan", "densewgan"])
def test_cells_frame_refusals(family, det, data):
    model = tiny_model(family, det, data)
    with pytest.raises(ModelError, match=r"impact point \(5, 0\) mm at row 1 requested.*default impact point"):
        model.sample([20e3, 30e3], 0.0, seed=0, positions=[[0, 0], [5, 0]])
    with pytest.raises(ModelError, match="angle 10 deg requested.*normal incidence only"):
        model.sample([20e3], 10.0, seed=0)
    with pytest.raises(ModelError, match="trained for gamma, e\\+ only|trained for e\\+, gamma only"):
        model.sample([20e3], 0.0, seed=0, particles="e-")
    cls = get_family(family)
    with pytest.raises(ModelError, match="normal-incidence cells"):
        cls(det, det.n_cells() + 1, cls.Config.from_dict(TINY_CONFIGS[family]))
    with pytest.raises(ModelError, match="energy or particle features only"):
        cls(det, None, cls.Config.from_dict(TINY_CONFIGS[family]), features=("log_e", "sin_x"))
    with pytest.raises(ModelError, match="takes frame cells"):
        cls(det, None, cls.Config.from_dict(TINY_CONFIGS[family]), frame="axis")


def test_image_families_refuse_per_layer_readouts_and_calogan_maps_hexagons(det):
    with pytest.raises(ModelError, match="per-layer cells"):
        get_family("wgan")(det)
    with pytest.raises(ModelError, match="frame 'cells'"):
        get_family("wgan")(toy_detector(), frame="cells")
    hexes = Detector.from_dict({"name": "hexes", "size_x_mm": 200.0, "size_y_mm": 200.0, "layers": [
        {"absorber": "G4_W", "absorber_mm": 3.0, "active": "G4_Si", "active_mm": 0.3, "count": 2,
         "cells": {"kind": "hex", "rings": 2, "pitch_mm": 10.0}}]})
    calogan = get_family("calogan")(hexes)  # hexagons onto the image of their axial lattice coordinates
    assert calogan.grids == [(5, 5)] * 2 and calogan.n_cells == hexes.n_cells()
    assert get_family("densewgan")(hexes).n_cells == hexes.n_cells()  # the dense WGAN takes any readout


def test_cells_models_on_a_uniform_grid_use_its_window(data):
    det = toy_detector()
    model = get_family("calogan")(det, None, get_family("calogan").Config.from_dict(TINY_CONFIGS["calogan"]))
    assert model.frame == "cells" and model.grids == [det.shape()[1:]] * det.n_layers


@pytest.mark.parametrize("family", ["calogan", "densewgan"])
def test_saved_frame_and_features(family, det, data, tmp_path):
    model = tiny_model(family, det, data)
    save_model(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["frame"] == "cells" and meta["condition_features"] == list(model.default_features)
    assert meta["particles"] == ["e+", "gamma"]
    loaded = load_model(tmp_path / "m", expected_detector=det)
    assert loaded.frame == "cells" and loaded.shape == (det.n_cells(),)


@pytest.mark.parametrize("family", ["calogan", "densewgan"])
def test_train_generate_export_bench_cli(family, det, tmp_path, capsys):
    b = toy_layered_showers(det, 96, seed=7)
    data = tmp_path / "train.h5"
    write_showers(data, det, b.conditions, b.showers, attrs={"source": "toy", "particle": "e+,gamma"})
    cfg = tmp_path / "c.toml"
    model_opts = "\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY_CONFIGS[family].items())
    cfg.write_text(f'family = "{family}"\n[train]\nbatch_size = 16\nmax_steps = 8\nval_every = 4\n'
                   f'checkpoint_every = 4\nval_max_showers = 16\nlr = 1e-3\n[model]\n{model_opts}\n')
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--model", family, "--config", str(cfg), "-o", str(run), "-q"]) == 0
    model = load_model(run, expected_detector=det)
    assert model.family == family and model.meta["conditions"]["energy_mev"][0] >= 10e3
    gen = tmp_path / "gen.h5"
    assert main(["generate", "--model", str(run), "--conditions-from", str(data), "-n", "20", "-o", str(gen),
                 "--seed", "3", "-q"]) == 0
    with ShowerFile(gen) as f:
        showers = f.read().showers
        assert f.detector.to_dict() == det.to_dict() and showers.shape == (20, det.n_cells())
    assert np.all(showers >= 0) and np.all(np.isfinite(showers))
    assert main(["export", "--model", str(run), "-o", str(tmp_path / "m.onnx")]) == 0
    assert "onnxruntime vs torch" in capsys.readouterr().err
    assert main(["bench", "--model", str(run), "--batch-sizes", "1,8", "--energies", "20", "--repeats", "2",
                 "--no-geant4", "--json", str(tmp_path / "b.json")]) == 0
    bench = json.loads((tmp_path / "b.json").read_text())
    assert bench and "ms" in json.dumps(bench)


def test_train_features_flag_gives_a_family_particle_features(det, tmp_path, capsys):
    """caloforge train --features: densewgan (energy alone by default) trained with the particle features on e+ and
    photons keeps them on saving and loading and makes different showers for the two particles at the same noise;
    an unknown feature name is refused with the list of what a cells-frame model takes."""
    b = toy_layered_showers(det, 64, seed=7)
    data = tmp_path / "train.h5"
    write_showers(data, det, b.conditions, b.showers, attrs={"source": "toy", "particle": "e+,gamma"})
    cfg = tmp_path / "c.toml"
    model_opts = "\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY_CONFIGS["densewgan"].items())
    cfg.write_text(f'family = "densewgan"\n[train]\nbatch_size = 16\nmax_steps = 4\nval_every = 4\n'
                   f'checkpoint_every = 4\nval_max_showers = 16\n[model]\n{model_opts}\n')
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--model", "densewgan", "--config", str(cfg), "-o", str(run), "-q",
                 "--features", "log_e,is_photon,charge"]) == 0
    assert json.loads((run / "run.json").read_text())["features"] == ["log_e", "is_photon", "charge"]
    model = load_model(run, expected_detector=det)
    assert model.features == ("log_e", "is_photon", "charge") and model.generator[0].in_features == 8 + 3
    cond = torch.tensor([[5e4, 0.0, 0.0, 0.0, 22.0], [5e4, 0.0, 0.0, 0.0, -11.0]])
    z = torch.randn(1, 8).expand(2, -1)
    with torch.no_grad():
        showers = model.decode(cond, z)
    assert not torch.equal(showers[0], showers[1])
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--model", "densewgan", "--config", str(cfg), "-o",
                 str(tmp_path / "bad"), "-q", "--features", "log_e,angle"]) != 0
    assert "(log_e, is_photon, charge)" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "run.json").exists()
    for family in ("densewgan", "calogan"):  # the HGCAL seed's labels: energy and impact point
        cls = get_family(family)
        assert cls(det, None, cls.Config.from_dict(TINY_CONFIGS[family]),
                   features=("log_e", "pos_x", "pos_y")).condition_names == ("energy", "position")


def test_shower_shapes_script(det, tmp_path):
    """scripts/shower_shapes.py: identical samples agree exactly; a sample with doubled energies is told apart."""

    mod = load_script("shower_shapes")
    b = toy_layered_showers(det, 60, seed=2)
    write_showers(tmp_path / "a.h5", det, b.conditions, b.showers)
    write_showers(tmp_path / "b.h5", det, b.conditions, 2 * b.showers)
    ref, particles, images, _ = mod.shapes(str(tmp_path / "a.h5"), 0.075)
    assert set(particles) == {"gamma", "e+"} and [x.shape[1] for x in images] == [16, 16, 8]
    rows = {r["quantity"]: r for r in mod.compare(ref, ref)}
    assert all(r["pull"] == 0 and r["ks"] == 0 for r in rows.values())
    want = {"E_tot [GeV]", "f_0", "E_ratio,1", "s_d [layers]", "sigma_sd [layers]", "sigma_1,x (eta) [cells]"}
    assert want <= set(rows)
    doubled, _, images2, _ = mod.shapes(str(tmp_path / "b.h5"), 0.075)
    rows2 = {r["quantity"]: r for r in mod.compare(ref, doubled)}
    assert rows2["E_tot [GeV]"]["model_mean"] == pytest.approx(2 * rows["E_tot [GeV]"]["geant4_mean"], rel=0.02)
    assert rows2["E_tot [GeV]"]["ks"] > rows2["E_tot [GeV]"]["ks_crit"]
    assert rows2["f_1"]["ks"] < rows2["f_1"]["ks_crit"]  # fractions do not change (cells far above threshold)
    assert mod.image_agreement(images, images2) == pytest.approx([1.0, 1.0, 1.0], rel=0.02)


def test_densewgan_power_law_cells_round_trip():
    """cell_power = 0.5 on a per-layer readout: y in [0, 1] with 1 the hottest training cell, back to the same MeV,
    a shower scaled by 1.05 scales every y by sqrt(1.05), empty cells stay exactly 0."""
    det = toy_layered_detector()
    data = toy_layered_showers(det, 40, seed=4)
    model = tiny_model("densewgan:cell_power", det, data)
    e = torch.as_tensor(data.energies)
    x = torch.as_tensor(data.showers).float()
    y = model.to_y(x, e)
    assert float(y.min()) == 0.0 and float(y.max()) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(model.from_y(y, e), x, rtol=1e-4, atol=1e-3)
    assert torch.equal(model.from_y(y, e)[x == 0], x[x == 0])
    hit = y > 0
    assert torch.allclose(model.to_y(1.05 * x, e)[hit], y[hit] * 1.05 ** 0.5, rtol=1e-4)


@pytest.mark.parametrize("power", [0.0, 0.5])
def test_densewgan_layer_energies_set_each_layer(power):
    """layer_energies: every non-empty generated layer holds exactly the energy of the generator's layer head
    (log or power-law cells), the training layer energies are standard in the head's units, and gradients reach
    the head."""
    det = toy_layered_detector()
    data = toy_layered_showers(det, 40, seed=5)
    cfg = dict(TINY_CONFIGS["densewgan"], cell_power=power, layer_energies=True)
    model = get_family("densewgan")(det, None, get_family("densewgan").Config.from_dict(cfg))
    model.fit_preprocessing(data)
    x = torch.as_tensor(data.showers).float()
    frac = (x @ model.layer_onehot) / torch.as_tensor(data.energies).float()[:, None]
    t_data = (torch.log(frac + 1e-6) - model.layer_log_mean) / model.layer_log_std
    assert torch.allclose(t_data.mean(0), torch.zeros(det.n_layers), atol=1e-4)
    z, cf = torch.randn(16, cfg["latent_dim"]), model.condition_features(
        torch.as_tensor(data.conditions.as_array()[:16], dtype=torch.float32))
    out = model.generator(torch.cat([z, cf], dim=1))
    y = model.generate_y(z, cf)
    got = model.cell_fractions(y) @ model.layer_onehot
    want = torch.exp((out[:, model.n_cells:] * model.layer_log_std + model.layer_log_mean).clamp(max=0.0))
    raw = model.cell_fractions(torch.relu(out[:, :model.n_cells])) @ model.layer_onehot
    assert bool((raw > 0).any())
    assert torch.allclose(got[raw > 0], want[raw > 0], rtol=1e-3)
    y.sum().backward()
    assert model.generator[-1].weight.grad[model.n_cells:].abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.generator.parameters() if p.grad is not None)
    # extreme layer energies (a head far below or above the training range): finite gradients still
    model.zero_grad()
    with torch.no_grad():
        model.generator[-1].bias[model.n_cells:] = torch.tensor([-1e3, 1e3] * (det.n_layers // 2)
                                                                + [-1e3] * (det.n_layers % 2))
    model.generate_y(z, cf).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.generator.parameters() if p.grad is not None)


def test_calogan_layer_energies_set_each_layer():
    """calogan with layer_energies: the concatenated per-layer images hold the layer head's energies."""
    det = toy_layered_detector()
    data = toy_layered_showers(det, 40, seed=6)
    model = tiny_model("calogan:layer_energies", det, data).eval()
    cond = torch.as_tensor(data.conditions.as_array()[:12], dtype=torch.float32)
    cf = model.condition_features(cond)
    z = torch.randn(12, model.config.latent_dim)
    with torch.no_grad():
        y = model.generate_y(z, cf)
        want = torch.exp((model.layer_head(torch.cat([z, cf], dim=1)) * model.layer_log_std
                          + model.layer_log_mean).clamp(max=0.0))
        got = model.cell_fractions(y) @ model.layer_onehot
    hit = got > 0
    assert bool(hit.any()) and torch.allclose(got[hit], want[hit], rtol=1e-3)


@pytest.mark.parametrize("variant", ["densewgan:response_distance", "calogan:response_distance"])
def test_response_features_are_standardised(variant):
    """The response features of the training showers (log layer energies and log total) come out standardised
    (mean 0, spread 1), and a shower scaled by k moves every column by log(k) / spread."""
    det = toy_layered_detector()
    data = toy_layered_showers(det, 40, seed=7)
    model = tiny_model(variant, det, data)
    x = torch.as_tensor(data.showers).float()
    e = torch.as_tensor(data.energies).float()
    f = model.response_features(model.to_y(x, e))
    assert f.shape == (40, det.n_layers + 1)
    assert torch.allclose(f.mean(0), torch.zeros(det.n_layers + 1), atol=1e-3)
    assert torch.allclose(f.std(0, unbiased=False), torch.ones(det.n_layers + 1), atol=1e-3)
    f2 = model.response_features(model.to_y(1.1 * x, e))
    assert torch.allclose(f2 - f, math.log(1.1) / model.response_std.expand_as(f), atol=2e-3)


def test_energy_distance_sees_a_wider_spread():
    """The energy distance between two samples of one law is ~0 (unbiased: within its sampling spread), and it grows
    with a shift and with a doubled spread, the error the GANs made in the response; finite gradients even for
    identical rows."""
    from caloforge.models.flatgan import energy_distance

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 3, generator=g), torch.randn(400, 3, generator=g)
    same = float(energy_distance(a, b))
    wide = float(energy_distance(2 * a, b))
    shifted = float(energy_distance(a + 0.5, b))
    assert abs(same) < 0.03 and wide > 0.3 and shifted > 0.1
    x = torch.zeros(5, 2, requires_grad=True)
    energy_distance(x, torch.zeros(5, 2)).backward()
    assert torch.isfinite(x.grad).all()


def test_energy_score_sees_the_spread_at_each_condition():
    """Two generators with the same mixture over the batch: one right at each condition, one drawing from the
    mixture whatever the condition. The batch's energy distance cannot tell them apart; the energy score can, and it
    also sees a spread doubled at half of the conditions."""
    from caloforge.models.flatgan import energy_distance, energy_score

    g = torch.Generator().manual_seed(1)
    n = 4000
    mu = torch.linspace(-3, 3, n)[:, None]
    real = mu + torch.randn(n, 1, generator=g)

    def right(k: float = 1.0) -> torch.Tensor:
        wide = torch.where(mu > 0, k, 1.0)
        return mu + wide * torch.randn(n, 1, generator=g)

    def mixture() -> torch.Tensor:
        return mu[torch.randperm(n, generator=g)] + torch.randn(n, 1, generator=g)

    rows = torch.randperm(n, generator=g)[:800]
    assert abs(float(energy_distance(mixture()[rows], real[rows]))) < 0.05
    good, mixed, wide = (float(energy_score(a, b, real)) for a, b in
                         ((right(), right()), (mixture(), mixture()), (right(3.0), right(3.0))))
    # Expected scores (normal laws): sqrt(2 / pi) (sqrt(s^2 + 1) - s / sqrt(2)) for spread s against 1, i.e. 0.564
    # (right), and 0.697 when half of the rows have s = 3; the sampling error of each is ~0.015 here.
    assert good == pytest.approx(1 / math.sqrt(math.pi), abs=0.06)
    assert wide == pytest.approx(0.697, abs=0.06)
    assert mixed > good + 0.3 and wide > good + 0.07


@pytest.mark.parametrize("family", ["densewgan", "calogan", "wgan"])
def test_response_conditional_needs_the_layer_head(family):
    """response_conditional scores the layer head's samples: without layer_energies (or without a weight) the
    model refuses the config and says what it needs."""
    det = toy_detector() if family == "wgan" else toy_layered_detector()
    cfg = dict(TINY_CONFIGS[f"{family}:response_conditional"], layer_energies=False)
    cls = get_family(family)
    with pytest.raises(ModelError, match="response_conditional.*layer_energies = true"):
        cls(det, None, cls.Config.from_dict(cfg))


def test_response_conditional_trains_the_layer_head_only():
    """The energy-score term of densewgan reaches the layer head's outputs, not the cells', is positive, and is
    reproducible from the batch's noise."""
    from caloforge.models.base import TrainBatch

    det = toy_layered_detector()
    data = toy_layered_showers(det, 40, seed=8)
    model = tiny_model("densewgan:response_conditional", det, data)
    cond = torch.as_tensor(data.conditions.as_array()[:32], dtype=torch.float32)
    x = torch.as_tensor(data.showers[:32]).float()

    def term(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        batch = TrainBatch(cond=cond, showers=x)
        y_gen = model.generate_y(batch.randn(model.config.latent_dim), model.condition_features(cond))
        return model._generator_extra(y_gen, batch)

    model.zero_grad()
    t = term(3)
    assert float(t) > 0 and float(t) == pytest.approx(float(term(3)), rel=1e-6)
    t.backward()
    grad = model.generator[-1].weight.grad
    assert grad[model.n_cells:].abs().sum() > 0
    assert grad[:model.n_cells].abs().sum() == 0


@pytest.mark.parametrize("variant", ["densewgan:shape_score", "calogan:response_conditional"])
def test_shape_features_are_the_layer_moments(variant):
    """shape_score's features are the evaluation's per-layer centroids and widths (observables.layer_moments), and
    standardised on the training showers; the score's gradient reaches the cells."""
    from caloforge.observables import as_geometry, layer_moments

    det = toy_layered_detector()
    data = toy_layered_showers(det, 60, seed=11)
    model = tiny_model(variant, det, data)
    x = torch.as_tensor(data.showers).float()
    e = torch.as_tensor(data.energies).float()
    raw = model._raw_shape_features(x / e[:, None]).double().numpy()
    mom = layer_moments(np.asarray(data.showers, np.float64), as_geometry(det))
    n_l = det.n_layers
    full = mom["e"] / np.asarray(data.energies)[:, None] > 1e-3  # the 1e-6 offset is negligible there
    for k, name in enumerate(("cog_x", "cog_y", "width_x", "width_y")):
        want = mom[name] if k < 2 else np.sqrt(mom[name] ** 2 + 1e-2)
        np.testing.assert_allclose(raw[:, k * n_l:(k + 1) * n_l][full], want[full], rtol=2e-3, atol=2e-3)
    f = model.shape_features(model.to_y(x, e))
    varying = model.shape_std != 1.0
    assert bool(varying.any())
    assert torch.allclose(f.mean(0)[varying], torch.zeros(int(varying.sum())), atol=0.05)
    y = model.to_y(x[:8], e[:8]).requires_grad_(True)
    model.shape_score(y, y.flip(0), model.to_y(x[8:16], e[8:16])).backward()
    assert torch.isfinite(y.grad).all() and float(y.grad.abs().sum()) > 0


def test_response_distance_trains_the_layer_head_only():
    """response_distance with generated layer energies: the term's gradient reaches the layer head's outputs and not
    the cells' (whose raw sizes the rescaling undoes), and it is positive against the real batch."""
    det = toy_layered_detector()
    data = toy_layered_showers(det, 40, seed=8)
    cfg = dict(TINY_CONFIGS["densewgan:cell_power"], response_distance=1.0)
    model = get_family("densewgan")(det, None, get_family("densewgan").Config.from_dict(cfg))
    model.fit_preprocessing(data)
    cond = torch.as_tensor(data.conditions.as_array()[:32], dtype=torch.float32)
    cf = model.condition_features(cond)
    x = torch.as_tensor(data.showers[:32]).float()
    y_real = model.to_y(x, cond[:, 0])
    z = torch.randn(32, cfg["latent_dim"])
    y_gen = model.generate_y(z, cf)
    d = model.response_distance(y_gen, y_real, cf)
    assert float(d) > 0
    d.backward()
    grad = model.generator[-1].weight.grad
    assert grad[model.n_cells:].abs().sum() > 0
    assert grad[:model.n_cells].abs().sum() == 0


def test_wgan_response_distance_trains_the_layer_head_only():
    """The same for ``wgan`` with layer_energies: the energy-distance term reaches the layer head, not the image
    generator's convolutions."""
    from caloforge.models.flatgan import energy_distance, head_response
    from conftest_models import toy_showers

    det = toy_detector()
    data = toy_showers(det, 40, seed=9)
    model = tiny_model("wgan:response_distance", det, data)
    cond = torch.as_tensor(data.conditions.as_array()[:32], dtype=torch.float32)
    cf = model.condition_features(cond)
    model._generate(torch.randn(32, model.config.latent_dim), cf)
    f_gen = head_response(model.generated_layer_logs, model.response_mean, model.response_std)
    y_real = model.to_image(torch.as_tensor(data.showers[:32]).float(), cond[:, 0])
    f_real = model._response_features(model.cell_fractions(y_real).sum(dim=(2, 3)))
    energy_distance(torch.cat([f_gen, cf], 1), torch.cat([f_real, cf], 1)).backward()
    head = sum(float(p.grad.abs().sum()) for p in model.generator.layer_head.parameters() if p.grad is not None)
    rest = [p for n, p in model.generator.named_parameters() if not n.startswith("layer_head")]
    assert head > 0 and all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in rest)


def test_conditional_flow_inverts_and_learns_a_spread_per_condition():
    """flatgan.ConditionalFlow: sample inverts the density's map (log_prob of zero-initialised couplings is the
    standard normal's), and by likelihood it learns a spread that changes with the condition, the response's
    situation (a narrower law at high energy)."""
    from caloforge.models.flatgan import ConditionalFlow

    torch.manual_seed(0)
    flow = ConditionalFlow(3, 1, hidden=32, blocks=4)
    x, c = torch.randn(50, 3), torch.rand(50, 1)
    std_normal = -0.5 * (x * x).sum(1) - 1.5 * math.log(2 * math.pi)
    assert torch.allclose(flow.log_prob(x, c), std_normal, atol=1e-5)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(300):
        c = torch.rand(256, 1)
        spread = 1.0 - 0.8 * c  # 1 at c = 0, 0.2 at c = 1
        rows = torch.cat([2 * c + spread * torch.randn(256, 1), torch.randn(256, 2)], dim=1)
        loss = -flow.log_prob(rows, c).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for level, want in ((0.2, 0.84), (0.8, 0.36)):
            c = torch.full((4000, 1), level)
            z = torch.randn(4000, 3)
            got = flow.sample(z, c)
            # the density's map takes the samples back to their noise
            back = got
            for i, block in enumerate(flow.blocks):
                back = block(back.flip(1) if i % 2 else back, c)[0]
            assert torch.allclose(back, z, atol=1e-3)
            assert float(got[:, 0].mean()) == pytest.approx(2 * level, abs=0.1)
            assert float(got[:, 0].std()) == pytest.approx(want, rel=0.2)


@pytest.mark.parametrize("family, sees", [("densewgan", True), ("densewgan", False), ("calogan", False)])
def test_layer_flow_sets_each_layer_and_feeds_the_generator(family, sees):
    """densewgan and calogan with layer_flow: every non-empty generated layer holds the flow's energy for the same
    noise, densewgan's generator takes those energies as inputs (generator_sees_layers) or only the noise, calogan
    has no layer head beside the flow, and a layer whose flow energy is below 1e-6 of E_inc comes out empty."""
    from caloforge.models.flatgan import EMPTY_LAYER_LOG

    det = toy_layered_detector()
    data = toy_layered_showers(det, 40, seed=12)
    cfg = dict(TINY_CONFIGS[f"{family}:layer_flow"], **({"generator_sees_layers": sees} if family == "densewgan"
                                                         else {}))
    cls = get_family(family)
    model = cls(det, None, cls.Config.from_dict(cfg))
    model.fit_preprocessing(data)
    n_l = det.n_layers
    if family == "densewgan":
        assert model.generator[0].in_features == cfg["latent_dim"] + model.n_cond_features + (n_l if sees else 0)
    else:
        assert model.layer_head is None and "flow" in model.configure_optimizers(1e-3)
    cond = torch.as_tensor(data.conditions.as_array()[:16], dtype=torch.float32)
    cf = model.condition_features(cond)
    z = torch.randn(16, cfg["latent_dim"])
    with torch.no_grad():
        y = model.generate_y(z, cf)
        want = model.head_logs(model.layer_flow.sample(z[:, :n_l], cf))
    got = model.cell_fractions(y) @ model.layer_onehot
    hit = got > 0
    assert bool(hit.any()) and torch.allclose(torch.log(got[hit]), want[hit], atol=1e-3)
    assert not bool(hit[want < EMPTY_LAYER_LOG].any())


@pytest.mark.parametrize("family", ["densewgan", "calogan"])
def test_critic_hits_count_the_cells_above_the_threshold(family):
    """critic_hits_mev: the critic's soft hit count is one half for a cell at the threshold, near 0 at half of it
    and near 1 at twice it, at every incident energy; an empty cell counts 0; the default (0) keeps tanh(50 y)."""
    det = toy_layered_detector()
    data = toy_layered_showers(det, 40, seed=12)
    cls = get_family(family)
    model = cls(det, None, cls.Config.from_dict(dict(TINY_CONFIGS[family], critic_hits_mev=0.075)))
    model.fit_preprocessing(data)
    n_l, first = det.n_layers, int(det.layer_offsets()[1])  # cells of layer 0
    for e_inc in (1e4, 9e4):
        showers = torch.zeros(4, det.n_cells())
        showers[:, 0] = torch.tensor([0.0375, 0.075, 0.15, 0.0])  # MeV, in a cell of layer 0
        showers[:, 1] = 50.0  # a hot cell
        energies = torch.full((4,), e_inc)
        cf = model.condition_features(torch.tensor([[e_inc, 0.0, 0.0, 0.0, 22.0]]).expand(4, -1))
        y = model.to_y(showers, energies)
        hits = model.layer_features(y, cf)[:, n_l] * first - 1.0  # the soft count of cell 0 (cell 1 counts 1)
        assert hits.tolist() == pytest.approx([1 / 17, 0.5, 16 / 17, 0.0], abs=2e-3)
    default = cls(det, None, cls.Config.from_dict(TINY_CONFIGS[family]))
    default.fit_preprocessing(data)
    assert torch.equal(default.layer_features(y, cf)[:, n_l], torch.tanh(50 * y[:, :first]).sum(1) / first)


def test_validator_reports_a_layer_the_model_stopped_filling(det, capsys, tmp_path):
    """train.Validator: a model whose showers lose a layer that the validation showers fill gets emptied_layers = 1
    (the score unchanged in form), a faithful one 0; the trainer warns with the layer and both fractions."""
    from caloforge.train import Trainer, Validator

    val = toy_layered_showers(det, 60, seed=5)

    class Replay:  # gives back the validation showers themselves, optionally with layer 1 emptied
        cond_mean = torch.zeros(1)

        def __init__(self, drop: bool):
            self.drop = drop

        def sample(self, conditions, generator=None, angled=False):
            x = torch.as_tensor(val.showers[:len(conditions)]).clone()
            if self.drop:
                lo, hi = det.layer_offsets()[1:3]
                x[:, int(lo):int(hi)] = 0.0
            return x

    validator = Validator(val, det, det.shape(False), 60)
    good, bad = validator(Replay(False)), validator(Replay(True))
    assert good["emptied_layers"] == 0 and good["score"] == pytest.approx(0.0, abs=1e-9)
    assert bad["emptied_layers"] == 1 and validator.emptied == [(1, 1.0, 0.0)] and bad["score"] > 0
    trainer = Trainer.__new__(Trainer)  # the reporting step alone
    trainer.validator, trainer.model, trainer.is_main = validator, Replay(True), True
    trainer.state = {"step": 7, "best_score": 0.0}
    trainer.cfg, trainer._log = type("C", (), {"select": "best"})(), lambda record: None
    trainer.validate()
    err = capsys.readouterr().err
    assert "step 7" in err and "layer 1 in 100 % (real 0 %)" in err


@pytest.mark.parametrize("family", ["densewgan", "calogan"])
def test_layer_flow_fit_steps_fit_the_flow_before_training(family):
    """layer_flow_fit_steps: fitting the preprocessing also fits the layer flow by likelihood on the training showers
    (lower NLL on them than the untrained flow), reproducibly for the same torch seed; 0 leaves the flow as built."""
    from caloforge.models.flatgan import flow_targets

    det = toy_layered_detector()
    data = toy_layered_showers(det, 80, seed=3)
    cls = get_family(family)

    def fitted(steps: int):
        torch.manual_seed(0)
        model = cls(det, None, cls.Config.from_dict(dict(TINY_CONFIGS[f"{family}:layer_flow"],
                                                         layer_flow_fit_steps=steps)))
        model.fit_preprocessing(data)
        cond = torch.as_tensor(data.conditions.as_array(), dtype=torch.float32)
        frac = torch.as_tensor(data.showers, dtype=torch.float32) @ model.layer_onehot / cond[:, :1]
        rows = flow_targets(frac, torch.full_like(frac, 0.5), model.layer_log_mean, model.layer_log_std)
        with torch.no_grad():
            return model, float(-model.layer_flow.log_prob(rows, model.condition_features(cond)).mean())

    (m0, nll0), (m1, nll1), (m2, _) = fitted(0), fitted(200), fitted(200)
    assert nll1 < nll0 - 0.5
    torch.manual_seed(0)
    built = cls(det, None, cls.Config.from_dict(TINY_CONFIGS[f"{family}:layer_flow"]))
    assert all(torch.equal(a, b) for a, b in zip(m0.layer_flow.parameters(), built.layer_flow.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(m1.layer_flow.parameters(), m2.layer_flow.parameters()))


def test_anchor_loss_pulls_raw_layers_to_the_flow_and_skips_empty_ones():
    """flatgan.anchor_loss: zero when the raw layer energies are the flow's, the squared log gap otherwise, nothing
    from layers the flow leaves empty, and a gradient that raises a raw layer below its target."""
    from caloforge.models.flatgan import EMPTY_LAYER_LOG, anchor_loss

    target = torch.log(torch.tensor([[0.1, 0.01, 1e-8]]))
    raw = torch.tensor([[0.1, 0.01, 0.5]], requires_grad=True)
    assert float(anchor_loss(raw, target).detach()) == pytest.approx(0.0, abs=1e-5)  # the empty third layer is ignored
    assert float(target[0, 2]) < EMPTY_LAYER_LOG
    low = torch.tensor([[0.1 / math.e, 0.01, 0.5]], requires_grad=True)
    loss = anchor_loss(low, target)
    assert float(loss.detach()) == pytest.approx(0.5, rel=1e-3)  # gap -1 in one of two counted layers
    loss.backward()
    assert float(low.grad[0, 0]) < 0 and float(low.grad[0, 2]) == 0.0
