"""The data-free Bertini placeholder (``simulate --hadronic bertini``): pions shower, files say which physics list."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

from caloforge.conditions import Conditions
from caloforge.dataset import ShowerFile, describe
from caloforge.detector import load_detector


def test_a_missing_hadronic_symbol_fails_loudly(monkeypatch):
    from caloforge import hadronic
    from caloforge.geant4_setup import import_geant4
    from caloforge.physics import PhysicsError, check_symbols

    g4 = import_geant4()
    check_symbols(g4)  # every symbol of the EM list and the placeholder is exported by geant4-pybind 0.1.3
    monkeypatch.setitem(hadronic.SYMBOLS, "bertini", "_ZN18G4CascadeInterfaceC1ERK8G4StringNoSuchOverload")
    with pytest.raises(PhysicsError, match="G4CascadeInterfaceC1ERK8G4StringNoSuchOverload"):
        check_symbols(g4)


def _pions_and_muons() -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """In a fresh process (one Geant4 per process): 8 pi+ and 8 mu+ at 5 GeV, and the pions again, same seed."""
    from caloforge.geant4_app import Geant4App

    app = Geant4App(load_detector("calogan-3layer"), "pi+", hadronic="bertini")
    pions = app.simulate(Conditions.make(np.full(8, 5e3), particle="pi+"), seed=11)
    muons = app.simulate(Conditions(np.full(8, 5e3), 0.0, 0.0, 0.0, -13), seed=11)  # mu+: ionisation only
    again = app.simulate(Conditions.make(np.full(8, 5e3), particle="pi+"), seed=11)
    return app.physics_name, pions.copy(), muons.copy(), again.copy()


def test_pions_shower_with_the_placeholder_and_not_like_muons():
    """With the hadronic list, 5 GeV pi+ in the CaloGAN stack interact: far more energy and cells than the MIP-like
    muons of the same run; the same seed gives the same showers."""
    with mp.get_context("spawn").Pool(1) as pool:
        name, pions, muons, again = pool.apply(_pions_and_muons)
    assert "bertini-placeholder" in name
    assert pions.sum() > 3 * muons.sum(), (pions.sum(axis=1), muons.sum(axis=1))
    assert np.median((pions > 0).sum(axis=1)) > 2 * np.median((muons > 0).sum(axis=1))
    np.testing.assert_array_equal(again, pions)


def test_a_pion_file_records_its_physics_list_and_limits(tmp_path):
    from caloforge.simulate import simulate

    out = simulate("calogan-3layer", "pi+,pi-", "5", "0", 4, 3, tmp_path / "pi.h5", workers=1, chunk_size=2,
                   quiet=True, hadronic="bertini")
    with ShowerFile(out) as f:
        assert "caloforge-bertini-placeholder" in f.attrs["physics_list"]
        assert f.attrs["physics_limits"].startswith("PLACEHOLDER, not a validated hadronic reference")
        assert sorted(np.unique(f.pdg)) == [-211, 211]
        assert np.all(f.read().showers.sum(axis=1) > 0)
    text = describe(out)
    assert "physics_limits:    PLACEHOLDER" in text and "pi+ 2" in text
    with pytest.raises(ValueError, match="need hadronic physics"):
        simulate("calogan-3layer", "pi+", "5", "0", 4, 3, tmp_path / "no.h5", workers=1, quiet=True)


def test_models_refuse_particles_their_features_cannot_tell_apart():
    """calogan's particle features (is_photon, charge) see e+ and pi+ alike: refuse to train on their mixture."""
    import torch

    from caloforge.dataset import Batch
    from caloforge.models import ModelError, get_family
    from conftest_models import TINY_CONFIGS, toy_layered_detector

    det = toy_layered_detector()
    cls = get_family("calogan")
    model = cls(det, det.n_cells(False), cls.Config.from_dict(TINY_CONFIGS["calogan"]))
    codes = torch.tensor([[1e4, 0, 0, 0, p] for p in (22, 11, -11, 211, -211, 2212)], dtype=torch.float32)
    charge = model.raw_condition_features(codes)[:, list(model.features).index("charge")]
    assert charge.tolist() == [0.0, -1.0, 1.0, 1.0, -1.0, 1.0]

    def batch(pdgs):
        n = len(pdgs)
        return Batch(Conditions.make(np.full(n, 1e4), particle=np.array(pdgs)), np.ones((n, det.n_cells(False)),
                                                                                       np.float32))

    model.fit_preprocessing(batch([211, -211, 22]))
    with pytest.raises(ModelError, match="e\\+ and pi\\+.*cannot tell apart"):
        cls(det, det.n_cells(False), cls.Config.from_dict(TINY_CONFIGS["calogan"])).fit_preprocessing(
            batch([-11, 211]))
    dense = get_family("densewgan")  # no particle features: e/gamma mixtures as before, hadrons never mixed in
    dense(det, det.n_cells(False), dense.Config.from_dict(TINY_CONFIGS["densewgan"])).fit_preprocessing(
        batch([22, -11]))
    with pytest.raises(ModelError, match="e- and pi\\+.*cannot tell apart"):
        dense(det, det.n_cells(False), dense.Config.from_dict(TINY_CONFIGS["densewgan"])).fit_preprocessing(
            batch([11, 211]))
