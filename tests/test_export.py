"""ONNX export: the graph run by onnxruntime reproduces the torch sampler given the same noise."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from caloforge.cli import main
from caloforge.export import export_onnx, noise_inputs
from caloforge.models import load_model, save_model
from conftest_models import VARIANTS, family_of, tiny_model, toy_detector, toy_showers


@pytest.mark.parametrize("family", VARIANTS)
def test_onnx_matches_torch(family, tmp_path):
    torch.set_num_threads(1)
    det = toy_detector()
    data = toy_showers(det, 40, seed=4)
    model = tiny_model(family, det, data)
    path = export_onnx(model, tmp_path / "m.onnx")
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["caloforge_family"] == family_of(family) and "toy-ecal" in meta["caloforge_detector"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 7):  # the batch axis is dynamic
        cond = torch.as_tensor(data.conditions[:n].as_array(), dtype=torch.float32)
        noise = model.draw_noise(n, torch.Generator().manual_seed(n))
        with torch.no_grad():
            ref = model.decode_window(cond, *noise).numpy()
        feeds = {"conditions": cond.numpy()}
        feeds.update({name: t.numpy() for (name, _, _), t in zip(noise_inputs(model), noise)})
        out = sess.run(["showers"], feeds)[0]
        assert out.shape == (n, det.n_cells())
        assert np.array_equal(out > 0, ref > 0)
        np.testing.assert_allclose(out, ref, rtol=2e-3, atol=1e-4)


def test_export_cli(tmp_path, capsys):
    det = toy_detector()
    save_model(tiny_model("wgan", det, toy_showers(det, 20)), tmp_path / "m")
    assert main(["export", "--model", str(tmp_path / "m"), "-o", str(tmp_path / "m.onnx")]) == 0
    assert "onnxruntime vs torch" in capsys.readouterr().err
    assert load_model(tmp_path / "m").family == "wgan"
