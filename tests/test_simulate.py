"""Geant4 simulation: physics sanity with statistical tolerances, reproducibility, resume."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from caloforge.dataset import DatasetError, ShowerFile, read_showers
from caloforge.detector import load_detector

DET = load_detector("ild-ecal")


def _longitudinal_cog(showers: np.ndarray) -> np.ndarray:
    layers = showers.reshape(len(showers), 30, -1).sum(axis=2)
    return (layers * np.arange(30)).sum(axis=1) / layers.sum(axis=1)


def _mean_and_error(x: np.ndarray) -> tuple[float, float]:
    return float(np.mean(x)), float(np.std(x, ddof=1) / np.sqrt(len(x)))


def test_physics_list_symbols_present():
    """The data-free EM list reaches into geant4-pybind's C++ symbols: fail loudly if one is missing."""
    from caloforge.geant4_setup import import_geant4
    from caloforge.physics import check_symbols

    check_symbols(import_geant4())


@pytest.mark.parametrize("env", [{"CI": "true"}, {"CI": "true", "G4LEDATA": "/nonexistent"}])
def test_geant4_imports_on_a_fresh_ci_machine(tmp_path, env):
    """geant4-pybind's import treats CI=true as leave to download data and then lists ~/.geant4_pybind."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("G4") and k != "GEANT4_DATA_DIR"}
    clean.update(env, HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"))
    code = "from caloforge.geant4_setup import import_geant4; import os; import_geant4(); print(os.environ['CI'])"
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("true"), "CI must be restored after the import"
    assert not (tmp_path / ".geant4_pybind").exists(), "nothing may be downloaded"


def test_visible_energy_about_3_percent_and_linear(g4_sample):
    means, errs, energies = [], [], (1.0, 2.0, 4.0)
    for e in energies:
        b = read_showers(g4_sample("gamma", str(e), 60, 7))
        vis = b.showers.sum(axis=1)
        assert np.all(vis < b.energies), "visible energy exceeds the incident energy"
        m, s = _mean_and_error(vis / b.energies)
        assert 0.025 < m < 0.036, f"sampling fraction {m:.4f} at {e} GeV, expected about 3 %"
        means.append(m)
        errs.append(s)
    # Linearity: the sampling fraction is the same at all energies within 4 standard errors (+1 % systematic).
    for m, s in zip(means[1:], errs[1:]):
        assert abs(m - means[0]) < 4 * np.hypot(s, errs[0]) + 0.01 * means[0]


def test_longitudinal_cog_grows_with_log_energy(g4_sample):
    lo = _longitudinal_cog(read_showers(g4_sample("gamma", "1", 60, 8)).showers)
    hi = _longitudinal_cog(read_showers(g4_sample("gamma", "8", 60, 8)).showers)
    (m_lo, e_lo), (m_hi, e_hi) = _mean_and_error(lo), _mean_and_error(hi)
    # ln(8) X0 = 2.1 X0 = 3.5 layers of 0.6 X0 expected; demand a significant shift of at least 1.5 layers
    assert m_hi - m_lo > max(1.5, 4 * np.hypot(e_lo, e_hi)), (m_lo, m_hi)


def test_photons_start_later_than_electrons(g4_sample):
    g = _longitudinal_cog(read_showers(g4_sample("gamma", "4", 80, 9)).showers)
    e = _longitudinal_cog(read_showers(g4_sample("e-", "4", 80, 9)).showers)
    (m_g, s_g), (m_e, s_e) = _mean_and_error(g), _mean_and_error(e)
    assert m_g - m_e > 3 * np.hypot(s_g, s_e), (m_g, m_e)


def test_angled_shower_moves_towards_plus_y(g4_sample):
    path = g4_sample("e-", "4", 40, 10, angle="30")
    with ShowerFile(path) as f:
        assert f.shape == (30, 30, 60)
        b = f.read()
    assert np.all(b.angles == 30)
    s = b.showers.reshape(len(b), 30, 30, 60)
    y = DET.cell_centers_mm(angled=True)[1]
    per_layer = s.sum(axis=2)  # (n, layer, y)
    e_layer = per_layer.sum(axis=2)
    layers = np.arange(4, 20)
    cog_y = (per_layer[:, layers] * y).sum(axis=2) / np.maximum(e_layer[:, layers], 1e-9)
    mean_y = np.average(cog_y, axis=0, weights=e_layer[:, layers])
    slope = np.polyfit(DET.layer_z_mm()[layers], mean_y, 1)[0]
    assert abs(slope - np.tan(np.radians(30))) < 0.15, slope


def test_same_seed_same_showers_any_worker_count(tmp_path):
    from caloforge.simulate import simulate

    a = simulate("ild-ecal", "gamma", "1:3", "0", 30, 5, tmp_path / "a.h5", workers=1, chunk_size=10, quiet=True)
    b = simulate("ild-ecal", "gamma", "1:3", "0", 30, 5, tmp_path / "b.h5", workers=2, chunk_size=10, quiet=True)
    c = simulate("ild-ecal", "gamma", "1:3", "0", 30, 6, tmp_path / "c.h5", workers=2, chunk_size=10, quiet=True)
    ra, rb, rc = read_showers(a), read_showers(b), read_showers(c)
    assert np.array_equal(ra.showers, rb.showers) and np.array_equal(ra.energies, rb.energies)
    assert not np.array_equal(ra.energies, rc.energies)
    assert not np.array_equal(ra.showers, rc.showers)
    # the first showers of a longer run are the same showers
    d = simulate("ild-ecal", "gamma", "1:3", "0", 35, 5, tmp_path / "d.h5", workers=2, chunk_size=10, quiet=True)
    assert np.array_equal(read_showers(d).showers[:30], ra.showers)


def test_interrupted_run_resumes_to_identical_file(tmp_path):
    out = tmp_path / "run.h5"
    cmd = [sys.executable, "-m", "caloforge", "simulate", "--energy", "3", "-n", "40", "--seed", "4",
           "--chunk-size", "4", "--workers", "1", "-q", "-o", str(out)]
    proc = subprocess.Popen(cmd)
    chunk_dir = tmp_path / "run.h5.chunks"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(chunk_dir.glob("chunk-*.npz"))) < 2:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not out.exists(), "a killed run must not leave a file with the final name"
    with pytest.raises(DatasetError, match="unfinished simulation"):
        ShowerFile(out)
    n_done = len(list(chunk_dir.glob("chunk-*.npz")))
    assert 2 <= n_done < 10
    subprocess.run(cmd, check=True)
    assert out.exists() and not chunk_dir.exists()
    ref = tmp_path / "ref.h5"
    subprocess.run(cmd[:-1] + [str(ref)], check=True)
    assert np.array_equal(read_showers(out).showers, read_showers(ref).showers)


def test_changed_command_does_not_reuse_chunks(tmp_path):
    from caloforge.simulate import RunConfig, _prepare_chunk_dir, resolve_physics

    base = dict(detector_json=DET.to_json(), particle="gamma", energy="3", angle="0", n=10, seed=1, chunk_size=5,
                physics=resolve_physics("auto"))
    _prepare_chunk_dir(tmp_path / "x.chunks", RunConfig(**base))
    with pytest.raises(ValueError, match="different seed"):
        _prepare_chunk_dir(tmp_path / "x.chunks", RunConfig(**{**base, "seed": 2}))


def test_bad_requests_are_refused(tmp_path):
    from caloforge.simulate import simulate

    with pytest.raises(ValueError, match="particle proton: hadron showers need hadronic physics"):
        simulate("ild-ecal", "proton", "3", "0", 5, 1, tmp_path / "p.h5", quiet=True)
    with pytest.raises(ValueError, match="angle"):
        simulate("ild-ecal", "gamma", "3", "0:80", 5, 1, tmp_path / "p.h5", quiet=True)
    with pytest.raises(ValueError):
        simulate("ild-ecal", "gamma", "-3", "0", 5, 1, tmp_path / "p.h5", quiet=True)


def test_snapshot_is_a_prefix_and_the_run_continues_over_it(tmp_path):
    from caloforge.simulate import RunConfig, _prepare_chunk_dir, resolve_physics, simulate
    from caloforge.simulate import snapshot as take_snapshot

    out = tmp_path / "run.h5"
    cfg = RunConfig(DET.to_json(), "gamma", "2", "0", 20, 9, 5, resolve_physics("auto"))
    chunk_dir = tmp_path / "run.h5.chunks"
    _prepare_chunk_dir(chunk_dir, cfg)
    # finish chunks 0 and 2 in a child process (one Geant4 per process), as an interrupted run would
    subprocess.run([sys.executable, "-c", (
        "from caloforge.simulate import RunConfig, _worker_init, _run_chunk; import json, sys; "
        f"cfg = RunConfig(**json.load(open({str(chunk_dir / 'run.json')!r}))); _worker_init(cfg); "
        f"_run_chunk((0, {str(chunk_dir)!r})); _run_chunk((2, {str(chunk_dir)!r}))")], check=True)
    assert take_snapshot(out, out) == 5  # only the leading run of chunks: chunk 0
    with ShowerFile(out) as f:
        assert len(f) == 5 and f.attrs["snapshot"]
    simulate("ild-ecal", "gamma", "2", "0", 20, 9, out, workers=1, chunk_size=5, quiet=True)
    full = read_showers(out)
    with ShowerFile(out) as f:
        assert len(f) == 20 and "snapshot" not in f.attrs
    ref = simulate("ild-ecal", "gamma", "2", "0", 20, 9, tmp_path / "ref.h5", workers=2, chunk_size=5, quiet=True)
    assert np.array_equal(full.showers, read_showers(ref).showers)


def test_a_dead_worker_gives_a_clear_error_not_a_hang(tmp_path):
    """A Geant4 worker killed mid-run (crash, OOM killer) must stop the run with an error, keeping finished chunks."""
    import multiprocessing
    import signal
    import threading

    from caloforge.simulate import simulate

    out, errors = tmp_path / "run.h5", []

    def target():
        try:
            simulate("ild-ecal", "gamma", "3", "0", 200, 4, out, workers=1, chunk_size=4, quiet=True)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            errors.append(err)

    thread = threading.Thread(target=target)
    thread.start()
    chunk_dir = tmp_path / "run.h5.chunks"
    deadline = time.time() + 120
    while time.time() < deadline and not list(chunk_dir.glob("chunk-*.npz")):
        time.sleep(0.05)
    children = multiprocessing.active_children()
    assert children, "no worker process found"
    for child in children:
        os.kill(child.pid, signal.SIGKILL)
    thread.join(timeout=120)
    assert not thread.is_alive(), "the run hangs after its worker died"
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError) and "died" in str(errors[0]), errors
    assert not out.exists() and list(chunk_dir.glob("chunk-*.npz"))
