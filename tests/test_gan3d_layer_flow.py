"""gan3d's layer flow (config ``layer_flow``; scripts/attach_layer_flow.py): a flow fitted by likelihood on the
training showers' layer energies sets the generated layers' energies, without touching the GAN."""

from __future__ import annotations

import sys

import numpy as np
import torch

from caloforge.dataset import write_showers
from caloforge.models import load_model, save_model
from conftest_models import load_script, tiny_model, toy_detector, toy_showers


def test_an_attached_layer_flow_gives_the_training_layer_energies(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    det = toy_detector()
    data = toy_showers(det, 600, seed=1)
    write_showers(tmp_path / "train.h5", det, data.conditions, data.showers, attrs={"particle": "gamma"})
    gan = tiny_model("gan3d:cell_power", det, data)  # untrained: its layer energies are anything
    save_model(gan, tmp_path / "gan")
    monkeypatch.setattr(sys, "argv", ["attach_layer_flow.py", str(tmp_path / "gan"), str(tmp_path / "train.h5"),
                                      str(tmp_path / "flowed"), "--steps", "600", "--seed", "1"])
    load_script("attach_layer_flow").main()
    flowed = load_model(tmp_path / "flowed")
    assert flowed.config.layer_flow and flowed.layer_flow is not None
    e = data.energies
    real = np.log(data.showers.reshape(len(e), det.n_layers, -1).sum(2) / e[:, None])
    raw = np.log(gan.sample(e, 0.0, seed=2).numpy().reshape(len(e), det.n_layers, -1).sum(2) / e[:, None] + 1e-12)
    gen = np.log(flowed.sample(e, 0.0, seed=2).numpy().reshape(len(e), det.n_layers, -1).sum(2) / e[:, None])
    se = real.std(0) / np.sqrt(len(e))
    assert np.all(np.abs(gen.mean(0) - real.mean(0)) < 0.1 + 5 * se), (gen.mean(0), real.mean(0))
    assert np.all(np.abs(gen.std(0) / real.std(0) - 1) < 0.35), (gen.std(0), real.std(0))
    assert np.max(np.abs(raw.mean(0) - real.mean(0))) > 1.0  # what the test would see without the flow
    # the GAN's cells are untouched within a layer: the same cells are hit, in the same proportions
    a, b = gan.sample(e[:50], 0.0, seed=3), flowed.sample(e[:50], 0.0, seed=3)
    assert torch.equal(a > 0, b > 0)
    ra = a.reshape(50, det.n_layers, -1)
    rb = b.reshape(50, det.n_layers, -1)
    share_a = ra / ra.sum(2, keepdim=True).clamp(min=1e-30)
    share_b = rb / rb.sum(2, keepdim=True).clamp(min=1e-30)
    assert torch.allclose(share_a, share_b, atol=1e-4)


def test_the_coupled_flow_takes_the_datas_law():
    """With the coupling the flow's draw comes from the generator's own layer energies and still gives the
    training law's layer energies."""
    torch.set_num_threads(1)
    det = toy_detector()
    data = toy_showers(det, 600, seed=4)
    gan = tiny_model("gan3d:cell_power", det, data).eval()
    e = torch.as_tensor(data.energies)
    cond = torch.as_tensor(data.conditions.as_array(), dtype=torch.float32)
    gan.enable_layer_flow()
    frac_data = gan.layer_fractions(torch.as_tensor(data.showers), e)
    gan.fit_layer_flow(frac_data, cond, 600, torch.Generator().manual_seed(1))
    fit = gan.fit_flow_coupling(cond, torch.Generator().manual_seed(2))
    assert fit["residual_sd"] > 0
    coupled = gan.sample(data.energies, 0.0, seed=5).reshape(len(e), det.n_layers, -1).sum(2)

    frac = lambda x: x / e[:, None]  # noqa: E731
    real = np.log(data.showers.reshape(len(e), det.n_layers, -1).sum(2) / data.energies[:, None])
    gen = np.log(frac(coupled).numpy())
    se = real.std(0) / np.sqrt(len(e))
    assert np.all(np.abs(gen.mean(0) - real.mean(0)) < 0.15 + 5 * se), (gen.mean(0), real.mean(0))


def test_a_wild_flow_draw_is_held_at_the_training_maximum():
    """A draw far in the flow's tail gives a layer no more energy than the most of any training shower's layer."""
    det = toy_detector()
    data = toy_showers(det, 200, seed=6)
    gan = tiny_model("gan3d:layer_flow", det, data).eval()
    gan.layer_flow.sample = lambda z, c: torch.full_like(z, 50.0)
    e = data.energies
    layers = gan.sample(e, 0.0, seed=1).reshape(len(e), det.n_layers, -1).sum(2) / torch.as_tensor(e)[:, None]
    most = torch.as_tensor(data.showers).reshape(len(e), det.n_layers, -1).sum(2) / torch.as_tensor(e)[:, None]
    most = most.max(0).values.float()
    assert bool((layers <= most * (1 + 1e-4)).all()) and bool((layers > 0.99 * most).any())
