"""GPU figures in one short run: generation and training of the shipped models on CUDA.

Made for a short device lease, so that one run gives every figure; each section writes its numbers to the JSON file
as soon as it has them (a run cut short keeps what it measured):

* generation, model only: ms/shower at batch 10^3-10^5, fp32, TF32 and bf16 autocast;
* with the copy to the host: dense (pageable and pinned memory), sparse (hit index + energy), and a pipelined loop
  that copies batch k on a side stream while batch k + 1 is generated;
* physics of bf16 against fp32 for the same noise (total energy, hits, layer fractions), so that half precision is
  used only where it keeps the physics;
* whole generate jobs into HDF5 files (:func:`caloforge.bench.time_whole_job`);
* the same model on the CPU of the same machine with 2 threads, for the ratio;
* training: steps/s of layerflow on CUDA (fp32, bf16 autocast), and whether a run killed half-way and resumed ends
  with the same weights as an uninterrupted one (and whether two uninterrupted runs agree).

    PYTHONPATH=src python scripts/bench_gpu.py --data data/gpu-train.h5 --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

RESULTS: dict = {}
T_START = time.perf_counter()


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f} s] {msg}", flush=True)


def save(path: str | None) -> None:
    if path:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(RESULTS, indent=1, default=str) + "\n")
        tmp.replace(path)


def conditions(model, n: int, seed: int = 0):
    """Energies 10-100 GeV; angles 0-60 deg and impacts over a cell for models trained on them, else 0 / origin."""
    from caloforge.conditions import Conditions

    rng = np.random.default_rng(seed)
    e = rng.choice([10e3, 50e3, 100e3], n)
    rng_ = model.meta.get("conditions", {})
    if rng_.get("angle", [0, 0])[1] > 0:
        cell = model.detector.cell_size_mm
        return Conditions(e, rng.uniform(0, 60, n), rng.uniform(-cell / 2, cell / 2, n),
                          rng.uniform(-cell / 2, cell / 2, n), 22)
    return Conditions(e, 0.0, 0.0, 0.0, 22)


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of ``fn`` after one warm-up, with CUDA synchronised around each call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _gen_point(model, gen: torch.Generator, b: int) -> dict:
    c = conditions(model, b)
    angled = bool(np.any(c.angle > 0))
    row: dict = {"batch": b}

    def sample():
        return model.sample(c, generator=gen, angled=angled)

    def sample_bf16():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return sample()

    def sparse():
        flat = sample().reshape(-1)
        idx = flat.nonzero().squeeze(1)
        return idx.cpu(), flat[idx].cpu()

    row["fp32_ms"] = 1e3 * timed(sample) / b
    torch.backends.cuda.matmul.allow_tf32 = True
    row["tf32_ms"] = 1e3 * timed(sample) / b
    torch.backends.cuda.matmul.allow_tf32 = False
    row["bf16_ms"] = 1e3 * timed(sample_bf16) / b
    x = sample()
    row["hits_per_shower"] = float((x > 0).sum()) / b
    row["bytes_dense_per_shower"] = x.shape[1] * 4
    pinned = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    del x
    row["dense_pageable_ms"] = 1e3 * timed(lambda: sample().cpu()) / b
    row["dense_pinned_ms"] = 1e3 * timed(lambda: pinned.copy_(sample(), non_blocking=True)) / b
    row["sparse_ms"] = 1e3 * timed(sparse) / b
    return row


def generation(name: str, batches: list[int]) -> dict:
    from caloforge.models import load_model

    model = load_model(name, device=DEVICE)
    out: dict = {"model": name, "points": []}
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for b in batches:
        try:
            row = _gen_point(model, gen, b)
        except torch.cuda.OutOfMemoryError as err:
            row = {"batch": b, "error": f"out of memory: {str(err)[:200]}"}
        torch.cuda.empty_cache()
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        out["points"].append(row)
        log(f"{name} batch {b}: {row}")
    return out


def pipelined(name: str, batch: int, n_batches: int) -> dict:
    """Generate ``n_batches`` batches while the previous batch is copied to pinned host memory on a side stream."""
    from caloforge.models import load_model

    model = load_model(name, device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    c = conditions(model, batch)
    angled = bool(np.any(c.angle > 0))
    shape = (batch, int(np.prod(model.window_shape(angled))))
    bufs = [torch.empty(shape, pin_memory=True) for _ in range(2)]
    copy_stream = torch.cuda.Stream()
    done = [torch.cuda.Event(), torch.cuda.Event()]

    def loop(k: int) -> None:
        for i in range(k):
            x = model.sample(c, generator=gen, angled=angled)
            copy_stream.wait_stream(torch.cuda.current_stream())
            done[i % 2].synchronize()  # the buffer's previous copy is finished
            with torch.cuda.stream(copy_stream):
                bufs[i % 2].copy_(x, non_blocking=True)
                x.record_stream(copy_stream)
                done[i % 2].record(copy_stream)
        torch.cuda.synchronize()

    loop(1)
    t0 = time.perf_counter()
    loop(n_batches)
    dt = time.perf_counter() - t0
    return {"model": name, "batch": batch, "n_batches": n_batches, "ms_per_shower": 1e3 * dt / (batch * n_batches)}


def bf16_physics(name: str, n: int) -> dict:
    """The same noise through fp32 and bf16: relative differences of total energy, hits and layer fractions."""
    from caloforge.models import load_model

    model = load_model(name, device=DEVICE)
    c = conditions(model, n, seed=1)
    c.energy[:] = 50e3
    angled = bool(np.any(c.angle > 0))
    a = model.sample(c, seed=5, angled=angled).double()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        b = model.sample(c, seed=5, angled=angled).double()
    res = {}
    for tag, x in (("fp32", a), ("bf16", b)):
        tot = x.sum(1)
        hits = float((x > 0).sum(1).float().mean())
        res[tag] = {"e_mean": float(tot.mean()), "e_std": float(tot.std()), "hits": hits}
    n_l = model.detector.n_layers
    fa = a.reshape(n, n_l, -1).sum(2) / a.sum(1, keepdim=True)
    fb = b.reshape(n, n_l, -1).sum(2) / b.sum(1, keepdim=True)
    res["n"] = n
    res["e_mean_rel"] = res["bf16"]["e_mean"] / res["fp32"]["e_mean"] - 1
    res["e_std_rel"] = res["bf16"]["e_std"] / res["fp32"]["e_std"] - 1
    res["e_std_err_rel"] = 1 / np.sqrt(2 * (n - 1))  # statistical error of a std ratio, for scale
    res["hits_rel"] = res["bf16"]["hits"] / res["fp32"]["hits"] - 1
    res["layer_frac_max_abs"] = float((fa.mean(0) - fb.mean(0)).abs().max())
    res["per_shower_e_rel_rms"] = float(((b.sum(1) / a.sum(1).clamp(min=1e-9)) - 1).pow(2).mean().sqrt())
    return res


def cpu_same_machine(name: str, batch: int) -> dict:
    from caloforge.models import load_model

    torch.set_num_threads(2)
    model = load_model(name, device="cpu")
    c = conditions(model, batch)
    angled = bool(np.any(c.angle > 0))
    model.sample(c, seed=0, angled=angled)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model.sample(c, seed=0, angled=angled)
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(os.cpu_count() or 1)
    return {"model": name, "batch": batch, "threads": 2, "cpu": _cpu_name(),
            "ms_per_shower": 1e3 * statistics.median(times) / batch}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def whole_jobs(name: str, n: int, batch: int) -> list[dict]:
    from caloforge.bench import time_whole_job
    from caloforge.models import load_model

    model = load_model(name, device=DEVICE)
    jobs = [("sparse", "none", True), ("sparse", "lzf", True), ("dense", "lzf", True), ("dense", "none", True)]
    return time_whole_job(model, n, jobs, [10.0, 50.0, 100.0], batch_size=batch)


def profile(name: str, batch: int) -> dict:
    """Where the GPU time of one batch goes: the top CUDA kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    from caloforge.models import load_model

    model = load_model(name, device=DEVICE)
    c = conditions(model, batch)
    angled = bool(np.any(c.angle > 0))
    model.sample(c, seed=0, angled=angled)
    sync()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        model.sample(c, seed=0, angled=angled)
        sync()
    table = p.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)
    print(table, flush=True)
    return {"model": name, "batch": batch, "table": table}


class _Kill(Exception):
    pass


def training(data: str, steps: int, kill_at: int) -> dict:
    """Steps/s on CUDA (fp32, bf16) and resume exactness: straight vs straight, straight vs killed-and-resumed."""
    import tomllib

    from caloforge.train import TrainConfig, Trainer

    cfg_file = Path(__file__).resolve().parents[1] / "configs" / "layerflow.toml"
    cfg = tomllib.loads(cfg_file.read_text())
    res: dict = {"data": data, "steps": steps}
    tmp = Path(tempfile.mkdtemp(prefix="gpu-train-"))

    def make(tag: str, amp: bool, deterministic: bool = False) -> Trainer:
        train = dict(cfg["train"], max_steps=steps, amp=amp, checkpoint_every=max(1, kill_at // 2), val_every=0,
                     log_every=0, lr_schedule="cosine")
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        return Trainer.create(data, "layerflow", tmp / tag, TrainConfig.from_dict(train), cfg["model"], DEVICE)

    def weights(tr: Trainer) -> dict:
        return {k: v.detach().cpu().clone() for k, v in tr.model.state_dict().items()}

    def compare(a: dict, b: dict) -> dict:
        diffs = [float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point()]
        return {"identical": all(torch.equal(a[k], b[k]) for k in a), "max_abs_diff": max(diffs)}

    for amp in (False, True):
        tr = make(f"speed-amp{int(amp)}", amp)
        t0 = time.perf_counter()
        tr.fit()
        sync()
        res[f"steps_per_s_{'bf16' if amp else 'fp32'}"] = steps / (time.perf_counter() - t0)
        log(f"training amp={amp}: {res}")
    for det in (False, True):
        a = make(f"a-det{int(det)}", False, det)
        a.fit()
        wa = weights(a)
        b = make(f"b-det{int(det)}", False, det)
        b.fit()
        c = make(f"c-det{int(det)}", False, det)

        def kill(t: Trainer) -> None:
            if t.state["step"] == kill_at:
                raise _Kill

        try:
            c.fit(callback=kill)
        except _Kill:
            pass
        c = Trainer.resume(tmp / f"c-det{int(det)}", DEVICE)
        c.fit()
        key = "deterministic" if det else "default"
        res[f"{key}_repeat"] = compare(wa, weights(b))
        res[f"{key}_resumed"] = compare(wa, weights(c))
        log(f"training exactness ({key}): {res}")
    torch.use_deterministic_algorithms(False)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the numbers here (updated after each section)")
    p.add_argument("--data", help="training file for the training section (skipped without)")
    p.add_argument("--models", default="default,multi")
    p.add_argument("--batches", default="1000,10000,100000")
    p.add_argument("--whole-job", type=int, default=50000)
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--sections", default="gen,bf16,train,pipe,whole,cpu,profile")
    p.add_argument("--device", default="cuda", help="cuda; cpu only for a dry run of the whole and train sections")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore")
    sections = args.sections.split(",")
    models = args.models.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    RESULTS["device"] = torch.cuda.get_device_name() if DEVICE == "cuda" else _cpu_name()
    RESULTS["torch"] = torch.__version__
    RESULTS["cuda"] = torch.version.cuda
    log(f"{RESULTS}")

    def section(name: str, fn) -> None:
        if name not in sections:
            return
        t0 = time.perf_counter()
        try:
            RESULTS[name] = fn()
        except Exception:  # noqa: BLE001 - one failed section must not lose the others
            RESULTS[name] = {"error": traceback.format_exc(limit=6)}
        RESULTS.setdefault("seconds", {})[name] = time.perf_counter() - t0
        log(f"section {name} done: {json.dumps(RESULTS[name], default=str)[:2000]}")
        save(args.json)

    section("gen", lambda: [generation(m, batches) for m in models])
    section("bf16", lambda: {m: bf16_physics(m, 20000) for m in models})
    if args.data:
        section("train", lambda: training(args.data, args.train_steps, args.train_steps // 2))
    section("pipe", lambda: [pipelined(m, 10000, 10) for m in models])
    section("whole", lambda: {m: whole_jobs(m, args.whole_job, 10000) for m in models[:1]})
    section("cpu", lambda: [cpu_same_machine(m, 1000) for m in models])
    section("profile", lambda: [profile(m, 10000) for m in models])
    save(args.json)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
