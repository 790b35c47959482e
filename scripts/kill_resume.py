"""Kill `simulate` and `train` at random moments, resume them, and check the results are bit-identical.

For each command: one uninterrupted run gives the reference; then each trial starts the same command, kills its
whole process group (SIGKILL: no clean-up runs) after a random delay, runs the command again (simulate: the same
command; train: ``--resume``) until it finishes, and compares every dataset of the output with the reference, bit
for bit (and, for train, that the history has no duplicated steps).

    python scripts/kill_resume.py --trials 20 --work /tmp/kill-resume --json kill-resume.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _run(cmd: list[str], kill_after: float | None = None) -> bool:
    """Run ``cmd``; with ``kill_after``, SIGKILL its process group then. True when it finished by itself."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return True


def _run_until(cmd: list[str], reached, extra_s: float) -> bool:
    """Run ``cmd``; once ``reached()`` is true, wait ``extra_s`` more and SIGKILL its process group (a kill in the
    middle of the work whatever the machine's speed). True when it finished by itself first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    while proc.poll() is None:
        if reached():
            time.sleep(extra_s)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return False
            break
        time.sleep(0.05)
    err = proc.stderr.read() if proc.stderr else b""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return True


def _last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "history.jsonl").read_text().splitlines()
        return max((json.loads(x)["step"] for x in lines if x.strip()), default=0)
    except (OSError, ValueError, KeyError):
        return 0


def _h5_arrays(path: Path) -> dict[str, np.ndarray]:
    import h5py

    out: dict[str, np.ndarray] = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """Names that differ (missing, shape, dtype or any bit)."""
    bad = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        x, y = np.asarray(a[k]), np.asarray(b[k])
        if x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
            bad.append(k)
    return bad


def trial_simulate(work: Path, rng: np.random.Generator, ref: Path | None, base: list[str], t_full: float) -> dict:
    out = work / ("sim-ref.h5" if ref is None else "sim.h5")
    if out.exists():
        out.unlink()
    shutil.rmtree(str(out) + ".chunks", ignore_errors=True)
    cmd = [*base, "-o", str(out)]
    if ref is None:
        _run(cmd)
        return {}
    kills = 0
    delay = float(rng.uniform(0.1, 0.9) * t_full)
    while not _run(cmd, kill_after=delay):
        kills += 1
        delay = float(rng.uniform(0.2, 1.0) * t_full * 1.5**kills)  # longer each time: a loaded machine ends too
    return {"kills": kills, "differs": _same(_h5_arrays(ref), _h5_arrays(out))}


def trial_train(work: Path, rng: np.random.Generator, ref: Path | None, base: list[str], t_full: float) -> dict:
    out = work / ("train-ref" if ref is None else "train")
    shutil.rmtree(out, ignore_errors=True)
    if ref is None:
        _run([*base, "-o", str(out)])
        return {}
    kills, cmd = 0, [*base, "-o", str(out)]
    n_kills = int(rng.integers(1, 4))  # each trial is killed 1-3 times, at random steps
    while True:
        if kills < n_kills:
            target = min(int(rng.integers(_last_step(out) + 1, _last_step(out) + 25)), 58)
            done = _run_until(cmd, lambda target=target: _last_step(out) >= target, float(rng.uniform(0, 0.5)))
        else:
            done = _run(cmd)
        if done:
            break
        kills += 1
        if (out / "run.json").exists():
            cmd = [sys.executable, "-m", "caloforge", "train", "-o", str(out), "--resume", "--quiet"]
        else:  # killed before the run existed: start it again
            shutil.rmtree(out, ignore_errors=True)
            cmd = [*base, "-o", str(out)]
    steps = [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()
             if json.loads(line).get("kind") == "train"]
    differs = _same(_safetensors(ref / "last" / "model.safetensors"), _safetensors(out / "last" / "model.safetensors"))
    differs += [f"checkpoint:{k}" for k in _same(_safetensors(ref / "checkpoint.safetensors"),
                                                  _safetensors(out / "checkpoint.safetensors"))]
    return {"kills": kills, "differs": differs, "duplicate_steps": len(steps) - len(set(steps))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--work", default="/tmp/kill-resume")
    p.add_argument("--train-data", default="data/gpu-train.h5", help="a small shower file to train on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["simulate", "train"])
    p.add_argument("--json")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    py = [sys.executable, "-m", "caloforge"]
    jobs = {
        "simulate": (trial_simulate, [*py, "simulate", "--energy", "10:30", "--angle", "0:30", "--position", "cell",
                                      "--particle", "gamma,e-", "-n", "120", "--chunk-size", "10", "--workers", "2",
                                      "--seed", "3", "--quiet"]),
        "train": (trial_train, [*py, "train", "--data", args.train_data, "--model", "layerflow", "--config",
                                "configs/layerflow.toml", "--set", "train.max_steps=60", "--set",
                                "train.checkpoint_every=5", "--set", "train.val_every=20", "--set",
                                "train.val_max_showers=100", "--set", "train.log_every=5", "--set",
                                "model.flow_blocks=2", "--set", "model.flow_hidden=32", "--seed", "1", "--quiet"]),
    }
    result: dict = {}
    for name, (fn, base) in jobs.items():
        if args.only and name != args.only:
            continue
        t0 = time.perf_counter()
        fn(work, rng, None, base, 0.0)
        t_full = time.perf_counter() - t0
        ref = work / ("sim-ref.h5" if name == "simulate" else "train-ref")
        rows = []
        for i in range(args.trials):
            r = fn(work, rng, ref, base, t_full)
            rows.append(r)
            print(f"{name} trial {i + 1}/{args.trials}: killed {r['kills']}x, "
                  f"{'identical' if not r['differs'] else 'DIFFERS: ' + ', '.join(r['differs'][:5])}"
                  + (f", duplicate history steps {r['duplicate_steps']}" if "duplicate_steps" in r else ""),
                  flush=True)
        result[name] = {"uninterrupted_s": t_full, "trials": rows,
                        "identical": sum(not r["differs"] for r in rows), "kills": sum(r["kills"] for r in rows)}
        print(f"{name}: {result[name]['identical']}/{args.trials} bit-identical after {result[name]['kills']} kills")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(v["identical"] == len(v["trials"]) for v in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
