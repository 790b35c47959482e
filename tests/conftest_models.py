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


def toy_layered_detector(name: str = "toy-layers") -> Detector:
    """A small Pb/LAr stack with a cell grid per layer, shaped like calogan-3layer's (strips, square cells,
    coarse cells): 8 x 2, 4 x 4 and 2 x 4 cells (40 cells)."""
    def grid(cx, cy, nx, ny):
        return {"kind": "grid", "cell_x_mm": cx, "cell_y_mm": cy, "x_min_mm": -nx * cx / 2, "n_x": nx,
                "y_min_mm": -ny * cy / 2, "n_y": ny}

    layer = {"samplings": 3, "absorber": "G4_Pb", "absorber_mm": 2.0, "active": "G4_lAr", "active_mm": 4.0}
    return Detector.from_dict({
        "name": name, "size_x_mm": 400.0, "size_y_mm": 400.0,
        "layers": [{**layer, "cells": grid(5.0, 40.0, 8, 2)},
                   {**layer, "samplings": 8, "cells": grid(10.0, 10.0, 4, 4)},
                   {**layer, "cells": grid(20.0, 10.0, 2, 4)}],
    })


def toy_layered_showers(detector: Detector, n: int, seed: int = 0) -> Batch:
    """Toy EM-ish showers at the origin for a per-layer readout: a longitudinal profile over the layers that deepens
    with energy, an exponential lateral profile, lognormal cell fluctuations, some empty cells; e+ and photons."""
    rng = np.random.default_rng(seed)
    cells = detector.cell_table()
    energies = rng.uniform(10e3, 100e3, n)
    n_l = detector.n_layers
    showers = np.zeros((n, len(cells["x"])), np.float32)
    for i, e in enumerate(energies):
        depth = 0.8 + 0.3 * np.log(e / 3e4) + 0.1 * rng.normal()
        prof = np.exp(-0.5 * ((np.arange(n_l) - depth) / 0.8) ** 2)
        prof = prof / prof.sum() * 0.2 * e * (1 + 0.05 * rng.normal())
        cx, cy = rng.normal(0, 2.0, 2)
        w = np.exp(-np.hypot(cells["x"] - cx, cells["y"] - cy) / 12.0) * rng.lognormal(0, 0.4, len(cells["x"]))
        for layer in range(n_l):
            m = cells["layer"] == layer
            showers[i, m] = prof[layer] * w[m] / w[m].sum()
        showers[i, rng.random(len(w)) < 0.15] = 0.0
    particles = np.where(np.arange(n) % 2 == 0, 22, -11)
    return Batch(Conditions.make(energies, np.zeros(n), particle=particles), showers)


#: Families that take any readout (frame "cells") run the parametrised model tests on a per-layer readout.
LAYERED_FAMILIES: set[str] = {"calogan", "densewgan"}


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
                       "core_block": 3, "select_noise": True, "total_energy": True, "angle_basis": 3,
                       "cap_rescaled": True},
    "layerflow:total_stage": {"flow_blocks": 2, "flow_hidden": 16, "hit_count": True, "count_blocks": 2,
                              "count_hidden": 16, "counts_first": True, "axis_features": True,
                              "offset_squares": True, "core_block": 2, "select_noise": True, "total_energy": True,
                              "total_stage": True, "halo_centroid_gain": 0.7},
    "layerflow:empty_layers": {"flow_blocks": 2, "flow_hidden": 16, "hit_count": True, "count_blocks": 2,
                               "count_hidden": 16, "counts_first": True, "axis_features": True,
                               "offset_squares": True, "core_block": 2, "select_noise": True, "total_energy": True,
                               "total_stage": True, "empty_logfrac": 0.3, "count_centres": True},
    "layerflow:halo": {"flow_blocks": 2, "flow_hidden": 16, "hit_count": True, "count_blocks": 2,
                       "count_hidden": 16, "counts_first": True, "axis_features": True, "offset_squares": True,
                       "core_block": 3, "select_noise": True, "halo_term": True, "halo_ramp_deg": 10.0},
    "layerflow:halo_knots": {"flow_blocks": 2, "flow_hidden": 16, "hit_count": True, "count_blocks": 2,
                             "count_hidden": 16, "counts_first": True, "axis_features": True, "offset_squares": True,
                             "core_block": 3, "select_noise": True, "halo_term": True, "halo_knots": True,
                             "halo_no_width": True},
    "layerflow:mirror_tie": {"flow_blocks": 2, "flow_hidden": 16, "hit_count": True, "count_blocks": 2,
                             "count_hidden": 16, "counts_first": True, "axis_features": True, "offset_squares": True,
                             "core_block": 2, "select_noise": True, "mirror_tie": "corner",
                             "centroid_over_width": True},
    "layerflow:core_exclusive": {"flow_blocks": 2, "flow_hidden": 16, "hit_count": True, "count_blocks": 2,
                                 "count_hidden": 16, "counts_first": True, "axis_features": True,
                                 "offset_squares": True, "core_block": 3, "core_exclusive": True,
                                 "core_centroid": True, "core_far": True, "select_noise": True},
    "wgan": {"latent_dim": 8, "gen_channels": 4, "critic_channels": 4, "critic_hidden": 16, "aux_channels": 4,
             "n_critic": 2},
    "wgan:critic_response": {"latent_dim": 8, "gen_channels": 4, "critic_channels": 4, "critic_hidden": 16,
                             "aux_channels": 4, "n_critic": 2, "critic_response": True, "response_weight": 1.0,
                             "response_by_energy": True},
    "wgan:cell_power": {"latent_dim": 8, "gen_channels": 4, "critic_channels": 4, "critic_hidden": 16,
                        "aux_channels": 4, "n_critic": 2, "cell_power": 0.5, "layer_energies": True},
    "wgan:response_distance": {"latent_dim": 8, "gen_channels": 4, "critic_channels": 4, "critic_hidden": 16,
                               "aux_channels": 4, "n_critic": 1, "cell_power": 0.5, "layer_energies": True,
                               "response_distance": 1.0},
    "wgan:response_conditional": {"latent_dim": 8, "gen_channels": 4, "critic_channels": 4, "critic_hidden": 16,
                                  "aux_channels": 4, "n_critic": 1, "cell_power": 0.5, "layer_energies": True,
                                  "response_distance": 1.0, "response_conditional": True},
    "wgan:layer_flow": {"latent_dim": 8, "gen_channels": 4, "critic_channels": 4, "critic_hidden": 16,
                        "aux_channels": 4, "n_critic": 1, "cell_power": 0.5, "layer_energies": True,
                        "layer_flow": True},
    "gan3d": {"latent_dim": 8, "gen_channels": 4, "disc_channels": 2, "out_bias_init": 0.05},
    "gan3d:cell_power": {"latent_dim": 8, "gen_channels": 4, "disc_channels": 2, "out_bias_init": 0.05,
                         "cell_power": 0.5},
    "gan3d:layer_flow": {"latent_dim": 8, "gen_channels": 4, "disc_channels": 2, "out_bias_init": 0.05,
                         "cell_power": 0.5, "layer_flow": True, "layer_flow_fit_steps": 20},
    "gan3d:flow_coupling": {"latent_dim": 8, "gen_channels": 4, "disc_channels": 2, "out_bias_init": 0.05,
                            "layer_flow": True, "layer_flow_fit_steps": 20, "layer_flow_coupling": True},
    "calogan": {"latent_dim": 8, "gen_channels": 4, "lc_channels": 2, "disc_channels": 2, "disc_features": 8,
                "disc_hidden": 16, "mbd_kernels": 3, "mbd_dims": 2, "n_critic": 2, "response_weight": 1.0},
    "calogan:layer_energies": {"latent_dim": 8, "gen_channels": 4, "lc_channels": 2, "disc_channels": 2,
                               "disc_features": 8, "disc_hidden": 16, "mbd_kernels": 3, "mbd_dims": 2, "n_critic": 2,
                               "cell_power": 0.5, "layer_energies": True},
    "calogan:response_distance": {"latent_dim": 8, "gen_channels": 4, "lc_channels": 2, "disc_channels": 2,
                                  "disc_features": 8, "disc_hidden": 16, "mbd_kernels": 3, "mbd_dims": 2,
                                  "n_critic": 2, "cell_power": 0.5, "layer_energies": True, "response_distance": 1.0},
    "calogan:response_conditional": {"latent_dim": 8, "gen_channels": 4, "lc_channels": 2, "disc_channels": 2,
                                     "disc_features": 8, "disc_hidden": 16, "mbd_kernels": 3, "mbd_dims": 2,
                                     "n_critic": 1, "cell_power": 0.5, "layer_energies": True,
                                     "response_distance": 1.0, "response_conditional": True, "shape_score": 1.0},
    "calogan:layer_flow": {"latent_dim": 8, "gen_channels": 4, "lc_channels": 2, "disc_channels": 2,
                           "disc_features": 8, "disc_hidden": 16, "mbd_kernels": 3, "mbd_dims": 2, "n_critic": 1,
                           "cell_power": 0.5, "layer_energies": True, "layer_flow": True, "response_weight": 1.0},
    "densewgan": {"latent_dim": 8, "gen_hidden": 16, "gen_depth": 2, "critic_hidden": 16, "critic_depth": 2,
                  "n_critic": 2},
    "densewgan:cell_power": {"latent_dim": 8, "gen_hidden": 16, "gen_depth": 2, "critic_hidden": 16,
                             "critic_depth": 2, "n_critic": 2, "cell_power": 0.5, "layer_energies": True},
    "densewgan:response_distance": {"latent_dim": 8, "gen_hidden": 16, "gen_depth": 2, "critic_hidden": 16,
                                    "critic_depth": 2, "n_critic": 1, "cell_power": 0.5, "layer_energies": True,
                                    "response_distance": 1.0},
    "densewgan:response_conditional": {"latent_dim": 8, "gen_hidden": 16, "gen_depth": 2, "critic_hidden": 16,
                                       "critic_depth": 2, "n_critic": 1, "cell_power": 0.5, "layer_energies": True,
                                       "response_distance": 1.0, "response_conditional": True},
    "densewgan:shape_score": {"latent_dim": 8, "gen_hidden": 16, "gen_depth": 2, "critic_hidden": 16,
                              "critic_depth": 2, "n_critic": 1, "cell_power": 0.5, "layer_energies": True,
                              "response_distance": 1.0, "response_conditional": True, "shape_score": 1.0},
    "densewgan:layer_flow": {"latent_dim": 8, "gen_hidden": 16, "gen_depth": 2, "critic_hidden": 16,
                             "critic_depth": 2, "n_critic": 1, "cell_power": 0.5, "layer_energies": True,
                             "layer_flow": True},
    "bibae": {"latent_dim": 4, "enc_channels": 2, "dec_channels": 2, "critic_channels": 2, "hidden": 8,
              "sorted_cells": 32, "post_channels": 4, "post_layers": 2, "flow_blocks": 2, "flow_hidden": 8,
              "post_start_step": 2, "out_bias_init": 0.05},
    "cfm": {"width": 16, "blocks": 2, "heads": 2, "head_channels": 2, "sample_steps": 3},
    "cfm:patches": {"width": 16, "blocks": 2, "heads": 2, "head_channels": 2, "sample_steps": 3, "patch_layers": 2,
                    "patch_x": 3, "patch_y": 2},
    "cfm:euler": {"width": 16, "blocks": 1, "heads": 2, "head_channels": 1, "sample_steps": 2,
                  "solver": "euler", "rescale_layers": False},
}


#: Every model variant the parametrised tests run over.
VARIANTS: list[str] = list(TINY_CONFIGS)


def family_of(variant: str) -> str:
    return variant.split(":")[0]


def _takes_grids_only(variant: str) -> bool:
    from caloforge.models import get_family

    return getattr(get_family(family_of(variant)), "readouts", "grid") == "grid"


#: The variants of image families (the shower-axis frame: angles, impact points, the angled window).
GRID_VARIANTS: list[str] = [v for v in VARIANTS if _takes_grids_only(v)]


def tiny_model(variant: str, detector: Detector, data: Batch):
    """A tiny model of ``variant`` (a family name, or "family:variant") fitted on ``data`` (untrained)."""
    import torch

    from caloforge.models import get_family

    cls = get_family(family_of(variant))
    torch.manual_seed(0)  # the initial weights, whatever ran before (the tests must not depend on their order)
    model = cls(detector, data.showers.shape[1], cls.Config.from_dict(TINY_CONFIGS[variant]))
    model.fit_preprocessing(data)
    return model


def toy_cell_showers(detector: Detector, n: int, seed: int = 0) -> Batch:
    """Toy EM-ish showers at the origin for any readout (grids, hexagons, (r, phi) bins) from its cell table: a
    longitudinal profile over the layers, exponential in the distance to the axis weighted by the cell area, some
    empty cells; photons and e+ alternating, 10-100 GeV."""
    rng = np.random.default_rng(seed)
    t = detector.cell_table()
    energies = rng.uniform(10e3, 100e3, n)
    n_l = detector.n_layers
    dist = np.hypot(t["x"], t["y"])
    showers = np.zeros((n, len(dist)), np.float32)
    for i, e in enumerate(energies):
        depth = n_l * (0.3 + 0.05 * np.log(e / 3e4)) + rng.normal(0, 0.3)
        prof = np.exp(-0.5 * ((np.arange(n_l) - depth) / max(n_l / 4, 0.8)) ** 2)
        prof = prof / prof.sum() * 0.02 * e
        w = np.exp(-dist / 15.0) * t["area"] * rng.lognormal(0, 0.4, len(dist))
        for layer in range(n_l):
            m = t["layer"] == layer
            showers[i, m] = prof[layer] * w[m] / w[m].sum()
        showers[i, (rng.random(len(dist)) < 0.2) | (showers[i] < 1e-4 * showers[i].max())] = 0.0
    particles = np.where(np.arange(n) % 2 == 0, 22, -11)
    return Batch(Conditions.make(energies, np.zeros(n), particle=particles), showers)


def load_script(name: str):
    """The module of ``scripts/NAME.py`` (the scripts are not a package), to call its ``main`` in a test."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
