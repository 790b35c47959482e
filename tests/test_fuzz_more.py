"""Seeded fuzzing of the commands added after the first fuzzing round (issue 13): ``tune``, ``events ...``,
``refine``, ``detectors`` and custom detector files (per-layer grids, hexagons, (r, phi) bins), the Dask options of
``simulate``, torchrun's environment for ``train``, event files given to ``evaluate``, files and model directories of
the wrong kind.

Same harness as ``test_fuzz.py`` (in-process runs, exit 0 or a clear error, no traceback, hang or huge allocation);
on top of it, a case that is invalid by construction must end in a clear error (exit 2): accepting it is a failure
("silent acceptance"). No Geant4 and no Pythia run: simulate stops where Geant4 would start, events produce and
bench where Pythia would.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from caloforge.detector import builtin_detectors
from caloforge.events.eventfile import Events, write_events
from test_fuzz import (  # noqa: F401  (world: the fixture of the first round's valid inputs)
    BIG_INTS,
    FUZZ_SCALE,
    SMALL_INTS,
    fuzz_settings,
    mutate,
    path_value,
    run_case,
    text_value,
    world,
)

#: Per command: how many generated cases ran, how many were refused with a clear error (the rest ran, or reached the
#: Geant4 or Pythia stub); printed with ``-s`` (BENCHMARKS.md).
COUNTS: dict[str, list[int]] = {}


#: CALOFORGE_FUZZ_COLLECT=FILE: record failures in FILE and go on (to list every defect at once) instead of failing.
COLLECT = os.environ.get("CALOFORGE_FUZZ_COLLECT")


def check(command: str, args: list, invalid: bool = False) -> int:
    """Run one case; ``invalid``: the input is bad by construction, so it must be refused (exit 2)."""
    t0 = time.monotonic()
    if os.environ.get("CALOFORGE_FUZZ_TIMES"):  # which case is running (a crash names it)
        print(f"start {command}: {' '.join(map(str, args))[-300:]}", flush=True)
    try:
        code, text = run_case(args)
        if os.environ.get("CALOFORGE_FUZZ_TIMES"):
            print(f"{time.monotonic():.1f} {time.monotonic() - t0:6.2f} s {code} {' '.join(map(str, args))[-200:]}")
        accepted = code == 0 or "would start" in text  # reaching the Geant4 or Pythia stub: accepted
        assert not (invalid and accepted), f"silently accepted: caloforge {' '.join(map(str, args))}"
    except AssertionError as err:
        if not COLLECT:
            raise
        with open(COLLECT, "a") as f:
            f.write(f"### {command}\n{' '.join(map(str, args))}\n{str(err)[-1500:]}\n\n")
        return -1
    n = COUNTS.setdefault(command, [0, 0])
    n[0] += 1
    n[1] += not accepted
    return code


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print("\nfuzz cases (run, refused) per command:", json.dumps(COUNTS))


# ---- the valid inputs --------------------------------------------------------------------------------------
def _events(n: int, seed: int, dim: int = 26) -> Events:
    rng = np.random.default_rng(seed)
    proc = (np.arange(n) % 2).astype(np.int8)
    x = np.exp(0.5 * rng.standard_normal((n, dim))) + proc[:, None] * 0.7
    return Events(x, proc, [f"v{i}" for i in range(dim)])


@pytest.fixture(scope="module")
def more(world, tmp_path_factory):  # noqa: F811  (the imported fixture)
    """World of the first round plus event files, an event WGAN run, a refiner run, a search space, detector
    descriptions (as dicts) of every readout kind."""
    from caloforge.events.wgan import WGANConfig
    from caloforge.events.wgan import train as train_events
    from caloforge.refiner import RefinerConfig, create_run

    root = tmp_path_factory.mktemp("fuzz-more")
    ev, ev2 = root / "ev.h5", root / "ev2.h5"
    write_events(ev, _events(240, 1), {"source": "pythia"})
    write_events(ev2, _events(240, 2), {"source": "pythia"})
    run = root / "eventrun"
    cfg = WGANConfig(hidden=8, layers=1, noise_dim=4, n_critic=1, batch_size=16, steps=2, log_every=1)
    train_events(str(ev), str(run), cfg=cfg, quiet=True)
    refiner = root / "refiner"
    rcfg = RefinerConfig(hidden=4, critic_channels=4, critic_hidden=8, batch_size=8, n_critic=1, steps=2,
                         checkpoint_every=1, log_every=1)
    create_run(world["data"], world["data"], refiner, rcfg).fit()
    (root / "space.toml").write_text('[space]\n"train.lr" = { type = "float", low = 1e-4, high = 1e-2, log = true }\n')
    import tomllib
    from importlib import resources

    dets = {name: tomllib.loads(resources.files("caloforge.detectors").joinpath(f"{name}.toml").read_text())
            for name in builtin_detectors()}
    dets["toy"] = json.loads(world["det"].read_text())
    torch.set_num_threads(1)
    return {**world, "mroot": root, "ev": ev, "ev2": ev2, "eventrun": run, "refiner": refiner,
            "space": root / "space.toml", "dets": dets}


def event_inputs(m):
    """Input files of every kind for the event commands."""
    return st.sampled_from([m["ev"], m["ev2"], m["data"], m["cc"], m["root"] / "plain.txt", m["root"] / "a_dir",
                            m["root"] / "nope.h5", "", m["eventrun"] / "model.safetensors"])


def model_dirs(m):
    """Model directories of every kind (and things that are none)."""
    return st.sampled_from([m["eventrun"], m["refiner"], m["model"], m["root"] / "a_dir", m["root"] / "nope",
                            m["data"], ""])


# ---- tune ----------------------------------------------------------------------------------------------------
SPACE_KEYS = ["train.lr", "train.batch_size", "model.flow_hidden", "model.flow_blocks", "train.nope", "nope",
              "model.", "train.max_steps", "model.clamp_features"]
SPACE_NASTY = [None, "x", True, False, "false", -1, 0, 1, 2, 1e-4, 1e9, 10**12, 1e300, -1e300, math.nan,
               math.inf, [], [1], {}, 0.5]


def _toml_value(v) -> str:
    if v is None:
        return '"null"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def space_file(draw, path: Path) -> tuple[Path, bool]:
    """A search-space file: a valid one with 1-2 fields damaged (or a damaged file); True when surely invalid."""
    space = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
             "model.flow_hidden": {"type": "int", "low": 4, "high": 8, "step": 4}}
    invalid = False
    op = draw(st.sampled_from(["field", "field", "key", "type", "drop", "extra", "garbage", "empty"]))
    if op == "garbage":
        path.write_bytes(draw(st.sampled_from([b"[space", b"\xff\xfe", b"space = 5", b"[other]\na = 1"])))
        return path, True
    if op == "empty":
        path.write_text("[space]\n")
        return path, True
    name = draw(st.sampled_from(sorted(space)))
    if op == "field":
        field = draw(st.sampled_from(["low", "high", "step", "log", "choices"]))
        value = draw(st.sampled_from(SPACE_NASTY))
        space[name][field] = value
        lo, hi = space[name].get("low"), space[name].get("high")
        nums = [space[name].get(k) for k in ("low", "high", "step") if k in space[name]]
        invalid = (field == "choices" or field == "log" and not isinstance(value, bool)
                   or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in nums)
                   or not lo < hi or (name == "model.flow_hidden" and (hi > 4096 or lo < 1))
                   or (name == "train.lr" and (lo <= 0 or hi > 1e3)))
    elif op == "key":
        space[draw(st.sampled_from(SPACE_KEYS))] = space.pop(name)
        invalid = not any(k in ("train.lr", "train.batch_size", "model.flow_hidden", "model.flow_blocks",
                                "train.max_steps") for k in space) or any(k not in (
                                    "train.lr", "model.flow_hidden", "train.batch_size", "model.flow_blocks",
                                    "train.max_steps") for k in space)
    elif op == "type":
        space[name]["type"] = draw(st.sampled_from(["categorical", "float", "int", "bool", "", None]))
        invalid = space[name]["type"] not in ("float", "int") or (space[name]["type"] == "float"
                                                                  and name == "model.flow_hidden")
    elif op == "drop":
        space[name].pop(draw(st.sampled_from(["type", "low", "high"])))
        invalid = True
    elif op == "extra":
        space[name][draw(st.sampled_from(["lo", "choice", "Low"]))] = 1
        invalid = True
    body = "[space]\n" + "".join(f'"{k}" = {_toml_value({f: v for f, v in spec.items()})}\n'
                                 for k, spec in space.items())
    path.write_text(body)
    return path, invalid


TUNE_BASE = ["train.max_steps=2", "train.val_every=1", "train.val_fraction=0.25", "train.val_max_showers=8",
             "train.batch_size=8", "model.flow_blocks=1", "model.flow_hidden=4"]


@pytest.mark.timeout(600 * FUZZ_SCALE)
@fuzz_settings(20)
@given(data=st.data())
def test_fuzz_tune(more, data):
    m = more
    space, bad_space = (m["space"], False)
    if data.draw(st.booleans()):
        space, bad_space = space_file(data.draw, m["new"](".toml"))
    base = {"--data": m["data"], "--model": "layerflow", "--space": space, "--trials": 1, "--startup": 1,
            "--device": "cpu", "-o": m["new"](""), "-q": None}
    pools = {"--data": st.one_of(event_inputs(m), st.just(m["data"])),
             "--model": st.sampled_from(["layerflow", "wgan", "eventwgan", "refiner", "", "nope"]),
             "--trials": st.one_of(st.sampled_from([-1, 0, 1, 10_001]), HUGE, text_value()),  # 1 valid trial: 5 s
             "--startup": st.one_of(SMALL_INTS, HUGE), "--seed": st.one_of(SMALL_INTS, HUGE, text_value()),
             "--device": st.sampled_from(["cpu", "cuda", "gpu", ""]), "-o": path_value(m),
             "--set": st.sampled_from(["train.max_steps=-1", "model.flow_hidden=1000000000", "x", "train.lr=nan",
                                       "train.val_every=0", "model.nope=1", "train.max_steps=2"]),
             "--config": st.sampled_from([m["root"] / "garbage.toml", m["root"] / "plain.txt", m["root"] / "a_dir",
                                          m["root"] / "missing.toml"])}
    f = mutate_dict(data.draw, base, pools, k_max=2, keep=("--trials",)) if data.draw(st.booleans()) or not bad_space \
        else dict(base)
    trials, startup = _int(f.get("--trials", 20)), _int(f.get("--startup", 4))
    invalid = (bad_space or str(f.get("--data")) != str(m["data"]) or f.get("--model") != "layerflow"
               or "--space" not in f or trials is None or not 1 <= trials <= 10_000 or startup is None
               or not 0 <= startup <= 10_000 or bad_seed(f.get("--seed", 0))
               or f.get("--device", "auto") not in ("cpu", "auto") or bad_output_dir(m, f)
               or f.get("--set", "train.max_steps=2") != "train.max_steps=2" or "--config" in f)
    sets = [x for kv in TUNE_BASE for x in ("--set", kv)]
    check("tune", ["tune", *sets, *as_args(f)], bool(invalid))


# ---- events --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def no_pythia(more):
    """Stop events produce and bench where Pythia would start (a clear error, exit 2); no plots in evaluate."""
    import caloforge.events.bench
    import caloforge.events.produce

    class _ReachedPythia(ValueError):
        pass

    def stop(*a, **k):
        raise _ReachedPythia("stopped where Pythia would start")

    mp = pytest.MonkeyPatch()
    import caloforge.events.plots

    mp.setattr(caloforge.events.plots, "plot_distributions", lambda *a, **k: [])  # seconds per case, no checks
    mp.setattr(caloforge.events.produce, "run_chunk", stop)
    mp.setattr(caloforge.events.produce, "ProcessPoolExecutor", stop)
    yield
    mp.undo()


def mutate_dict(draw, base: dict, pools: dict, k_max: int = 3, keep: tuple = ()) -> dict:
    """As ``test_fuzz.mutate``, but returns the flags (flag -> value; None: a bare switch) to judge them."""
    args = dict(base)
    for flag in draw(st.lists(st.sampled_from(sorted(pools)), min_size=1, max_size=k_max, unique=True)):
        choice = draw(st.integers(0, 9))
        if choice == 0 and flag not in keep:
            args.pop(flag, None)
        else:
            args[flag] = None if pools[flag] is None else draw(pools[flag])
    return args


def as_args(flags: dict) -> list:
    out = []
    for flag, value in flags.items():
        if value is None:
            out.append(flag)
        elif flag.startswith("-"):
            out.append(f"{flag}={value}")
        else:
            out.append(value)
    return out


#: Absurd counts: never valid for any count or size (a valid but huge run would be a hang, not a finding).
HUGE = st.sampled_from([10**8 + 1, 2**31, 2**63, 10**30, -(2**63) - 1])


def _int(v):
    try:
        return int(str(v))
    except ValueError:
        return None


def _float(v):
    try:
        return float(str(v))
    except ValueError:
        return None


def bad_count(v, hi: int) -> bool:
    """Not an integer in [1, hi]."""
    i = _int(v)
    return i is None or not 1 <= i <= hi


def bad_seed(v) -> bool:
    i = _int(v)
    return i is None or not 0 <= i <= 2**63 - 1


def bad_output_file(m, flags: dict, flag: str = "-o") -> bool:
    """An output file path that is empty, a directory, under a regular file, or exists without --overwrite."""
    if flag not in flags:
        return False
    p = str(flags[flag])
    root = m["root"]
    if p.strip() == "" or p == str(root / "a_dir") or p.startswith(str(root / "plain.txt") + "/"):
        return True
    return "--overwrite" not in flags and Path(p).exists()


def bad_output_dir(m, flags: dict, flag: str = "-o") -> bool:
    p = str(flags.get(flag, "x"))
    root = m["root"]
    return p.strip() == "" or p.startswith(str(root / "plain.txt")) or p == str(root / "existing.h5")


def good_events(m, v) -> bool:
    return str(v) in (str(m["ev"]), str(m["ev2"]))


@pytest.mark.timeout(600 * FUZZ_SCALE)
@fuzz_settings(70)
@given(data=st.data())
def test_fuzz_events_arguments(more, no_pythia, data):
    m = more
    step = data.draw(st.sampled_from(["split", "train", "generate", "generate", "evaluate", "bench", "produce"]))
    ints = st.one_of(SMALL_INTS, HUGE, text_value().filter(lambda t: _int(t) is None or abs(_int(t)) > 10**8))
    threads = st.sampled_from([-1, 0, 1, 10**6])
    if step == "split":
        base = {"input": m["ev"], "--fractions": "0.5,0.5", "-o": m["new"](), "--seed": 0}
        pools = {"input": event_inputs(m), "--fractions": st.one_of(text_value(), st.sampled_from(
            ["0.5,nan", "1,1", "-0.5,1.5", "0,1", "1e-300,0.5", "0.5", "inf,0.5", "0.25,0.25"])), "--seed": ints,
            "-o": path_value(m), "--overwrite": None}
        f = mutate_dict(data.draw, base, pools)
        fr = [_float(x) for x in str(f.get("--fractions", "0.75,0.25")).split(",")]
        invalid = (not good_events(m, f.get("input")) or bad_seed(f.get("--seed", 0)) or bad_output_file(m, f)
                   or len(fr) != 1 or None in fr or not all(math.isfinite(x) and x > 0 for x in fr) or sum(fr) > 1)
        invalid = invalid or len(fr) != 1  # one -o: one fraction
        args = as_args(f)
    elif step == "train":
        base = {"--data": m["ev"], "-o": m["new"](""), "--steps": 1, "--batch-size": 8, "-q": None}
        pools = {"--data": event_inputs(m), "-o": path_value(m), "--steps": ints, "--batch-size": ints,
                 "--seed": ints, "--threads": threads, "--resume": None,
                 "--device": st.sampled_from(["cpu", "cuda", "auto", "", "meta"]), "--checkpoint-every": ints}
        f = mutate_dict(data.draw, base, pools, keep=("--steps", "--batch-size"))
        invalid = (not good_events(m, f.get("--data")) or bad_output_dir(m, f) or bad_count(f["--steps"], 10**8)
                   or bad_count(f["--batch-size"], 65536) or bad_seed(f.get("--seed", 0))
                   or bad_count(f.get("--threads", 1), 256) or f.get("--device", "cpu") not in ("cpu", "auto")
                   or bad_count(f.get("--checkpoint-every", 1), 10**8) or "--resume" in f)
        args = as_args(f)
    elif step == "generate":
        base = {"--model": m["eventrun"], "-n": 3, "-o": m["new"]()}
        pools = {"--model": model_dirs(m), "-n": ints, "--conditions-from": event_inputs(m),
                 "--process": st.one_of(text_value(), st.sampled_from(["tth", "ttbb", "tth,tth", "ttH"])),
                 "-o": path_value(m), "--seed": ints, "--threads": threads, "--overwrite": None}
        f = mutate_dict(data.draw, base, pools, keep=("-n",))
        procs = [p.strip() for p in str(f.get("--process", "tth,ttbb")).split(",")]
        invalid = (str(f.get("--model")) != str(m["eventrun"]) or bad_count(f["-n"], 5_000_000)
                   or bad_output_file(m, f) or bad_seed(f.get("--seed", 0)) or bad_count(f.get("--threads", 1), 256)
                   or ("--conditions-from" in f and not good_events(m, f["--conditions-from"]))
                   or ("--conditions-from" not in f and (not set(procs) <= {"tth", "ttbb"}
                                                         or len(set(procs)) != len(procs))))
        args = as_args(f)
    elif step == "evaluate":
        base = {"--reference": m["ev"], "--candidate": m["ev2"], "-o": m["new"](""), "--critic-steps": 2,
                "--critic-batch": 16, "--max-events": 120, "-q": None}
        pools = {"--reference": event_inputs(m), "--candidate": event_inputs(m), "--train-reference": event_inputs(m),
                 "-o": path_value(m), "--critic-steps": ints, "--critic-batch": ints, "--max-events": ints,
                 "--critic-lr": st.one_of(text_value(), st.sampled_from(["nan", "inf", "-1", "0", "1e300"])),
                 "--seed": ints, "--label": text_value(), "--threads": threads}
        f = mutate_dict(data.draw, base, pools, keep=("--critic-steps", "--critic-batch", "--max-events"))
        lr = _float(f.get("--critic-lr", 1e-4))
        invalid = (not good_events(m, f.get("--reference")) or not good_events(m, f.get("--candidate"))
                   or ("--train-reference" in f and not good_events(m, f["--train-reference"]))
                   or bad_output_dir(m, f) or bad_count(f["--critic-steps"], 10**6)
                   or bad_count(f["--critic-batch"], 65536) or bad_count(f["--max-events"], 10**30)
                   or _int(f["--max-events"]) < 40 or lr is None or not 0 < lr <= 1
                   or bad_seed(f.get("--seed", 0)) or bad_count(f.get("--threads", 1), 256))
        args = as_args(f)
    elif step == "bench":
        base = {"--model": m["eventrun"], "--pythia-tries": 1, "--events": 10}
        pools = {"--model": model_dirs(m), "--pythia-tries": ints, "--events": ints, "--json": path_value(m),
                 "--seed": ints, "--threads": threads}
        f = mutate_dict(data.draw, base, pools, keep=("--events", "--pythia-tries"))
        invalid = True  # a valid one reaches the Pythia stub (exit 2): judged by the exit code only
        invalid = None
        args = as_args(f)
    else:
        base = {"--process": "tth", "-n": 2, "-o": m["new"](), "--workers": 1, "-q": None}
        pools = {"--process": st.one_of(text_value(), st.sampled_from(["tth,ttbb", "ttH", "tth,tth"])), "-n": ints,
                 "--seed": ints, "-o": path_value(m), "--workers": st.one_of(SMALL_INTS, HUGE),
                 "--min-btags": ints, "--snapshot": path_value(m)}
        f = mutate_dict(data.draw, base, pools)
        invalid = None  # a valid one reaches the Pythia stub (exit 2)
        args = as_args(f)
    check(f"events {step}", ["events", step, *args], bool(invalid))


# ---- damaged and mislabelled event files ------------------------------------------------------------------------
EVENT_ATTRS = {"kind": ["events", "showers", "", 5, "EVENTS"], "high_level_names": ["[", "[]", "5", json.dumps(["a"]),
                                                                                     json.dumps(list(range(26)))],
               "source": [b"\xff", 3], "detector": ["toy-ecal"]}


def damage_events(draw, src: Path, dst: Path) -> tuple[Path, bool]:
    """A copy of an event file with one or two damages; True when it is surely unusable."""
    shutil.copyfile(src, dst)
    invalid = False
    for _ in range(draw(st.integers(1, 2))):
        op = draw(st.sampled_from(["delete", "reshape", "dtype", "value", "group", "attr", "truncate", "empty",
                                   "process"]))
        if op == "truncate":
            with open(dst, "r+b") as f:
                f.truncate(draw(st.integers(0, dst.stat().st_size - 1)))
            return dst, True
        try:
            h5 = h5py.File(dst, "a")
        except OSError:
            return dst, True
        with h5:
            field = draw(st.sampled_from(["high_level", "process"]))
            n = 240
            if op == "delete" and field in h5:
                del h5[field]
                invalid = True
            elif op in ("reshape", "dtype", "group", "empty") and field in h5:
                del h5[field]
                if op == "reshape":
                    shape = draw(st.sampled_from([(n,), (n, 2), (n + 1, 26), (n, 0), (0, 26), (), (n, 26, 1),
                                                  (n, 25), (n, 27), (3, 26)]))
                    h5.create_dataset(field, data=np.ones(shape))
                    invalid = True
                elif op == "dtype":
                    shape = (n, 26) if field == "high_level" else (n,)
                    dt = draw(st.sampled_from([np.dtype([("a", "f8"), ("b", "f8")]), h5py.string_dtype(),
                                               np.dtype("S4"), np.dtype(bool), np.dtype("c8"), np.dtype("f2")]))
                    h5.create_dataset(field, shape=shape, dtype=dt)
                    invalid = True
                elif op == "group":
                    h5.create_group(field)
                    invalid = True
                else:
                    h5.create_dataset(field, shape=(0, 26) if field == "high_level" else (0,), dtype="f4")
                    invalid = True
            elif op == "value" and "high_level" in h5 and isinstance(h5["high_level"], h5py.Dataset):
                ds = h5["high_level"]
                if ds.ndim == 2 and ds.size and ds.dtype.kind == "f":
                    v = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e30]))
                    with contextlib.suppress(TypeError, ValueError, OverflowError), warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # 1e300 into float32: inf, on purpose
                        ds[draw(st.integers(0, ds.shape[0] - 1)), draw(st.integers(0, ds.shape[1] - 1))] = v
                    invalid = invalid or not math.isfinite(v) or abs(v) > 1e30
            elif op == "process" and "process" in h5 and isinstance(h5["process"], h5py.Dataset):
                ds = h5["process"]
                if ds.ndim == 1 and ds.size:
                    ds[draw(st.integers(0, ds.shape[0] - 1))] = draw(st.sampled_from([2, -1, 7]))
                    invalid = True
            elif op == "attr":
                key = draw(st.sampled_from(sorted(EVENT_ATTRS)))
                h5.attrs[key] = draw(st.sampled_from(EVENT_ATTRS[key]))
                invalid = invalid or (key == "kind" and h5.attrs[key] != "events") or (
                    key == "high_level_names" and h5.attrs[key] != json.dumps(list(range(26))))
    return dst, invalid


@pytest.mark.timeout(600 * FUZZ_SCALE)
@fuzz_settings(60)
@given(data=st.data())
def test_fuzz_damaged_event_files(more, no_pythia, data):
    m = more
    bad, invalid = damage_events(data.draw, m["ev"], m["new"]())
    command = data.draw(st.sampled_from(["split", "train", "generate", "events evaluate", "evaluate",
                                         "evaluate-candidate", "info"]))
    if command == "split":
        args = ["events", "split", bad, "-o", m["new"](), "--fractions", "0.5"]
    elif command == "train":
        args = ["events", "train", "--data", bad, "-o", m["new"](""), "--steps", "1", "--batch-size", "8", "-q"]
    elif command == "generate":
        args = ["events", "generate", "--model", m["eventrun"], "--conditions-from", bad, "-o", m["new"]()]
    elif command == "events evaluate":
        args = ["events", "evaluate", "--reference", m["ev"], "--candidate", bad, "-o", m["new"](""),
                "--critic-steps", "1", "--critic-batch", "8", "-q"]
    elif command == "evaluate" and invalid:
        args = ["evaluate", "--reference", bad, "--candidate", m["ev2"], "-o", m["new"](""), "-q"]
    elif command == "evaluate-candidate" and invalid:  # refused before the critic's 3000 steps
        args = ["evaluate", "--reference", m["ev"], "--candidate", bad, "-o", m["new"](""), "-q"]
    else:  # a usable file: the events evaluate command with a short critic
        args = ["events", "evaluate", "--reference", bad, "--candidate", m["ev2"], "-o", m["new"](""),
                "--critic-steps", "1", "--critic-batch", "8", "-q"]
    if command == "info":
        args = ["info", bad]
        invalid = False  # info describes what it can
    check(f"damaged event file -> {command}", args, invalid)


@pytest.mark.timeout(600 * FUZZ_SCALE)
@fuzz_settings(40)
@given(data=st.data())
def test_fuzz_mislabelled_files(more, no_pythia, data):
    """Event files given to the shower commands, shower files to the event commands: always refused."""
    m = more
    ev, shower = data.draw(st.sampled_from([m["ev"], m["ev2"]])), data.draw(st.sampled_from([m["data"], m["cc"]]))
    cases = {
        "generate": ["generate", "--model", m["model"], "--conditions-from", ev, "-o", m["new"](), "-q"],
        "train": ["train", "--data", ev, "--model", "layerflow", "-o", m["new"](""), "--max-steps", "1", "-q"],
        "convert": ["convert", ev, m["new"](), "--to", "calochallenge"],
        "convert-back": ["convert", ev, m["new"](), "--to", "caloforge", "--detector", m["det"]],
        "evaluate": ["evaluate", "--reference", shower, "--candidate", ev, "-o", m["new"](""), "-q"],
        "evaluate-events": ["evaluate", "--reference", ev, "--candidate", shower, "-o", m["new"](""), "-q"],
        "digitize": ["digitize", ev, "-o", m["new"](), "-q"],
        "refine apply": ["refine", "apply", m["refiner"], ev, "-o", m["new"](), "-q"],
        "refine train": ["refine", "train", ev, shower, "-o", m["new"](""), "-q", "--steps", "1"],
        "tune": ["tune", "--data", ev, "--model", "layerflow", "--space", m["space"], "-o", m["new"](""), "-q"],
        "events split": ["events", "split", shower, "-o", m["new"](), "--fractions", "1"],
        "events train": ["events", "train", "--data", shower, "-o", m["new"](""), "--steps", "1", "-q"],
        "events generate": ["events", "generate", "--model", m["eventrun"], "--conditions-from", shower, "-o",
                            m["new"]()],
        "events evaluate": ["events", "evaluate", "--reference", shower, "--candidate", ev, "-o", m["new"](""),
                            "--critic-steps", "1", "-q"],
    }
    name = data.draw(st.sampled_from(sorted(cases)))
    check(f"mislabelled file -> {name}", cases[name], invalid=True)


# ---- model directories of the wrong kind, damaged refiners and event runs -------------------------------------
def damage_run(draw, src: Path, dst: Path, meta_name: str, weights_name: str) -> tuple[Path, bool]:
    shutil.copytree(src, dst)
    meta_path, weights = dst / meta_name, dst / weights_name
    meta = json.loads(meta_path.read_text())
    op = draw(st.sampled_from(["config", "config", "config", "meta", "bad_json", "truncate", "poison", "drop_tensor",
                               "reshape_tensor", "delete_file"]))
    nasty = [None, {}, [], "", "false", True, -1, 0, 10**9, 1e300, math.nan, "8", 2.5]
    invalid = True
    if op == "config":
        key = draw(st.sampled_from(sorted(meta["config"])))
        value = draw(st.sampled_from(nasty))
        # wrong types, NaN and 1e300 fit no option; the numbers may fit some (bounds differ per option)
        invalid = value is None or isinstance(value, dict | list | str | bool) or value != value or value == 1e300
        meta["config"][key] = value
    elif op == "meta":
        key = draw(st.sampled_from(sorted(meta)))
        meta[key] = draw(st.sampled_from(nasty))
        invalid = key not in ("caloforge_version", "condition", "processes", "summary", "training")
    meta_path.write_text(json.dumps(meta))
    if op == "bad_json":
        meta_path.write_text(draw(st.sampled_from(["", "{", "[]", "null", "\x00\xff"])))
    elif op == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(draw(st.integers(0, weights.stat().st_size - 1)))
    elif op in ("poison", "drop_tensor", "reshape_tensor"):
        state = load_file(weights)
        name = draw(st.sampled_from(sorted(state)))
        if op == "poison" and state[name].is_floating_point() and state[name].numel():
            state[name].view(-1)[0] = draw(st.sampled_from([math.nan, math.inf]))
        elif op == "drop_tensor":
            del state[name]
        elif op == "reshape_tensor":
            state[name] = torch.zeros(3, 5)
        else:
            invalid = False
        save_file(state, weights)
    elif op == "delete_file":
        draw(st.sampled_from([meta_path, weights])).unlink()
    return dst, invalid


@pytest.mark.timeout(600 * FUZZ_SCALE)
@fuzz_settings(50)
@given(data=st.data())
def test_fuzz_model_directories_of_the_wrong_kind(more, data):
    m = more
    kind = data.draw(st.sampled_from(["right", "wrong"]))
    if kind == "wrong":
        cases = {
            "generate <- event run": ["generate", "--model", m["eventrun"], "-n", "2", "-o", m["new"](), "-q"],
            "generate <- refiner": ["generate", "--model", m["refiner"], "-n", "2", "-o", m["new"](), "-q"],
            "bench <- event run": ["bench", "--model", m["eventrun"], "--no-geant4", "--batch-sizes", "1",
                                   "--energies", "50", "--repeats", "1", "--max-seconds", "0.1"],
            "export <- refiner": ["export", "--model", m["refiner"], "-o", m["new"](".onnx"), "--no-check"],
            "refine apply <- shower model": ["refine", "apply", m["model"], m["data"], "-o", m["new"](), "-q"],
            "refine apply <- event run": ["refine", "apply", m["eventrun"], m["data"], "-o", m["new"](), "-q"],
            "events generate <- shower model": ["events", "generate", "--model", m["model"], "-n", "2", "-o",
                                                m["new"]()],
            "events generate <- refiner": ["events", "generate", "--model", m["refiner"], "-n", "2", "-o",
                                           m["new"]()],
            "events bench <- shower model": ["events", "bench", "--model", m["model"], "--events", "10",
                                             "--pythia-tries", "1"],
            "simulate --fastsim <- event run": ["simulate", "-n", "2", "--energy", "50", "--fastsim",
                                                m["eventrun"], "-o", m["new"](), "-q"],
            "simulate --fastsim <- refiner": ["simulate", "-n", "2", "--energy", "50", "--fastsim", m["refiner"],
                                              "-o", m["new"](), "-q"],
        }
        name = data.draw(st.sampled_from(sorted(cases)))
        check(name, cases[name], invalid=True)
        return
    which = data.draw(st.sampled_from(["refiner", "eventrun"]))
    if which == "refiner":
        bad, invalid = damage_run(data.draw, m["refiner"], m["new"](""), "refiner.json", "refiner.safetensors")
        args = ["refine", "apply", bad, m["data"], "-o", m["new"](), "-q"]
    else:
        bad, invalid = damage_run(data.draw, m["eventrun"], m["new"](""), "model.json", "model.safetensors")
        args = ["events", "generate", "--model", bad, "-n", "2", "-o", m["new"]()]
    check(f"damaged {which}", args, invalid)


# ---- refine --------------------------------------------------------------------------------------------------
REFINE_SETS = ["hidden=0", "hidden=1000000000", "steps=-1", "lr=nan", "lr=\"1e-3\"", "batch_size=0",
               "ema_decay=1", "threads=-1", "nope=1", "blocks=true", "x", "threshold_mev=inf", "match_window=1e300",
               "seed=-1", "checkpoint_every=0", "hidden=4"]


@pytest.mark.timeout(600 * FUZZ_SCALE)
@fuzz_settings(40)
@given(data=st.data())
def test_fuzz_refine_arguments(more, data):
    m = more
    ints = st.one_of(SMALL_INTS, HUGE, text_value().filter(lambda t: _int(t) is None or abs(_int(t)) > 10**8))
    if data.draw(st.booleans()):
        base = {"action": "train", "sim": m["data"], "data": m["data"], "-o": m["new"](""), "--steps": 1, "-q": None}
        pools = {"sim": st.one_of(event_inputs(m), st.just(m["data"])), "data": event_inputs(m),
                 "-o": path_value(m), "--steps": ints, "--closeness": text_value(), "--max-showers": ints,
                 "--seed": ints, "--resume": None, "--set": st.sampled_from(REFINE_SETS)}
        f = mutate_dict(data.draw, base, pools, keep=("--steps", "sim", "data"))
        closeness = _float(f.get("--closeness", 1.0))
        invalid = (str(f["sim"]) != str(m["data"]) or str(f["data"]) != str(m["data"]) or bad_output_dir(m, f)
                   or bad_count(f["--steps"], 10**7) or closeness is None or not 0 <= closeness <= 1e4
                   or ("--max-showers" in f and bad_count(f["--max-showers"], 10**30))
                   or _int(f.get("--max-showers", 2)) in (None, 1) or bad_seed(f.get("--seed", 0))
                   or "--resume" in f or f.get("--set", "hidden=4") != "hidden=4")
        args = as_args({k: v for k, v in f.items() if k != "action"})
        args = ["train", "--set=hidden=4", "--set=critic_channels=4", "--set=critic_hidden=8", "--set=batch_size=8",
                *args]  # the fuzzed --set comes last: it wins
    else:
        base = {"run": m["refiner"], "input": m["data"], "-o": m["new"](), "-q": None}
        pools = {"run": model_dirs(m), "input": st.one_of(event_inputs(m), st.just(m["data"])), "-o": path_value(m),
                 "--seed": ints, "--overwrite": None}
        f = mutate_dict(data.draw, base, pools, keep=("run", "input"))
        invalid = (str(f["run"]) != str(m["refiner"]) or str(f["input"]) != str(m["data"])
                   or bad_output_file(m, f) or bad_seed(f.get("--seed", 0)))
        args = ["apply", *as_args(f)]
    check(f"refine {args[0]}", ["refine", *args], bool(invalid))


# ---- detector files ------------------------------------------------------------------------------------------
DET_NASTY = [math.nan, math.inf, -math.inf, -1.0, 0.0, -0.0, 1e300, 1e-300, 1e7 + 1, "x", "5", True, None, [], {},
             [1.0, 2.0], 2.5, 10**6, 10**12, "G4_Unobtainium", ""]


def _paths(obj, prefix=()):
    """Every (path, value) of a nested description."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,), v
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list) and len(obj) <= 4:  # long lists (hexagon centres) are edited as a whole
        for i, v in enumerate(obj):
            yield prefix + (i,), v
            yield from _paths(v, prefix + (i,))


def _set(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    if value is _DROP:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


_DROP = object()
#: Edits that no detector can take: (description of the edit, fields it applies to, value)
SURELY_BAD = {"absorber_mm": [math.nan, math.inf, -1.0, "x", None, []], "active_mm": [math.nan, 0.0, -1.0, "x", None],
              "pitch_mm": [0.0, -1.0, math.nan, math.inf, "x"], "n_phi": [0, -1, 2.5, "x", 10**6],
              "n_x": [0, -1, 2.5, "x", 10**6], "n_y": [0, -1, 2.5, "x", 10**6], "cell_size_mm": [0.0, -1.0, math.nan],
              "size_x_mm": [0.0, -1.0, math.nan, math.inf], "size_y_mm": [0.0, -1.0, math.nan],
              "count": [0, -1, 10**6, 2.5, "x", 1001], "samplings": [0, -1, 2.5, 10**6],
              "absorber": ["G4_Unobtainium", "", 5], "active": ["G4_Unobtainium", "", 5],
              "world_material": ["G4_Unobtainium", ""], "kind": ["nope", "", None],
              "orientation": ["sideways", ""], "cell_x_mm": [0.0, -1.0, math.nan], "cell_y_mm": [0.0, -1.0],
              "r_edges_mm": [[], [5.0], [-1.0, 2.0], [2.0, 1.0], [0.0, math.nan], "x"],
              "centres_mm": [[], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 0.0]], "x", [[0.0]]],
              "production_cut_mm": [math.nan, -1.0, math.inf], "layers": [[], "x", {}]}


def detector_file(draw, m, path_stem: Path) -> tuple[Path, bool]:
    """A built-in or toy description with one edit (or a thousand layers, or a typo'd field), as JSON or YAML."""
    name = draw(st.sampled_from(sorted(m["dets"])))
    d = copy.deepcopy(m["dets"][name])
    op = draw(st.sampled_from(["edit", "edit", "edit", "surely_bad", "surely_bad", "drop", "extra", "layers"]))
    invalid = False
    paths = [p for p, _ in _paths(d)]
    if op == "edit":
        _set(d, draw(st.sampled_from(paths)), draw(st.sampled_from(DET_NASTY)))
    elif op == "surely_bad":
        cands = [p for p in paths if isinstance(p[-1], str) and p[-1] in SURELY_BAD]
        path = draw(st.sampled_from(cands))
        _set(d, path, draw(st.sampled_from(SURELY_BAD[path[-1]])))
        invalid = True
    elif op == "drop":
        path = draw(st.sampled_from([p for p in paths if isinstance(p[-1], str)]))
        _set(d, path, _DROP)
        invalid = path[-1] in ("name", "layers", "absorber", "absorber_mm", "active", "active_mm", "size_x_mm",
                               "size_y_mm", "cells", "kind", "pitch_mm", "r_edges_mm", "n_phi", "n_x", "n_y",
                               "cell_size_mm", "readout", "x_min_mm", "y_min_mm", "cell_x_mm", "cell_y_mm")
    elif op == "extra":  # a typo'd field name is an error, not a silent default
        path = draw(st.sampled_from([p for p in paths if isinstance(p[-1], str)]))
        _set(d, path[:-1] + (path[-1] + "s",), 1.0)
        invalid = True
    else:
        d["layers"] = [dict(d["layers"][0], count=draw(st.sampled_from([1001, 10**6, 999])))]
        invalid = d["layers"][0]["count"] > 1000
    fmt = draw(st.sampled_from(["json", "yaml"]))
    path = path_stem.with_suffix("." + fmt)
    with contextlib.suppress(Exception):
        path.write_text(json.dumps(d) if fmt == "json" else yaml.safe_dump(d))
        return path, invalid
    path.write_text(json.dumps(d, default=str))
    return path, invalid


@pytest.mark.timeout(600 * FUZZ_SCALE)
@fuzz_settings(90)
@given(data=st.data())
def test_fuzz_detector_files(more, data):
    m = more
    det, invalid = detector_file(data.draw, m, m["new"](""))
    command = data.draw(st.sampled_from(["describe", "json", "binning", "simulate", "convert"]))
    if command == "describe":
        args = ["detectors", det]
    elif command == "json":
        args = ["detectors", det, "--json"]
    elif command == "binning":
        particle = data.draw(st.one_of(st.sampled_from(["electron", "photon", "pion"]), text_value()))
        args = ["detectors", det, "--binning-xml", data.draw(path_value(m)), f"--particle={particle}"]
        invalid = invalid or particle not in ("electron", "photon", "pion")
    elif command == "simulate":
        args = ["simulate", "--detector", det, "-n", "2", "--energy", "50", "-o", m["new"](), "-q"]
    else:
        args = ["convert", m["cc"], m["new"](), "--to", "caloforge", "--detector", det]
    check(f"detector file -> {command}", args, invalid)


# ---- Dask and torchrun options -------------------------------------------------------------------------------
@pytest.mark.timeout(600 * FUZZ_SCALE)
@fuzz_settings(30)
@given(data=st.data())
def test_fuzz_dask_options(more, data):
    m = more
    root = m["mroot"]
    cfgs = {"slurm.toml": "cores = -1\n", "bad.toml": "cores = [", "list.yaml": "- 1\n- 2\n",
            "unknown.yaml": "coress: 4\nmemory: 4GB\n", "ok.yaml": "cores: 1\nmemory: 1GB\n", "x.txt": "cores: 1\n",
            "nan.yaml": "cores: .nan\nmemory: 1GB\n"}
    for name, text in cfgs.items():
        (root / name).write_text(text)
    base = {"-n": 2, "--energy": "50", "--backend": "dask", "--workers": 1, "-o": m["new"](), "-q": None}
    pools = {"--backend": st.sampled_from(["dask", "pool", "mpi", ""]),
             "--scheduler": st.sampled_from(["", "nope", "tcp://", "tcp://127.0.0.1:0", "tcp://[::1", "\x00",
                                             "inproc://x"]),
             "--cluster": st.sampled_from(["slurm", "htcondor", "pbs", ""]),
             "--cluster-config": st.sampled_from([root / n for n in cfgs] + [root / "missing.toml",
                                                                             m["root"] / "a_dir"]),
             "--retries": st.one_of(SMALL_INTS, BIG_INTS, text_value()),
             "--workers": st.one_of(SMALL_INTS, BIG_INTS)}
    f = mutate_dict(data.draw, base, pools)
    backend = f.get("--backend", "dask" if "--scheduler" in f or "--cluster" in f else "pool")
    dask_only = [k for k in ("--scheduler", "--cluster", "--cluster-config") if k in f]
    config = Path(str(f.get("--cluster-config", root / "ok.yaml"))).name
    invalid = (backend not in ("pool", "dask") or (backend == "pool" and dask_only)
               or ("--scheduler" in f and ("--cluster" in f or f["--scheduler"] in ("", "tcp://", "tcp://[::1", "\x00",
                                                                                    "tcp://127.0.0.1:0")))
               or f.get("--cluster", "slurm") not in ("slurm", "htcondor")
               or ("--cluster-config" in f and ("--cluster" not in f or config != "ok.yaml"))
               or ("--cluster" in f and "--workers" not in f)
               or bad_count(f.get("--workers", 1), 4096) or _int(f.get("--retries", 3)) is None
               or not 0 <= _int(f.get("--retries", 3)) <= 100)
    check("simulate --backend dask", ["simulate", *as_args(f)], bool(invalid))


@pytest.mark.timeout(600 * FUZZ_SCALE)
@fuzz_settings(15)
@given(data=st.data())
def test_fuzz_torchrun_environment(more, data):
    m = more
    env = {"WORLD_SIZE": data.draw(st.sampled_from(["", "x", "-1", "0", "1", "2", "1e3", "99999999999999999999"])),
           "RANK": data.draw(st.sampled_from(["", "x", "-1", "5", None])),  # never a rank that would wait for peers
           "LOCAL_RANK": data.draw(st.sampled_from(["x", "-1", "0", None])),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            if v is None:
                mp.delenv(k, raising=False)
            else:
                mp.setenv(k, v)
        world_ok = env["WORLD_SIZE"] in ("0", "1")
        args = ["train", "--data", m["data"], "--model", "layerflow", "-o", m["new"](""), "--max-steps", "1", "-q",
                "--set", "model.flow_blocks=1", "--set", "model.flow_hidden=4", "--set", "train.val_every=0",
                "--set", "train.batch_size=8"]
        check("train under torchrun", args, invalid=not world_ok)
