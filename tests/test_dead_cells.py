"""Dead cells in the detector description: checked, round-tripped, and zero in every shower Geant4 or a model makes."""

from __future__ import annotations

import numpy as np
import pytest

from caloforge.dataset import ShowerFile, describe, write_showers
from caloforge.detector import Detector, DetectorError, load_detector


def _with_dead(name: str, dead: list[list[int]]) -> Detector:
    d = load_detector(name).to_dict()
    d.update(name=f"{name}-dead", dead_cells=dead)
    return Detector.from_dict(d)


def test_dead_cells_round_trip_through_toml_json_and_yaml(tmp_path):
    import yaml

    f = tmp_path / "mine.toml"
    f.write_text("""
name = "mine"
size_x_mm = 400.0
size_y_mm = 400.0
dead_cells = [[2, 5], [0, 3], [0, 1]]
[[layers]]
count = 3
absorber = "G4_W"
absorber_mm = 3.5
active = "G4_Si"
active_mm = 0.3
cells = { kind = "hex", pitch_mm = 30.0, rings = 2 }
""")
    d = load_detector(f)
    assert d.dead_cells == ((0, 1), (0, 3), (2, 5))  # sorted
    np.testing.assert_array_equal(d.dead_cell_indices(), [1, 3, 2 * 19 + 5])
    assert Detector.from_json(d.to_json()) == d
    y = tmp_path / "mine.yaml"
    y.write_text(yaml.safe_dump(d.to_dict()))
    assert load_detector(y) == d
    assert d != Detector.from_dict({**d.to_dict(), "dead_cells": []})  # dead cells are part of the identity
    assert "dead_cells" not in load_detector("ild-ecal").to_dict()  # detectors without keep their description
    from caloforge.detector_cli import describe as describe_detector

    assert "dead cells (read zero): 3: layer 0: 1, 3; layer 2: 5" in describe_detector(str(f))


def test_dead_cells_on_a_uniform_grid_keep_their_place_in_the_angled_window():
    d = _with_dead("ild-ecal", [[5, 14 * 30 + 14], [0, 0]])
    n_l, n_x, n_y = d.shape(True)
    np.testing.assert_array_equal(d.dead_cell_indices(False), [0, (5 * 30 + 14) * 30 + 14])
    np.testing.assert_array_equal(d.dead_cell_indices(True), [0, (5 * n_x + 14) * n_y + 14])
    assert d.dead_cells_summary() == "2: layer 0: 0; layer 5: 434"


@pytest.mark.parametrize("dead, match", [
    ([[7, 0]], "layer 7 does not exist"), ([[0, 128]], "layer 0 has 128 cells"), ([[0, -1]], "cell index"),
    ([[0, 1], [0, 1]], "twice"), ([0, 1], "list of \\[layer, cell\\] pairs"), ([[0, 1.5]], "expected an integer"),
    ("3", "list of \\[layer, cell\\] pairs"),
])
def test_bad_dead_cells_are_refused(dead, match):
    with pytest.raises(DetectorError, match=match):
        _with_dead("hgcal-proto", dead)


def test_dead_cells_travel_in_files_and_models(tmp_path):
    """Dataset attributes and model files carry them; a model's showers read zero there (sample, hits, ONNX)."""
    import onnxruntime as ort
    import torch

    from caloforge.export import check_onnx, export_onnx, noise_inputs
    from caloforge.models import load_model, save_model
    from conftest_models import tiny_model, toy_layered_detector, toy_layered_showers

    base = toy_layered_detector()
    det = Detector.from_dict({**base.to_dict(), "dead_cells": [[0, 7], [1, 5], [2, 0]]})
    data = toy_layered_showers(det, 16)
    write_showers(tmp_path / "s.h5", det, data.conditions, data.showers, attrs={"source": "toy"})
    with ShowerFile(tmp_path / "s.h5") as f:
        assert f.detector == det
    assert "dead cells:        3: layer 0: 7; layer 1: 5; layer 2: 0" in describe(tmp_path / "s.h5")
    dead = det.dead_cell_indices()
    for family in ("calogan", "densewgan"):
        model = tiny_model(family, det, data)
        path = save_model(model, tmp_path / family)
        again = load_model(path)
        assert again.detector == det
        showers = again.sample(torch.full((8,), 3e4), seed=1)
        assert torch.all(showers[:, dead] == 0) and showers.sum() > 0
        n, cells, _ = again.sample_hits(torch.full((8,), 3e4), seed=1)
        assert not np.isin(cells.numpy(), dead).any() and int(n.sum()) == int((showers != 0).sum())
    onnx = export_onnx(again, tmp_path / "m.onnx")
    assert check_onnx(again, onnx) < 1e-3
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    cond = torch.tensor([[3e4, 0, 0, 0, 22]] * 8, dtype=torch.float32)
    feeds = {"conditions": cond.numpy()}
    feeds.update({name: t.numpy() for (name, _, _), t in zip(noise_inputs(again), again.draw_noise(8, None))})
    assert np.all(sess.run(["showers"], feeds)[0][:, dead] == 0)


def _simulate(det: Detector, path) -> tuple[np.ndarray, Detector]:
    from caloforge.simulate import simulate

    out = simulate(det, "e-", "5", "0", 4, 21, path, workers=1, chunk_size=4, quiet=True)
    with ShowerFile(out) as f:
        return f.read().showers, f.detector


@pytest.mark.parametrize("name, dead", [
    ("hgcal-proto", [[layer, 0] for layer in range(7)] + [[3, 1]]),  # the hexagon on the axis in every layer
    ("ild-ecal", [[layer, cell] for layer in (4, 8, 12) for cell in (14 * 30 + 14, 15 * 30 + 15)]),  # at the impact
    # corner, on the uniform grid's code path
])
def test_a_dead_cell_reads_zero_in_geant4_and_nothing_else_changes(name, dead, tmp_path):
    live, _ = _simulate(load_detector(name), tmp_path / "live.h5")
    det = _with_dead(name, dead)
    showers, stored = _simulate(det, tmp_path / "dead.h5")
    idx = det.dead_cell_indices()
    assert stored == det
    assert np.all(live[:, idx].sum(axis=0) > 0), "the test's dead cells must see energy when alive"
    assert np.all(showers[:, idx] == 0)
    keep = np.setdiff1d(np.arange(showers.shape[1]), idx)
    np.testing.assert_array_equal(showers[:, keep], live[:, keep])  # the same seed: the same showers elsewhere
