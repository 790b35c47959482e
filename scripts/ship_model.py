"""Ship a trained model inside the package (the model zoo listed by ``caloforge models``).

Copies a model directory to ``src/caloforge/pretrained/NAME`` with its evaluation figures in ``model.json`` (key
``zoo``: the test set, classifier AUCs, FPD with its floor, the number of flagged metrics, and the commands that
produced them), read from the ``metrics.json`` of a ``caloforge evaluate`` run. A zoo model holds at most 8 MB of
weights: with ``--half-above N`` float tensors of at least N numbers are stored in float16 (the loader makes them
float32 again; check the figures after, as for any change of the weights).

    python scripts/ship_model.py runs/calogan-500 calogan-3layer-calogan --metrics reports/calogan/metrics.json \\
        --label calogan --test-set calogan-test --commands "caloforge train ...; caloforge generate ...; ..."
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 8_000_000


def figures(metrics_path: Path, label: str) -> dict:
    """The headline figures of one candidate of a ``caloforge evaluate`` run, rounded for the zoo record."""
    from caloforge.evaluate import headline_figures

    out = headline_figures(json.loads(metrics_path.read_text()), label)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path, help="trained model directory (model.json + model.safetensors)")
    p.add_argument("name", help="zoo name, e.g. calogan-3layer-calogan")
    p.add_argument("--metrics", type=Path, required=True, help="metrics.json of the evaluation against held-out Geant4")
    p.add_argument("--label", required=True, help="the model's candidate label in that evaluation")
    p.add_argument("--test-set", required=True, help="name of the held-out Geant4 set (README, Standard datasets)")
    p.add_argument("--commands", required=True, help="the train / generate / evaluate commands behind the figures")
    p.add_argument("--note", default="", help="one line a user should read before using it")
    p.add_argument("--half-above", type=int, default=0, help="store float tensors of >= N numbers in float16")
    p.add_argument("--force", action="store_true", help="replace an existing zoo entry")
    args = p.parse_args(argv)

    from caloforge.models.base import shipped_model_path

    existing = shipped_model_path(args.name)  # "default" lives at the top of pretrained/, the others in NAME/
    dest = existing if existing is not None else ROOT / "src" / "caloforge" / "pretrained" / args.name
    if existing is not None and not args.force:
        sys.exit(f"{dest} exists (use --force to replace it)")
    state = load_file(str(args.model / "model.safetensors"))
    if args.half_above > 0:
        state = {k: (v.half() if v.dtype == torch.float32 and v.numel() >= args.half_above else v)
                 for k, v in state.items()}
    meta = json.loads((args.model / "model.json").read_text())
    meta["zoo"] = {"test_set": args.test_set, **figures(args.metrics, args.label), "commands": args.commands,
                   "weights": (f"float16 for tensors of >= {args.half_above} numbers" if args.half_above
                               else "as trained"),
                   "note": args.note}
    dest.mkdir(parents=True, exist_ok=True)
    weights, tmp = dest / "model.safetensors", dest / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    size = tmp.stat().st_size
    if size > MAX_BYTES:
        tmp.unlink()
        sys.exit(f"{args.name}: {size / 1e6:.1f} MB of weights, above the zoo's {MAX_BYTES / 1e6:g} MB "
                 "(try --half-above)")
    tmp.replace(weights)
    tmp = dest / "model.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(dest / "model.json")
    print(f"shipped {args.model} as {args.name} in {dest}: {size / 1e6:.2f} MB; {meta['zoo']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
