"""Write a copy of a saved ``cfm`` model whose default ODE steps and solver are changed, so that the unchanged
``caloforge generate`` and ``caloforge bench`` sample it at another step count (until they take a --steps flag).

    python scripts/cfm_steps.py runs/cfm --steps 4 --solver midpoint -o runs/cfm-mid4

The weights are copied unchanged; only ``config.sample_steps`` and ``config.solver`` of model.json differ (checked by
loading the copy).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from caloforge.models import ModelError, load_model, read_meta
from caloforge.models.base import META_FILE, WEIGHTS_FILE


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a saved cfm model directory")
    p.add_argument("--steps", type=int, required=True, help="ODE steps")
    p.add_argument("--solver", choices=["euler", "midpoint", "heun"], help="ODE solver (default: unchanged)")
    p.add_argument("-o", "--output", required=True, help="new model directory")
    args = p.parse_args(argv)
    meta = read_meta(args.model)
    if meta["family"] != "cfm":
        raise ModelError(f"{args.model}/{META_FILE}: field 'family' is {meta['family']!r}; expected 'cfm'")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    meta["config"]["sample_steps"] = args.steps
    if args.solver:
        meta["config"]["solver"] = args.solver
    shutil.copyfile(Path(args.model) / WEIGHTS_FILE, out / (WEIGHTS_FILE + ".tmp"))
    (out / (META_FILE + ".tmp")).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (out / (WEIGHTS_FILE + ".tmp")).replace(out / WEIGHTS_FILE)
    (out / (META_FILE + ".tmp")).replace(out / META_FILE)
    model = load_model(out)
    print(f"{out}: cfm with {model.sample_steps} {model.solver} steps ({model.evaluations_per_shower} network "
          f"evaluations per shower)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ModelError as err:
        sys.exit(f"cfm_steps: error: {err}")
