"""layerflow's sampling-only centroid gains: ``centroid_gain`` scales the layer centroids' deviations from their
conditional mean before the cells see them; ``halo_centroid_gain`` does so again for the cells outside the core
block, whose laws then differ while the core block's stay as they were."""

from __future__ import annotations

import numpy as np
import torch

from caloforge.conditions import Conditions
from caloforge.dataset import Batch
from caloforge.models import get_family
from conftest_models import TINY_CONFIGS, toy_detector, toy_showers


def _model(**options):
    det = toy_detector(n_layers=3, n_xy=6, n_y_angled=12)
    data = toy_showers(det, 40, seed=3)
    cond = data.conditions.as_array().copy()
    cond[:, 2:4] = np.random.default_rng(2).uniform(-2, 2, (len(cond), 2))
    cls = get_family("layerflow")
    cfg = {**TINY_CONFIGS["layerflow:mirror_tie"], "mirror_tie": "none", **options}
    model = cls(det, None, cls.Config.from_dict(cfg))
    model.fit_preprocessing(Batch(Conditions.from_array(cond), model.to_local(data.showers, cond)))
    g = torch.Generator().manual_seed(5)  # as after training: the cell laws respond to the covariates
    with torch.no_grad():
        for w in (model.cell_hit, model.cell_mu, model.cell_log_sigma):
            w.add_(0.1 * torch.randn(w.shape, generator=g))
    return model.eval(), torch.as_tensor(cond, dtype=torch.float32)


def test_centroid_gain_scales_only_the_centroids_deviation_from_their_conditional_mean():
    model, cond = _model()
    n_l = model.n_layers
    y = torch.randn(len(cond), model.dim, generator=torch.Generator().manual_seed(0))
    mean_fs = model._cond_basis(model.condition_features(cond)) @ model.flow_coef
    full = model._centroids_scaled(y, mean_fs, 1.0)
    torch.testing.assert_close(full, y * model.flow_std + mean_fs)
    half = model._centroids_scaled(y, mean_fs, 0.5)
    centroid = slice(n_l, 3 * n_l)
    torch.testing.assert_close(half[:, centroid] - mean_fs[:, centroid], 0.5 * (full - mean_fs)[:, centroid])
    others = torch.ones(model.dim, dtype=torch.bool)
    others[centroid] = False
    assert torch.equal(half[:, others], full[:, others])


def test_halo_gain_changes_the_halo_cells_laws_and_keeps_the_core_blocks():
    model, cond = _model()
    n_l = model.n_layers
    cf = model.condition_features(cond)
    offsets = model._offsets(cond)
    y = torch.randn(len(cond), model.dim, generator=torch.Generator().manual_seed(1))
    mean_fs = model._cond_basis(cf) @ model.flow_coef
    with torch.no_grad():
        cov = model._covariates(model._centroids_scaled(y, mean_fs, 1.0), cf, offsets, cond)
        cov_halo = model._covariates(model._centroids_scaled(y, mean_fs, 0.3), cf, offsets, cond)
        core = model._core_terms(cov, offsets, cond)
        plain = model._sampling_logits(cov, None, core, offsets, cond)
        mixed = model._sampling_logits(cov, cov_halo, core, offsets, cond)
        halo_only = model._hit_logits(cov_halo, core, offsets, cond)
    in_core = torch.zeros(model.n_lat, dtype=torch.bool)
    in_core[model.core_idx] = True
    torch.testing.assert_close(mixed[:, :, in_core], plain[:, :, in_core])
    torch.testing.assert_close(mixed[:, :, ~in_core], halo_only[:, :, ~in_core])
    assert not torch.allclose(mixed[:, :, ~in_core], plain[:, :, ~in_core])
    assert mixed.shape == (n_l, len(cond), model.n_lat)


def test_gains_of_one_sample_what_the_model_samples_without_them():
    base, cond = _model()
    same, _ = _model(centroid_gain=1.0, halo_centroid_gain=1.0)
    shrunk, _ = _model(halo_centroid_gain=0.5)
    c = Conditions.from_array(cond.numpy())
    a = base.sample(c, seed=4)
    assert torch.equal(a, same.sample(c, seed=4))
    b = shrunk.sample(c, seed=4)
    assert b.shape == a.shape and not torch.equal(a, b)
    # the layers keep the flow's energies (up to hits the window drops, which differ)
    torch.testing.assert_close(b.sum(1), a.sum(1), rtol=0.05, atol=1e-3)


def test_the_halo_split_gives_the_energies_of_both_laws_everywhere(monkeypatch):
    """Sampling evaluates each hit's laws once (core hits from the full covariates, the others from the halo's);
    the export path evaluates both for every hit and picks: the same hits and energies."""
    model, cond = _model(halo_centroid_gain=0.5)
    noise = model.draw_noise(len(cond), torch.Generator().manual_seed(6))
    with torch.no_grad():
        eager = model._hits(cond, *noise)
        monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
        traced = model._hits(cond, *noise)
    def by_cell(out):  # the torch path lists hits layer-major, the compiled one shower-major
        row, flat, e = out[0], out[3], out[4]
        key = row * model.n_cells + flat
        order = torch.argsort(key)
        return key[order], e[order]

    (ka, ea), (kb, eb) = by_cell(eager), by_cell(traced)
    assert torch.equal(ka, kb)
    torch.testing.assert_close(ea, eb, rtol=1e-5, atol=1e-6)


def test_the_halo_split_samples_under_bf16_autocast():
    """The GPU path (:meth:`ShowerModel.sample`) inside ``torch.autocast`` (bench_gpu's bf16 figures, or a user's
    own autocast): the core block's bf16 logits go into the float32 buffer; the showers stay those of float32 to
    within bf16 rounding (8 bits of mantissa, a few 1e-3 relative per logit)."""
    from caloforge.models.base import ShowerModel

    model, cond = _model(halo_centroid_gain=0.5)
    c = Conditions.from_array(cond.numpy())
    full = ShowerModel.sample(model, c, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = ShowerModel.sample(model, c, seed=4)
    assert half.dtype == torch.float32 and half.shape == full.shape
    torch.testing.assert_close(half.sum(1), full.sum(1), rtol=0.01, atol=1e-3)
