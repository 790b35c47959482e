"""layerflow's ``centroid_over_width``: the cells see each layer's centroid over its mean squared radius."""

from __future__ import annotations

import numpy as np
import torch

from caloforge.conditions import Conditions
from caloforge.dataset import Batch
from caloforge.models import get_family
from conftest_models import TINY_CONFIGS, toy_detector, toy_showers


def _model():
    det = toy_detector(n_layers=3, n_xy=6, n_y_angled=12)
    data = toy_showers(det, 40, seed=3)
    cond = data.conditions.as_array().copy()
    cond[:, 2:4] = np.random.default_rng(2).uniform(-2, 2, (len(cond), 2))
    cls = get_family("layerflow")
    model = cls(det, None, cls.Config.from_dict({**TINY_CONFIGS["layerflow:mirror_tie"], "mirror_tie": "none"}))
    conditions = Conditions.from_array(cond)
    local = model.to_local(data.showers, cond)
    model.fit_preprocessing(Batch(conditions, local))
    return model, torch.as_tensor(cond, dtype=torch.float32), torch.as_tensor(local)


def test_the_covariates_are_centroid_over_width_scaled_by_their_training_rms():
    model, cond, local = _model()
    feat, _ = model.layer_features(local, cond[:, 0], cond=cond)
    n_l = model.n_layers
    cx, cy, log_r2 = (feat[:, k * n_l:(k + 1) * n_l] for k in (1, 2, 3))
    expected = torch.stack([cx, cy], dim=-1) / torch.exp(log_r2)[..., None]  # (n, L, 2), raw
    rms = expected.double().pow(2).mean(0).sqrt().float()  # (L, 2)
    torch.testing.assert_close(model.cow_scale, rms, rtol=1e-4, atol=1e-6)
    fs = (feat - model.feat_mean) / model.feat_std
    cov = model._covariates(fs, model.condition_features(cond), model._offsets(cond), cond)
    assert cov.shape[-1] == model.n_cov
    torch.testing.assert_close(cov[..., -2:], (expected / rms).permute(1, 0, 2), rtol=1e-4, atol=1e-5)


def test_a_narrow_layer_answers_a_shift_more_than_a_wide_one():
    """The same centroid shift in a layer half as wide gives about four times the covariate (x d / s^2)."""
    model, cond, _ = _model()
    n_l, n = model.n_layers, 2
    raw = model.feat_mean.repeat(n, 1).clone()
    raw[:, n_l] = 0.5  # layer 0's centroid: half a cell from the axis in x
    raw[0, 3 * n_l] = np.log(4.0 + 0.25)  # its mean r^2: 4 cells^2 in shower 0, 1 cell^2 in shower 1
    raw[1, 3 * n_l] = np.log(1.0 + 0.25)
    per_layer = model._per_layer((raw - model.feat_mean) / model.feat_std).reshape(n, model.n_feat, n_l)
    g = model._centroid_over_width(per_layer.permute(2, 0, 1))[0, :, 0]
    torch.testing.assert_close(g, torch.tensor([0.5 / 4.25, 0.5 / 1.25]), rtol=1e-4, atol=1e-6)


def test_cow_soft_bounds_the_lever_arm_of_a_narrow_layer():
    """With ``cow_soft`` = k the covariate is c / (r^2 + 1/4 + k): a one-cell-wide layer no longer answers four
    times a two-cell-wide one."""
    model, cond, _ = _model()
    model.config.cow_soft = 2.0
    n_l, n = model.n_layers, 2
    raw = model.feat_mean.repeat(n, 1).clone()
    raw[:, n_l] = 0.5
    raw[0, 3 * n_l] = np.log(4.0 + 0.25)
    raw[1, 3 * n_l] = np.log(1.0 + 0.25)
    per_layer = model._per_layer((raw - model.feat_mean) / model.feat_std).reshape(n, model.n_feat, n_l)
    g = model._centroid_over_width(per_layer.permute(2, 0, 1))[0, :, 0]
    torch.testing.assert_close(g, torch.tensor([0.5 / 6.25, 0.5 / 3.25]), rtol=1e-4, atol=1e-6)
