"""Shared fixtures: small real Geant4 samples, simulated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def g4_sample(tmp_path_factory):
    """``g4_sample(particle, energy, n, seed, angle="0")`` -> path of a cached tiny Geant4 sample."""
    from caloforge.simulate import simulate

    root = tmp_path_factory.mktemp("g4")
    cache: dict[tuple, Path] = {}

    def make(particle: str = "gamma", energy: str = "2:6", n: int = 100, seed: int = 1, angle: str = "0",
             workers: int = 2) -> Path:
        key = (particle, energy, n, seed, angle)
        if key not in cache:
            name = "_".join(str(k).replace(":", "-").replace(",", "_") for k in key) + ".h5"
            cache[key] = simulate("ild-ecal", particle, energy, angle, n, seed, root / name, workers=workers,
                                  chunk_size=25, quiet=True)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def g4_pair(g4_sample):
    """Two independent Geant4 photon samples of the same configuration (different seeds)."""
    return g4_sample("gamma", "2:6", 400, 101), g4_sample("gamma", "2:6", 400, 102)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny (untrained) layerflow model for the toy detector, saved as a model directory."""
    from caloforge.models import save_model
    from conftest_models import tiny_model, toy_detector, toy_showers

    det = toy_detector()
    model = tiny_model("layerflow", det, toy_showers(det, 40, seed=2))
    model.meta["particle"] = "gamma"
    return save_model(model, tmp_path_factory.mktemp("model") / "m")
