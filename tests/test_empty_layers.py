"""layerflow's handling of empty and nearly empty layers (docs/models.md, layerflow item 14): ``empty_logfrac``
gives empty layers' log energy a compact stand-in far from one-hit layers; ``count_centres`` shows the later flow
stages each drawn hit count at the centre of its dequantisation bin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caloforge.conditions import Conditions
from caloforge.dataset import Batch
from caloforge.models import get_family
from caloforge.models.base import TrainBatch
from caloforge.models.layerflow import EMPTY_LOGFRAC_AT
from conftest_models import TINY_CONFIGS, toy_detector, toy_showers


def _model(**options):
    det = toy_detector(n_layers=4, n_xy=6)
    data = toy_showers(det, 400, seed=3)
    showers = data.showers.copy()
    n_l = det.shape()[0]
    per_layer = showers.reshape(len(showers), n_l, -1)
    per_layer[::3, 0] = 0.0  # every third shower starts in layer 1: empty first layers to learn
    per_layer[1::4, 0] = 0.0
    data = Batch(data.conditions, showers)
    cls = get_family("layerflow")
    model = cls(det, None, cls.Config.from_dict({**TINY_CONFIGS["layerflow:total_stage"], **options}))
    cond = data.conditions.as_array()
    model.fit_preprocessing(Batch(data.conditions, model.to_local(data.showers, cond)))
    g = torch.Generator().manual_seed(5)  # as after training: the flows respond to what they are conditioned on
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, data


def test_options_need_counts_first():
    cls = get_family("layerflow")
    det = toy_detector()
    for opt in ({"empty_logfrac": 0.3}, {"count_centres": True}):
        with pytest.raises(ValueError, match="counts_first"):
            cls(det, None, cls.Config.from_dict({**TINY_CONFIGS["layerflow:hit_count"], **opt}))


def test_empty_layers_log_energy_is_the_stand_in_the_others_unchanged(monkeypatch):
    model, data = _model(empty_logfrac=0.3)
    seen = {}
    forward = model._flow_forward

    def spy(y, c):
        seen["y"] = y.detach().clone()
        return forward(y, c)

    monkeypatch.setattr(model, "_flow_forward", spy)
    cond = torch.as_tensor(data.conditions.as_array(), dtype=torch.float32)
    local = torch.as_tensor(model.to_local(data.showers, data.conditions.as_array()))
    torch.manual_seed(0)  # training noise comes from torch's global generator
    model.nll_terms(TrainBatch(cond, local))
    n_l = model.n_layers
    cf = model.condition_features(cond)
    fs = seen["y"] * model.flow_std + model._cond_basis(cf) @ model.flow_coef  # standardised features the flow saw
    e_l = local.reshape(len(local), n_l, -1).sum(2)
    empty = e_l[:, 0] <= 0
    assert empty.sum() > 150
    stand_in = fs[empty, 0]
    # N(-3, 0.3^2): mean within 4 standard errors, spread within 15 %
    assert abs(float(stand_in.mean()) - EMPTY_LOGFRAC_AT) < 4 * 0.3 / np.sqrt(len(stand_in))
    assert abs(float(stand_in.std()) / 0.3 - 1) < 0.15
    # the layers with energy keep their own feature: the same as without the option
    off, _ = _model()
    monkeypatch.setattr(off, "_flow_forward", lambda y, c: (seen.__setitem__("off", y.detach().clone()),
                                                             forward(y, c))[1])
    off.load_state_dict(model.state_dict())
    torch.manual_seed(0)
    off.nll_terms(TrainBatch(cond, local))
    torch.testing.assert_close(seen["off"][~empty], seen["y"][~empty])


def test_sampling_empties_layers_by_their_count():
    model, data = _model(empty_logfrac=0.3)
    model.eval()
    c = Conditions.from_array(data.conditions.as_array()[:200])
    counts, cell, e = model.sample_hits(c, seed=1)
    assert torch.all(e > 0) and torch.isfinite(e).all()
    out = model.sample(c, seed=1)
    n_l = model.n_layers
    per_layer = out.reshape(len(c), n_l, -1)
    hits = (per_layer > 0).sum(2)
    energy = per_layer.sum(2)
    assert torch.equal(hits == 0, energy == 0)


def test_count_centres_keep_the_counts_and_move_them_to_the_bin_centre():
    model, data = _model()
    model.eval()
    c = Conditions.from_array(data.conditions.as_array()[:200])
    plain = model.sample(c, seed=2)
    model.config.count_centres = True
    centred = model.sample(c, seed=2)
    n_l = model.n_layers
    hits = lambda s: (s.reshape(len(c), n_l, -1) > 0).sum(2)  # noqa: E731
    assert torch.equal(hits(plain), hits(centred))  # the count flow's draws are the same
    assert not torch.equal(plain, centred)  # the later stages saw other counts
    # the centred residuals give log(count + 3/2) exactly
    k = 4 * n_l + model.total
    part = slice(k, model.dim)
    cond = torch.as_tensor(c.as_array(), dtype=torch.float32)
    mean = (model._cond_basis(model.condition_features(cond)) @ model.flow_coef)[:, part]
    y = torch.randn(len(c), n_l, generator=torch.Generator().manual_seed(4))
    yc = model._count_bin_centres(y, mean, part)
    log_count = (yc * model.flow_std[part] + mean) * model.feat_std[part] + model.feat_mean[part]
    count = torch.exp(log_count) - 1.5
    torch.testing.assert_close(count, torch.round(count), atol=1e-3, rtol=0)
