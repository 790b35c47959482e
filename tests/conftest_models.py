"""Toy detector and toy showers for the model tests: tiny, fast, shaped roughly like EM showers."""

from __future__ import annotations

import numpy as np

from caloforge.conditions import Conditions
from caloforge.dataset import Batch, write_showers
from caloforge.detector import Detector


def toy_detector(name: str = "toy-ecal", n_layers: int = 4, n_xy: int = 6, n_y_angled: int | None = None) -> Detector:
    """A small Si-W stack with an n_xy x n_xy window of 5 mm cells around the impact point (and an angled window
    n_xy x n_y_angled reaching towards +y when given)."""
    half = n_xy * 5.0 / 2
    return Detector.from_dict({
        "name": name,
        "size_x_mm": 600.0, "size_y_mm": 600.0, "cell_size_mm": 5.0,
        "layers": [{"count": n_layers, "absorber": "G4_W", "absorber_mm": 2.1, "active": "G4_Si", "active_mm": 0.5}],
        "readout": {"x_min_mm": -half, "n_x": n_xy, "y_min_mm": -half, "n_y": n_xy, "n_y_angled": n_y_angled},
    })


def toy_showers(detector: Detector, n: int, seed: int = 0, e_gev: tuple[float, float] = (10.0, 100.0)) -> Batch:
    """Sparse toy showers: gamma longitudinal profile, exponential lateral profile, random centroid, MIP-ish hits."""
    rng = np.random.default_rng(seed)
    n_l, n_x, n_y = detector.shape()
    energies = rng.uniform(e_gev[0] * 1e3, e_gev[1] * 1e3, n)
    angles = np.zeros(n)
    x = (np.arange(n_x) - n_x / 2 + 0.5)[:, None]
    y = (np.arange(n_y) - n_y / 2 + 0.5)[None, :]
    t = np.arange(n_l) + 0.5
    showers = np.zeros((n, n_l, n_x, n_y), np.float32)
    for i, e in enumerate(energies):
        tmax = 0.35 * n_l + 0.1 * n_l * np.log(e / 3e4)
        prof = t ** 2 * np.exp(-2 * t / max(tmax, 0.5))
        prof = prof / prof.sum() * 0.03 * e * (1 + 0.08 * rng.normal())
        cx, cy = rng.normal(0, 0.3, 2)
        for layer in range(n_l):
            w = np.exp(-np.hypot(x - cx, y - cy) / (0.6 + 0.1 * layer))
            cells = prof[layer] * w / w.sum() * rng.lognormal(0, 0.4, w.shape)
            keep = rng.random(w.shape) < np.clip(cells / 2.0, 0.01, 1.0)
            showers[i, layer] = np.where(keep, cells, 0.0)
    return Batch(Conditions.make(energies, angles), showers.reshape(n, -1))


def write_toy_file(path, detector: Detector, n: int, seed: int = 0) -> Batch:
    """Write toy showers as a caloforge HDF5 file and return them."""
    b = toy_showers(detector, n, seed)
    write_showers(path, detector, b.conditions, b.showers, attrs={"source": "toy", "particle": "gamma"})
    return b


#: Tiny architectures per family (and per variant, "family:variant"), so that every test runs in a second or two.
TINY_CONFIGS: dict[str, dict] = {
    "layerflow": {"flow_blocks": 2, "flow_hidden": 16},
    "layerflow:hit_count": {"flow_blocks": 2, "flow_hidden": 16, "hit_count": True, "count_blocks": 2,
                            "count_hidden": 16, "clamp_features": True},
    "layerflow:counts_first": {"flow_blocks": 2, "flow_hidden": 16, "hit_count": True, "count_blocks": 2,
                               "count_hidden": 16, "counts_first": True},
    "layerflow:axis_features": {"flow_blocks": 2, "flow_hidden": 16, "hit_count": True, "count_blocks": 2,
                                "count_hidden": 16, "counts_first": True, "axis_features": True,
                                "offset_squares": True, "match_centroids": True},
    "layerflow:core": {"flow_blocks": 2, "flow_hidden": 16, "hit_count": True, "count_blocks": 2,
                       "count_hidden": 16, "counts_first": True, "axis_features": True, "offset_squares": True,
                       "core_block": 3, "select_noise": True},
    "wgan": {"latent_dim": 8, "gen_channels": 4, "critic_channels": 4, "critic_hidden": 16, "aux_channels": 4,
             "n_critic": 2},
    "gan3d": {"latent_dim": 8, "gen_channels": 4, "disc_channels": 2, "out_bias_init": 0.05},
    "cfm": {"width": 16, "blocks": 2, "heads": 2, "head_channels": 2, "sample_steps": 3},
    "cfm:euler": {"width": 16, "blocks": 1, "heads": 2, "head_channels": 1, "sample_steps": 2,
                  "solver": "euler", "rescale_layers": False},
}


#: Every model variant the parametrised tests run over.
VARIANTS: list[str] = list(TINY_CONFIGS)


def family_of(variant: str) -> str:
    return variant.split(":")[0]


def tiny_model(variant: str, detector: Detector, data: Batch):
    """A tiny model of ``variant`` (a family name, or "family:variant") fitted on ``data`` (untrained)."""
    from caloforge.models import get_family

    cls = get_family(family_of(variant))
    model = cls(detector, data.showers.shape[1], cls.Config.from_dict(TINY_CONFIGS[variant]))
    model.fit_preprocessing(data)
    return model
