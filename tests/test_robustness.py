"""Every bad input gives a clear one-line error (exit 2), never a traceback, a hang or a huge allocation (issue 13).

One regression test per problem the fuzzing run found; ``test_fuzz.py`` mutates inputs at random on top of these.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from caloforge.cli import main
from caloforge.conditions import Conditions, ConditionsError
from caloforge.dataset import DatasetError, ShowerFile
from caloforge.detector import Detector, DetectorError, load_detector
from caloforge.metrics import compare_with_floor, correlation_chi2_ndf, fisher_z_test, half_splits
from caloforge.models import ModelError, get_family, load_model, save_model
from caloforge.train import TrainConfig, Trainer, TrainingError, load_training_data
from conftest_models import TINY_CONFIGS, tiny_model, toy_detector, toy_showers, write_toy_file

LayerFlowConfig = get_family("layerflow").Config


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "toy.h5"
    write_toy_file(path, toy_detector(), 40, seed=3)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    det = toy_detector()
    model = tiny_model("layerflow", det, toy_showers(det, 40, seed=2))
    model.meta["particle"] = "gamma"
    return save_model(model, tmp_path_factory.mktemp("model") / "m")


def _cli(capsys, *args) -> tuple[int, str]:
    """Exit code and stderr of one in-process command (argparse errors exit 2 as well)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def _copy_model(src: Path, dst: Path, edit=None, tensors=None) -> Path:
    dst.mkdir(parents=True)
    meta = json.loads((src / "model.json").read_text())
    if edit:
        edit(meta)
    (dst / "model.json").write_text(json.dumps(meta))
    state = load_file(src / "model.safetensors")
    if tensors:
        tensors(state)
    save_file(state, dst / "model.safetensors")
    return dst


def _edit_h5(path: Path, fn) -> Path:
    with h5py.File(path, "a") as h5:
        fn(h5)
    return path


# ---- memory: sane architecture bounds before any allocation -------------------------------------------------
@pytest.mark.parametrize("options, match", [
    ({"flow_hidden": 10**9}, r"flow_hidden is 1000000000; expected an integer in \[1, 4096\]"),
    ({"flow_layers": 1e300}, r"flow_layers is 1e\+300; expected an integer in \[0, 16\]"),
    ({"flow_blocks": None}, r"flow_blocks is None; expected an integer"),
    ({"flow_blocks": {}}, r"flow_blocks is \{\}; expected an integer"),
    ({"flow_blocks": "8"}, r"flow_blocks is '8'; expected an integer"),
    ({"flow_blocks": True}, r"flow_blocks is True; expected an integer"),
    ({"flow_blocks": 2.5}, r"flow_blocks is 2.5; expected an integer"),
    ({"scale_clamp": None}, r"scale_clamp is None; expected a number"),
    ({"scale_clamp": math.nan}, r"scale_clamp is nan; expected a finite number"),
    ({"hit_count": "false"}, r"hit_count is 'false'; expected true or false"),
    ({"hit_count": 0}, r"hit_count is 0; expected true or false"),
    ({"flow_hidden": 4096, "flow_blocks": 64}, r"make about .* weights; expected at most"),
])
def test_model_config_is_checked_before_allocation(options, match):
    with pytest.raises(ModelError, match=match):
        LayerFlowConfig.from_dict(options, "model.json: field 'config'")


def test_model_config_accepts_real_values():
    cfg = LayerFlowConfig.from_dict({"flow_blocks": 4.0, "hit_count": False, "clamp_features": True,
                                     "scale_clamp": 2})
    assert cfg.flow_blocks == 4 and isinstance(cfg.flow_blocks, int) and cfg.hit_count is False
    assert cfg.clamp_features is True and cfg.scale_clamp == 2.0 and isinstance(cfg.scale_clamp, float)
    wgan = get_family("wgan").Config
    with pytest.raises(ModelError, match="gen_channels is 100000"):
        wgan.from_dict({"gen_channels": 100_000})


def test_huge_width_in_model_json_is_refused_by_every_command(model_dir, tmp_path, capsys):
    def huge(meta):
        meta["config"]["flow_hidden"] = 10**9

    bad = _copy_model(model_dir, tmp_path / "bad", huge)
    for args in (["generate", "--model", bad, "-n", 2, "-o", tmp_path / "g.h5"],
                 ["bench", "--model", bad, "--no-geant4", "--batch-sizes", 1],
                 ["export", "--model", bad, "-o", tmp_path / "m.onnx"]):
        code, err = _cli(capsys, *args)
        assert code == 2 and "field 'config': flow_hidden is 1000000000" in err, (args, err)


def test_train_set_is_checked(toy_file, tmp_path, capsys):
    base = ["train", "--data", toy_file, "--model", "layerflow", "-q"]
    code, err = _cli(capsys, *base, "--set", "model.flow_hidden=1000000000", "-o", tmp_path / "a")
    assert code == 2 and "flow_hidden is 1000000000" in err
    code, err = _cli(capsys, *base, "--set", "train.epochs=-1", "-o", tmp_path / "b")
    assert code == 2 and "epochs is -1" in err
    code, err = _cli(capsys, *base, "--set", 'model.hit_count="false"', "-o", tmp_path / "c")
    assert code == 2 and "hit_count is 'false'; expected true or false" in err
    with pytest.raises(TrainingError, match="lr_schedule is 'cosin'"):
        TrainConfig.from_dict({"lr_schedule": "cosin"})
    with pytest.raises(TrainingError, match="amp is 'no'"):
        TrainConfig.from_dict({"amp": "no"})


# ---- model files: NaN weights, null and tables where numbers belong -------------------------------------------
def test_nonfinite_weights_are_refused(model_dir, tmp_path):
    def poison(state):
        name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
        state[name].view(-1)[1] = float("nan")
        poison.name = name

    bad = _copy_model(model_dir, tmp_path / "bad", tensors=poison)
    with pytest.raises(ModelError, match=f"tensor '{poison.name}' holds NaN or inf"):
        load_model(bad)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.__setitem__("n_cells", None), "field 'n_cells' is None"),
    (lambda m: m.__setitem__("n_cells", {"a": 1}), "field 'n_cells'"),
    (lambda m: m.__setitem__("format_version", "x"), "field 'format_version'"),
    (lambda m: m.__setitem__("config", [1]), "field 'config' is"),
    (lambda m: m["config"].__setitem__("flow_blocks", None), "flow_blocks is None"),
    (lambda m: m["config"].__setitem__("dequant_mev", {}), r"dequant_mev is \{\}"),
    (lambda m: m["conditions"].__setitem__("energy_mev", [None, 1.0]), "field 'conditions.energy_mev'"),
    (lambda m: m["detector"]["readout"].__setitem__("n_x", 10**9), "readout.n_x is 1000000000"),
    (lambda m: m["detector"].__setitem__("cell_size_mm", None), "invalid detector description"),
])
def test_bad_model_json_values(model_dir, tmp_path, capsys, edit, match):
    bad = _copy_model(model_dir, tmp_path / "bad", edit)
    with pytest.raises(ModelError, match=match):
        load_model(bad)
    code, err = _cli(capsys, "generate", "--model", bad, "-n", 2, "-o", tmp_path / "g.h5")
    assert code == 2 and err.count("\n") == 1, err


# ---- hangs ------------------------------------------------------------------------------------------------------
def test_simulate_refuses_before_geant4(tmp_path, capsys):
    out = tmp_path / "s.h5"
    code, err = _cli(capsys, "simulate", "--energy", "1e30", "-n", 1, "-o", out)
    assert code == 2 and "<= 10000 GeV" in err
    code, err = _cli(capsys, "simulate", "--workers", 0, "-n", 1, "-o", out)
    assert code == 2 and "--workers must be > 0" in err
    code, err = _cli(capsys, "simulate", "-o", out)
    assert code == 2 and "-n is required" in err
    code, err = _cli(capsys, "simulate", "--detector", tmp_path, "-n", 1, "-o", out)
    assert code == 2 and "is a directory" in err
    assert not out.exists() and not Path(str(out) + ".chunks").exists()


def test_convert_max_showers_must_be_positive(toy_file, tmp_path, capsys):
    for n in (-1, 0):
        code, err = _cli(capsys, "convert", toy_file, tmp_path / "c.h5", "--to", "calochallenge", "--max-showers", n)
        assert code == 2 and "--max-showers" in err


# ---- output paths -----------------------------------------------------------------------------------------------
def test_output_under_a_file_or_at_a_directory(toy_file, model_dir, tmp_path, capsys):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    commands = {
        "generate": (["generate", "--model", model_dir, "-n", 2, "-o"], True),
        "export": (["export", "--model", model_dir, "-o"], True),
        "convert": (["convert", toy_file, "--to", "calochallenge"], True),
        "simulate": (["simulate", "-n", 1, "-o"], True),
        "bench": (["bench", "--model", model_dir, "--no-geant4", "--batch-sizes", 1, "--json"], True),
        "evaluate": (["evaluate", "--reference", toy_file, "--candidate", toy_file, "-o"], False),
        "train": (["train", "--data", toy_file, "--model", "layerflow", "-o"], False),
    }
    for name, (args, is_file) in commands.items():
        targets = [plain / "sub" / "x.out"] + ([a_dir] if is_file else [plain])
        for target in targets:
            code, err = _cli(capsys, *args, target)
            assert code == 2, (name, target, err)
            assert str(target) in err and err.count("\n") == 1, (name, err)


def test_overwrite_and_own_input(toy_file, model_dir, tmp_path, capsys):
    out = tmp_path / "c.h5"
    out.write_text("old")
    code, err = _cli(capsys, "convert", toy_file, out, "--to", "calochallenge")
    assert code == 2 and "use --overwrite" in err and out.read_text() == "old"
    assert _cli(capsys, "convert", toy_file, out, "--to", "calochallenge", "--overwrite")[0] == 0
    before = toy_file.read_bytes()
    code, err = _cli(capsys, "convert", toy_file, toy_file, "--to", "calochallenge", "--overwrite")
    assert code == 2 and "is the input file" in err and toy_file.read_bytes() == before
    for args in (["generate", "--model", model_dir, "-n", 2], ["export", "--model", model_dir]):
        code, err = _cli(capsys, *args, "-o", out)
        assert code == 2 and "use --overwrite" in err


# ---- dataset files: dtypes and attributes ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype, match", [
    (np.dtype([("e", "f8"), ("a", "f8")]), "dtype"),
    (h5py.string_dtype(), "dtype"),
    (np.dtype("S8"), "dtype"),
    (np.dtype(bool), "dtype bool"),
    (np.dtype("c16"), "dtype complex128"),
])
def test_energies_of_a_bad_dtype(toy_file, tmp_path, dtype, match):
    path = tmp_path / "d.h5"
    path.write_bytes(toy_file.read_bytes())

    def retype(h5):
        n = h5["incident_energies"].shape[0]
        del h5["incident_energies"]
        h5.create_dataset("incident_energies", shape=(n, 1), dtype=dtype)

    _edit_h5(path, retype)
    with pytest.raises(DatasetError, match=f"field 'incident_energies' has {match}"):
        ShowerFile(path)


def test_particle_codes_may_not_wrap_around(toy_file, tmp_path):
    path = tmp_path / "p.h5"
    path.write_bytes(toy_file.read_bytes())

    def big_codes(h5):
        n = h5["incident_particles"].shape[0]
        del h5["incident_particles"]
        h5["incident_particles"] = np.full((n, 1), 2**32 + 22, np.int64)  # 22 (gamma) after a cast to int32

    _edit_h5(path, big_codes)
    with ShowerFile(path) as f, pytest.raises(DatasetError, match="holds code 4294967318"):
        _ = f.pdg


@pytest.mark.parametrize("attrs, match", [
    ({"detector": "ild-ecal"}, "attribute 'detector' is 'ild-ecal' but attribute 'detector_json' describes"),
    ({"shape": [4, 6, 7]}, "attribute 'shape' is"),
    ({"complete": "no"}, "attribute 'complete' is 'no'; expected a boolean"),
    ({"detector_json": 5}, "attribute 'detector_json' is 5; expected JSON text"),
    ({"detector_json": "{"}, "attribute 'detector_json' is invalid"),
])
def test_inconsistent_attributes_are_refused(toy_file, tmp_path, attrs, match):
    path = tmp_path / "a.h5"
    path.write_bytes(toy_file.read_bytes())
    _edit_h5(path, lambda h5: h5.attrs.update(attrs))
    with pytest.raises(DatasetError, match=match):
        ShowerFile(path)


def test_detector_directory_and_bad_files(tmp_path):
    with pytest.raises(DetectorError, match="is a directory"):
        load_detector(tmp_path)
    (tmp_path / "d.toml").write_text("name = [")
    with pytest.raises(DetectorError, match="not a valid TOML"):
        load_detector(tmp_path / "d.toml")
    d = toy_detector().to_dict()
    with pytest.raises(DetectorError, match="layer 'count' is 1000000000"):
        Detector.from_dict({**d, "layers": [{**d["layers"][0], "count": 10**9}]})
    with pytest.raises(DetectorError, match="size_x_mm is inf"):
        Detector.from_dict({**d, "size_x_mm": math.inf})


def test_evaluate_refuses_two_detectors(toy_file, tmp_path, capsys):
    other = toy_detector(name="other-ecal")  # the same cells, another detector
    write_toy_file(tmp_path / "o.h5", other, 20, seed=4)
    code, err = _cli(capsys, "evaluate", "--reference", toy_file, "--candidate", tmp_path / "o.h5",
                     "-o", tmp_path / "r", "--no-classifier")
    assert code == 2 and "'other-ecal'" in err and "expected the same detector" in err


# ---- energies: physical bound and NaN --------------------------------------------------------------------------
def test_training_data_above_the_physical_bound(toy_file, tmp_path):
    path = tmp_path / "e.h5"
    path.write_bytes(toy_file.read_bytes())
    _edit_h5(path, lambda h5: h5["incident_energies"].__setitem__((3, 0), 1e161))
    with pytest.raises(ConditionsError, match=r"energy 1e\+161 MeV at row 3; expected <= 1e\+07 MeV"):
        load_training_data(path, 0.1, 0)


def test_nan_conditions_are_refused(model_dir, toy_file, tmp_path, capsys):
    model = load_model(model_dir)
    with pytest.raises(ModelError, match="energy is NaN"):
        model.sample(Conditions.make(np.array([math.nan, 20e3])))
    path = tmp_path / "nan.h5"
    path.write_bytes(toy_file.read_bytes())
    _edit_h5(path, lambda h5: h5["incident_energies"].__setitem__((1, 0), math.nan))
    code, err = _cli(capsys, "generate", "--model", model_dir, "--conditions-from", path, "-o", tmp_path / "g.h5")
    assert code == 2 and "holds NaN or inf" in err
    code, err = _cli(capsys, "bench", "--model", model_dir, "--angle", "nan", "--no-geant4")
    assert code == 2 and "--angle nan" in err
    code, err = _cli(capsys, "bench", "--model", model_dir, "--energies", "nan", "--no-geant4")
    assert code == 2 and "--energies" in err


# ---- a crash on valid input: the Fisher-z test on few showers ---------------------------------------------------
def test_fisher_z_with_few_showers():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    assert math.isfinite(fisher_z_test(a, b)["chi2_ndf"])
    small = fisher_z_test(a[:3], b[:3])
    assert math.isnan(small["chi2_ndf"]) and "not enough showers" in small["note"]
    res = compare_with_floor(a, b, correlation_chi2_ndf, half_splits(6, 6, 3, rng))  # halves of 3 showers
    assert math.isnan(res.value) and not res.flagged


# ---- the CLI's last line of defence --------------------------------------------------------------------------
def test_internal_errors_and_os_errors(monkeypatch, tmp_path, capsys):
    import caloforge.info

    def boom(args):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(caloforge.info, "run", boom)
    code, err = _cli(capsys, "info", "x.h5")
    assert code == 3 and err.count("\n") == 1
    assert "caloforge info: internal error (a bug): RuntimeError: something unexpected; full traceback in" in err
    log = Path(err.strip().rsplit(" ", 1)[1])
    assert log.is_file() and "Traceback" in log.read_text() and "RuntimeError" in log.read_text()
    log.unlink()

    def denied(args):
        raise PermissionError(13, "Permission denied", "/some/file")

    monkeypatch.setattr(caloforge.info, "run", denied)
    code, err = _cli(capsys, "info", "x.h5")
    assert code == 2 and err == "caloforge info: error: /some/file: Permission denied\n"


# ---- resume: changed data, history without duplicate steps ----------------------------------------------------
def _cfg(**kw) -> TrainConfig:
    base = dict(batch_size=16, max_steps=6, checkpoint_every=2, val_every=3, val_fraction=0.2, val_max_showers=16,
                log_every=1, lr=1e-3)
    return TrainConfig(**{**base, **kw})


class _Interrupt(Exception):
    pass


def test_resume_refuses_changed_data(tmp_path):
    data = tmp_path / "d.h5"
    write_toy_file(data, toy_detector(), 40, seed=1)
    Trainer.create(str(data), "layerflow", tmp_path / "run", _cfg(max_steps=2), TINY_CONFIGS["layerflow"]).fit()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data_fingerprint"]["size"] > 0
    Trainer.resume(tmp_path / "run", max_steps=3).fit()  # unchanged: fine
    write_toy_file(data, toy_detector(), 40, seed=2)
    with pytest.raises(TrainingError, match="the training data changed since the run"):
        Trainer.resume(tmp_path / "run", max_steps=4)


def test_resume_refuses_a_damaged_checkpoint(toy_file, tmp_path):
    Trainer.create(str(toy_file), "layerflow", tmp_path / "run", _cfg(max_steps=2), TINY_CONFIGS["layerflow"]).fit()
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(TrainingError, match="unreadable checkpoint"):
        Trainer.resume(tmp_path / "run")


def test_resume_does_not_duplicate_history(toy_file, tmp_path):
    def kill_at_5(trainer):
        if trainer.state["step"] == 5:  # after the checkpoint at step 4: step 5 is logged, lost and redone
            raise _Interrupt

    with pytest.raises(_Interrupt):
        Trainer.create(str(toy_file), "layerflow", tmp_path / "run", _cfg(), TINY_CONFIGS["layerflow"]).fit(kill_at_5)
    with open(tmp_path / "run" / "history.jsonl", "a") as f:
        f.write('{"step": 5, "kind": "tr')  # a line torn by the kill
    Trainer.resume(tmp_path / "run").fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["kind"] == "val"] == [3, 6]
    assert os.path.getsize(tmp_path / "run" / "history.jsonl") > 0
