"""Export a trained model to ONNX: (conditions (n, 5), noise...) -> showers (n, n_window_cells) MeV.

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

#: The oldest ONNX opset the exported graphs use (the legacy exporter goes up to torch's own maximum).
MIN_OPSET = 14


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="trained model directory (runs/NAME)")
    p.add_argument("-o", "--output", required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison with torch")
    p.add_argument("--window", choices=["auto", "normal", "angled"], default="auto",
                   help="readout window of the graph's output (auto: angled when the model was trained on angles)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _wrapper(model, angled: bool):
    import torch

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, conditions: torch.Tensor, *noise: torch.Tensor) -> torch.Tensor:
            return self.model.zero_dead_cells(self.model.decode_window(conditions, *noise, angled=angled), angled)

    return Decoder().eval()


def default_angled(model) -> bool:
    """Whether the exported graph writes the angled window: the model was trained on angles > 0."""
    return float(model.meta.get("conditions", {}).get("angle_deg", [0, 0])[1]) > 0 and model.frame == "axis"


def _example_conditions(model, n: int, rng: np.random.Generator, angled: bool) -> np.ndarray:
    from caloforge.conditions import PARTICLE_PDG, Conditions

    rngs = model.meta.get("conditions", {})
    lo, hi = rngs.get("energy_mev", (10e3, 100e3))
    a_hi = float(rngs.get("angle_deg", [0, 0])[1]) if angled else 0.0
    parts = [p for p in model.meta.get("particles", [model.meta.get("particle", "gamma")]) if p in PARTICLE_PDG]
    takes_pos = "position" in model.condition_names
    if takes_pos and model.frame == "cells":  # the impact point itself (no cell frame): its training range
        (x0, x1), (y0, y1) = rngs.get("x_mm", (0.0, 0.0)), rngs.get("y_mm", (0.0, 0.0))
        pos = np.stack([rng.uniform(x0, x1, n), rng.uniform(y0, y1, n)], axis=1)
    else:
        pos = rng.uniform(0, model.detector.cell_size_mm, (n, 2)) if takes_pos else np.zeros((n, 2))
    return Conditions.make(rng.uniform(lo, hi, n), rng.uniform(0, a_hi, n), pos,
                           particle=PARTICLE_PDG[parts[0] if parts else "gamma"]).as_array()


def noise_inputs(model) -> list[tuple[str, tuple[int, ...], str]]:
    """(input name, shape per shower, distribution) of the noise inputs of the exported graph."""
    return [(f"noise_{i}_{kind}", tuple(shape[1:]), kind) for i, (shape, kind) in enumerate(model.noise_shapes(1))]


def export_onnx(model, output: str | Path, opset: int = 17, angled: bool | None = None) -> Path:
    """Write the ONNX graph of ``model.decode_window`` with a dynamic batch axis (legacy TorchScript exporter).

    Inputs: ``conditions`` (n, 5) float32 with the columns energy MeV, angle deg, impact x mm, impact y mm, PDG
    code, and the noise tensors; output ``showers`` (n, n_window_cells) MeV in the normal or ``angled`` window.
    """
    import onnx
    import torch

    from caloforge.conditions import CONDITION_COLUMNS

    model = model.to("cpu").eval()
    angled = default_angled(model) if angled is None else angled
    n = 3
    cond = torch.as_tensor(_example_conditions(model, n, np.random.default_rng(0), angled), dtype=torch.float32)
    noise = model.draw_noise(n, torch.Generator().manual_seed(0))
    names = [name for name, _, _ in noise_inputs(model)]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {name: {0: "n"} for name in ["conditions", *names, "showers"]}
    tmp = output.with_name(output.name + ".tmp")
    with torch.no_grad():
        torch.onnx.export(_wrapper(model, angled), (cond, *noise), str(tmp), input_names=["conditions", *names],
                          output_names=["showers"], dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    graph = onnx.load(str(tmp))
    meta = {
        "caloforge_family": model.family,
        "caloforge_noise": json.dumps([{"name": nm, "shape": list(s), "distribution": k}
                                       for nm, s, k in noise_inputs(model)]),
        "caloforge_detector": model.detector.to_json(),
        "caloforge_shape": json.dumps(list(model.window_shape(angled))),
        "caloforge_conditions": json.dumps(model.meta.get("conditions", {})),
        "caloforge_condition_columns": json.dumps(list(CONDITION_COLUMNS)),
        "caloforge_particles": json.dumps(model.meta.get("particles", [model.meta.get("particle", "gamma")])),
        "caloforge_units": "energy MeV, angle deg, impact x and y mm, particle PDG code; showers MeV",
    }
    for k, v in meta.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(graph, str(tmp))
    tmp.replace(output)
    return output


def check_onnx(model, path: str | Path, n: int = 16, seed: int = 0, angled: bool | None = None) -> float:
    """Max |ONNX - torch| (MeV) over ``n`` showers with shared noise and conditions from the training range."""
    import onnxruntime as ort
    import torch

    angled = default_angled(model) if angled is None else angled
    cond = torch.as_tensor(_example_conditions(model, n, np.random.default_rng(seed), angled), dtype=torch.float32)
    noise = model.draw_noise(n, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model.zero_dead_cells(model.to("cpu").eval().decode_window(cond, *noise, angled=angled), angled).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"conditions": cond.numpy()}
    feeds.update({name: t.numpy() for (name, _, _), t in zip(noise_inputs(model), noise)})
    out = sess.run(["showers"], feeds)[0]
    return float(np.abs(out - ref).max())


def run(args: argparse.Namespace) -> int:
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET

    from caloforge.models import load_model
    from caloforge.validate import check_int, check_output_file

    check_output_file(args.output, "-o", overwrite=args.overwrite)
    check_int(args.opset, "--opset", MIN_OPSET, ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    model = load_model(args.model)
    angled = None if args.window == "auto" else args.window == "angled"
    out = export_onnx(model, args.output, args.opset, angled)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); inputs: conditions (n, 5) [energy MeV, angle deg, "
          f"x mm, y mm, PDG code], " +
          ", ".join(f"{nm} (n, {', '.join(map(str, s))}) {k}" for nm, s, k in noise_inputs(model)), file=sys.stderr)
    if not args.no_check:
        diff = check_onnx(model, out, angled=angled)
        print(f"onnxruntime vs torch: max |difference| {diff:.3g} MeV", file=sys.stderr)
    return 0
