"""Export a trained model to ONNX: (energies MeV, angles deg, noise...) -> showers (n, n_cells) MeV.

The noise is an explicit input, so ONNX and torch give the same showers for the same noise. The graph's
metadata records the family, the noise inputs (shape per shower and distribution), the detector and the
training conditions range. The export is checked against the torch sampler with onnxruntime (``--no-check``
skips that).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="trained model directory (runs/NAME)")
    p.add_argument("-o", "--output", required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison with torch")


def _wrapper(model):
    import torch

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, energies: torch.Tensor, angles: torch.Tensor, *noise: torch.Tensor) -> torch.Tensor:
            return self.model.decode(energies, angles, *noise)

    return Decoder().eval()


def noise_inputs(model) -> list[tuple[str, tuple[int, ...], str]]:
    """(input name, shape per shower, distribution) of the noise inputs of the exported graph."""
    return [(f"noise_{i}_{kind}", tuple(shape[1:]), kind) for i, (shape, kind) in enumerate(model.noise_shapes(1))]


def export_onnx(model, output: str | Path, opset: int = 17) -> Path:
    """Write the ONNX graph of ``model.decode`` with a dynamic batch axis (legacy TorchScript exporter)."""
    import onnx
    import torch

    model = model.to("cpu").eval()
    n = 3
    energies = torch.full((n,), 50e3)
    angles = torch.zeros(n)
    noise = model.draw_noise(n, torch.Generator().manual_seed(0))
    names = [name for name, _, _ in noise_inputs(model)]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {name: {0: "n"} for name in ["energies", "angles", *names, "showers"]}
    tmp = output.with_name(output.name + ".tmp")
    with torch.no_grad():
        torch.onnx.export(_wrapper(model), (energies, angles, *noise), str(tmp), input_names=["energies", "angles",
                          *names], output_names=["showers"], dynamic_axes=dynamic, opset_version=opset,
                          dynamo=False)
    graph = onnx.load(str(tmp))
    meta = {
        "caloforge_family": model.family,
        "caloforge_noise": json.dumps([{"name": nm, "shape": list(s), "distribution": k}
                                       for nm, s, k in noise_inputs(model)]),
        "caloforge_detector": model.detector.to_json(),
        "caloforge_shape": json.dumps(list(model.shape)),
        "caloforge_conditions": json.dumps(model.meta.get("conditions", {})),
        "caloforge_units": "energies MeV, angles deg, showers MeV",
    }
    for k, v in meta.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(graph, str(tmp))
    tmp.replace(output)
    return output


def check_onnx(model, path: str | Path, n: int = 16, seed: int = 0) -> float:
    """Max |ONNX - torch| (MeV) over ``n`` showers with shared noise; also the fraction of differing cells."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(seed)
    lo, hi = model.meta.get("conditions", {}).get("energy_mev", (10e3, 100e3))
    energies = torch.as_tensor(rng.uniform(lo, hi, n), dtype=torch.float32)
    angles = torch.zeros(n)
    noise = model.draw_noise(n, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model.to("cpu").eval().decode(energies, angles, *noise).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"energies": energies.numpy(), "angles": angles.numpy()}
    feeds.update({name: t.numpy() for (name, _, _), t in zip(noise_inputs(model), noise)})
    out = sess.run(["showers"], feeds)[0]
    return float(np.abs(out - ref).max())


def run(args: argparse.Namespace) -> int:
    from caloforge.models import load_model

    model = load_model(args.model)
    out = export_onnx(model, args.output, args.opset)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); inputs: energies (n,) MeV, angles (n,) deg, " +
          ", ".join(f"{nm} (n, {', '.join(map(str, s))}) {k}" for nm, s, k in noise_inputs(model)), file=sys.stderr)
    if not args.no_check:
        diff = check_onnx(model, out)
        print(f"onnxruntime vs torch: max |difference| {diff:.3g} MeV", file=sys.stderr)
    return 0
