"""Regression tests for the defects the second fuzzing round (tests/test_fuzz_more.py) found in the newer commands:
events, detector files, torchrun's environment and the Dask options (issue 13). Each bad input ends in a clear
one-line error (exit 2) that names the file or argument, the field and what was expected.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from caloforge.cli import main
from caloforge.detector import DetectorError, load_detector
from caloforge.events.eventfile import EventFileError, Events, read_events, write_events
from caloforge.events.wgan import EventModelError, EventWGAN, WGANConfig
from caloforge.events.wgan import train as train_events


def _events(n: int, seed: int, dim: int = 26, names: list[str] | None = None) -> Events:
    rng = np.random.default_rng(seed)
    proc = (np.arange(n) % 2).astype(np.int8)
    return Events(np.exp(0.5 * rng.standard_normal((n, dim))) + proc[:, None], proc,
                  names or [f"v{i}" for i in range(dim)])


@pytest.fixture(scope="module")
def ev(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ev") / "ev.h5"
    write_events(path, _events(200, 1))
    return path


@pytest.fixture(scope="module")
def run_dir(ev, tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run") / "r"
    train_events(str(ev), str(out), cfg=WGANConfig(hidden=8, layers=1, noise_dim=4, n_critic=1, batch_size=16,
                                                     steps=2), quiet=True)
    return out


def _cli(capsys, *args) -> tuple[int, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err
    return code, err


# ---- event files ------------------------------------------------------------------------------------------
def test_event_file_with_a_group_or_huge_values(ev, tmp_path):
    bad = tmp_path / "group.h5"
    bad.write_bytes(ev.read_bytes())
    with h5py.File(bad, "a") as h5:  # was: TypeError (a traceback)
        del h5["process"]
        h5.create_group("process")
    with pytest.raises(EventFileError, match="field 'process': expected a 1-D integer dataset, got a group"):
        read_events(bad)
    huge = tmp_path / "huge.h5"
    huge.write_bytes(ev.read_bytes())
    with h5py.File(huge, "a") as h5:
        del h5["high_level"]
        h5["high_level"] = np.full((200, 26), 1e300)  # float64: float32 copies would hold inf
    with pytest.raises(EventFileError, match="field 'high_level': expected values of magnitude at most 1e"):
        read_events(huge)


def test_split_refuses_bad_fractions_and_its_own_input(ev, tmp_path, capsys):
    for fractions in ("0.5,nan", "abc", "inf", "0,1"):  # nan was accepted (bounds of a NaN split)
        code, err = _cli(capsys, "events", "split", ev, "--fractions", fractions, "-o", tmp_path / "a.h5", "-o",
                         tmp_path / "b.h5")
        assert code == 2 and "--fractions" in err
    copy = tmp_path / "copy.h5"
    copy.write_bytes(ev.read_bytes())
    code, err = _cli(capsys, "events", "split", copy, "--fractions", "1", "-o", copy, "--overwrite")
    assert code == 2 and "is the input file" in err  # was: the input replaced by its split
    (tmp_path / "taken.h5").write_text("x")
    code, err = _cli(capsys, "events", "split", ev, "--fractions", "1", "-o", tmp_path / "taken.h5")
    assert code == 2 and "--overwrite" in err


def test_split_exclude_keeps_an_earlier_test_file_out(ev, tmp_path, capsys):
    """--exclude: a grown production split again keeps every event of an earlier split's test file out of all the
    new parts, and a file with none of the input's events is refused (most likely the wrong file)."""
    code, _ = _cli(capsys, "events", "split", ev, "--fractions", "0.75,0.25", "-o", tmp_path / "tr.h5", "-o",
                   tmp_path / "te.h5", "--seed", "3")
    assert code == 0
    test = read_events(tmp_path / "te.h5")
    code, _ = _cli(capsys, "events", "split", ev, "--exclude", tmp_path / "te.h5", "--fractions", "0.6,0.4", "-o",
                   tmp_path / "a.h5", "-o", tmp_path / "b.h5")
    assert code == 0
    parts = [read_events(tmp_path / n) for n in ("a.h5", "b.h5")]
    assert sum(len(p) for p in parts) == len(read_events(ev)) - len(test)
    held = {r.tobytes() for r in test.high_level.astype(np.float32)}
    assert not any(r.tobytes() in held for p in parts for r in p.high_level.astype(np.float32))
    write_events(tmp_path / "other.h5", _events(30, 99))
    code, err = _cli(capsys, "events", "split", ev, "--exclude", tmp_path / "other.h5", "--fractions", "1", "-o",
                     tmp_path / "c.h5")
    assert code == 2 and "--exclude" in err and "none of its 30 events" in err


def test_event_generate_bounds_and_outputs(run_dir, ev, tmp_path, capsys):
    code, err = _cli(capsys, "events", "generate", "--model", run_dir, "-n", 2**31, "-o", tmp_path / "g.h5")
    assert code == 2 and "-n 2147483648: expected an integer in [1, 5000000]" in err  # was: a hang
    code, err = _cli(capsys, "events", "generate", "--model", run_dir, "-n", 2, "--conditions-from", "",
                     "-o", tmp_path / "g.h5")
    assert code == 2 and "no such event file" in err  # was: '' ignored, -n events generated
    for process in ("tth,tth", ",", "ttH"):
        code, err = _cli(capsys, "events", "generate", "--model", run_dir, "-n", 2, "--process", process,
                         "-o", tmp_path / "g.h5")
        assert code == 2 and "--process" in err
    assert _cli(capsys, "events", "generate", "--model", run_dir, "-n", 2, "-o", tmp_path / "g.h5")[0] == 0
    code, err = _cli(capsys, "events", "generate", "--model", run_dir, "-n", 2, "-o", tmp_path / "g.h5")
    assert code == 2 and "exists; use --overwrite" in err  # was: replaced without a word
    assert _cli(capsys, "events", "generate", "--model", run_dir, "-n", 2, "-o", tmp_path / "g.h5",
                "--overwrite")[0] == 0


def test_event_evaluate_checks_its_options_and_files(ev, tmp_path, capsys):
    base = ["events", "evaluate", "--reference", ev, "--candidate", ev, "-o", tmp_path / "r", "-q"]
    for flag, value in (("--critic-batch", -(2**63) - 1), ("--critic-steps", 0), ("--critic-lr", "nan"),
                        ("--max-events", 3), ("--threads", 0), ("--seed", -1)):
        code, err = _cli(capsys, *base, flag, value)  # --critic-batch: was a TypeError from torch.randint
        assert code == 2 and flag in err, (flag, err)
    other = tmp_path / "other.h5"
    write_events(other, _events(200, 2, names=[f"w{i}" for i in range(26)]))
    code, err = _cli(capsys, "events", "evaluate", "--reference", ev, "--candidate", other, "-o", tmp_path / "r",
                     "--critic-steps", 1, "-q")
    assert code == 2 and "differ from the reference" in err  # was: compared column by column regardless
    few = tmp_path / "few.h5"
    write_events(few, _events(30, 3))
    code, err = _cli(capsys, "events", "evaluate", "--reference", ev, "--candidate", few, "-o", tmp_path / "r",
                     "--critic-steps", 1, "-q")
    assert code == 2 and "expected at least 20 of each" in err
    code, err = _cli(capsys, "evaluate", "--reference", ev, "--candidate", ev, "-o", tmp_path / "r", "--seed", -1)
    assert code == 2 and "--seed" in err  # the event branch of caloforge evaluate skipped the checks


def test_event_train_and_bench_options(ev, run_dir, tmp_path, capsys):
    base = ["events", "train", "--data", ev, "-o", tmp_path / "t", "-q"]
    for flag, value in (("--steps", 0), ("--batch-size", 10**9), ("--checkpoint-every", 0), ("--threads", 0),
                        ("--device", "meta"), ("--seed", -1)):
        code, err = _cli(capsys, *base, flag, value)
        assert code == 2 and flag in err, (flag, err)
    for flag, value in (("--events", 10**30), ("--pythia-tries", 0)):
        code, err = _cli(capsys, "events", "bench", "--model", run_dir, flag, value)
        assert code == 2 and flag in err
    shower_model = tmp_path / "not-a-run"
    shower_model.mkdir()
    code, err = _cli(capsys, "events", "bench", "--model", shower_model)  # was: refused after minutes of Pythia
    assert code == 2 and "model.json" in err


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["config"].update(hidden=10**9), r"hidden is 1000000000; expected an integer in \[1, 4096\]"),
    (lambda m: m["config"].update(lr="false"), "lr is 'false'; expected a number"),
    (lambda m: m["config"].update(nope=1), "unknown option 'nope'"),
    (lambda m: m.update(names=["a"]), "field 'names'"),
    (lambda m: m.update(family="layerflow"), "field 'family'"),
])
def test_event_run_model_json_is_checked(run_dir, tmp_path, edit, match):
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads((run_dir / "model.json").read_text())
    edit(meta)  # each of these loaded (hidden=1e9: tried to allocate first) or ran with a wrong value
    (bad / "model.json").write_text(json.dumps(meta))
    (bad / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes())
    with pytest.raises(EventModelError, match=match):
        EventWGAN.load(bad)


@pytest.mark.parametrize("tensors, match", [
    (lambda t: t.pop("gauss.probs"), "'gauss.probs' .* missing"),  # was: KeyError (a traceback)
    (lambda t: t["generator.0.weight"].view(-1).__setitem__(0, math.nan), "NaN or inf"),
])
def test_event_run_weights_are_checked(run_dir, tmp_path, tensors, match):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text((run_dir / "model.json").read_text())
    state = load_file(run_dir / "model.safetensors")
    tensors(state)
    save_file(state, bad / "model.safetensors")
    with pytest.raises(EventModelError, match=match):
        EventWGAN.load(bad)


# ---- detector files -------------------------------------------------------------------------------------------
def _toy() -> dict:
    return {"name": "t", "size_x_mm": 100.0, "size_y_mm": 100.0, "cell_size_mm": 5.0,
            "layers": [{"count": 3, "absorber": "G4_W", "absorber_mm": 2.0, "active": "G4_Si", "active_mm": 0.5}],
            "readout": {"x_min_mm": -10.0, "n_x": 4, "y_min_mm": -10.0, "n_y": 4}}


def _hex() -> dict:
    return {"name": "h", "size_x_mm": 100.0, "size_y_mm": 100.0,
            "layers": [{"absorber": "G4_Pb", "absorber_mm": 5.0, "active": "G4_Si", "active_mm": 0.3,
                        "cells": {"kind": "hex", "pitch_mm": 10.0, "rings": 1}}]}


@pytest.mark.parametrize("make, edit, match", [
    # typo'd fields were ignored and their defaults used
    (_toy, lambda d: d.update(world_materials="G4_AIR"), "unknown field 'world_materials'"),
    (_toy, lambda d: d["layers"][0].update(samplingz=2), "layer 0: unknown field 'samplingz'"),
    (_toy, lambda d: d["readout"].update(n_y_angle=8), "readout: unknown field 'n_y_angle'"),
    (_hex, lambda d: d["layers"][0]["cells"].update(orientaton="flat"), "unknown field 'orientaton' of hex cells"),
    # materials Geant4 does not know were accepted, and failed only once Geant4 started
    (_toy, lambda d: d["layers"][0].update(absorber=""), "layer 0 absorber is ''; expected a Geant4 NIST material"),
    (_toy, lambda d: d["layers"][0].update(active="G4_Unobtainium"), "layer 0 active is 'G4_Unobtainium'"),
    (_toy, lambda d: d["layers"][0].update(absorber="g4_w"), "did you mean 'G4_W'"),
    (_toy, lambda d: d.update(world_material="vacuum"), "world_material is 'vacuum'"),
    # counts were truncated (2.5 layers -> 2)
    (_toy, lambda d: d["layers"][0].update(count=2.5), "'count' is 2.5; expected an integer"),
    (_toy, lambda d: d["readout"].update(n_x=4.5), "'n_x' is 4.5; expected an integer"),
    (_toy, lambda d: d.update(production_cut_mm=-1.0), "production_cut_mm is -1.0; expected a length > 0"),
    (_toy, lambda d: d.update(name=" "), "field 'name' is empty"),
])
def test_detector_files_refuse_typos_and_unknown_materials(tmp_path, capsys, make, edit, match):
    d = make()
    edit(d)
    path = tmp_path / "det.json"
    path.write_text(json.dumps(d))
    with pytest.raises(DetectorError, match=match):
        load_detector(path)
    code, err = _cli(capsys, "detectors", path)
    assert code == 2 and str(path) in err


def test_detector_files_still_load(tmp_path):
    for make in (_toy, _hex):
        path = tmp_path / "ok.json"
        path.write_text(json.dumps(make()))
        assert load_detector(path).n_layers >= 1
    d = _toy()
    d["layers"][0]["passive"] = [["G4_Cu", 1.0]]
    path.write_text(json.dumps(d))
    assert load_detector(path).layers[0].passive == (("G4_Cu", 1.0),)


# ---- torchrun and Dask ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, match", [
    ({"WORLD_SIZE": "-1"}, r"WORLD_SIZE='-1': expected an integer in \[1, 65536\]"),  # was: one process, silently
    ({"WORLD_SIZE": "99999999999999999999", "RANK": "0"}, "WORLD_SIZE="),  # was: TypeError in TCPStore
    ({"WORLD_SIZE": "2", "RANK": "5"}, r"RANK='5': expected an integer in \[0, 1\]"),
    ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK='x'"),
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"}, "LOCAL_RANK='-1'"),
])
def test_torchrun_environment_is_checked(monkeypatch, env, match):
    from caloforge.distributed import init_from_env

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=match):
        init_from_env("cpu")


def test_dask_options_are_checked_before_any_work(tmp_path):
    pytest.importorskip("distributed")
    from caloforge.dask_backend import check_options

    for address in ("tcp://", "tcp://[::1", "tcp://127.0.0.1:0", "\x00"):
        with pytest.raises(ValueError, match="--scheduler .*expected a Dask scheduler address"):
            check_options(address, None, None)
    assert check_options("tcp://127.0.0.1:8786", None, None) == {}
    cases = {"coress: 4\n": "unknown option 'coress'", "cores: -1\n": "option 'cores' is -1",
             "cores: .nan\n": "option 'cores' is nan", "memory: lots\n": "option 'memory' is 'lots'"}
    for text, match in cases.items():  # were accepted: the cluster failed only after the chunk directory was made
        cfg = tmp_path / "c.yaml"
        cfg.write_text(text)
        with pytest.raises(ValueError, match=match):
            check_options(None, "slurm", cfg)
    cfg.write_text("cores: 4\nmemory: 8GB\nqueue: short\nwalltime: '01:00:00'\n")
    assert check_options(None, "slurm", cfg)["cores"] == 4


# ---- tune ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, match", [
    ('{ type = "float", low = 1e-4, high = 1e-2, log = "false" }', "log is 'false'; expected true or false"),
    ('{ type = "float", low = 1e-4, high = 1e-2, choices = [1] }', r"field\(s\) \['choices'\] do not apply"),
    ('{ type = "categorical", choices = [1, 2], low = 0 }', r"field\(s\) \['low'\] do not apply"),
])
def test_tune_space_fields(tmp_path, spec, match):
    from caloforge.tune import TuneError, load_space

    path = tmp_path / "space.toml"
    path.write_text(f'[space]\n"train.lr" = {spec}\n')  # "false" read as True (log scale), choices ignored
    with pytest.raises(TuneError, match=match):
        load_space(path)


def test_tune_space_must_fit_the_model_before_the_study_starts(tmp_path, capsys):
    from conftest_models import toy_detector, write_toy_file

    data = tmp_path / "toy.h5"
    write_toy_file(data, toy_detector(), 30, seed=1)
    space = tmp_path / "space.toml"
    space.write_text('[space]\n"model.flow_hidden" = { type = "int", low = 4, high = 1000000000 }\n')
    out = tmp_path / "study"
    code, err = _cli(capsys, "tune", "--data", data, "--model", "layerflow", "--space", space, "-o", out,
                     "--trials", 1, "-q")
    assert code == 2 and "[space] 'model.flow_hidden': the value 1000000000 does not fit --model layerflow" in err
    assert not out.exists()  # was: refused only when a trial drew it, after the study was made
    space.write_text('[space]\n"model.flow_hidden" = { type = "float", low = 4, high = 8 }\n')
    code, err = _cli(capsys, "tune", "--data", data, "--model", "layerflow", "--space", space, "-o", out,
                     "--trials", 1, "-q")
    assert code == 2 and "the value 5.48 does not fit" in err and "expected an integer" in err
    space.write_text('[space]\n"train.lr" = { type = "float", low = 1e-4, high = 1e-2 }\n')
    code, err = _cli(capsys, "tune", "--data", tmp_path / "none.h5", "--model", "layerflow", "--space", space,
                     "-o", out, "--trials", 1, "-q")
    assert code == 2 and "none.h5" in err and not out.exists()


def test_binning_xml_particle(tmp_path, capsys):
    out = tmp_path / "b.xml"
    code, err = _cli(capsys, "detectors", "cc-ds2", "--binning-xml", out, "--particle", 'e"<')
    assert code == 2 and "--particle 'e\"<': expected one of electron, photon, pion" in err  # was: broken XML
    assert not out.exists()
    assert _cli(capsys, "detectors", "cc-ds2", "--binning-xml", out, "--particle", "photon")[0] == 0
    assert '<Bin pid="22" name="photon">' in out.read_text()  # was: pid 11 whatever the particle


def test_train_eventwgan_takes_its_flags_literally(ev, tmp_path, capsys):
    for flag, value in (("--max-steps", 0), ("--seed", -1), ("--threads", 0)):  # 0 was read as "the default"
        code, err = _cli(capsys, "train", "--model", "eventwgan", "--data", ev, "-o", tmp_path / "r", flag, value)
        assert code == 2 and (flag if flag != "--max-steps" else "--steps") in err, (flag, err)
