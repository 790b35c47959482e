"""layerflow's ``total_stage``: the visible energy gets its own small flow after the hit counts, and the layer flow is
conditioned on it."""

from __future__ import annotations

import pytest
import torch

from caloforge.models import get_family
from conftest_models import TINY_CONFIGS, toy_detector


def _model(**options):
    cls = get_family("layerflow")
    cfg = {**TINY_CONFIGS["layerflow:total_stage"], **options}
    return cls(toy_detector(n_layers=3, n_xy=6, n_y_angled=12), None, cls.Config.from_dict(cfg))


def test_the_stages_cover_the_features_once_and_the_total_comes_before_the_layers():
    model = _model()
    n_l = model.n_layers
    stages = model._stages()
    assert [s[3] for s in stages] == [slice(4 * n_l + 1, model.dim), slice(4 * n_l, 4 * n_l + 1), slice(0, 4 * n_l)]
    assert model.blocks[0].net[0].in_features == model.blocks[0].d_a + model.n_cond_features + 1 + n_l + 1


def test_the_flow_with_a_total_stage_inverts_and_its_total_depends_on_the_counts():
    model = _model().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        n = 16
        c = torch.randn(n, model.n_cond_features + 1, generator=g)
        y = torch.randn(n, model.dim, generator=g)
        z, logdet = model._flow_forward(y, c)
        torch.testing.assert_close(model._flow_inverse(z, c), y, rtol=1e-4, atol=1e-4)
        k = 4 * model.n_layers
        y2 = y.clone()
        y2[:, k + 1:] += 1.0  # other hit counts: the total's latent changes, the counts' own latents do not
        z2, _ = model._flow_forward(y2, c)
        assert not torch.allclose(z2[:, k], z[:, k])
        assert logdet.shape == (n,)


def test_total_stage_needs_the_total_and_counts_first():
    with pytest.raises(ValueError, match="total_stage needs"):
        _model(total_energy=False)
    with pytest.raises(ValueError, match="total_stage needs"):
        _model(counts_first=False)
