"""layerflow's ``mirror_tie``: the cell laws of mirrored cells are one law, so that a shower at normal incidence
on a cell corner is shared symmetrically by construction, and a training step keeps the tie."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caloforge.dataset import Batch
from caloforge.models import get_family
from caloforge.models.base import TrainBatch
from conftest_models import TINY_CONFIGS, toy_detector, toy_showers


def _tied_model(tie: str = "corner", core_block: int = 2):
    det = toy_detector(n_layers=3, n_xy=6, n_y_angled=12)
    data = toy_showers(det, 30, seed=3)
    cond = data.conditions.as_array().copy()
    rng = np.random.default_rng(5)
    cond[:, 1] = rng.uniform(0, 40, len(cond))  # angles and impact points: the conditions spread, the
    cond[:, 2:4] = rng.uniform(-5, 5, (len(cond), 2))  # standardisation non-trivial
    cls = get_family("layerflow")
    cfg = {**TINY_CONFIGS["layerflow:mirror_tie"], "mirror_tie": tie, "core_block": core_block}
    model = cls(det, None, cls.Config.from_dict(cfg))
    from caloforge.conditions import Conditions

    conditions = Conditions.from_array(cond)
    model.fit_preprocessing(Batch(conditions, model.to_local(data.showers, cond)))
    with torch.no_grad():  # laws far from their symmetric start, so that the tie has something to do
        g = torch.Generator().manual_seed(0)
        for p in (model.cell_hit, model.cell_mu, model.cell_log_sigma, model.cell_mix, model.core_w):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    model.tie_mirrors()
    return model, conditions


def _laws(model, cov, cond):
    """Hit logits plus the core term's hit-logit and mu (L, n, n_lat, 2) at covariates ``cov``."""
    n_feat, n_cf = model.n_feat, model.n_cond_features
    o = 1 + n_feat + n_cf
    offsets = cov[..., o:o + 4]
    core = model._core_terms(cov, offsets, cond)
    with torch.enable_grad():  # the training path: every cell, core term added in place of nothing
        logit = model._hit_logits(cov, core, offsets, cond)
    mu = torch.einsum("lnk,lck->lnc", cov, model.cell_mu.view(model.n_layers, model.n_lat, -1))
    mu = mu + core[:, :, model.core_pos, 1]
    return torch.stack([logit, mu], dim=-1).detach()


def _covariates(model, cond_array):
    cond = torch.as_tensor(cond_array, dtype=torch.float32)
    n = len(cond)
    feat = torch.randn(n, model.dim, generator=torch.Generator().manual_seed(1))
    cf = model.condition_features(cond)
    return model._covariates(feat, cf, model._offsets(cond), cond), cond


def test_mirrored_cells_follow_the_mirrored_covariates():
    """``full``: the law of a cell at x is its mirror image's at the mirrored covariates, for any x."""
    model, conditions = _tied_model("full")
    cov, cond = _covariates(model, conditions.as_array()[:8])
    base = _laws(model, cov, cond)
    maps = model._mirror_maps().float()
    for k in range(2):
        mirrored = torch.einsum("lij,lnj->lni", maps[k], cov)
        img = _laws(model, mirrored, cond)
        torch.testing.assert_close(img[:, :, model.mirror_perms[k]], base, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.einsum("lij,lnj->lni", maps[k], mirrored), cov, rtol=1e-5, atol=1e-5)


def _corner_laws(model, angle: float = 0.0):
    """Laws of a shower at normal incidence on a cell corner with layer centroids on the axis."""
    cond = torch.tensor([[5e4, angle, 0.0, 0.0, 22.0]] * 2)
    n_l = model.n_layers
    feat = torch.randn(2, model.dim, generator=torch.Generator().manual_seed(2))
    raw_centroid = torch.zeros(2, 2 * n_l)
    feat[:, n_l:3 * n_l] = (raw_centroid - model.feat_mean[n_l:3 * n_l]) / model.feat_std[n_l:3 * n_l]
    cov = model._covariates(feat, model.condition_features(cond), model._offsets(cond), cond)
    n_x, n_y = model.shape[1:]
    return _laws(model, cov, cond).reshape(n_l, 2, n_x, n_y, 2)


@pytest.mark.parametrize("mode", ["corner", "full"])
def test_a_corner_shower_at_normal_incidence_is_shared_symmetrically(mode):
    laws = _corner_laws(_tied_model(mode)[0])
    torch.testing.assert_close(laws.flip(2), laws, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(laws.flip(3), laws, rtol=1e-4, atol=1e-4)
    untied = _corner_laws(_tied_model(tie="none")[0])  # the same laws without the tie are not symmetric
    assert (untied.flip(3) - untied).abs().max() > 0.1
    angled = _corner_laws(_tied_model(mode)[0], angle=30.0)  # an inclined shower may lean towards +y, and does
    assert (angled.flip(3) - angled).abs().max() > 1e-3


def test_the_halo_tie_leaves_the_core_cells_alone():
    """``halo``: the cells outside the core block are tied as by ``corner``; the core cells keep their own laws."""
    model = _tied_model("halo", core_block=2)[0]
    laws = _corner_laws(model)  # (L, 2, n_x, n_y, 2)
    n_x, n_y = model.shape[1:]
    halo = torch.ones(n_x * n_y, dtype=torch.bool)
    halo[model.core_idx] = False
    halo = halo.view(n_x, n_y)
    for dim in (2, 3):
        diff = (laws.flip(dim) - laws).abs().amax(dim=(0, 1, 4))
        assert diff[halo].max() < 1e-4 and diff[~halo].max() > 1e-3


def test_the_corner_tie_leaves_other_configurations_free():
    """``corner`` constrains the laws only where the configuration is its own mirror image: the projection is
    idempotent, and away from the corner mirrored cells keep laws of their own (``full`` would tie them)."""
    model, conditions = _tied_model("corner")
    cov, cond = _covariates(model, conditions.as_array()[:8])
    base = _laws(model, cov, cond)
    mirrored = torch.einsum("lij,lnj->lni", model._mirror_maps().float()[1], cov)
    img = _laws(model, mirrored, cond)
    assert (img[:, :, model.mirror_perms[1]] - base).abs().max() > 0.1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.tie_mirrors()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=1e-5, atol=1e-5)


def test_a_training_step_keeps_the_tie():
    model, conditions = _tied_model()
    det = model.detector
    data = toy_showers(det, 16, seed=9)
    cond = torch.as_tensor(conditions.as_array()[:16], dtype=torch.float32)
    local = torch.as_tensor(model.to_local(data.showers[:16], cond.numpy()), dtype=torch.float32)
    opts = model.configure_optimizers(1e-2)
    for step in range(3):
        model.training_step(TrainBatch(cond, local), opts, step)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.tie_mirrors()  # a projection: tied laws are a fixed point
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [{"core_block": 3}, {"halo_term": True, "core_block": 2, "halo_ramp_deg": 10.0}])
def test_what_cannot_be_tied_is_refused(bad):
    det = toy_detector(n_layers=3, n_xy=6, n_y_angled=12)
    cls = get_family("layerflow")
    with pytest.raises(ValueError, match="mirror_tie needs"):
        cls(det, None, cls.Config.from_dict({**TINY_CONFIGS["layerflow:mirror_tie"], **bad}))


def test_a_fine_tune_may_switch_the_tie_on(tmp_path):
    """``train --init-from`` accepts a source without the tie (its laws are projected at the first step), and
    still refuses other option changes."""
    from caloforge.models import save_model
    from caloforge.train import TrainingError, init_from_model

    src, _ = _tied_model(tie="none", core_block=2)
    save_model(src, tmp_path / "src")
    target, _ = _tied_model(tie="corner", core_block=4)
    init_from_model(target, str(tmp_path / "src"), "test")
    assert torch.equal(target.cell_hit, src.cell_hit)
    target.tie_mirrors()
    laws = _corner_laws(target)
    torch.testing.assert_close(laws.flip(3), laws, rtol=1e-4, atol=1e-4)
    cls = get_family("layerflow")
    cfg = {**TINY_CONFIGS["layerflow:mirror_tie"], "select_noise": False}
    other = cls(src.detector, None, cls.Config.from_dict(cfg))
    with pytest.raises(TrainingError, match="model options"):
        init_from_model(other, str(tmp_path / "src"), "test")


def test_tie_model_script_ties_a_trained_model(tmp_path):
    """scripts/tie_model.py: an untied model becomes a tied one (corner laws symmetric), weights otherwise kept."""
    from caloforge.models import load_model, save_model
    from conftest_models import load_script

    src, _ = _tied_model(tie="none", core_block=2)
    save_model(src, tmp_path / "src")
    load_script("tie_model").main([str(tmp_path / "src"), str(tmp_path / "tied"), "--core-block", "4"])
    tied = load_model(tmp_path / "tied")
    assert tied.config.mirror_tie == "corner" and tied.config.core_block == 4
    laws = _corner_laws(tied)
    torch.testing.assert_close(laws.flip(2), laws, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tied.blocks[0].net[0].weight, src.blocks[0].net[0].weight)


def test_every_mirror_feature_is_a_condition_feature_and_tan_angle_is_odd():
    """The mirror table names only known features; ``tan_angle`` is tan a, odd in the angle."""
    from caloforge.models.base import CONDITION_FEATURES
    from caloforge.models.layerflow import MIRROR_FEATURES

    assert set(MIRROR_FEATURES) <= set(CONDITION_FEATURES)
    cond = torch.tensor([[5e4, 30.0, 0.0, 0.0, 22.0], [5e4, -30.0, 0.0, 0.0, 22.0]])
    tan = CONDITION_FEATURES["tan_angle"][1](cond, None)
    torch.testing.assert_close(tan, torch.tensor([1 / 3 ** 0.5, -1 / 3 ** 0.5]))
    det = toy_detector(n_layers=3, n_xy=6, n_y_angled=12)
    cls = get_family("layerflow")
    model = cls(det, None, cls.Config.from_dict(TINY_CONFIGS["layerflow:mirror_tie"]),
                features=("log_e", "angle", "tan_angle", "sin_x", "cos_x", "sin_y", "cos_y", "is_photon"))
    assert model.n_cond_features == 8
