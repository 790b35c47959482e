"""caloforge tune: the search space, a small study, its resumption and its reproducibility."""

from __future__ import annotations

import json

import optuna
import pytest

from caloforge.cli import main
from caloforge.train import resolve_config
from caloforge.tune import TuneError, _sampler, load_space, tune
from conftest_models import toy_detector, write_toy_file

SPACE = """
[space]
"train.lr" = { type = "float", low = 1e-4, high = 1e-2, log = true }
"model.flow_hidden" = { type = "int", low = 8, high = 24, step = 8 }
"model.mip_bins" = { type = "categorical", choices = [0, 8] }
"""
BASE = ["train.max_steps=6", "train.val_every=3", "train.val_fraction=0.25", "train.val_max_showers=16",
        "train.batch_size=16", "train.checkpoint_every=3", "model.flow_blocks=2"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune")
    write_toy_file(d / "toy.h5", toy_detector(), 64, seed=3)
    (d / "space.toml").write_text(SPACE)
    return d


def _tune(toy, out, n, **kw):
    return tune(toy / "toy.h5", "layerflow", out, load_space(toy / "space.toml"), n, overrides=BASE, seed=7,
                n_startup=2, quiet=True, **kw)


def test_a_study_finds_finite_scores_and_writes_its_best_config(toy, tmp_path):
    s = _tune(toy, tmp_path / "study", 3)
    assert [t["state"] for t in s["trials"]].count("COMPLETE") + [t["state"] for t in s["trials"]].count("PRUNED") == 3
    best = s["best"]
    assert best is not None and best["value"] > 0 and set(best["params"]) == {"train.lr", "model.flow_hidden",
                                                                              "model.mip_bins"}
    assert best["params"]["model.flow_hidden"] in (8, 16, 24) and 1e-4 <= best["params"]["train.lr"] <= 1e-2
    assert json.loads((tmp_path / "study" / "summary.json").read_text())["best"] == best
    # the best config trains as is, and only the best trial's run is kept
    train_cfg, model_cfg = resolve_config("layerflow", str(tmp_path / "study" / "best.toml"), [])
    assert train_cfg.lr == pytest.approx(best["params"]["train.lr"]) and train_cfg.max_steps == 6
    assert model_cfg["flow_hidden"] == best["params"]["model.flow_hidden"]
    assert sorted(p.name for p in (tmp_path / "study").glob("trial-*")) == [f"trial-{best['number']:04d}"]


def test_resumed_and_interrupted_studies_match_an_uninterrupted_one(toy, tmp_path):
    full = _tune(toy, tmp_path / "full", 3)
    _tune(toy, tmp_path / "part", 2)
    # a scan killed during its third trial leaves it RUNNING in the study, with the values the scan proposed
    study = optuna.load_study(study_name="caloforge", storage=f"sqlite:///{tmp_path / 'part' / 'study.db'}")
    study.sampler = _sampler(7, 2, 2)
    trial = study.ask()
    for p in load_space(toy / "space.toml"):
        p.suggest(trial)
    resumed = _tune(toy, tmp_path / "part", 3)
    done = [t for t in resumed["trials"] if t["state"] in ("COMPLETE", "PRUNED")]
    assert [t["state"] for t in resumed["trials"]].count("FAIL") == 1  # the interrupted one
    assert [(t["params"], t["value"]) for t in done] == [
        (t["params"], t["value"]) for t in full["trials"] if t["state"] in ("COMPLETE", "PRUNED")]


def test_bad_spaces_are_refused(tmp_path):
    cases = {
        "[space]\n": "non-empty",
        '[space]\n"lr" = { type = "float", low = 1, high = 2 }\n': "train.OPTION",
        '[space]\n"train.lr" = { type = "float", low = 2, high = 1 }\n': "low < high",
        '[space]\n"train.lr" = { type = "float", low = 0, high = 1, log = true }\n': "low > 0",
        '[space]\n"train.lr" = { type = "float", low = 0, high = nan }\n': "finite",
        '[space]\n"model.flow_hidden" = { type = "int", low = 1.5, high = 8 }\n': "integers",
        '[space]\n"model.mip_bins" = { type = "categorical", choices = [] }\n': "choices",
        '[space]\n"train.lr" = { type = "normal", low = 0, high = 1 }\n': "type",
        '[space]\n"train.lr" = { type = "float", low = 0, high = 1, mu = 3 }\n': "unknown",
    }
    for i, (text, match) in enumerate(cases.items()):
        path = tmp_path / f"s{i}.toml"
        path.write_text(text)
        with pytest.raises(TuneError, match=match):
            load_space(path)


def test_cli_tune_and_its_errors(toy, tmp_path, capsys):
    args = ["tune", "--data", str(toy / "toy.h5"), "--model", "layerflow", "--space", str(toy / "space.toml"),
            "--trials", "2", "--startup", "1", "-o", str(tmp_path / "cli"), "--device", "cpu"]
    sets = [x for kv in BASE for x in ("--set", kv)]
    assert main([*args, *sets, "--quiet"]) == 0
    assert (tmp_path / "cli" / "best.toml").is_file()
    # the same directory with another space: refused, not mixed into the study
    other = tmp_path / "other.toml"
    other.write_text('[space]\n"train.lr" = { type = "float", low = 1e-3, high = 1e-2 }\n')
    args[args.index(str(toy / "space.toml"))] = str(other)
    assert main([*args, *sets, "--quiet"]) == 2
    assert "another -o" in capsys.readouterr().err
    assert main([*args, *sets, "--set", "train.val_every=0", "-o", str(tmp_path / "noval"), "--quiet"]) == 2
    assert "validation" in capsys.readouterr().err
