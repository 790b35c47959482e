"""The cfm family beyond the parametrised model tests: its representation, the ODE solvers and the step knob, and
that a short training run learns the toy showers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caloforge.models import ModelError, TrainBatch, get_family
from conftest_models import TINY_CONFIGS, load_script, tiny_model, toy_detector, toy_showers


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def detector():
    return toy_detector()


@pytest.fixture(scope="module")
def data(detector):
    return toy_showers(detector, 64, seed=11)


def test_tokens_round_trip(detector, data):
    """Tokens hold the cells and the layer energies; decoding them gives back the showers (cells under
    ``min_hit_mev`` dropped, each layer rescaled to its energy channel, so the layer sums are exact)."""
    model = tiny_model("cfm", detector, data)
    showers = torch.as_tensor(data.showers)
    energies = torch.as_tensor(data.energies)
    tokens = model.to_tokens(showers, energies)
    n_l, nx, ny = model.shape
    assert tokens.shape == (len(showers), n_l, nx * ny + 1)
    cells = tokens[..., :-1]
    assert abs(float(cells.mean())) < 1e-3 and float(cells.std()) == pytest.approx(1.0, rel=1e-3)
    back = model.from_tokens(tokens, energies)
    layers = showers.reshape(len(showers), n_l, -1).sum(2)
    assert torch.allclose(back.reshape(len(showers), n_l, -1).sum(2), layers, rtol=1e-4, atol=1e-3)
    hot = showers > 0.1
    assert torch.allclose(back[hot], showers[hot], rtol=0.02)
    assert torch.all(back[showers < model.config.min_hit_mev] == 0)


def test_empty_cells_decode_to_exact_zeros(detector, data):
    model = tiny_model("cfm", detector, data)
    empty = torch.zeros(3, model.n_cells)
    e = torch.full((3,), 50e3)
    assert torch.equal(model.from_tokens(model.to_tokens(empty, e), e), empty)


def test_step_knob_and_solvers(detector, data):
    """The steps and the solver are a sampling-time override; the solvers converge to the same ODE solution."""
    model = tiny_model("cfm", detector, data)
    assert model.sample_steps == TINY_CONFIGS["cfm"]["sample_steps"] and model.solver == "midpoint"
    assert model.evaluations_per_shower == 2 * model.sample_steps
    cond = torch.as_tensor(data.conditions.as_array()[:8], dtype=torch.float32)
    noise = model.draw_noise(8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        default = model.decode(cond, *noise)
        assert torch.equal(default, model.decode(cond, *noise)), "decode must be deterministic given the noise"
        one = model.set_sampling(steps=1, solver="euler").decode(cond, *noise)
        assert model.evaluations_per_shower == 1
        assert not torch.equal(one, default)
        cf = model.condition_features(cond)
        exact = model.integrate(noise[0], cf, steps=256, solver="heun")
        err = {(s, k): float((model.integrate(noise[0], cf, steps=k, solver=s) - exact).abs().max())
               for s in ("euler", "midpoint", "heun") for k in (4, 32)}
    for s in ("euler", "midpoint", "heun"):
        assert err[(s, 32)] < err[(s, 4)], err
    assert err[("midpoint", 32)] < err[("euler", 32)] and err[("heun", 32)] < err[("euler", 32)], err
    assert err[("midpoint", 32)] < 0.2 * err[("euler", 32)], err  # second order against first
    with pytest.raises(ModelError, match="steps 0"):
        model.set_sampling(steps=0)
    with pytest.raises(ModelError, match="solver 'rk4'"):
        model.set_sampling(solver="rk4")
    with pytest.raises(ModelError, match="solver"):
        get_family("cfm").Config.from_dict({"solver": "rk4"})
    with pytest.raises(ModelError, match="multiple of 'heads'"):
        get_family("cfm")(detector, config=get_family("cfm").Config.from_dict({"width": 10, "heads": 4}))


def test_short_training_learns_the_toy_showers(detector):
    """200 flow-matching steps on toy showers: the loss falls, and the sampled showers' energy response and hit
    counts move from the untrained model's towards the data's."""
    torch.manual_seed(0)
    data = toy_showers(detector, 256, seed=4)
    cls = get_family("cfm")
    model = cls(detector, data.showers.shape[1], cls.Config.from_dict(
        {"width": 32, "blocks": 1, "heads": 2, "head_channels": 2, "sample_steps": 8}))
    model.fit_preprocessing(data)
    cond = torch.as_tensor(data.conditions.as_array(), dtype=torch.float32)
    showers = torch.as_tensor(data.showers)
    energies = data.energies

    def gaps() -> tuple[float, float]:
        gen = model.sample(energies, 0.0, seed=1).numpy()
        frac = abs(np.mean(gen.sum(1) / energies) / np.mean(data.showers.sum(1) / energies) - 1)
        hits = abs(np.mean((gen > 0.075).sum(1)) / np.mean((data.showers > 0.075).sum(1)) - 1)
        return float(frac), float(hits)

    before = gaps()
    opts = model.configure_optimizers(3e-3)
    losses = []
    gen = torch.Generator().manual_seed(0)
    for step in range(200):
        idx = torch.randperm(len(showers), generator=gen)[:64]
        losses.append(model.training_step(TrainBatch(cond[idx], showers[idx]), opts, step, grad_clip=1.0)["loss"])
    after = gaps()
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:20]), (losses[:20], losses[-20:])
    assert after[0] < 0.15 and after[1] < 0.25, (before, after)
    assert after[0] < before[0] and after[1] < before[1], (before, after)


def test_steps_script_writes_the_same_weights_with_other_steps(detector, data, tmp_path):
    """scripts/cfm_steps.py: a model copy that samples with other steps, as set_sampling does; non-cfm refused."""

    from caloforge.models import load_model, save_model

    script = load_script("cfm_steps")
    model = tiny_model("cfm", detector, data)
    save_model(model, tmp_path / "m")
    assert script.main([str(tmp_path / "m"), "--steps", "5", "--solver", "heun", "-o", str(tmp_path / "m5")]) == 0
    copy = load_model(tmp_path / "m5")
    assert (copy.sample_steps, copy.solver) == (5, "heun")
    expected = model.set_sampling(steps=5, solver="heun").sample(data.energies[:4], 0.0, seed=2)
    assert torch.equal(copy.sample(data.energies[:4], 0.0, seed=2), expected)
    save_model(tiny_model("gan3d", detector, data), tmp_path / "g")
    with pytest.raises(ModelError, match="field 'family' is 'gan3d'; expected 'cfm'"):
        script.main([str(tmp_path / "g"), "--steps", "2", "-o", str(tmp_path / "g2")])


def test_export_checkpoint_script_gives_the_trained_model(tmp_path):
    """scripts/export_checkpoint.py: the model of a run's last checkpoint, without loading the data, samples as the
    model the trainer wrote at the same step."""

    from caloforge.models import load_model
    from caloforge.train import TrainConfig, Trainer
    from conftest_models import write_toy_file

    script = load_script("export_checkpoint")
    det = toy_detector()
    write_toy_file(tmp_path / "toy.h5", det, 40, seed=1)
    cfg = TrainConfig(batch_size=16, max_steps=4, checkpoint_every=2, val_every=0, val_fraction=0.2, select="last")
    Trainer.create(str(tmp_path / "toy.h5"), "cfm", tmp_path / "run", cfg, TINY_CONFIGS["cfm"]).fit()
    assert script.main([str(tmp_path / "run"), "-o", str(tmp_path / "m")]) == 0
    exported, trained = load_model(tmp_path / "m", expected_detector=det), load_model(tmp_path / "run")
    assert exported.meta["training"]["step"] == 4 and exported.meta["particles"] == ["gamma"]
    assert exported.meta["conditions"] == trained.meta["conditions"]  # the trainer's range, specs included
    e = [20e3, 60e3]
    assert torch.equal(exported.sample(e, 0.0, seed=1), trained.sample(e, 0.0, seed=1))


def test_reflow_script_distils_the_teacher_and_resumes_exactly(tmp_path):
    """scripts/cfm_reflow.py: the student, trained on the teacher's (noise, endpoint) pairs, maps noise in one Euler
    step closer to the teacher's many-step endpoint than the teacher's own one step does; a run stopped early and
    rerun (one pair chunk lost) ends with the same weights as an uninterrupted one; non-cfm models are refused."""

    from caloforge.models import load_model, save_model
    from conftest_models import write_toy_file

    script = load_script("cfm_reflow")
    det = toy_detector()
    data = write_toy_file(tmp_path / "toy.h5", det, 48, seed=3)
    teacher = tiny_model("cfm", det, data)
    save_model(teacher, tmp_path / "t")
    args = [str(tmp_path / "t"), "--conditions-from", str(tmp_path / "toy.h5"), "--pairs", "48", "--chunk", "16",
            "--teacher-steps", "8", "--batch-size", "16", "--lr", "3e-3", "--checkpoint-every", "10", "-q"]
    assert script.main(args + ["--steps", "200", "-o", str(tmp_path / "a")]) == 0
    assert script.main(args + ["--steps", "100", "-o", str(tmp_path / "b")]) == 0
    (tmp_path / "b" / "pairs" / "chunk-00001.safetensors").unlink()
    assert script.main(args + ["--steps", "200", "-o", str(tmp_path / "b")]) == 0
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert (a.sample_steps, a.solver) == (1, "euler") and a.meta["reflow"]["teacher_steps"] == 8

    cond = torch.as_tensor(data.conditions.as_array()[:48], dtype=torch.float32)
    x0 = torch.randn(teacher.noise_shapes(48)[0][0], generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        target = teacher.integrate(x0, teacher.condition_features(cond), steps=8, solver="midpoint")
        one_teacher = teacher.integrate(x0, teacher.condition_features(cond), steps=1, solver="euler")
        one_student = a.integrate(x0, a.condition_features(cond), steps=1, solver="euler")
    assert float(((one_student - target) ** 2).mean()) < 0.7 * float(((one_teacher - target) ** 2).mean())

    save_model(tiny_model("gan3d", det, data), tmp_path / "g")
    with pytest.raises(ModelError, match="reflow needs a cfm model"):
        script.main([str(tmp_path / "g"), "--conditions-from", str(tmp_path / "toy.h5"), "-o", str(tmp_path / "x")])


def test_patch_tokens_must_tile_the_cells():
    """Patch tokens: options that do not divide the model's cells are refused with the numbers; the layer-token
    model keeps its parameter names (models saved before patches load unchanged)."""
    det = toy_detector()
    data = toy_showers(det, 20, seed=1)
    cfm = get_family("cfm")
    with pytest.raises(ModelError, match="must divide the model's cells 4 x 6 x 6"):
        cfm(det, data.showers.shape[1], cfm.Config.from_dict(dict(TINY_CONFIGS["cfm"], patch_layers=3, patch_x=3)))
    names = {k for k in tiny_model("cfm", det, data).state_dict()}
    assert "net.embed.weight" in names and "net.patch_pos" not in names and "net.out_e.weight" not in names
    patched = tiny_model("cfm:patches", det, data)
    assert patched.net.grid == (2, 2, 3) and patched.net.embed.in_features == 2 * 3 * 2
