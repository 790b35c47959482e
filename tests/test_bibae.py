"""bibae: the two training phases, the post-processor, the latent flow, the kernel distances, critic resets."""

from __future__ import annotations

import pytest
import torch

from caloforge.models import TrainBatch, load_model, save_model
from caloforge.models.bibae import mmd, sorted_mmd
from conftest_models import tiny_model, toy_detector, toy_showers


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _setup(seed: int = 3):
    torch.manual_seed(0)
    det = toy_detector()
    data = toy_showers(det, 32, seed=seed)
    model = tiny_model("bibae", det, data)
    batch = TrainBatch(torch.as_tensor(data.conditions.as_array(), dtype=torch.float32), torch.as_tensor(data.showers))
    return det, data, model, batch


def _params(module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module) -> set[str]:
    return {k for k, p in module.named_parameters() if not torch.equal(p.detach(), before[k])}


def test_phases_train_their_own_parts():
    """Before post_start_step the autoencoder and critics train (post-processor and flow untouched); from it on
    only the post-processor and the flow (encoder, decoder, critics frozen)."""
    _, _, model, batch = _setup()
    opts = model.configure_optimizers(1e-2)
    first = ("encoder", "decoder", "critic", "dual_critic", "latent_critic")
    second = ("post", "flow")
    before = {name: _params(getattr(model, name)) for name in first + second}
    losses = model.training_step(batch, opts, 0)
    assert {"adv", "dual", "latent_mmd", "kld", "stats"} <= set(losses)
    for name in first:
        assert _changed(before[name], getattr(model, name)), name
    for name in second:
        assert not _changed(before[name], getattr(model, name)), name
    before = {name: _params(getattr(model, name)) for name in first + second}
    for step in (2, 3):  # post_start_step = 2 in the tiny config; two steps pass the zero-initialised last layers
        losses = model.training_step(batch, opts, step)
    assert {"post_mse", "post_mmd", "flow_nll"} <= set(losses)
    for name in first:
        assert not _changed(before[name], getattr(model, name)), name
    for name in second:
        assert _changed(before[name], getattr(model, name)), name


def test_flow_is_invertible_and_learns_the_latents():
    """The latent flow: inverse(forward(z)) = z, and maximum likelihood fits a shifted, correlated latent
    distribution far better than the N(0, 1) it starts as."""
    _, data, model, _ = _setup()
    cf = model.condition_features(torch.as_tensor(data.conditions.as_array()[:1], dtype=torch.float32))
    gen = torch.Generator().manual_seed(1)
    d = model.config.latent_dim
    mix = torch.randn(d, d, generator=gen) * 0.5 + torch.eye(d)
    target = torch.randn(2000, d, generator=gen) @ mix + 1.5
    c = cf.expand(len(target), -1)
    opt = torch.optim.Adam(model.flow.parameters(), lr=1e-2)
    with torch.no_grad():
        nll0 = float(-model.flow.log_prob(target, c).mean())
    for _ in range(150):
        opt.zero_grad()
        loss = -model.flow.log_prob(target, c).mean()
        loss.backward()
        opt.step()
    assert float(loss) < nll0 - 5.0, (nll0, float(loss))
    with torch.no_grad():
        u = torch.randn(50, d, generator=gen)
        z = model.flow.inverse(u, c[:50])
        # forward again: the base point the flow maps z back to
        back = z
        for block in model.flow.blocks:
            back, _ = block(back, c[:50])
            back = back.flip(1)
    torch.testing.assert_close(back, u, rtol=1e-4, atol=1e-4)
    assert float((z.mean(0) - 1.5).abs().mean()) < 0.5  # samples land on the fitted latents, not on N(0, 1)


def test_post_processor_keeps_empty_cells_and_hit_path_matches():
    _, data, model, _ = _setup()
    with torch.no_grad():
        for p in model.post.parameters():
            p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
        y = torch.relu(torch.randn(5, *model.shape, generator=torch.Generator().manual_seed(3)) - 0.5)
        c = model.condition_features(torch.as_tensor(data.conditions.as_array()[:5], dtype=torch.float32))
        dense, hits = model.post(y, c), model.post.hit_cells(y, c)
    assert torch.equal(dense, hits)
    assert torch.all(dense[y == 0] == 0)
    assert not torch.equal(dense, y)


def test_save_load_keeps_the_trained_post_processor_and_flow(tmp_path):
    """After both phases the post-processor and the flow are no longer identities; saving and loading keeps them
    (safetensors + JSON only) and the showers are identical."""
    det, data, model, batch = _setup()
    opts = model.configure_optimizers(1e-2)
    for step in range(6):
        model.training_step(batch, opts, step)
    cond = torch.as_tensor(data.conditions.as_array()[:6], dtype=torch.float32)
    u = model.draw_noise(6, torch.Generator().manual_seed(4))[0]
    with torch.no_grad():
        cf = model.condition_features(cond)
        assert not torch.allclose(model.flow.inverse(u, cf), u)
        y = model.decoder(model.flow.inverse(u, cf), cf)
        assert not torch.equal(model.post(y, cf), y)
    save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.safetensors"]
    loaded = load_model(tmp_path / "m", expected_detector=det)
    for name in ("post", "flow"):
        for (k, a), (_, b) in zip(getattr(model, name).state_dict().items(),
                                  getattr(loaded, name).state_dict().items()):
            assert torch.equal(a, b), (name, k)
    assert torch.equal(model.sample(data.energies[:6], 0.0, seed=5), loaded.sample(data.energies[:6], 0.0, seed=5))


def test_critic_reset_reinitialises_and_clears_the_optimiser():
    _, _, model, batch = _setup()
    model.config.critic_reset_every = 2
    opts = model.configure_optimizers(1e-2)
    model.training_step(batch, opts, 0)
    model.training_step(batch, opts, 1)
    assert len(opts["dual_critic"].state) > 0
    before_dual, before_main = _params(model.dual_critic), _params(model.critic)
    model.config.post_start_step = 100
    # reset (step 2) without the following update: the reset alone
    names = model.reset_critics(opts)
    assert names == ["dual_critic"]
    assert _changed(before_dual, model.dual_critic) == set(before_dual)
    assert not _changed(before_main, model.critic)
    assert len(opts["dual_critic"].state) == 0
    losses = model.training_step(batch, opts, 2)
    assert losses["reset"] == 1.0


def test_kernel_distances():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, generator=gen), torch.randn(400, generator=gen)
    shifted = b + 1.0
    widths = (0.5, 1.0)
    # with a band covering every rank the sorted-kernel MMD is the ordinary MMD
    torch.testing.assert_close(sorted_mmd(a, shifted, 400, widths), mmd(a[:, None], shifted[:, None], widths))
    assert float(sorted_mmd(a, a, 8, widths)) == pytest.approx(0.0, abs=1e-6)
    assert float(sorted_mmd(a, shifted, 8, widths)) > 10 * float(sorted_mmd(a, b, 8, widths))
    x = torch.randn(100, 3, requires_grad=True)
    mmd(x, torch.randn(100, 3, generator=gen), widths).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_config_bounds():
    from caloforge.models import ModelError, get_family

    cls = get_family("bibae")
    with pytest.raises(ModelError, match="reset_critic"):
        cls.Config.from_dict({"reset_critic": "all"})
    with pytest.raises(ModelError, match="latent_dim"):
        cls.Config.from_dict({"latent_dim": 0})
    det = toy_detector()
    model = tiny_model("bibae", det, toy_showers(det, 8, seed=1))
    assert model.k_sorted == 32


@pytest.mark.parametrize("centre", [True, False])
def test_centre_crop_makes_the_decoder_mirror_symmetric(centre):
    """With ``centre_crop`` the decoder keeps the central cells of its upsampled grid (32 -> 30 cells: 1-30), so
    mirror-symmetric kernels and a mirror-symmetric coarse volume give a mirror-symmetric shower on every axis; the
    old crop (cells 0-29, the default so that saved models decode unchanged) does not."""
    from caloforge.models.bibae import BIBAEConfig, _Decoder

    flips = ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))
    torch.manual_seed(0)
    dec = _Decoder((30, 30, 30), BIBAEConfig(dec_channels=2, latent_dim=4, centre_crop=centre), n_cond=2)
    assert dec.crop == ((slice(1, 31),) * 3 if centre else (slice(0, 30),) * 3)
    coarse = torch.randn(1, 4, *dec.base)
    coarse = sum(coarse.flip(d) for d in flips) / 8

    class _Coarse(torch.nn.Module):  # stands in for the dense layer: a mirror-symmetric coarse volume
        def forward(self, x):
            return coarse.reshape(1, -1)

    with torch.no_grad():
        for m in (dec.up1, dec.conv1, dec.up2, dec.out):
            m.weight.copy_(sum(m.weight.flip(d) for d in flips) / 8)
            m.bias.uniform_(0.0, 0.1)
        dec.fc = _Coarse()
        y = dec(torch.zeros(1, 4), torch.zeros(1, 2))
    assert y.shape == (1, 30, 30, 30) and y.sum() > 0
    for axis in (1, 2, 3):
        assert torch.allclose(y, y.flip(axis), atol=1e-6) == centre
