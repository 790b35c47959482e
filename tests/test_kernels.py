"""The compiled CPU kernels (caloforge.models.kernels) against their torch definitions, and at the model level."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from caloforge.models import kernels
from caloforge.models.layerflow import LayerFlow
from conftest_models import tiny_model, toy_detector, toy_showers

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="numba missing or switched off")


@pytest.fixture(autouse=True)
def _one_thread_kernels_on(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("CALOFORGE_NUMBA", "1")


def _reference(monkeypatch):  # the torch definitions only
    monkeypatch.setenv("CALOFORGE_NUMBA", "0")


# ---- uniform noise -------------------------------------------------------------------------------------------
def test_uniform_is_its_torch_definition_bit_for_bit(monkeypatch):
    u = kernels.uniform((37, 3, 50), torch.Generator().manual_seed(4))
    seed = kernels._draw_seed(torch.Generator().manual_seed(4))
    assert torch.equal(u.view(37, -1), kernels.uniform_reference(37, 150, seed))
    _reference(monkeypatch)
    assert torch.equal(kernels.uniform((37, 3, 50), torch.Generator().manual_seed(4)), u)


def test_uniform_rows_are_the_rows_of_the_whole_draw_on_any_thread_count():
    whole = kernels.UniformRows((300, 90), torch.Generator().manual_seed(1))
    full = whole.rows(0, 300)
    assert torch.equal(whole.rows(128, 256), full[128:256]) and torch.equal(whole.rows(290, 400), full[290:])
    torch.set_num_threads(2)
    assert torch.equal(kernels.UniformRows((300, 90), torch.Generator().manual_seed(1)).rows(0, 300), full)


def test_blocks_made_whole_or_at_places_are_the_draw(monkeypatch):
    draw = kernels.UniformRows((50, 4, 30), torch.Generator().manual_seed(2))
    full = draw.rows(0, 50).view(50, -1)
    block = draw.block(20, 45)
    assert block.shape == (25, 4, 30) and torch.equal(block.tensor().view(25, -1), full[20:45])
    rows, cols = torch.randint(0, 25, (300,)), torch.randint(0, 120, (300,))
    assert torch.equal(block.at(rows, cols), full[20 + rows, cols])
    _reference(monkeypatch)
    assert torch.equal(block.at(rows, cols), full[20 + rows, cols]) and torch.equal(draw.rows(0, 50).view(50, -1), full)


def test_uniform_statistics():
    """Range, mean, variance, neighbour and row correlations within 4 standard errors of a uniform's."""
    u = kernels.uniform((400, 2000), torch.Generator().manual_seed(7)).double()
    n = u.numel()
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(float(u.var()) - 1 / 12) < 4 * math.sqrt(1 / 180 / n)  # var of (u - 1/2)^2 is 1/180
    for a, b in ((u[:, :-1], u[:, 1:]), (u[:-1], u[1:])):
        r = float(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1])
        assert abs(r) < 4 / math.sqrt(a.numel())
    # distinct generators' seeds give distinct draws; the same seed the same
    v = kernels.uniform((400, 2000), torch.Generator().manual_seed(8)).double()
    assert not torch.equal(u, v)
    assert torch.equal(u, kernels.uniform((400, 2000), torch.Generator().manual_seed(7)).double())


# ---- hit selection -------------------------------------------------------------------------------------------
def _selection_case(seed: int, n_l: int = 5, n: int = 40, m: int = 64):
    g = torch.Generator().manual_seed(seed)
    logit = torch.randn(n_l, n, m, generator=g) * 3 - 2
    u_cells = torch.rand(n, n_l * m, generator=g)
    count = torch.randint(0, m + 1, (n, n_l), generator=g).float()
    count[0, :] = torch.tensor([0.0, m, m - 1, 1, 2])[:n_l]  # the edges: no hit, every cell, all but one, one
    return logit, u_cells, count


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_hits_matches_the_torch_reference(seed):
    logit, u_cells, count = _selection_case(seed)
    n_l, n, m = logit.shape
    with torch.no_grad():
        fast = kernels.select_hits(logit, u_cells, count)
    assert fast is not None
    lay, row, col, logit_hit, u_hit, thr_hit = fast
    u = u_cells.reshape(n, n_l, m).transpose(0, 1)
    mask, threshold = LayerFlow._hits_exactly(None, logit, u, count)
    rr, rl, rc = mask.permute(1, 0, 2).nonzero(as_tuple=True)  # the kernel's order: shower, layer, cell
    assert torch.equal(lay, rl) and torch.equal(row, rr) and torch.equal(col, rc)
    per_row = torch.zeros(n, n_l, dtype=torch.long).index_put_((row, lay), torch.ones_like(row), accumulate=True)
    assert torch.equal(per_row, count.long())
    assert torch.equal(logit_hit, logit[rl, rr, rc]) and torch.equal(u_hit, u[rl, rr, rc].clamp(1e-7, 1 - 1e-7))
    ref_thr = threshold[rl, rr, 0]
    finite = torch.isfinite(ref_thr)
    assert torch.equal(finite, torch.isfinite(thr_hit))
    assert torch.allclose(thr_hit[finite], ref_thr[finite], atol=2e-5, rtol=1e-5)


def test_select_hits_on_a_block_makes_the_same_hits_as_on_its_numbers():
    logit, _, count = _selection_case(4)
    n_l, n, m = logit.shape
    block = kernels.UniformRows((n + 7, n_l * m), torch.Generator().manual_seed(9)).block(7, n + 7)
    with torch.no_grad():
        a, b = kernels.select_hits(logit, block, count), kernels.select_hits(logit, block.tensor(), count)
    assert a is not None and b is not None and all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_scan_order_changes_no_hit():
    """A model reuses one scan order (:func:`kernels.likely_first`) for every call: any order gives the same hits."""
    logit, u_cells, count = _selection_case(5)
    with torch.no_grad():
        own = kernels.select_hits(logit, u_cells, count)
        reversed_order = kernels.likely_first(logit)[:, ::-1].copy()
        other = kernels.select_hits(logit, u_cells, count, reversed_order)
        shuffled = np.stack([np.random.default_rng(i).permutation(logit.shape[2]) for i in range(logit.shape[0])])
        third = kernels.select_hits(logit, u_cells, count, shuffled)
    assert own is not None and other is not None and third is not None
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(own, other, third))


@pytest.mark.parametrize("block", [1, 2, 3, 5])
def test_selection_a_few_layers_at_a_time_makes_the_same_hits(block):
    """Sampling makes the logits a block of layers at a time (:func:`kernels.select_hits_by_layers`): the hits, their
    uniforms and thresholds are those of one selection over the whole tensor, with given uniforms and with a block
    of a draw; the scan order it makes block by block is :func:`kernels.likely_first` of the whole tensor."""
    logit, u_cells, count = _selection_case(6)
    n_l, n, m = logit.shape
    draw = kernels.UniformRows((n + 3, n_l * m), torch.Generator().manual_seed(2)).block(3, n + 3)
    asked = []

    def logits_of(l0: int, l1: int) -> torch.Tensor:
        asked.append((l0, l1))
        buf = torch.full((l1 - l0, n, m), float("nan"))  # a fresh buffer each time: nothing may be read twice
        buf.copy_(logit[l0:l1])
        return buf

    with torch.no_grad():
        for noise in (u_cells, draw):
            whole = kernels.select_hits(logit, noise, count)
            asked.clear()
            parts, order = kernels.select_hits_by_layers(logits_of, (n_l, n, m), noise, count, None, block)
            assert whole is not None and all(torch.equal(a, b) for a, b in zip(whole, parts))
            assert asked == [(i, min(i + block, n_l)) for i in range(0, n_l, block)]
            assert np.array_equal(order, kernels.likely_first(logit))
            again, same = kernels.select_hits_by_layers(logits_of, (n_l, n, m), noise, count, order, block)
            assert same is order and all(torch.equal(a, b) for a, b in zip(whole, again))
        with pytest.raises(ValueError, match="layers 0..1 came as"):
            kernels.select_hits_by_layers(lambda a, b: logit[a:b, :-1], (n_l, n, m), u_cells, count, None, 1)
        with pytest.raises(ValueError, match="expected .* float32 on the CPU"):
            kernels.select_hits_by_layers(lambda a, b: logit[a:b].double(), (n_l, n, m), u_cells, count, None, 1)


def test_window_hits_are_the_window_index_and_selection():
    """The compiled placement of hits in the readout window keeps exactly the hits inside it with energy > 0, at
    the indices that the torch path (axis shifts, bounds, flat index) gives, and says whether they are in order."""
    g = torch.Generator().manual_seed(21)
    n, n_l, nx, ny, window = 30, 4, 6, 7, (4, 5, 9)
    h = 3000
    row = torch.sort(torch.randint(0, n, (h,), generator=g)).values
    lay, col = torch.randint(0, n_l, (h,), generator=g), torch.randint(0, nx * ny, (h,), generator=g)
    e = torch.rand(h, generator=g)
    e[::7] = 0.0
    sx, sy = torch.randint(-3, 3, (n,), generator=g), torch.randint(-4, 5, (n, n_l), generator=g)
    with torch.no_grad():
        out = kernels.window_hits(row, lay, col, e, sx, sy, ny, window)
    wx, wy = col // ny + sx[row], col % ny + sy[row, lay]
    keep = (wx >= 0) & (wx < window[1]) & (wy >= 0) & (wy < window[2]) & (e > 0)
    idx = (lay * window[1] + wx) * window[2] + wy
    assert out is not None
    r, i, en, ordered = out
    assert torch.equal(r, row[keep]) and torch.equal(i, idx[keep]) and torch.equal(en, e[keep])
    key = r * int(np.prod(window)) + i
    assert ordered == bool((key[1:] > key[:-1]).all()) and not ordered  # random cells within a row: not in order
    one = torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([1, 2]), torch.ones(2)
    with torch.no_grad():
        assert kernels.window_hits(*one, torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), 7,
                                   (1, 1, 7))[3]


def test_scratch_buffers_are_reused_and_stand_aside_under_autograd():
    pool = kernels.ScratchPool(keep=2)
    like = torch.zeros(1)
    with torch.no_grad():
        a = pool.take((3, 4, 5), like)
        assert a is not None and a.shape == (3, 4, 5) and a.dtype == torch.float32
        ptr = a.data_ptr()
        pool.give(a)
        b = pool.take((2, 5), like)  # a smaller request reuses the free buffer
        assert b is not None and b.data_ptr() == ptr and b.shape == (2, 5)
        c = pool.take((2, 5), like)  # the buffer is taken: a new one
        assert c is not None and c.data_ptr() != ptr
        pool.give(b), pool.give(c), pool.give(None)
        assert pool.take((1,), torch.zeros(1, dtype=torch.float64)) is None
    with torch.enable_grad():
        assert pool.take((3,), like) is None


def test_basis_dot_is_the_einsum_with_a_zero_row():
    g = torch.Generator().manual_seed(13)
    phi, coef = torch.randn(3, 8, 49, 6, generator=g), torch.randn(3, 8, 4, 6, generator=g)
    with torch.no_grad():
        out = kernels.basis_dot(list(phi.unbind(-1)), coef)
    ref = torch.einsum("lnbk,lnjk->lnbj", phi, coef)
    assert out is not None and out.shape == (3, 8, 50, 4)
    assert torch.allclose(out[:, :, :-1], ref, atol=1e-5) and not out[:, :, -1].any()


def test_kernels_stand_aside_under_autograd():
    logit, u_cells, count = _selection_case(0)
    with torch.enable_grad():
        assert kernels.select_hits(logit, u_cells, count) is None


def test_gathered_dots_are_the_dot_products():
    g = torch.Generator().manual_seed(3)
    cov = torch.randn(4, 10, 6, generator=g)
    tables = [torch.randn(4 * 25, 6, generator=g) for _ in range(3)]
    lay, row, col = torch.randint(0, 4, (200,)), torch.randint(0, 10, (200,)), torch.randint(0, 25, (200,))
    flat = lay * 25 + col
    with torch.no_grad():
        out = kernels.gathered_dots(cov, lay, row, flat, tables)
    ref = torch.stack([(cov[lay, row] * t[flat]).sum(1) for t in tables])
    assert out is not None and out.shape == (3, 200) and torch.allclose(out, ref, atol=1e-5)
    tables[1].add_(0.5)  # an in-place update (an optimiser step, a weight load) must not meet a stale cached copy
    with torch.no_grad():
        again = kernels.gathered_dots(cov, lay, row, flat, tables)
    assert again is not None and torch.allclose(again[1], (cov[lay, row] * tables[1][flat]).sum(1), atol=1e-5)
    assert torch.equal(again[0], out[0])
    other = [torch.randn(4 * 25, 6, generator=g) for _ in range(3)]  # other tensors of the same shapes and versions
    with torch.no_grad():
        theirs = kernels.gathered_dots(cov, lay, row, flat, other)
    assert theirs is not None and torch.allclose(theirs, torch.stack([(cov[lay, row] * t[flat]).sum(1) for t in other]),
                                                  atol=1e-5)


def test_first_bins_is_searchsorted_row_by_row():
    """Same bins as torch.searchsorted (side left) on each hit's layer row: q on a CDF value, between, below the
    first and above the last, and rows with empty (zero-width) bins."""
    g = torch.Generator().manual_seed(8)
    prob = torch.softmax(torch.randn(5, 48, generator=g) * 3, dim=1)
    prob[2, 10:20] = 0.0  # repeated CDF values
    cdf = torch.cumsum(prob / prob.sum(1, keepdim=True), dim=1)
    lay = torch.randint(0, 5, (4000,), generator=g)
    q = torch.rand(4000, generator=g)
    q[:200] = cdf[lay[:200], torch.randint(0, 48, (200,), generator=g)]  # exactly on a CDF value
    q[200:210], q[210:220] = 0.0, 1.5
    with torch.no_grad():
        out = kernels.first_bins(cdf, q, lay)
    ref = torch.stack([torch.searchsorted(cdf[lay[h]], q[h:h + 1])[0] for h in range(4000)])
    assert out is not None and torch.equal(out, ref)


# ---- at the model level ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["layerflow:hit_count", "layerflow:core", "layerflow:core_exclusive",
                                     "layerflow:halo", "layerflow:total_stage"])
def test_layerflow_samples_the_same_with_and_without_the_kernels(variant, monkeypatch):
    """Same seed, same showers: hit for hit (the hit counts exactly; energies to float rounding, allowing the rare
    tie of two keys within a few ulp)."""
    det = toy_detector(n_y_angled=9)
    model = tiny_model(variant, det, toy_showers(det, 48, seed=3)).eval()
    n = 200
    rng = np.random.default_rng(0)
    cond = (rng.uniform(2e4, 9e4, n), np.zeros(n))
    fast = model.sample(cond[0], cond[1], seed=5)
    _reference(monkeypatch)
    ref = model.sample(cond[0], cond[1], seed=5)
    assert torch.equal((fast > 0).sum(1), (ref > 0).sum(1))
    close = torch.isclose(fast, ref, rtol=1e-4, atol=1e-5).all(dim=1)
    assert float(close.float().mean()) >= 0.98
    torch.set_num_threads(2)
    monkeypatch.setenv("CALOFORGE_NUMBA", "1")
    assert torch.equal(model.sample(cond[0], cond[1], seed=5), fast)



@pytest.mark.parametrize("variant", ["layerflow:hit_count", "layerflow:core", "layerflow:halo",
                                     "layerflow:total_stage"])
def test_layerflow_dense_showers_through_hits_are_the_chunked_dense_decode(variant):
    """layerflow.sample on the CPU scatters its hits once per batch; the generic path decodes a dense window per
    chunk. Same seed, same numbers, at normal incidence and in the angled window, over several chunks."""
    from caloforge.models.base import ShowerModel

    det = toy_detector(n_y_angled=9)
    model = tiny_model(variant, det, toy_showers(det, 48, seed=3)).eval()
    model.sample_chunk = 64
    n = 150
    rng = np.random.default_rng(1)
    e = rng.uniform(2e4, 9e4, n)
    for angles in (np.zeros(n), rng.uniform(0, 30, n)):
        via_hits = model.sample(e, angles, seed=6)
        chunked = ShowerModel.sample(model, e, angles, seed=6)
        assert via_hits.shape == chunked.shape and torch.equal(via_hits, chunked)
