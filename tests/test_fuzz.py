"""Seeded fuzzing of the command line (issue 13): every input gives exit 0 or a clear error (exit 2), never an
internal error (exit 3), a traceback or a hang.

Valid inputs are mutated at random (Hypothesis, derandomised: the same cases on every run): command-line values of
generate, bench, simulate, convert, info and export; damaged HDF5 files (shapes, dtypes, NaN, missing fields, bad
attributes, truncation); damaged model directories (edited model.json values, truncated or poisoned safetensors).
Each case runs in-process through ``caloforge.cli.main`` under a CPU and wall-clock budget. No Geant4 runs: simulate
cases stop where Geant4 would start, and bench's Geant4 timing is replaced by a stub.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from caloforge.calochallenge import to_calochallenge
from caloforge.cli import main
from caloforge.models import save_model
from conftest_models import tiny_model, toy_detector, toy_showers, write_toy_file

# Per case: CPU seconds (a busy loop) and wall seconds (a blocked one); the slowest valid case, a one-step training
# run, takes about a second of CPU. Wall time alone would misfire on a machine shared with Geant4 jobs.
BUDGET_CPU_S = 15.0
BUDGET_WALL_S = 180.0


#: A release run scales every case count: CALOFORGE_FUZZ_SCALE=3 python -m pytest tests/test_fuzz.py (1350 cases).
FUZZ_SCALE = max(1, int(os.environ.get("CALOFORGE_FUZZ_SCALE", "1")))


def fuzz_settings(n: int) -> settings:
    return settings(max_examples=n * FUZZ_SCALE, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=list(HealthCheck))


# ---- the world the cases run in ---------------------------------------------------------------------------------
class _ReachedGeant4(ValueError):
    """Raised where ``caloforge simulate`` would start Geant4 (a ValueError: the command exits 2)."""


XML = "<Bins><Particle name='photon'>" + "".join(
    f"<Layer id='{i}' r_edges='0,2,4,6,8,10,12,14,16,18' n_bin_alpha='4'/>" for i in range(4)) + "</Particle></Bins>"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Valid inputs (a shower file, a model, a detector file, a CaloChallenge file and binning) and bad paths."""
    root = tmp_path_factory.mktemp("fuzz")
    torch.set_num_threads(1)
    det = toy_detector()
    data = root / "toy.h5"
    write_toy_file(data, det, 30, seed=1)
    model = tiny_model("layerflow", det, toy_showers(det, 40, seed=2))
    model.meta["particle"] = "gamma"
    model_dir = save_model(model, root / "model")
    (root / "toy-ecal.json").write_text(json.dumps(det.to_dict()))
    cc = root / "cc.h5"
    to_calochallenge(data, cc)
    (root / "binning.xml").write_text(XML)
    (root / "plain.txt").write_text("not a shower file")
    (root / "a_dir").mkdir()
    (root / "out").mkdir()  # the cases' outputs (commands create their own parents; the damaged copies need it)
    (root / "garbage.toml").write_text("name = [")
    (root / "garbage.json").write_bytes(b"\x00\xff\xfe")
    (root / "garbage.xml").write_text("<Bins><Particle")
    (root / "existing.h5").write_bytes(data.read_bytes())
    counter = itertools.count()
    mp = pytest.MonkeyPatch()
    import caloforge.simulate

    def no_geant4(*args, **kwargs):
        raise _ReachedGeant4("stopped where Geant4 would start")

    mp.setattr(caloforge.simulate, "_prepare_chunk_dir", no_geant4)
    mp.setattr(caloforge.simulate, "time_geant4", lambda *a, **k: 1.0)
    import caloforge.report

    mp.setattr(caloforge.report, "render_html", lambda *a, **k: None)  # plots: seconds per case, no input checks
    yield {"root": root, "data": data, "model": model_dir, "det": root / "toy-ecal.json", "cc": cc,
           "xml": root / "binning.xml", "new": lambda suffix=".h5": root / "out" / f"case{next(counter)}{suffix}"}
    mp.undo()


class _Watchdog(threading.Thread):
    """Interrupts the main thread (KeyboardInterrupt: ``main`` returns 130) once a case exceeds its budget."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.done = threading.Event()

    def run(self) -> None:
        cpu0, wall0 = time.process_time(), time.monotonic()
        while not self.done.wait(0.05):
            if time.process_time() - cpu0 > BUDGET_CPU_S or time.monotonic() - wall0 > BUDGET_WALL_S:
                # a real SIGINT: it also ends a blocking call (interrupt_main alone would wait for it)
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return


def run_case(args: list) -> tuple[int, str]:
    """Run one command in-process; fail on anything but exit 0 or a clear error (exit 2)."""
    args = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    timer = _Watchdog()
    timer.start()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                code = main(args)
            except SystemExit as exc:  # argparse: exit 2 on a bad option, 0 for --help
                code = exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
        code = "a hang"
    finally:
        timer.done.set()
        torch.set_num_threads(threads)
    text = err.getvalue()
    if code == 130:
        code = "a hang"
    assert code in (0, 2), f"caloforge {' '.join(map(repr, args))} gave {code}:\n{text[-3000:]}"
    assert "Traceback" not in text and "internal error" not in text, text[-3000:]
    if code == 2:
        assert "error" in text, text[-3000:]
    return code, text


# ---- value pools ----------------------------------------------------------------------------------------------
NASTY = ["", " ", "-1", "0", "1", "2", "1e30", "1e308", "-1e308", "1e-320", "nan", "-nan", "inf", "-inf", "abc",
         "1:2:3", "log:0:1", "log:-1:5", "10:1", "5:5", ",", ";", ",,", "1,,2", "0,0", "0,0;", "cell", "gamma",
         "e-,gamma", "muon", "99999999999999999999999", "0x10", "1_000", "\u2603", "--quiet", "-", "\x00", "9" * 400]
SMALL_INTS = st.integers(-3, 40)
BIG_INTS = st.sampled_from([10**6 + 1, 10**8 + 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30])


def text_value():
    """A command-line value: a nasty string, a number in text, or any short text."""
    return st.one_of(st.sampled_from(NASTY), SMALL_INTS.map(str), BIG_INTS.map(str),
                     st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=12))


def path_value(world, kind: str = "file"):
    """An output path: a fresh one, an existing file, a directory, a path under a regular file, empty."""
    root = world["root"]
    fixed = [root / "a_dir", root / "plain.txt" / "x.h5", root / "plain.txt", "", root / "existing.h5",
             root / "missing" / "deep" / "x.h5"]
    return st.one_of(st.just(None), st.sampled_from(fixed)).map(lambda p: world["new"](".onnx" if kind == "onnx" else
                                                                                        ".h5") if p is None else p)


def input_value(world):
    root = world["root"]
    return st.sampled_from([world["data"], world["cc"], root / "plain.txt", root / "a_dir", root / "nope.h5", "",
                            root / "garbage.json", world["model"] / "model.safetensors"])


def mutate(draw, base: dict, pools: dict, k_max: int = 3, keep: tuple = ()) -> list:
    """``base`` (flag -> value; None: a bare switch) with 1..k_max flags changed, dropped (except ``keep``: flags
    whose default means slow valid work, such as the shipped model) or added."""
    args = dict(base)
    for flag in draw(st.lists(st.sampled_from(sorted(pools)), min_size=1, max_size=k_max, unique=True)):
        choice = draw(st.integers(0, 9))
        if choice == 0 and flag not in keep:
            args.pop(flag, None)
        elif pools[flag] is None:
            args[flag] = None
        else:
            args[flag] = draw(pools[flag])
    out = []
    for flag, value in args.items():
        if value is None:
            out.append(flag)
        elif flag.startswith("-"):
            out.append(f"{flag}={value}")  # '=': a value that starts with '-' stays a value
        else:
            out.append(value)
    return out


# ---- command-line values ----------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
@fuzz_settings(70)
@given(data=st.data())
def test_fuzz_generate_arguments(world, data):
    base = {"--model": world["model"], "-n": 3, "--energy": "10:100", "--angle": "0", "--position": "0,0",
            "--batch-size": 2, "--seed": 0, "-o": world["new"](), "--device": "cpu", "-q": None}
    pools = {"--model": st.one_of(input_value(world), st.just(world["model"])),
             "-n": st.one_of(SMALL_INTS, BIG_INTS, st.sampled_from(["x", "1.5", ""])),
             "--energy": text_value(), "--angle": text_value(), "--position": text_value(),
             "--particle": text_value(), "--batch-size": st.one_of(SMALL_INTS, BIG_INTS, text_value()),
             "--seed": st.one_of(SMALL_INTS, BIG_INTS, text_value()), "--threads": st.sampled_from([-1, 0, 1, 10**6]),
             "--device": st.sampled_from(["cpu", "auto", "cuda", "gpu", ""]), "-o": path_value(world),
             "--conditions-from": input_value(world), "--overwrite": None}
    run_case(["generate", *mutate(data.draw, base, pools, keep=("--model",))])


@pytest.mark.timeout(300)
@fuzz_settings(45)
@given(data=st.data())
def test_fuzz_bench_arguments(world, data):
    base = {"--model": world["model"], "--no-geant4": None, "--batch-sizes": "1,2", "--energies": "20",
            "--repeats": 1, "--max-seconds": 0.2, "--angle": 0, "--geant4-showers": 1}
    pools = {"--model": input_value(world), "--batch-sizes": st.one_of(text_value(), st.just("100001")),
             "--energies": text_value(), "--angle": text_value(), "--repeats": st.sampled_from(["-1", "0", "2", "1e3",
                                                                                               "10000000", "x"]),
             "--max-seconds": st.sampled_from(["0", "-1", "nan", "inf", "1e7", "0.01", "x"]),
             "--threads": st.sampled_from([-1, 0, 1, 10**6]), "--geant4-showers": st.one_of(SMALL_INTS, BIG_INTS),
             "--particle": text_value(), "--json": path_value(world), "--device": st.sampled_from(["cpu", "cuda", ""]),
             "--no-geant4": None}
    run_case(["bench", *mutate(data.draw, base, pools, keep=("--model", "--batch-sizes"))])


@pytest.mark.timeout(300)
@fuzz_settings(70)
@given(data=st.data())
def test_fuzz_simulate_arguments(world, data):
    root = world["root"]
    base = {"-n": 2, "--energy": "50", "--angle": "0", "--seed": 1, "--workers": 1, "--chunk-size": 5,
            "-o": world["new"](), "-q": None}
    pools = {"-n": st.one_of(SMALL_INTS, BIG_INTS, text_value()), "--energy": text_value(), "--angle": text_value(),
             "--position": text_value(), "--particle": text_value(), "--workers": st.one_of(SMALL_INTS, BIG_INTS),
             "--chunk-size": st.one_of(SMALL_INTS, BIG_INTS), "--seed": st.one_of(SMALL_INTS, BIG_INTS),
             "--detector": st.sampled_from(["ild-ecal", "nope", "", root / "a_dir", root / "garbage.toml",
                                            root / "garbage.json", world["det"], root / "plain.txt",
                                            root / "missing.yaml"]),
             "--physics": st.sampled_from(["auto", "standard", "data-free", "best"]), "-o": path_value(world),
             "--snapshot": path_value(world), "--overwrite": None}
    run_case(["simulate", *mutate(data.draw, base, pools)])


@pytest.mark.timeout(300)
@fuzz_settings(30)
@given(data=st.data())
def test_fuzz_simulate_fastsim_arguments(world, data):
    root = world["root"]
    base = {"-n": 2, "--energy": "50", "--position": "cell", "--fastsim": "multi", "--seed": 1, "--workers": 1,
            "-o": world["new"](), "-q": None}
    pools = {"--fastsim": st.sampled_from(["multi", "default", "nope", "", world["model"], root / "a_dir",
                                           root / "plain.txt", root / "missing"]),
             "--fastsim-threshold": text_value(), "--multiplicity": st.one_of(SMALL_INTS, BIG_INTS, text_value()),
             "--energy": text_value(), "--angle": text_value(), "--position": text_value(),
             "--particle": text_value()}
    run_case(["simulate", *mutate(data.draw, base, pools)])


@pytest.mark.timeout(300)
@fuzz_settings(40)
@given(data=st.data())
def test_fuzz_digitize_arguments(world, data):
    root = world["root"]
    base = {"input": world["data"], "-o": world["new"](), "--seed": 1, "-q": None}
    pools = {"input": input_value(world), "-o": path_value(world), "--noise-mev": text_value(),
             "--threshold-mev": text_value(), "--dead-fraction": text_value(), "--calibration": text_value(),
             "--seed": st.one_of(SMALL_INTS, BIG_INTS, text_value()),
             "--config": st.sampled_from([root / "garbage.toml", root / "plain.txt", root / "a_dir",
                                          root / "missing.toml", world["data"]]), "--overwrite": None}
    run_case(["digitize", *mutate(data.draw, base, pools)])


@pytest.mark.timeout(300)
@fuzz_settings(55)
@given(data=st.data())
def test_fuzz_convert_arguments(world, data):
    root = world["root"]
    to = data.draw(st.sampled_from(["calochallenge", "caloforge"]))
    base = {"input": world["data"] if to == "calochallenge" else world["cc"], "output": world["new"](), "--to": to}
    if to == "caloforge":
        key = data.draw(st.sampled_from(["--binning", "--detector"]))
        base[key] = world["xml"] if key == "--binning" else world["det"]
    pools = {"input": input_value(world), "output": path_value(world),
             "--to": st.sampled_from(["calochallenge", "caloforge", "onnx", ""]),
             "--binning": st.sampled_from([world["xml"], root / "garbage.xml", root / "a_dir", root / "nope.xml",
                                           root / "garbage.json", world["data"]]),
             "--particle": text_value(),
             "--detector": st.sampled_from([world["det"], "ild-ecal", "nope", root / "a_dir", root / "garbage.toml"]),
             "--max-showers": st.one_of(SMALL_INTS, BIG_INTS, text_value()),
             "--showers-dtype": st.sampled_from(["float32", "float64", "int8"]), "--overwrite": None}
    run_case(["convert", *mutate(data.draw, base, pools)])


@pytest.mark.timeout(300)
@fuzz_settings(25)
@given(data=st.data())
def test_fuzz_info_arguments(world, data):
    files = data.draw(st.lists(st.one_of(input_value(world), text_value()), min_size=0, max_size=3))
    run_case(["info", *files])


@pytest.mark.timeout(300)
@fuzz_settings(25)
@given(data=st.data())
def test_fuzz_export_arguments(world, data):
    base = {"--model": world["model"], "-o": world["new"](".onnx"), "--no-check": None}
    pools = {"--model": input_value(world), "-o": path_value(world, "onnx"),
             "--opset": st.sampled_from(["-1", "0", "9", "13", "14", "17", "20", "21", "1000000000", "x", ""]),
             "--window": st.sampled_from(["auto", "normal", "angled", "tilted"]), "--overwrite": None}
    run_case(["export", *mutate(data.draw, base, pools, k_max=2, keep=("--model",))])


# ---- damaged shower files -----------------------------------------------------------------------------------
FIELDS = ["incident_energies", "showers", "incident_angles", "incident_positions", "incident_particles"]
BAD_DTYPES = [np.dtype([("a", "f8"), ("b", "f8")]), h5py.string_dtype(), np.dtype("S4"), np.dtype(bool),
              np.dtype("c8"), np.dtype("i8"), np.dtype("f2"), np.dtype("u1"), np.dtype("f8")]
BAD_VALUES = [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e300, 1e161, 1e-300, 2**40, 22, 11, -11]
BAD_ATTRS = {
    "detector": ["ild-ecal", "nope", "", 5, "/etc"],
    "detector_json": ["{", "[]", "5", "null", json.dumps({"name": "x"}), 5, ""],
    "shape": [[1, 2, 3], [4, 6, 6, 1], "abc", 144, [0], [-144]],
    "complete": [False, "no", 2, np.array([1, 0])],
    "particle": ["muon", "", 22, "electron", "e+"],
    "source": [b"\xff", 3],
}


def damage_file(draw, src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    n_ops = draw(st.integers(1, 2))
    for _ in range(n_ops):
        op = draw(st.sampled_from(["delete", "reshape", "dtype", "value", "group", "attr", "del_attr", "truncate",
                                   "empty"]))
        if op == "truncate":
            size = dst.stat().st_size
            with open(dst, "r+b") as f:
                f.truncate(draw(st.integers(0, size - 1)))
            return dst
        try:
            h5 = h5py.File(dst, "a")
        except OSError:
            return dst
        with h5:
            field = draw(st.sampled_from(FIELDS))
            old_e = h5.get("incident_energies")  # an earlier damage may have made it a group or a scalar
            n = old_e.shape[0] if isinstance(old_e, h5py.Dataset) and old_e.ndim else 30
            if op == "delete" and field in h5:
                del h5[field]
            elif op in ("reshape", "dtype", "group", "empty") and field in h5:
                old = h5[field]
                shape, dtype = (old.shape, old.dtype) if isinstance(old, h5py.Dataset) else ((n, 1), np.dtype("f8"))
                del h5[field]
                if op == "reshape":
                    shape = draw(st.sampled_from([(n,), (n, 2), (n + 1, 1), (n, 0), (0, 1), (), (n, 1, 1),
                                                  (n, 143)]))
                    h5.create_dataset(field, shape=shape, dtype="f8")
                elif op == "dtype":
                    h5.create_dataset(field, shape=shape, dtype=draw(st.sampled_from(BAD_DTYPES)))
                elif op == "group":
                    h5.create_group(field)
                else:
                    h5.create_dataset(field, shape=(0,) + tuple(shape[1:]), dtype=dtype)
            elif op == "value" and field in h5 and isinstance(h5[field], h5py.Dataset) and h5[field].size:
                ds = h5[field]
                idx = tuple(draw(st.integers(0, d - 1)) for d in ds.shape)
                value = draw(st.sampled_from(BAD_VALUES))
                with contextlib.suppress(TypeError, ValueError, OverflowError):
                    ds[idx] = value
            elif op == "attr":
                key = draw(st.sampled_from(sorted(BAD_ATTRS)))
                h5.attrs[key] = draw(st.sampled_from(BAD_ATTRS[key]))
            elif op == "del_attr":
                key = draw(st.sampled_from(["detector", "detector_json", "shape", "particle", "complete"]))
                if key in h5.attrs:
                    del h5.attrs[key]
    return dst


@pytest.mark.timeout(300)
@fuzz_settings(90)
@given(data=st.data())
def test_fuzz_damaged_shower_files(world, data):
    bad = damage_file(data.draw, world["data"], world["new"]())
    command = data.draw(st.sampled_from(["info", "generate", "convert", "convert-back", "evaluate", "train"]))
    if command == "info":
        args = ["info", bad]
    elif command == "generate":
        args = ["generate", "--model", world["model"], "--conditions-from", bad, "-o", world["new"](), "-q"]
    elif command == "convert":
        args = ["convert", bad, world["new"](), "--to", "calochallenge"]
    elif command == "convert-back":
        args = ["convert", bad, world["new"](), "--to", "caloforge", "--detector", world["det"]]
    elif command == "evaluate":
        args = ["evaluate", "--reference", world["data"], "--candidate", bad, "-o", world["new"](""),
                "--no-classifier", "--splits", "2", "-q"]
    else:
        args = ["train", "--data", bad, "--model", "layerflow", "-o", world["new"](""), "--max-steps", "1", "-q",
                "--set", "model.flow_blocks=1", "--set", "model.flow_hidden=4", "--set", "train.val_every=0",
                "--set", "train.batch_size=8"]
    run_case(args)


# ---- damaged model directories ----------------------------------------------------------------------------------
JSON_NASTY = [None, {}, [], "", "false", "true", True, False, -1, 0, 1, 2.5, 10**9, 1e300, -1e300, "8", [1, 2],
              {"a": 1}, float("nan"), 2**70]
META_KEYS = ["family", "config", "detector", "n_cells", "format_version", "conditions", "condition_features",
             "frame", "particles", "particle", "shape"]


def damage_model(draw, src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    meta_path, weights = dst / "model.json", dst / "model.safetensors"
    op = draw(st.sampled_from(["config", "config", "meta", "detector", "readout", "del_key", "bad_json", "truncate",
                               "poison", "drop_tensor", "reshape_tensor", "delete_file"]))
    meta = json.loads(meta_path.read_text())
    if op == "config":
        meta["config"][draw(st.sampled_from(sorted(meta["config"])))] = draw(st.sampled_from(JSON_NASTY))
    elif op == "meta":
        meta[draw(st.sampled_from(META_KEYS))] = draw(st.sampled_from(JSON_NASTY))
    elif op == "detector":
        meta["detector"][draw(st.sampled_from(sorted(meta["detector"])))] = draw(st.sampled_from(JSON_NASTY))
    elif op == "readout":
        meta["detector"]["readout"][draw(st.sampled_from(sorted(meta["detector"]["readout"])))] = draw(
            st.sampled_from(JSON_NASTY))
    elif op == "del_key":
        meta.pop(draw(st.sampled_from(META_KEYS)), None)
    meta_path.write_text(json.dumps(meta))  # NaN is written as the (Python-readable) literal NaN
    if op == "bad_json":
        meta_path.write_text(draw(st.sampled_from(["", "{", "[]", "null", "{\"family\": 5}", "\x00\xff"])))
    elif op == "truncate":
        size = weights.stat().st_size
        with open(weights, "r+b") as f:
            f.truncate(draw(st.integers(0, size - 1)))
    elif op in ("poison", "drop_tensor", "reshape_tensor"):
        state = load_file(weights)
        name = draw(st.sampled_from(sorted(state)))
        if op == "poison" and state[name].is_floating_point() and state[name].numel():
            state[name].view(-1)[0] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        elif op == "drop_tensor":
            del state[name]
        elif op == "reshape_tensor":
            state[name] = torch.zeros(3, 5)
        save_file(state, weights)
    elif op == "delete_file":
        draw(st.sampled_from([meta_path, weights])).unlink()
    return dst


@pytest.mark.timeout(300)
@fuzz_settings(70)
@given(data=st.data())
def test_fuzz_damaged_model_directories(world, data):
    bad = damage_model(data.draw, world["model"], world["new"](""))
    command = data.draw(st.sampled_from(["generate", "generate", "bench", "export"]))
    if command == "generate":
        args = ["generate", "--model", bad, "-n", "2", "-o", world["new"](), "-q"]
    elif command == "bench":
        args = ["bench", "--model", bad, "--no-geant4", "--batch-sizes", "1", "--energies", "50", "--repeats", "1",
                "--max-seconds", "0.1"]
    else:
        args = ["export", "--model", bad, "-o", world["new"](".onnx"), "--no-check"]
    run_case(args)
