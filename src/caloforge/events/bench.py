"""Time the event WGAN against Pythia 8 + FastJet + the response + the variables, in the same run.

The full chain's cost is CPU seconds per *selected* event (what the WGAN replaces: the ttbb b-pair filter and the
single-lepton selection reject most tries); the WGAN's is CPU seconds per generated event, noise to variables after
the inverse Gaussianisation, at batch size 10000 on ``threads`` CPU threads.
"""

from __future__ import annotations

import time

import numpy as np

from caloforge.events import PROCESSES


def bench(model_dir: str, pythia_tries: int = 400, n_events: int = 100000, threads: int = 1, seed: int = 0) -> dict:
    import torch

    from caloforge.events.produce import CHUNK_TRIES, run_chunk
    from caloforge.events.wgan import MAX_EVENTS, EventWGAN
    from caloforge.validate import check_int, check_seed

    check_int(pythia_tries, "--pythia-tries", 1, 100_000)
    check_int(n_events, "--events", 2, 2 * MAX_EVENTS)
    check_int(threads, "--threads", 1, 256)
    check_seed(seed)
    model = EventWGAN.load(model_dir)  # a wrong directory is refused before minutes of Pythia
    torch.set_num_threads(max(threads, 1))
    res: dict = {"threads": threads, "pythia": {}, "summary": []}
    for proc in PROCESSES:
        tries = pythia_tries * CHUNK_TRIES[proc] // CHUNK_TRIES["tth"]
        c0, w0 = time.process_time(), time.perf_counter()
        r = run_chunk(proc, 10_000 + seed, 0, tries, 2)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        sel = max(r["selected"], 1)
        res["pythia"][proc] = {"tries": tries, "selected": r["selected"], "cpu_s": cpu, "wall_s": wall,
                               "cpu_s_per_event": cpu / sel, "pythia_cpu_s_per_event": r["pythia_cpu_s"] / sel,
                               "reco_cpu_s_per_event": r["reco_cpu_s"] / sel}
    proc_labels = np.tile(np.array(list(PROCESSES.values()), dtype=np.int8), n_events // 2)
    model.sample(proc_labels[:1000], seed=seed)  # warm-up
    c0, w0 = time.process_time(), time.perf_counter()
    model.sample(proc_labels, seed=seed, batch_size=10000)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    res["wgan"] = {"events": len(proc_labels), "cpu_s": cpu, "wall_s": wall, "cpu_s_per_event": cpu / len(proc_labels),
                   "wall_s_per_event": wall / len(proc_labels)}
    w = res["wgan"]["cpu_s_per_event"]
    mean_chain = float(np.mean([v["cpu_s_per_event"] for v in res["pythia"].values()]))
    res["speedup"] = {p: v["cpu_s_per_event"] / w for p, v in res["pythia"].items()}
    res["speedup"]["mean"] = mean_chain / w
    for p, v in res["pythia"].items():
        res["summary"].append(f"{p}: Pythia + FastJet + response {v['cpu_s_per_event'] * 1e3:.1f} ms CPU per selected "
                              f"event ({v['selected']} of {v['tries']} tries); WGAN speed-up {res['speedup'][p]:.3g}x")
    res["summary"].append(f"eventwgan: {w * 1e6:.2f} us CPU per event ({threads} thread(s), {len(proc_labels)} "
                          f"events); equal mix speed-up {res['speedup']['mean']:.3g}x")
    return res
