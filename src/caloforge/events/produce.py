"""Seeded, parallel, resumable production of ttH and ttbb events (Pythia 8 + FastJet + the response) into HDF5.

Work is cut into chunks of a fixed number of Pythia tries; chunk k of a process has its own Pythia seed and
response seed, so the events depend only on the seed and the command, not on ``--workers``. Finished chunks are
kept as small HDF5 files in ``OUT.chunks/`` (written to a temporary name, then renamed); running the same command
again skips them. The output takes the first chunks of each process in order until it has ``n`` selected events
per process, interleaved ttH, ttbb, ttH, ... . ``--snapshot FILE`` writes what the chunks hold so far into FILE.
The cost per selected event (CPU seconds: Pythia, then FastJet + response + variables) is stored in the file's
``cost`` attribute. Chunks go first to the process with the fewest events (ttbb costs ~15x more per event).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import h5py
import numpy as np

from caloforge.events import PROCESSES
from caloforge.events.eventfile import Events, write_events
from caloforge.events.variables import AUX, HIGH_LEVEL, LOW_LEVEL

CHUNK_TRIES = {"tth": 400, "ttbb": 2000}
MANIFEST = "manifest.json"
#: Most selected events per process one production makes (chunks to plan stay a bounded list).
MAX_EVENTS = 10_000_000


def chunk_seed(seed: int, process: str, k: int) -> int:
    """Pythia's seed (1..900000000) of chunk k."""
    return (seed * 1_000_003 + PROCESSES[process] * 500_009 + k * 7919) % 900_000_000 + 1


def run_chunk(process: str, seed: int, k: int, tries: int, min_btags: int) -> dict:
    """Generate one chunk: the selected events' variables and the CPU time spent in each stage."""
    from caloforge.events.pythia import PythiaSource
    from caloforge.events.response import reconstruct
    from caloforge.events.variables import event_variables

    c0 = time.process_time()
    src = PythiaSource(process, chunk_seed(seed, process, k), +1 if k % 2 == 0 else -1)
    particles = [p for p in (src.next() for _ in range(tries)) if p is not None]
    c1 = time.process_time()
    rng = np.random.default_rng([seed, PROCESSES[process], k])
    reco = [r for r in reconstruct(particles, rng, min_btags) if r is not None]
    rows = [event_variables(r) for r in reco]
    c2 = time.process_time()
    cols = [np.array([r[i] for r in rows], dtype=np.float64).reshape(len(rows), w)
            for i, w in enumerate((len(HIGH_LEVEL), len(LOW_LEVEL), len(AUX)))]
    return {"high_level": cols[0], "low_level": cols[1], "aux": cols[2], "tries": tries,
            "generated": len(particles), "selected": len(rows), "pythia_cpu_s": c1 - c0, "reco_cpu_s": c2 - c1}


def _chunk_path(chunks: Path, process: str, k: int) -> Path:
    return chunks / f"{process}-{k:05d}.h5"


def save_chunk(path: Path, result: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as h5:
        for key in ("high_level", "low_level", "aux"):
            h5.create_dataset(key, data=result[key])
        for key in ("tries", "generated", "selected", "pythia_cpu_s", "reco_cpu_s"):
            h5.attrs[key] = result[key]
    os.replace(tmp, path)


def load_chunk(path: Path) -> dict:
    with h5py.File(path, "r") as h5:
        out = {key: h5[key][...] for key in ("high_level", "low_level", "aux")}
        out.update({k: v.item() for k, v in h5.attrs.items()})
    return out


def _check_manifest(chunks: Path, manifest: dict) -> None:
    f = chunks / MANIFEST
    if f.exists():
        old = json.loads(f.read_text())
        if old != manifest:
            diff = {k: (old.get(k), manifest.get(k)) for k in set(old) | set(manifest) if old.get(k) != manifest.get(k)}
            raise ValueError(f"{chunks}: the finished chunks were made with other settings {diff} (old, new); use "
                             f"the same command, or another -o")
    else:
        chunks.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(manifest, indent=1))


def _done_prefix(chunks: Path, process: str) -> list[int]:
    """Indices 0..K-1 of the finished chunks of a process that form an unbroken run from 0."""
    ks = []
    while _chunk_path(chunks, process, len(ks)).exists():
        ks.append(len(ks))
    return ks


def assemble(chunks: Path, processes: list[str], n: int, output: Path, settings: dict) -> dict[str, int]:
    """Write the output from the finished chunks (at most n per process); return the events per process."""
    parts, cost = {}, {}
    for p in processes:
        hl, ll, ax, stats = [], [], [], {"tries": 0, "generated": 0, "selected": 0, "pythia_cpu_s": 0.0,
                                         "reco_cpu_s": 0.0, "chunks": 0}
        total = 0
        for k in _done_prefix(chunks, p):
            if total >= n:
                break
            c = load_chunk(_chunk_path(chunks, p, k))
            hl.append(c["high_level"])
            ll.append(c["low_level"])
            ax.append(c["aux"])
            total += c["selected"]
            for key in ("tries", "generated", "selected", "pythia_cpu_s", "reco_cpu_s"):
                stats[key] += c[key]
            stats["chunks"] += 1
        cat = [np.concatenate(x)[:n] if x else np.zeros((0, w)) for x, w in
               ((hl, len(HIGH_LEVEL)), (ll, len(LOW_LEVEL)), (ax, len(AUX)))]
        parts[p] = cat
        sel = max(stats["selected"], 1)
        stats["cpu_s_per_event"] = (stats["pythia_cpu_s"] + stats["reco_cpu_s"]) / sel
        stats["pythia_cpu_s_per_event"] = stats["pythia_cpu_s"] / sel
        stats["reco_cpu_s_per_event"] = stats["reco_cpu_s"] / sel
        stats["selection_efficiency"] = stats["selected"] / max(stats["generated"], 1)
        stats["filter_efficiency"] = stats["generated"] / max(stats["tries"], 1)
        cost[p] = stats
    counts = {p: len(parts[p][0]) for p in processes}
    order = _interleave([np.full(counts[p], PROCESSES[p]) for p in processes])
    hl = np.zeros((len(order), len(HIGH_LEVEL)))
    ll = np.zeros((len(order), len(LOW_LEVEL)))
    ax = np.zeros((len(order), len(AUX)))
    for p in processes:
        rows = np.flatnonzero(order == PROCESSES[p])
        hl[rows], ll[rows], ax[rows] = parts[p]
    ev = Events(hl, order.astype(np.int8), HIGH_LEVEL, ll, LOW_LEVEL, ax, AUX)
    write_events(output, ev, {"source": "pythia", "cost": json.dumps(cost), "settings": json.dumps(settings),
                              "seed": settings["seed"], "n_per_process": json.dumps(counts)})
    return counts


def _interleave(labels: list[np.ndarray]) -> np.ndarray:
    """Round-robin merge of the per-process label arrays (the longer one's tail at the end)."""
    out = []
    for i in range(max((len(x) for x in labels), default=0)):
        out.extend(x[i] for x in labels if i < len(x))
    return np.array(out, dtype=np.int64)


def produce(processes: list[str], n: int, output: str | Path, seed: int = 1, workers: int = 1,
            min_btags: int = 2, snapshot: str | Path | None = None, quiet: bool = False,
            chunk_tries: dict[str, int] | None = None) -> dict[str, int]:
    """Produce (or resume) n selected events per process into ``output``; returns the events per process."""
    from caloforge.events.response import RESPONSE_DOC
    from caloforge.progress import progress
    from caloforge.validate import check_int, check_output_file, check_seed

    for p in processes:
        if p not in PROCESSES:
            raise ValueError(f"--process {p!r}: expected tth or ttbb")
    if not processes or len(set(processes)) != len(processes):
        raise ValueError(f"--process {','.join(processes)!r}: expected tth, ttbb or both, each once")
    check_int(n, "-n", 1, MAX_EVENTS)
    check_seed(seed)
    check_int(workers, "--workers", 1, 4096)
    check_int(min_btags, "--min-btags", 0, 8)
    check_output_file(output)
    if snapshot is not None:
        check_output_file(snapshot, "--snapshot")
    try:
        import pythia8mc
    except ImportError:
        raise ValueError("events produce needs Pythia 8 (pythia8mc): pip install 'caloforge[events]'") from None
    tries = {**CHUNK_TRIES, **(chunk_tries or {})}
    output = Path(output)
    chunks = output.with_name(output.name + ".chunks")
    settings = {"seed": seed, "min_btags": min_btags, "chunk_tries": {p: tries[p] for p in processes},
                "pythia": pythia8mc.__version__ if hasattr(pythia8mc, "__version__") else "8.3",
                "response": RESPONSE_DOC, "processes": processes}
    if not snapshot:
        _check_manifest(chunks, {k: settings[k] for k in ("seed", "min_btags", "chunk_tries")})
    if snapshot:
        if not (chunks / MANIFEST).exists():
            raise ValueError(f"{chunks}: no production to snapshot")
        return assemble(chunks, processes, n, Path(snapshot), settings)

    selected = {p: {k: load_chunk(_chunk_path(chunks, p, k))["selected"] for k in _done_prefix(chunks, p)}
                for p in processes}
    for p in processes:  # finished chunks beyond a gap (an interrupted parallel run)
        for f in chunks.glob(f"{p}-*.h5"):
            k = int(f.stem.split("-")[1])
            if k not in selected[p]:
                selected[p][k] = load_chunk(f)["selected"]
    in_flight: dict = {}

    def _per_chunk(p: str) -> float:
        """Selected events per chunk seen so far (a guess before the first chunk)."""
        return max(sum(selected[p].values()) / len(selected[p]), 0.5) if selected[p] else tries[p] * 0.01

    def need_more(p: str) -> list[int]:
        """Chunk indices to submit next for p, from the yield seen so far (at least one while short)."""
        got = sum(selected[p].values())
        pending = [k for (q, k) in in_flight.values() if q == p]
        per_chunk = _per_chunk(p)
        short = n - got - per_chunk * len(pending)
        k, out = 0, []
        while short > 0:
            while k in selected[p] or k in pending:
                k += 1
            out.append(k)
            short -= per_chunk
            k += 1
        return out

    def complete(p: str) -> bool:
        total = 0
        for k in range(len(selected[p]) + 1):
            if k not in selected[p]:
                return False
            total += selected[p][k]
            if total >= n:
                return True
        return False

    bar = progress(total=n * len(processes), desc="events", unit="ev", quiet=quiet)
    bar.update(min(sum(min(sum(s.values()), n) for s in selected.values()), n * len(processes)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        while True:
            while len(in_flight) < 2 * workers:  # the process with the fewest (expected) events goes first
                todo = {p: need_more(p) for p in processes if not complete(p)}
                todo = {p: ks for p, ks in todo.items() if ks}
                if not todo:
                    break
                p = min(todo, key=lambda q: n - len(todo[q]) * _per_chunk(q))
                fut = pool.submit(run_chunk, p, seed, todo[p][0], tries[p], min_btags)
                in_flight[fut] = (p, todo[p][0])
            if not in_flight:
                break
            done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for fut in done:
                p, k = in_flight.pop(fut)
                res = fut.result()
                save_chunk(_chunk_path(chunks, p, k), res)
                before = min(sum(selected[p].values()), n)
                selected[p][k] = res["selected"]
                bar.update(min(sum(selected[p].values()), n) - before)
    bar.close()
    return assemble(chunks, processes, n, output, settings)
