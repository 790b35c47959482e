"""layerflow's ``sparse_map`` (docs/models.md, layerflow item 15): the energies of layers with 1..K hits pass through
a per-layer, per-count quantile map from the flow's distribution to the training showers', fitted after training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caloforge.conditions import Conditions
from caloforge.dataset import Batch
from caloforge.export import export_onnx, noise_inputs
from caloforge.models import get_family, load_model, save_model
from caloforge.models.layerflow import SPARSE_MAP_Q
from conftest_models import TINY_CONFIGS, toy_detector, toy_showers


def _fitted(k: int = 2, n: int = 600):
    det = toy_detector(n_layers=4, n_xy=6)
    data = toy_showers(det, n, seed=3)
    showers = data.showers.reshape(n, det.shape()[0], -1).copy()
    for i in range(n):  # sparse first layers: one hit in every second shower, two in every fourth
        keep = 1 if i % 2 == 0 else 2 if i % 4 == 1 else 0
        if keep:
            first = showers[i, 0]
            first[np.argsort(first)[:-keep]] = 0.0
    data = Batch(data.conditions, showers.reshape(n, -1))
    cls = get_family("layerflow")
    model = cls(det, None, cls.Config.from_dict(TINY_CONFIGS["layerflow:total_stage"]))
    cond = data.conditions.as_array()
    local = model.to_local(data.showers, cond)
    model.fit_preprocessing(Batch(data.conditions, local))
    model.eval()
    per_layer = torch.as_tensor(local).reshape(n, model.n_layers, -1)
    e_data, n_data = per_layer.sum(2), (per_layer > 0).sum(2).float()
    # the "data" have four times the flow's sparse energies: a map the fit must find
    e_data = torch.where((n_data >= 1) & (n_data <= k), 4 * e_data, e_data)
    cond_t = torch.as_tensor(cond, dtype=torch.float32)
    return model, cond_t, e_data, n_data


def test_the_map_is_monotone_and_identity_where_there_is_too_little():
    model, cond, e_data, n_data = _fitted()
    model.fit_sparse_map(cond, e_data, n_data, 2, torch.Generator().manual_seed(0))
    assert model.config.sparse_map == 2
    assert model.sparse_q_flow.shape == (model.n_layers, 2, SPARSE_MAP_Q)
    assert torch.all(model.sparse_q_flow.diff(dim=-1) >= 0) and torch.all(model.sparse_q_data.diff(dim=-1) >= 0)
    assert torch.isfinite(model.sparse_q_flow).all() and torch.isfinite(model.sparse_q_data).all()


def test_mapped_layers_follow_the_data_others_untouched():
    model, cond, e_data, n_data = _fitted(k=2)
    e = torch.tensor([[0.0, 0.3, 0.3, 5.0]]).repeat(3, 1)
    count = torch.tensor([[0.0, 1.0, 3.0, 40.0]]).repeat(3, 1)
    c = cond[:3]
    # a map whose data quantiles are the flow's plus log 4: every mapped energy is multiplied by 4
    q = torch.linspace(-12.0, 6.0, SPARSE_MAP_Q).expand(model.n_layers, 2, -1).clone()
    model.config.sparse_map = 2
    model.register_buffer("sparse_q_flow", q)
    model.register_buffer("sparse_q_data", q + np.log(4.0))
    out = model._map_sparse(e, count, c)
    torch.testing.assert_close(out[:, 1], 4 * e[:, 1])  # one hit: mapped
    torch.testing.assert_close(out[:, [0, 2, 3]], e[:, [0, 2, 3]])  # empty, 3 hits (> K), dense: unchanged
    # outside the stored quantiles the map shifts by its end difference
    far = model._map_sparse(torch.full((1, 4), 1e4), torch.ones(1, 4), c[:1])
    torch.testing.assert_close(far, torch.full((1, 4), 4e4))


def test_fitted_model_samples_saves_loads_and_exports(tmp_path):
    model, cond, e_data, n_data = _fitted()
    c = Conditions.from_array(cond[:50].numpy())
    before = model.sample(c, seed=1)
    model.fit_sparse_map(cond, e_data, n_data, 2, torch.Generator().manual_seed(0))
    after = model.sample(c, seed=1)
    assert not torch.equal(before, after)
    hits = lambda s: (s.reshape(len(c), model.n_layers, -1) > 0).sum(2)  # noqa: E731
    assert torch.equal(hits(before), hits(after))  # the map moves energies, not hits
    path = save_model(model, tmp_path / "m")
    again = load_model(path)
    assert again.config.sparse_map == 2
    assert torch.equal(again.sample(c, seed=1), after)
    onnx_path = export_onnx(again, tmp_path / "m.onnx")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    cond7 = cond[:7]
    noise = again.draw_noise(7, torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = again.decode_window(cond7, *noise).numpy()
    feeds = {"conditions": cond7.numpy()}
    feeds.update({name: t.numpy() for (name, _, _), t in zip(noise_inputs(again), noise)})
    np.testing.assert_allclose(sess.run(["showers"], feeds)[0], ref, rtol=2e-3, atol=1e-4)


def test_sparse_map_needs_hit_counts():
    cls = get_family("layerflow")
    with pytest.raises(ValueError, match="hit_count"):
        cls(toy_detector(), None, cls.Config.from_dict({**TINY_CONFIGS["layerflow"], "sparse_map": 2}))
