"""layerflow's ``cap_rescaled``: no hit ends above its cell's cap after the rescaling to the layer energy, the
excess goes to the layer's other hits, and layers with nothing over the cap are untouched."""

from __future__ import annotations

import torch

from caloforge.dataset import Batch
from caloforge.models import get_family
from caloforge.models.layerflow import LayerFlow
from conftest_models import TINY_CONFIGS, toy_detector, toy_showers


def test_cap_moves_the_excess_to_the_other_hits_of_the_layer():
    e = torch.tensor([10.0, 1.0, 1.0, 5.0, 2.0, 3.0])
    cap = torch.tensor([4.0, 10.0, 10.0, 100.0, 100.0, 1.0])
    seg = torch.tensor([0, 0, 0, 1, 1, 2])
    target = torch.tensor([12.0, 7.0, 3.0])
    out = LayerFlow._cap_hits(e, cap, seg, target)
    assert torch.all(out <= cap)
    # layer 0: 6 MeV over the cap shared 1:1 by the two others; layer 1 untouched bit for bit; layer 2 has no
    # other hit, so its excess is lost
    torch.testing.assert_close(out[:3], torch.tensor([4.0, 4.0, 4.0]))
    assert torch.equal(out[3:5], e[3:5])
    assert out[5].item() == 1.0


def test_cap_rounds_share_what_the_first_round_pushed_over():
    e = torch.tensor([20.0, 3.0, 1.0])
    cap = torch.tensor([5.0, 4.0, 100.0])
    out = LayerFlow._cap_hits(e, cap, torch.zeros(3, dtype=torch.long), torch.zeros(1))
    assert torch.all(out <= cap + 1e-6)
    torch.testing.assert_close(out.sum(), e.sum())  # the third hit takes what the second could not


def test_only_the_layers_over_their_cap_are_recomputed(monkeypatch):
    """The eager path rescales only the segments with a hit over its cap: the same numbers as the rounds over all
    hits (what ONNX export runs)."""
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 50, (2000,), generator=g).sort().values
    e = torch.rand(2000, generator=g) * 10
    cap = torch.full((2000,), 9.5)
    target = torch.zeros(50)
    fast = LayerFlow._cap_hits(e, cap, seg, target)
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)  # the export path: every segment, two rounds
    full = LayerFlow._cap_hits(e, cap, seg, target)
    assert torch.equal(fast, full)
    assert torch.all(fast <= cap) and not torch.equal(fast, e)


def _model(cap_rescaled: bool):
    det = toy_detector(n_layers=3, n_xy=6, n_y_angled=12)
    data = toy_showers(det, 40, seed=3)
    cls = get_family("layerflow")
    cfg = {**TINY_CONFIGS["layerflow:mirror_tie"], "mirror_tie": "none", "cap_rescaled": cap_rescaled,
           "cell_cap_margin": 0.5}  # a cap below the training maxima: many hits reach it
    model = cls(det, None, cls.Config.from_dict(cfg))
    cond = data.conditions.as_array()
    model.fit_preprocessing(Batch(data.conditions, model.to_local(data.showers, cond)))
    return model, data


def test_sampled_hits_respect_the_cap_and_other_showers_do_not_change():
    capped, data = _model(True)
    free, _ = _model(False)
    free.load_state_dict(capped.state_dict())
    cond = torch.as_tensor(data.conditions.as_array(), dtype=torch.float32)
    noise = capped.draw_noise(len(cond), torch.Generator().manual_seed(4))
    with torch.no_grad():
        row, lay, col, flat, e = capped._hits(cond, *noise)
        row_f, _, _, flat_f, e_f = free._hits(cond, *noise)
    cap = torch.exp(capped.cell_log_e_max[flat])
    assert torch.equal(row, row_f) and torch.equal(flat, flat_f)  # the same hits, only their energies differ
    assert bool((e_f > cap * (1 + 1e-6)).any())  # without the option the rescaling overshoots the cap
    assert bool((e <= cap * (1 + 1e-6)).all())
    seg = row * capped.n_layers + lay
    over_seg = torch.unique(seg[e_f > cap * (1 + 1e-6)])
    untouched = ~torch.isin(seg, over_seg)
    assert bool(untouched.any())
    assert torch.equal(e[untouched], e_f[untouched])
    # a layer never gains energy and keeps nearly all of it where its hits below the cap have room for the excess
    # (two rounds of proportional sharing; what is left over after them is dropped)
    tot = torch.zeros(int(seg.max()) + 1).scatter_add(0, seg, e)
    tot_f = torch.zeros_like(tot).scatter_add(0, seg, e_f)
    assert bool((tot <= tot_f * (1 + 1e-5)).all())
    room = torch.zeros_like(tot).scatter_add(0, seg, cap) >= tot_f * 2
    assert int(room[over_seg].sum()) > 0
    kept = tot / tot_f
    assert float(kept[room].min()) > 0.99
    assert float(kept[over_seg].mean()) > 0.95
