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


def test_shipped_multi_model_covers_angles_and_electrons(g4_sample):
    """The shipped `multi` model: photons and electrons at 0-60 degrees, anywhere in a cell (ild-multi-train)."""
    from caloforge.conditions import Conditions

    model = load_model("multi")
    assert set(model.meta["particles"]) == {"gamma", "e-"} and model.condition_names[-1] == "particle"
    assert model.meta["conditions"]["angle_deg"][1] == 60.0
    g4 = read_showers(g4_sample("e-", "30", 20, 23, angle="40"))
    rng = np.random.default_rng(0)
    c = Conditions.make(np.full(300, 30e3), 40.0, rng.uniform(0, 0.1, (300, 2)), "e-")  # Geant4 hits near (0, 0)
    showers = model.sample(c, seed=4).numpy()
    assert showers.shape == (300, 30 * 30 * 60)  # the angled window, because the angle is > 0
    frac, g4_frac = showers.sum(axis=1) / 30e3, g4.showers.sum(axis=1) / g4.energies
    assert abs(frac.mean() / g4_frac.mean() - 1) < 0.05, (frac.mean(), g4_frac.mean())
    # the energy-weighted centroid in y follows the shower axis: y = tan(40 deg) z
    y = (np.arange(60) + 0.5) * 5.0 - 75.0
    def centroid(s: np.ndarray) -> np.ndarray:
        e_y = s.reshape(len(s), 30, 30, 60).sum(axis=(0, 2))
        return e_y @ y / e_y.sum(axis=1)
    z = model.detector.layer_z_mm()
    core = slice(3, 20)  # layers that hold most of a 30 GeV shower
    np.testing.assert_allclose(centroid(showers)[core], centroid(g4.showers)[core], atol=2.5)
    slope, g4_slope = (np.polyfit(z[core], centroid(s)[core], 1)[0] for s in (showers, g4.showers))
    assert 0.6 < g4_slope < 0.9 and slope == pytest.approx(g4_slope, rel=0.1)  # tan(40 deg) = 0.84


def test_generate_cli_works_without_model_or_data(tmp_path):
    from caloforge.cli import main

    out = tmp_path / "showers.h5"
    assert main(["generate", "-n", "50", "--energy", "50", "-o", str(out), "--quiet"]) == 0
    b = read_showers(out, expected_detector="ild-ecal")
    assert b.showers.shape == (50, 27000) and np.all(b.energies == 50e3)


@pytest.mark.parametrize("extra, name, n_cells", [
    ([], "default", 27000),  # photons at normal incidence on the corner: the specialised model
    (["--angle", "0:40"], "multi", 54000),  # angles, electrons or impact points: the whole-space model
    (["--particle", "e-"], "multi", 27000),
    (["--position", "cell"], "multi", 27000),
])
def test_generate_without_model_picks_the_shipped_default_that_covers_the_request(tmp_path, capsys, extra, name,
                                                                                    n_cells):
    """Without --model, the first shipped default that takes every requested row without extrapolating runs it."""
    import h5py

    from caloforge.cli import main
    from caloforge.zoo import shipped_models

    out = tmp_path / "s.h5"
    assert main(["generate", "-n", "6", "--energy", "20:90", "--seed", "2", "-o", str(out), *extra]) == 0
    assert f"the shipped model {name!r}" in capsys.readouterr().err
    with h5py.File(out) as f:
        assert f.attrs["model"] == str(shipped_models()[name]) and f["showers"].shape == (6, n_cells)
    # the same showers as naming that model (photons unless asked: the shipped default's particle)
    particle = [] if "--particle" in extra else ["--particle", "gamma"]
    assert main(["generate", "-n", "6", "--energy", "20:90", "--seed", "2", "--model", name, "-o",
                 str(tmp_path / "named.h5"), "-q", *extra, *particle]) == 0
    assert np.array_equal(read_showers(out).showers, read_showers(tmp_path / "named.h5").showers)


def test_generate_without_model_keeps_an_angled_reference_window(tmp_path):
    """Conditions from a file in the angled window (normal-incidence photons merged into it, as ild-mixed) are made
    in that window: by the shipped default that writes it."""
    import h5py

    from caloforge.cli import main
    from caloforge.conditions import Conditions
    from caloforge.dataset import ShowerWriter
    from caloforge.detector import load_detector

    det = load_detector("ild-ecal")
    ref = tmp_path / "ref.h5"
    with ShowerWriter(ref, det, det.n_cells(True), {}, "none", "dense") as w:
        w.append(Conditions.make(np.full(3, 50e3), 0.0, particle="gamma"), np.zeros((3, det.n_cells(True)), np.float32))
    assert main(["generate", "--conditions-from", str(ref), "-o", str(tmp_path / "g.h5"), "-q"]) == 0
    with h5py.File(tmp_path / "g.h5") as f:
        assert f["showers"].shape == (3, det.n_cells(True)) and f.attrs["model"].endswith("multi")


def test_covers_and_load_default_model():
    from caloforge.conditions import Conditions
    from caloforge.models import DEFAULT_MODELS, load_default_model

    default = load_model("default")
    assert default.covers(Conditions.make(np.array([10e3, 100e3]), 0.0, particle="gamma"))
    assert not default.covers(Conditions.make(np.array([5e3]), 0.0, particle="gamma"))  # outside its range
    assert not default.covers(Conditions.make(np.array([50e3]), 20.0, particle="gamma"))
    assert not default.covers(Conditions.make(np.array([50e3]), 0.0, particle="e-"))
    assert load_default_model(Conditions.make(np.array([50e3]), 0.0, particle="gamma")).meta["name"] == "default"
    assert load_default_model(Conditions.make(np.array([50e3]), 30.0, particle="gamma")).meta["name"] == "multi"
    assert load_default_model().meta["name"] == DEFAULT_MODELS[-1] == "multi"  # no request: the whole space
    # what commands generate when no particle is asked for: photons where the model takes them
    assert load_model("multi").particles == ["e-", "gamma"] and load_model("multi").default_particle == "gamma"
    assert load_model("hgcal-proto-wgan").default_particle == "e-"


@pytest.mark.slow
def test_main_job_runs_end_to_end(tmp_path):
    import json

    from caloforge.cli import main

    out = tmp_path / "qs"
    assert main(["run", "-o", str(out), "-n", "40", "--energy", "20", "--no-classifier", "-q"]) == 0
    results = json.loads((out / "report" / "metrics.json").read_text())
    assert results["reference"]["n_used"] == 40 and "layerflow" in results["candidates"]
    assert (out / "report" / "report.html").stat().st_size > 10_000


def test_shipped_models_are_listed_and_load_by_name(capsys):
    from caloforge.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "default" in out and "multi" in out and "0-60 deg" in out
    assert load_model("default").n_cells == 27000  # the normal-incidence window, around the shower axis
    assert load_model("multi").shape == (30, 30, 40)  # the same, 5 cells wider on both sides along y (pad_y)
    with pytest.raises(Exception, match="model not found"):
        load_model("no-such-model")


def test_configs_reproduce_the_shipped_multi_model():
    """configs/layerflow-multi.toml is the recipe of the shipped ``multi``: the same model and training settings as
    its model.json records (with ``--seed 1``), so the README command retrains it."""
    import json
    import tomllib
    from pathlib import Path

    from caloforge.models.layerflow import LayerFlowConfig
    from caloforge.train import TrainConfig

    root = Path(__file__).parents[1]
    cfg = tomllib.loads((root / "configs" / "layerflow-multi.toml").read_text())
    meta = json.loads((root / "src" / "caloforge" / "pretrained" / "multi" / "model.json").read_text())
    assert LayerFlowConfig.from_dict(cfg["model"]) == LayerFlowConfig.from_dict(meta["config"])
    assert TrainConfig.from_dict({**cfg["train"], "seed": 1}) == TrainConfig.from_dict(meta["training"]["train"])


@pytest.mark.parametrize("name", list(__import__("caloforge.zoo", fromlist=["x"]).shipped_models()))
def test_every_zoo_model_is_small_loads_generates_and_states_its_figures(name):
    """Each shipped model: at most 8 MB of weights, loads by name (safetensors + JSON), makes finite non-negative
    showers of its readout at its training conditions, and carries its evaluation figures with their commands."""
    import json

    from caloforge.conditions import PARTICLE_PDG, Conditions
    from caloforge.zoo import shipped_models

    path = shipped_models()[name]
    assert (path / "model.safetensors").stat().st_size <= 8_000_000
    meta = json.loads((path / "model.json").read_text())
    zoo = meta["zoo"]
    assert zoo["test_set"] and zoo["commands"] and 0.0 <= zoo["auc_low"] <= 1.0 and zoo["flags"] >= 0
    model = load_model(name)
    rng = np.random.default_rng(0)
    cond = meta["conditions"]
    e = rng.uniform(*cond["energy_mev"], 3)
    a = rng.uniform(*cond.get("angle_deg", [0, 0]), 3)
    pos = np.stack([rng.uniform(*cond.get("x_mm", [0, 0]), 3), rng.uniform(*cond.get("y_mm", [0, 0]), 3)], 1)
    particles = meta.get("particles") or [meta.get("particle", "gamma")]
    c = Conditions.make(e, a, pos if "position" in model.condition_names else np.zeros((3, 2)),
                        particle=PARTICLE_PDG[particles[0]])
    showers = model.sample(c, seed=1).numpy()
    assert showers.shape[0] == 3 and np.isfinite(showers).all() and (showers >= 0).all() and showers.sum() > 0
