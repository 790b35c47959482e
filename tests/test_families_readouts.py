"""The families on every readout (issue 8): calogan and densewgan train, generate, save/load and export to ONNX on
hexagons (``hgcal-proto``) and (r, phi) bins (``cc-ds2``); the image families refuse both with a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from caloforge.cli import main
from caloforge.dataset import ShowerFile, write_showers
from caloforge.detector import load_detector
from caloforge.models import ModelError, get_family, load_model
from conftest_models import GRID_VARIANTS, TINY_CONFIGS, family_of, toy_cell_showers

READOUTS = ("hgcal-proto", "cc-ds2")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_calogan_images_of_hexagons_and_polar_bins():
    """Hexagons go onto the image of their axial lattice coordinates, one pixel each; (r, phi) bins are an
    n_phi x n_r image in cell order; the model's layer outputs are the layers' cells."""
    from caloforge.models.calogan import layer_images

    hexes = layer_images(load_detector("hgcal-proto"))
    assert len(hexes) == 7 and all((h, w) == (13, 13) for h, w, _ in hexes)
    pixels = hexes[0][2]
    assert len(pixels) == 128 and len(set(pixels.tolist())) == 128 and pixels.max() < 169
    assert all(p is None and (h, w) == (16, 9) for h, w, p in layer_images(load_detector("cc-ds2")))


@pytest.mark.parametrize("name", READOUTS)
@pytest.mark.parametrize("family", ["calogan", "densewgan"])
def test_train_generate_save_export_on_every_readout(family, name, tmp_path, capsys):
    det = load_detector(name)
    b = toy_cell_showers(det, 48, seed=5)
    data = tmp_path / "train.h5"
    write_showers(data, det, b.conditions, b.showers, attrs={"source": "toy", "particle": "e+,gamma"})
    cfg = tmp_path / "c.toml"
    model_opts = "\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY_CONFIGS[family].items())
    cfg.write_text(f'family = "{family}"\n[train]\nbatch_size = 8\nmax_steps = 4\nval_every = 2\n'
                   f'checkpoint_every = 2\nval_max_showers = 8\nlr = 1e-3\n[model]\n{model_opts}\n')
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--model", family, "--config", str(cfg), "-o", str(run), "-q"]) == 0
    model = load_model(run, expected_detector=det)
    assert model.family == family and model.n_cells == det.n_cells()
    gen = tmp_path / "gen.h5"
    assert main(["generate", "--model", str(run), "-n", "6", "--energy", "20:80", "--particle", "gamma",
                 "-o", str(gen), "--seed", "3", "-q"]) == 0
    with ShowerFile(gen) as f:
        assert f.detector == det
        showers = f.read().showers
    assert showers.shape == (6, det.n_cells()) and np.all(np.isfinite(showers)) and np.all(showers >= 0)
    again = load_model(run)
    np.testing.assert_array_equal(again.sample(torch.full((4,), 3e4), seed=2).numpy(),
                                  model.sample(torch.full((4,), 3e4), seed=2).numpy())
    assert main(["export", "--model", str(run), "-o", str(tmp_path / "m.onnx")]) == 0
    assert "onnxruntime vs torch" in capsys.readouterr().err


@pytest.mark.parametrize(("variant", "name"), [
    (v, name) for v in GRID_VARIANTS if ":" not in v for name in READOUTS
    if not (v == "wgan" and name == "hgcal-proto")])  # wgan takes hexagons (frame cells): tests/test_wgan_hgcal.py
def test_image_families_refuse_hexagons_and_polar_bins(variant, name, tmp_path, capsys):
    det = load_detector(name)
    cls = get_family(family_of(variant))
    with pytest.raises(ModelError, match=f"detector '{name}' has per-layer cells"):
        cls(det, None, cls.Config.from_dict(TINY_CONFIGS[variant]))
    if variant == "wgan":  # the same through the command line: one line, exit 2
        b = toy_cell_showers(det, 4)
        write_showers(tmp_path / "d.h5", det, b.conditions, b.showers)
        assert main(["train", "--data", str(tmp_path / "d.h5"), "--model", "wgan", "-o", str(tmp_path / "r"),
                     "-q"]) == 2
        assert "per-layer cells" in capsys.readouterr().err
