"""torchrun data-parallel training vs one process: validation score after the same steps on the same data.

    python scripts/bench_ddp.py --source data/ild-multi-train-10k.h5 --rows 3000 --steps 300 --procs 2

takes the first ROWS showers of SOURCE (a training file, never a test file) into OUT/train.h5, trains the model of
``--config`` (configs/layerflow.toml by default) for STEPS steps once in one process and once under
``torchrun --nproc-per-node PROCS`` (gloo on CPU; ``--device cuda`` for one process per GPU, NCCL), with the same
seed and global batch size, and prints (and writes OUT/result.json) each run's wall time, final validation score
and training loss, and the largest weight difference between the two.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def make_subset(source: Path, out: Path, rows: int) -> None:
    """The first ``rows`` showers of ``source`` with its attributes (a smaller training file)."""
    from caloforge.dataset import ShowerFile, ShowerWriter

    if "test" in source.name:
        raise SystemExit(f"{source}: a test file; benchmark on training data")
    with ShowerFile(source) as f:
        attrs = {k: v for k, v in f.attrs.items() if k not in ("detector", "detector_json", "shape")}
        writer = ShowerWriter(out, f.detector, f.n_cells, attrs)
        for start in range(0, min(rows, len(f)), 500):
            b = f.read(start, min(start + 500, rows))
            writer.append(b.conditions, b.showers)
        writer.close()


def train(out: Path, data: Path, args: argparse.Namespace, procs: int) -> float:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
              if procs > 1 else [sys.executable])
    cmd = launch + ["-m", "caloforge", "train", "--data", str(data), "--model", "layerflow", "--config", args.config,
                    "--max-steps", str(args.steps), "--set", f"train.val_every={args.steps}", "--set",
                    f"train.checkpoint_every={args.steps}", "--set", f"train.val_max_showers={args.val_showers}",
                    "--device", args.device, "--seed", str(args.seed), "-q", "-o", str(out)]
    if args.nice:
        cmd = ["nice", "-n", "10"] + cmd
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def summary(run: Path) -> dict:
    hist = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    val = [r for r in hist if r["kind"] == "val"][-1]
    losses = [r["loss"] for r in hist if r["kind"] == "train"]
    return {"step": val["step"], "score": val["score"], **{k: v for k, v in val.items() if k.startswith("w1_")},
            "loss_last50": sum(losses[-50:]) / len(losses[-50:]) if losses else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="data/ild-multi-train-10k.h5")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--config", default="configs/layerflow.toml")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-showers", type=int, default=1000)
    p.add_argument("--nice", action="store_true", help="run the trainings with nice -n 10")
    p.add_argument("--out", default="data/bench-ddp")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "train.h5"
    if not data.exists():
        make_subset(Path(args.source), data, args.rows)
    res = {k: getattr(args, k) for k in ("source", "rows", "steps", "procs", "config", "device", "seed")}
    for name, procs in (("one", 1), (f"torchrun{args.procs}", args.procs)):
        run = out / f"{name}-{args.device}"
        if run.exists():
            import shutil

            shutil.rmtree(run)
        wall = train(run, data, args, procs)
        res[name] = {"wall_s": round(wall, 1), **summary(run)}
        print(name, json.dumps(res[name]), flush=True)
    from safetensors.torch import load_file

    a = load_file(str(out / f"one-{args.device}" / "last" / "model.safetensors"))
    b = load_file(str(out / f"torchrun{args.procs}-{args.device}" / "last" / "model.safetensors"))
    res["max_abs_weight_diff"] = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    (out / f"result-{args.device}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
