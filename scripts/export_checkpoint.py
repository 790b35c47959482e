"""Write a run's latest checkpoint (``runs/NAME/checkpoint.safetensors``) as a model directory, without loading the
training data: for a run stopped before its end (``caloforge train`` writes the model only at validations and at
the end).

    python scripts/export_checkpoint.py runs/cfm -o runs/cfm-step800

The model is built from run.json (family, model options) and the detector of the training file; the weights and
preprocessing buffers come from the checkpoint; the training range (widened to the file's energy and angle specs, as
the trainer does) and particles are read from the training file's conditions (train and validation rows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from caloforge.conditions import PDG_PARTICLE
    from caloforge.dataset import ShowerFile
    from caloforge.models import get_family, load_model, save_model
    from caloforge.train import CHECKPOINT, RUN_FILE, _read_run_file, conditions_range

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a training run directory (runs/NAME)")
    p.add_argument("-o", "--output", required=True, help="new model directory")
    args = p.parse_args(argv)
    run_dir = Path(args.run)
    run = _read_run_file(run_dir / RUN_FILE)
    cls = get_family(run["family"])
    with ShowerFile(run["data"]) as f:
        detector, cond, attrs = f.detector, f.conditions, f.attrs
    model = cls(detector, detector.n_cells(False), cls.Config.from_dict(run["model"], f"{run_dir / RUN_FILE}"))
    ckpt = run_dir / CHECKPOINT
    tensors = load_file(str(ckpt))
    with safe_open(str(ckpt), "pt") as f:
        state = json.loads((f.metadata() or {})["trainer"])
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
    model.meta["conditions"] = conditions_range(cond.energy, cond.angle, np.stack([cond.x, cond.y], axis=1), attrs)
    model.meta["particles"] = sorted({PDG_PARTICLE[int(p)] for p in np.unique(cond.pdg)})
    model.meta["training"] = {"data": {"path": run["data"]}, "train": run["train"], "step": state["step"],
                              "from_checkpoint": str(ckpt)}
    save_model(model, args.output)
    load_model(args.output)
    print(f"{args.output}: {run['family']} at step {state['step']} of {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
