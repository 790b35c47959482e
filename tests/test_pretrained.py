"""The model shipped inside the package: loads with no data, generates plausible showers, runs the main job."""

from __future__ import annotations

import numpy as np
import pytest

from caloforge.dataset import read_showers
from caloforge.models import default_model_path, load_model


def test_shipped_model_is_small_and_for_the_house_detector():
    path = default_model_path()
    size = sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("model."))
    assert size < 20 * 2**20
    model = load_model(path, expected_detector="ild-ecal")
    assert model.n_cells == 30 * 30 * 30


def test_shipped_model_matches_geant4_sampling_fraction_at_50_gev(g4_sample):
    g4 = read_showers(g4_sample("gamma", "50", 30, 21))
    g4_frac = g4.showers.sum(axis=1) / g4.energies
    model = load_model(default_model_path())
    showers = model.sample(np.full(500, 50e3), np.zeros(500), seed=3).numpy()
    assert showers.shape == (500, 27000) and np.all(showers >= 0)
    frac = showers.sum(axis=1) / 50e3
    # within 5 % of Geant4's sampling fraction (Geant4's mean is known to ~1.6 % from 30 showers)
    assert abs(frac.mean() / g4_frac.mean() - 1) < 0.05, (frac.mean(), g4_frac.mean())
    # and a shower-to-shower spread of the right size (Geant4: about 8 %)
    assert 0.5 < frac.std() / g4_frac.std() < 2.0
    n_hits = (showers > 0.075).sum(axis=1).mean()
    g4_hits = (g4.showers > 0.075).sum(axis=1).mean()
    assert abs(n_hits / g4_hits - 1) < 0.1, (n_hits, g4_hits)


def test_generate_cli_works_without_model_or_data(tmp_path):
    from caloforge.cli import main

    out = tmp_path / "showers.h5"
    assert main(["generate", "-n", "50", "--energy", "50", "-o", str(out), "--quiet"]) == 0
    b = read_showers(out, expected_detector="ild-ecal")
    assert b.showers.shape == (50, 27000) and np.all(b.energies == 50e3)


@pytest.mark.slow
def test_main_job_runs_end_to_end(tmp_path):
    import json

    from caloforge.cli import main

    out = tmp_path / "qs"
    assert main(["run", "-o", str(out), "-n", "40", "--energy", "20", "--no-classifier", "-q"]) == 0
    results = json.loads((out / "report" / "metrics.json").read_text())
    assert results["reference"]["n_used"] == 40 and "layerflow" in results["candidates"]
    assert (out / "report" / "report.html").stat().st_size > 10_000
