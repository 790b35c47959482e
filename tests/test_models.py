"""The model interface, per family: shapes, non-negativity, gradients, save/load, detector and range checks."""

from __future__ import annotations

import functools
import json
import math
import warnings

import numpy as np
import pytest
import torch

from caloforge.models import (
    ConditionsWarning,
    ModelError,
    TrainBatch,
    families,
    get_family,
    load_model,
    save_model,
)
from caloforge.models.layerflow import N_FEAT
from conftest_models import (
    LAYERED_FAMILIES,
    VARIANTS,
    family_of,
    tiny_model,
    toy_detector,
    toy_layered_detector,
    toy_layered_showers,
    toy_showers,
)

FAMILIES = families()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@functools.lru_cache
def _toy(layered: bool):
    if layered:
        det = toy_layered_detector()
        return det, toy_layered_showers(det, 48, seed=3)
    det = toy_detector()
    return det, toy_showers(det, 48, seed=3)


def _layered(request) -> bool:
    """Whether the test's family takes any readout (then it runs on the per-layer toy readout)."""
    callspec = getattr(request.node, "callspec", None)
    return callspec is not None and family_of(callspec.params.get("family", "")) in LAYERED_FAMILIES


@pytest.fixture
def detector(request):
    return _toy(_layered(request))[0]


@pytest.fixture
def data(request):
    return _toy(_layered(request))[1]


def test_registry():
    assert set(FAMILIES) >= {"layerflow", "wgan"}
    assert {family_of(v) for v in VARIANTS} == set(FAMILIES)
    for name in FAMILIES:
        assert get_family(name).family == name
    with pytest.raises(ModelError, match="unknown model family 'nope'"):
        get_family("nope")


def test_unknown_config_option_is_refused():
    with pytest.raises(ModelError, match="unknown model option"):
        get_family("layerflow").Config.from_dict({"flow_bloks": 3})


@pytest.mark.parametrize("family", VARIANTS)
def test_sample_shape_and_non_negative(family, detector, data):
    model = tiny_model(family, detector, data)
    showers = model.sample(data.energies[:10], data.angles[:10], seed=1)
    assert showers.shape == (10, detector.n_cells())
    assert showers.dtype == torch.float32
    assert torch.isfinite(showers).all()
    assert (showers >= 0).all()
    assert (showers == 0).any(), "sparse showers need exact zeros"


@pytest.mark.parametrize("family", VARIANTS)
def test_sampling_is_seeded(family, detector, data):
    model = tiny_model(family, detector, data)
    a = model.sample(data.energies[:5], 0.0, seed=7)
    b = model.sample(data.energies[:5], 0.0, seed=7)
    c = model.sample(data.energies[:5], 0.0, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("family", VARIANTS)
def test_sample_into_a_reused_buffer(family, detector, data):
    """``sample(out=...)`` (what generate does with its reused host buffers) fills the caller's buffer with the same
    numbers, whatever the buffer held before; a buffer of another shape or dtype is refused."""
    model = tiny_model(family, detector, data)
    a = model.sample(data.energies[:6], 0.0, seed=3)
    buf = torch.full_like(a, 123.0)
    b = model.sample(data.energies[:6], 0.0, seed=3, out=buf)
    assert b.data_ptr() == buf.data_ptr() and torch.equal(a, b)
    with pytest.raises(ValueError, match=r"out is \(5, .*expected a contiguous \(6, "):
        model.sample(data.energies[:6], 0.0, seed=3, out=buf[:5])
    with pytest.raises(ValueError, match="float32"):
        model.sample(data.energies[:6], 0.0, seed=3, out=buf.double())


@pytest.mark.parametrize("family", VARIANTS)
def test_gradients_reach_all_parameters(family, detector, data):
    torch.manual_seed(0)
    model = tiny_model(family, detector, data)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opts = model.configure_optimizers(1e-2)
    batch = TrainBatch(torch.as_tensor(data.conditions.as_array(), dtype=torch.float32), torch.as_tensor(data.showers))
    for step in range(4):  # two steps so that zero-initialised output layers pass gradients back
        losses = model.training_step(batch, opts, step)
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    frozen = [k for k, p in model.named_parameters() if torch.equal(p.detach(), before[k])]
    assert not frozen, f"parameters that received no gradient: {frozen}"


@pytest.mark.parametrize("family", VARIANTS)
def test_save_load_gives_identical_showers(family, detector, data, tmp_path):
    model = tiny_model(family, detector, data)
    model.meta["particle"] = "gamma"
    save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.safetensors"]
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["family"] == family_of(family) and meta["detector"]["name"] == detector.name
    assert meta["conditions"]["energy_mev"][0] == pytest.approx(data.energies.min())
    loaded = load_model(tmp_path / "m", expected_detector=detector)
    assert loaded.meta["particle"] == "gamma"
    a = model.sample(data.energies[:6], 0.0, seed=3)
    b = loaded.sample(data.energies[:6], 0.0, seed=3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", VARIANTS)
def test_sample_hits_are_the_non_zero_cells_of_sample(family, detector, data):
    """The sparse form (``sample_hits``, what ``generate --format sparse`` writes) holds the same showers."""
    from caloforge.models.base import dense_hits

    model = tiny_model(family, detector, data)
    dense = model.sample(data.energies[:7], 0.0, seed=3)
    counts, cells, energies = model.sample_hits(data.energies[:7], 0.0, seed=3)
    row, cells_d, energies_d = dense_hits(dense)
    assert torch.equal(counts, torch.bincount(row, minlength=7)) and counts.sum() > 0
    assert torch.equal(cells, cells_d) and torch.equal(energies, energies_d)
    _, cells32, energies32 = model.sample_hits(data.energies[:7], 0.0, seed=3, cell_dtype=torch.int32)
    assert cells32.dtype == torch.int32 and torch.equal(cells32.long(), cells) and torch.equal(energies32, energies)
    with pytest.raises(ValueError, match="cell_dtype torch.float32; expected torch.int32 or torch.int64"):
        model.sample_hits(data.energies[:7], 0.0, seed=3, cell_dtype=torch.float32)
    # sampling leaves the mode as it found it, and samples in eval mode either way
    for mode in (True, False):
        model.train(mode)
        again = model.sample_hits(data.energies[:7], 0.0, seed=3)
        assert model.training is mode and all(m.training is mode for m in model.modules())
        assert all(torch.equal(a, b) for a, b in zip(again, (counts, cells, energies)))


@pytest.mark.parametrize("family", VARIANTS)
def test_hits_come_chunk_by_chunk_over_every_shower(family, detector, data):
    """``hits_by_chunk`` hands every chunk's hits to the sink once (rows within the chunk), together the hits of
    ``sample_hits``, on one thread and on two (chunks then in parallel)."""
    model = tiny_model(family, detector, data)
    model.sample_chunk = 4  # (an instance attribute: the class's stays; the chunk size must match for equal bits)
    n = 9
    counts, cells, energies = model.sample_hits(data.energies[:1].repeat(n), 0.0, seed=2)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            seen: dict[int, tuple] = {}

            def sink(i, m, row, cell, energy, seen=seen):
                assert i not in seen and (len(row) == 0 or 0 <= int(row.min()) <= int(row.max()) < m)
                seen[i] = (torch.bincount(row, minlength=m), cell, energy)

            model.hits_by_chunk(sink, data.energies[:1].repeat(n), 0.0, seed=2)
            parts = [seen[i] for i in sorted(seen)]
            assert len(parts) == 3  # 4 + 4 + 1 showers
            assert sum(len(p[0]) for p in parts) == n
            assert torch.equal(torch.cat([p[0] for p in parts]), counts)
            assert torch.equal(torch.cat([p[1] for p in parts]), cells)
            assert torch.equal(torch.cat([p[2] for p in parts]), energies)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("family", VARIANTS)
def test_model_for_another_detector_is_refused(family, detector, data, tmp_path):
    save_model(tiny_model(family, detector, data), tmp_path / "m")
    for other in (toy_detector(name="other-ecal", n_layers=5), toy_layered_detector(name="other-layers")):
        with pytest.raises(ModelError, match=rf"model\.json: field 'detector' is '{detector.name}'; expected detector "
                                             rf"'other"):
            load_model(tmp_path / "m", expected_detector=other)


@pytest.mark.parametrize("family", VARIANTS)
def test_conditions_outside_training_range_warn(family, detector, data):
    model = tiny_model(family, detector, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConditionsWarning)
        model.sample(data.energies[:3], 0.0, seed=0)  # inside: silent
    with pytest.warns(ConditionsWarning, match="outside the training range"):
        model.sample([500e3], 0.0, seed=0)
    with pytest.raises(ModelError, match="angle 30 deg requested"):  # the toy detector has no angled window
        model.sample([50e3], 30.0, seed=0)


def test_bad_inputs_and_files(detector, data, tmp_path):
    model = tiny_model("layerflow", detector, data)
    with pytest.raises(ValueError, match="> 0 MeV"):
        model.sample([0.0], 0.0)
    with pytest.raises(ModelError, match="model not found"):
        load_model(tmp_path / "missing")
    save_model(model, tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="invalid JSON"):
        load_model(tmp_path / "m")
    save_model(model, tmp_path / "m2")
    meta = json.loads((tmp_path / "m2" / "model.json").read_text())
    meta["config"]["flow_blocks"] = 3
    (tmp_path / "m2" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="weights do not match"):
        load_model(tmp_path / "m2")


def test_layerflow_soft_hit_spectrum_quantiles_follow_its_density():
    """The soft-hit (MIP) histogram of layerflow: its quantile function samples exactly its density."""
    det = toy_detector()
    model = tiny_model("layerflow", det, toy_showers(det, 30, seed=2))
    cfg = model.config
    with torch.no_grad():
        model.mip_logits.copy_(torch.randn_like(model.mip_logits, generator=torch.Generator().manual_seed(0)) * 2)
    n, k = 200_000, cfg.mip_bins
    lay = torch.full((n,), 1, dtype=torch.long)
    q = torch.rand(n, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model._mip_quantile(q, lay)
        width = (cfg.mip_log_max - cfg.mip_log_min) / k
        centres = cfg.mip_log_min + width * (torch.arange(k) + 0.5)
        dens = torch.exp(model._mip_log_density(centres, torch.full((k,), 1, dtype=torch.long)))
    assert float(dens.sum() * width) == pytest.approx(1.0, rel=1e-5)
    counts = np.bincount(model._mip_bin(y).numpy(), minlength=k)
    expected = (dens * width).numpy() * n
    ok = expected > 20
    chi2 = (((counts - expected) ** 2 / expected)[ok]).sum()
    assert chi2 < ok.sum() + 5 * np.sqrt(2 * ok.sum()), chi2  # chi2/ndf ~ 1 within 5 sigma


def test_layerflow_exact_hit_count_sampling_keeps_the_hit_probabilities():
    """With ``hit_count``, layerflow hits exactly the flow's number of cells per layer (Pareto order sampling).

    Drawing that number as the sum of the cells' Bernoulli(p) hits and then choosing the cells by order sampling
    must give back each cell's hit probability p (tolerance: 5 standard errors plus 0.025, the approximation's bias,
    about 0.02 at p near 0.5; ordering the cells without p misses by 0.44).
    """
    det = toy_detector()
    model = tiny_model("layerflow:hit_count", det, toy_showers(det, 30, seed=2))
    gen = torch.Generator().manual_seed(5)
    reps, n_lat = 20000, 12
    p = torch.linspace(0.02, 0.9, n_lat)
    logit = torch.logit(p).expand(1, reps, n_lat)
    count = (torch.rand(reps, n_lat, generator=gen) < p).sum(1, keepdim=True)  # (n, L=1)
    hits, _ = model._hits_exactly(logit, torch.rand(1, reps, n_lat, generator=gen), count)
    assert torch.equal(hits.sum(2), count.T), "each layer must have exactly the requested number of hits"
    freq = hits[0].float().mean(0)
    tol = 5 * torch.sqrt(p * (1 - p) / reps) + 0.025
    assert torch.all((freq - p).abs() < tol), (freq, p)


def test_layerflow_selection_noise_gives_uniform_energy_quantiles():
    """With ``select_noise``, a hit's energy quantile is u / sigmoid(threshold + logit p): given the next key, the
    selected cells' keys are independent below it, so the quantiles are uniform on (0, 1) in every cell, whatever p
    (Kolmogorov-Smirnov distance below its 0.1 % critical value 1.95 / sqrt(N); taking u itself fails it)."""
    det = toy_detector()
    model = tiny_model("layerflow:core", det, toy_showers(det, 30, seed=2))
    gen = torch.Generator().manual_seed(6)
    reps, n_lat = 20000, 12
    p = torch.linspace(0.02, 0.9, n_lat)
    logit = torch.logit(p).expand(1, reps, n_lat)
    count = (torch.rand(reps, n_lat, generator=gen) < p).sum(1, keepdim=True)
    u = torch.rand(1, reps, n_lat, generator=gen)
    hits, threshold = model._hits_exactly(logit, u, count)
    lay, row, col = hits.nonzero(as_tuple=True)
    v = u[lay, row, col] / torch.sigmoid(threshold[lay, row, 0] + logit[lay, row, col])
    for values, uniform in ((v, True), (u[lay, row, col], False)):
        for c in (0, n_lat // 2, n_lat - 1):
            x = np.sort(values[col == c].numpy())
            ecdf = np.arange(1, len(x) + 1) / len(x)
            ks = max(np.abs(ecdf - x).max(), np.abs(ecdf - 1 / len(x) - x).max())
            assert (ks < 1.95 / np.sqrt(len(x))) == uniform, (c, ks, len(x), uniform)


def test_layerflow_total_energy_sets_the_visible_energy():
    """With ``total_energy`` each shower's visible energy is the flow's total, exp(log total) x E_inc, whatever the
    layer energies sum to (the layers only share it), so its distribution is the flow's one-dimensional marginal."""
    det = toy_detector()
    data = toy_showers(det, 40, seed=2)
    model = tiny_model("layerflow:core", det, data).eval()
    with torch.no_grad():
        model.feat_mean[N_FEAT * det.n_layers] -= 0.3  # a total unlike the layers' sum, to see that it rules
        cond = torch.as_tensor(data.conditions.as_array()[:12], dtype=torch.float32)
        noise = model.draw_noise(12, torch.Generator().manual_seed(1))
        showers = model.decode_window(cond, *noise)
        cf = model.condition_features(cond)
        fs = model._flow_inverse(noise[0], model._flow_cond(cf))
        fs = fs * model.flow_std + model._cond_basis(cf) @ model.flow_coef  # (no clamp in this variant)
        k = N_FEAT * det.n_layers
        expected = torch.exp((fs[:, k] * model.feat_std[k] + model.feat_mean[k]).clamp(max=0.0)) * cond[:, 0]
    assert torch.allclose(showers.sum(1), expected, rtol=1e-4), (showers.sum(1), expected)


def test_layerflow_core_exclusive_shares_a_corner_shower_equally():
    """With ``core_exclusive`` the laws of the cells near the axis depend only on their displacement from it: a
    shower at normal incidence on the corner of four cells gives those four cells (and every pair of cells mirrored
    through the axis) the same hit logit and energy law, whatever the per-cell coefficients hold; angled, the odd
    terms break the symmetry in y only."""
    det = toy_detector()
    model = tiny_model("layerflow:core_exclusive", det, toy_showers(det, 30, seed=2)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (model.cell_hit, model.cell_mu, model.cell_log_sigma, model.core_w, model.core_cw):
            p.copy_(torch.randn(p.shape, generator=gen))
        n_l = det.n_layers
        for angle, y_symmetric in ((0.0, True), (40.0, False)):
            cond = torch.tensor([[3e4, angle, 0.0, 0.0, 22.0]] * 4)
            cf = model.condition_features(cond)
            fs = torch.randn(4, model.dim, generator=gen)
            # layer centroids on the axis (core_centroid: the cells follow the centroid, here symmetric)
            fs[:, n_l:3 * n_l] = -model.feat_mean[n_l:3 * n_l] / model.feat_std[n_l:3 * n_l]
            offsets = model._offsets(cond)
            cov = model._covariates(fs, cf, offsets)
            core = model._core_terms(cov, offsets, cond)
            logit = model._hit_logits(cov, core)  # (L, n, n_lat)
            ix = {float(v): i for i, v in enumerate(model.cell_x.reshape(6, 6)[:, 0])}
            iy = {float(v): j for j, v in enumerate(model.cell_y.reshape(6, 6)[0])}
            cell = {(x, y): ix[x] * 6 + iy[y] for x in (-0.5, 0.5) for y in (-0.5, 0.5)}
            # the axis crosses layer 0 at the corner (x, y) = (0, 0) of the four cells in the local frame
            for (x, y), c in cell.items():
                assert torch.allclose(logit[0, :, c], logit[0, :, cell[(-x, y)]], atol=1e-5)  # x always symmetric
                same_y = torch.allclose(logit[0, :, c], logit[0, :, cell[(x, -y)]], atol=1e-5)
                assert same_y == y_symmetric, (angle, x, y)


@pytest.mark.parametrize("variant", ["layerflow:halo", "layerflow:halo_knots"])
def test_layerflow_halo_term_is_symmetric_at_normal_incidence(variant):
    """With ``halo_term`` the cells outside the core block follow a law of their displacement from the axis plus
    sin(angle) times their own laws: at normal incidence on the corner of four cells, with the layer centroid on the
    axis, every halo cell and its mirror images through the axis (in x and in y) get the same hit logit, energy law
    and soft-hit weight, whatever the coefficients hold; at 40 degrees the cells' own laws return."""
    det = toy_detector()
    model = tiny_model(variant, det, toy_showers(det, 30, seed=2)).eval()
    gen = torch.Generator().manual_seed(0)
    n_l = det.n_layers
    with torch.no_grad():
        for p in (model.cell_hit, model.cell_mu, model.cell_log_sigma, model.cell_mix, model.core_w, model.halo_w):
            p.copy_(torch.randn(p.shape, generator=gen))
        ix = {float(v): i for i, v in enumerate(model.cell_x.reshape(6, 6)[:, 0])}
        iy = {float(v): j for j, v in enumerate(model.cell_y.reshape(6, 6)[0])}
        halo = [(x, y) for x in ix for y in iy if model.halo_mask[ix[x] * 6 + iy[y]] > 0]
        assert len(halo) == 36 - 9
        for angle in (0.0, 40.0):
            cond = torch.tensor([[3e4, angle, 0.0, 0.0, 22.0]] * 4)
            cf = model.condition_features(cond)
            fs = torch.randn(4, model.dim, generator=gen)
            fs[:, n_l:3 * n_l] = -model.feat_mean[n_l:3 * n_l] / model.feat_std[n_l:3 * n_l]  # centroids on the axis
            offsets = model._offsets(cond)
            cov = model._covariates(fs, cf, offsets, cond)
            logit = model._hit_logits(cov, model._core_terms(cov, offsets, cond), offsets, cond)[0]  # layer 0
            lay = torch.zeros(len(halo), dtype=torch.long)
            col = torch.tensor([ix[x] * 6 + iy[y] for x, y in halo])
            at = model._halo_at(cov, offsets, cond, lay, lay, col)
            mu, log_sigma, _, _ = model._hit_params(cov, lay, lay, col, None, at)
            mix = model._mix_logit(cov, lay, lay, col, None, at)
            values = {cell: (logit[0, c], mu[i], log_sigma[i], mix[i]) for i, (cell, c) in enumerate(zip(halo, col))}
            # the axis crosses layer 0 at the corner (0, 0) of the four central cells in the local frame
            mirrored = [(values[(x, y)], values[(-x, y)], values[(x, -y)]) for x, y in halo
                        if (-x, y) in values and (x, -y) in values]
            assert len(mirrored) > 10
            same = all(torch.allclose(torch.stack(a), torch.stack(b), atol=1e-4)
                       and torch.allclose(torch.stack(a), torch.stack(c), atol=1e-4) for a, b, c in mirrored)
            assert same == (angle == 0.0), angle
            # the hit logits' written-out halo sum is the basis contracted with its coefficients
            axis, sin_a, sec_m1, c_raw, coef = model._halo_inputs(cov, offsets, cond)
            dx, dy = model.cell_x - axis[..., 0:1], model.cell_y - axis[..., 1:2]
            psi = model._halo_basis(dx, dy, sin_a[..., None], sec_m1[..., None], c_raw[..., 0:1], c_raw[..., 1:2])
            ref = torch.einsum("lnck,lnk->lnc", psi, coef[:, :, 0]) * model.halo_mask
            assert torch.allclose(model._halo_logits(cov, offsets, cond), ref, atol=1e-4)


def test_layerflow_angle_basis_covariates_are_bumps_in_the_angle():
    """``angle_basis`` appends K Gaussian bumps in the incidence angle (centred by 1/2) to every layer's cell
    covariates: bump k is 1/2 at its own angle, exp(-1/2) - 1/2 one spacing away; cells then respond to the angle
    through their own coefficients on the bumps."""
    det = toy_detector()
    model = tiny_model("layerflow:core", det, toy_showers(det, 30, seed=2)).eval()
    k = model.config.angle_basis
    assert k == 3 and model.n_cov == model.cell_hit.shape[1]
    cond = torch.tensor([[3e4, a, 0.0, 0.0, 22.0] for a in (0.0, 30.0, 60.0)])
    with torch.no_grad():
        cf = model.condition_features(cond)
        fs = torch.zeros(3, model.dim)
        cov = model._covariates(fs, cf, model._offsets(cond), cond)
        bumps = cov[0, :, -k:]
        expected = torch.full((3, 3), math.exp(-0.5) - 0.5)
        expected[0, 2] = expected[2, 0] = math.exp(-2.0) - 0.5
        expected.fill_diagonal_(0.5)
        assert torch.allclose(bumps, expected, atol=1e-6)
        assert torch.equal(cov[:, :, -k:], bumps.expand(cov.shape[0], -1, -1))  # the same bumps in every layer
        # a coefficient on the middle bump changes the hit logits at 30 degrees most
        before = model._hit_logits(cov)
        model.cell_hit[:, -2, :] += 1.0
        delta = (model._hit_logits(cov) - before)[0, :, 0]
        assert torch.allclose(delta, bumps[:, 1], atol=1e-6)
        with pytest.raises(ValueError, match="raw conditions"):
            model._covariates(fs, cf, model._offsets(cond))


def test_layerflow_clamp_keeps_a_wild_flow_inside_the_training_range():
    """A flow maps rare latents far outside the data; ``clamp_features`` bounds every sampled feature."""
    det = toy_detector()
    data = toy_showers(det, 40, seed=2)
    wild = {}
    for variant in ("layerflow", "layerflow:hit_count"):  # without and with the clamp
        model = tiny_model(variant, det, data)
        with torch.no_grad():
            for block in model.blocks:
                block.net[-1].bias.normal_(0.0, 20.0, generator=torch.Generator().manual_seed(1))
        x = model.sample(data.energies, data.angles, seed=4)
        wild[variant] = float((x.sum(1) / torch.as_tensor(data.energies)).max())
    train_max = float((data.showers.sum(1) / data.energies).max())
    assert wild["layerflow"] > 3 * train_max, ("the test needs a flow that leaves the training range", wild, train_max)
    assert wild["layerflow:hit_count"] < 3 * train_max, (wild, train_max)


def test_layerflow_flow_weight_decay_shrinks_the_flows_only():
    """``flow_weight_decay``: decoupled decay of the flows' weights; the per-cell laws keep theirs (and their lr)."""
    det = toy_detector()
    data = toy_showers(det, 40, seed=2)
    model = tiny_model("layerflow:hit_count", det, data)
    model.config.flow_weight_decay = 1.0
    opt = model.configure_optimizers(1e-3)["main"]
    assert isinstance(opt, torch.optim.AdamW)
    flow_group, cell_group = opt.param_groups
    assert flow_group["weight_decay"] == 1.0 and cell_group["weight_decay"] == 0.0 and cell_group["lr"] == 1e-2
    assert any(p is model.cell_mu for p in cell_group["params"])
    assert any(p is model.blocks[0].net[0].weight for p in flow_group["params"])
    # with zero gradients, one AdamW step shrinks the flow's weights by lr x decay and leaves the cells alone
    flow_before = model.blocks[0].net[0].weight.detach().clone()
    cells_before = model.cell_mu.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(model.blocks[0].net[0].weight, flow_before * (1 - 1e-3 * 1.0))
    assert torch.equal(model.cell_mu.detach(), cells_before)
    with pytest.raises(ValueError, match="exclusive"):
        model.configure_optimizers(1e-3, weight_decay=0.1)
