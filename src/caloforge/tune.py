"""Hyper-parameter scans: ``caloforge tune`` runs an Optuna study over a model family's configuration.

Each trial trains the family (:class:`caloforge.train.Trainer`) with the trial's values on top of the base config,
reports the fast validation score at every validation to Optuna (lower is better), and may be pruned there
(median rule) when it is clearly behind. The study lives in a SQLite file in the output directory, so a killed scan
continues where it stopped: the trial that was running is started again with the same values. Suggestions are
reproducible: the TPE sampler of the k-th finished trial is seeded from (``--seed``, k), so an interrupted and an
uninterrupted scan propose the same values (training is deterministic too).

The search space is a TOML file::

    [space]
    "train.lr" = { type = "float", low = 1e-4, high = 3e-3, log = true }
    "model.flow_hidden" = { type = "int", low = 64, high = 256, step = 32 }
    "model.mip_bins" = { type = "categorical", choices = [24, 48] }

The output directory gets ``study.db`` (the Optuna study), ``trial-NNNN/`` (each trial's run), ``summary.json``
(every trial, the best) and ``best.toml`` (the base config with the best values: ``caloforge train --config``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: The Optuna study's name inside study.db.
STUDY = "caloforge"
MAX_TRIALS = 10_000


class TuneError(ValueError):
    """A search space or tune option that cannot be used."""


@dataclass(frozen=True)
class Param:
    """One dimension of the search space: ``name`` is a config key (``train.lr``, ``model.flow_hidden``)."""

    name: str
    kind: str  # "float" | "int" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, list(self.choices))


def load_space(path: str | Path) -> list[Param]:
    """The ``[space]`` table of a TOML file, checked: each key a ``train.`` or ``model.`` option, finite bounds."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: search space file not found")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise TuneError(f"{path}: invalid TOML ({err})") from None
    table = doc.get("space")
    if not isinstance(table, dict) or not table:
        raise TuneError(f"{path}: expected a non-empty [space] table of KEY = {{ type = ..., ... }}")
    params = []
    for name, spec in table.items():
        where = f"{path}: [space] {name!r}"
        if not name.startswith(("train.", "model.")):
            raise TuneError(f"{where}: expected a key 'train.OPTION' or 'model.OPTION'")
        if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
            raise TuneError(f"{where}: expected a table with type = 'float', 'int' or 'categorical'")
        unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
        if unknown:
            raise TuneError(f"{where}: unknown field(s) {sorted(unknown)}")
        kind = spec["type"]
        misplaced = set(spec) & ({"low", "high", "log", "step"} if kind == "categorical" else {"choices"})
        if misplaced:
            raise TuneError(f"{where}: field(s) {sorted(misplaced)} do not apply to type = {kind!r}")
        if not isinstance(spec.get("log", False), bool):
            raise TuneError(f"{where}: log is {spec['log']!r:.40}; expected true or false")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices or len({json.dumps(c) for c in choices}) != len(choices):
                raise TuneError(f"{where}: categorical needs choices = [distinct values]")
            params.append(Param(name, kind, choices=tuple(choices)))
            continue
        low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
        nums = [v for v in (low, high, step) if v is not None]
        if low is None or high is None or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                   and math.isfinite(v) for v in nums):
            raise TuneError(f"{where}: {kind} needs finite numbers low and high (and optionally step)")
        if not low < high or (log and low <= 0) or (step is not None and (step <= 0 or log)):
            raise TuneError(f"{where}: expected low < high, low > 0 with log = true, step > 0 and not with log")
        if kind == "int" and not all(float(v).is_integer() for v in nums):
            raise TuneError(f"{where}: int bounds and step must be integers")
        params.append(Param(name, kind, float(low), float(high), log, None if step is None else float(step)))
    return params


def check_space(space: list[Param], family: str, config: str | None, base: list[str]) -> None:
    """Every point the space can propose fits the family's configuration (its options, types and bounds): the
    ends of each range and every choice are resolved once before the first trial, not when a trial draws them."""
    from caloforge.train import resolve_config

    for p in space:
        values = list(p.choices) if p.kind == "categorical" else [p.low, p.high]
        if p.kind == "float":  # and a value between the ends: a float range over an integer option is refused
            values.append(p.low + 0.37 * (p.high - p.low))
        for v in values:
            v = int(v) if p.kind == "int" else v
            try:
                resolve_config(family, config, base + [_assignment(p.name, v)])
            except ValueError as err:
                raise TuneError(f"[space] {p.name!r}: the value {v!r} does not fit --model {family}: {err}") from None


def _assignment(key: str, value: Any) -> str:
    """``--set`` text of one suggested value (strings quoted)."""
    return f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"


def _sampler(seed: int, k: int, n_startup: int):
    import optuna

    return optuna.samplers.TPESampler(seed=int(np.random.SeedSequence([seed, k]).generate_state(1)[0]),
                                      n_startup_trials=n_startup)


def _finished(study) -> list:
    import optuna

    return [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]


def _requeue_interrupted(study) -> int:
    """Trials left RUNNING by a killed scan: mark them failed and queue their values again (same point, from
    scratch). One scan per study at a time."""
    import optuna

    n = 0
    for t in study.trials:
        if t.state == optuna.trial.TrialState.RUNNING:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            n += 1
    return n


def tune(data: str | Path, family: str, output: str | Path, space: list[Param], n_trials: int,
         config: str | None = None, overrides: list[str] | None = None, seed: int = 0, device: str = "cpu",
         n_startup: int = 4, prune: bool = True, keep_runs: bool = False, quiet: bool = False) -> dict:
    """Run (or continue) a study until it has ``n_trials`` finished trials; returns the summary."""
    import optuna

    from caloforge.train import Trainer, resolve_config
    from caloforge.validate import check_output_dir

    if not 0 < n_trials <= MAX_TRIALS:
        raise TuneError(f"--trials {n_trials}: expected 1..{MAX_TRIALS}")
    base = list(overrides or [])
    train_cfg, _ = resolve_config(family, config, base)  # refuse a bad base config before any trial
    if not train_cfg.val_every or train_cfg.val_fraction <= 0:
        raise TuneError("tune needs validation: train.val_every > 0 and train.val_fraction > 0 (the objective is "
                        "the validation score)")
    check_space(space, family, config, base)
    out = check_output_dir(output)
    from caloforge.dataset import ShowerFile

    with ShowerFile(data):  # a missing or unusable data file is refused before the study directory is made
        pass
    out.mkdir(parents=True, exist_ok=True)
    meta = {"data": str(Path(data).resolve()), "family": family, "config": config, "overrides": base, "seed": seed,
            "space": [p.__dict__ | {"choices": list(p.choices)} for p in space]}
    meta_file = out / "tune.json"
    if meta_file.exists():
        old = json.loads(meta_file.read_text())
        if old != json.loads(json.dumps(meta)):
            raise TuneError(f"{out}: holds a study with other data, family, config, seed or space; use another -o")
    else:
        _write(meta_file, json.dumps(meta, indent=1) + "\n")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if prune else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}", direction="minimize",
                                pruner=pruner, load_if_exists=True)
    if (n := _requeue_interrupted(study)) and not quiet:
        print(f"{out}: {n} interrupted trial(s) queued again", file=sys.stderr)
    while len(done := _finished(study)) < n_trials:
        study.sampler = _sampler(seed, len(done), n_startup)
        trial = study.ask()
        values = {p.name: p.suggest(trial) for p in space}
        run_dir = out / f"trial-{trial.number:04d}"
        shutil.rmtree(run_dir, ignore_errors=True)
        train_cfg, model_cfg = resolve_config(family, config, base + [_assignment(k, v) for k, v in values.items()])
        if not quiet:
            print(f"trial {trial.number} ({len(done) + 1}/{n_trials}): "
                  + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()),
                  file=sys.stderr)
        trainer = Trainer.create(str(data), family, run_dir, train_cfg, model_cfg, device, quiet=True)

        def report(tr: Trainer, trial=trial) -> None:
            step = tr.state["step"]
            if tr.latest_validation and tr.cfg.val_every and step % tr.cfg.val_every == 0:
                trial.report(float(tr.latest_validation["score"]), step)
                if prune and step < tr.total_steps and trial.should_prune():
                    raise optuna.TrialPruned()

        try:
            state = trainer.fit(report)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            outcome = "pruned"
        else:
            score = state["best_score"]
            if score is None or not math.isfinite(score):
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                outcome = "failed (no finite validation score)"
            else:
                study.tell(trial, float(score))
                outcome = f"score {score:.5g}"
        if not keep_runs:  # keep only the best trial's run
            best_n = _best_number(study)
            keep = None if best_n is None else f"trial-{best_n:04d}"
            for d in out.glob("trial-*"):
                if d.name != keep:
                    shutil.rmtree(d, ignore_errors=True)
        if not quiet:
            print(f"trial {trial.number}: {outcome}", file=sys.stderr)
        summary = _summary(study, meta)
        _write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
        if summary["best"] is not None:
            _write(out / "best.toml", _best_toml(family, config, base, summary["best"]["params"]))
    return _summary(study, meta)


def _best_number(study) -> int | None:
    try:
        return study.best_trial.number
    except ValueError:
        return None


def _summary(study, meta: dict) -> dict:
    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
               "steps": max(t.intermediate_values) if t.intermediate_values else None} for t in study.trials]
    best = None
    if (n := _best_number(study)) is not None:
        b = study.trials[n]
        best = {"number": n, "value": b.value, "params": b.params, "run": f"trial-{n:04d}"}
    return {**meta, "trials": trials, "best": best}


def _best_toml(family: str, config: str | None, base: list[str], params: dict[str, Any]) -> str:
    """The base config with the overrides and the best values, as a TOML file for ``caloforge train --config``."""
    import dataclasses

    from caloforge.train import resolve_config

    train_cfg, model_cfg = resolve_config(family, config, base + [f"{k}={v}" for k, v in params.items()])
    lines = [f"# caloforge tune: best trial of the study (values {json.dumps(params)})", f'family = "{family}"', "",
             "[train]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in dataclasses.asdict(train_cfg).items()]
    lines += ["", "[model]"] + [f"{k} = {_toml_value(v)}" for k, v in model_cfg.items()]
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf") if not math.isnan(v) else "nan"
    return str(v)


def _write(path: Path, text: str) -> None:
    from caloforge.models.base import _atomic_write_bytes

    _atomic_write_bytes(path, text.encode())


# ---- CLI ----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="training shower file (a validation split is held out of it)")
    p.add_argument("--model", dest="family", required=True, help="model family: layerflow, wgan")
    p.add_argument("--config", help="base TOML config ([train], [model]); the trials change it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed overrides of the base config for every trial (e.g. train.max_steps=500)")
    p.add_argument("--space", required=True, help="TOML file with the [space] table (see caloforge.tune)")
    p.add_argument("--trials", type=int, default=20, help="finished trials the study should have (default 20)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (training seeds come from the config)")
    p.add_argument("--startup", type=int, default=4, help="random trials before TPE takes over (default 4)")
    p.add_argument("--no-prune", action="store_true", help="train every trial to the end")
    p.add_argument("--keep-runs", action="store_true", help="keep every trial's run directory (default: the best)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("-o", "--output", required=True, help="study directory (study.db, summary.json, best.toml)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-trial lines")


def run(args: argparse.Namespace) -> int:
    from caloforge.train import pick_device
    from caloforge.validate import check_int, check_seed

    check_int(args.trials, "--trials", 1, MAX_TRIALS)
    check_int(args.startup, "--startup", 0, MAX_TRIALS)
    check_seed(args.seed)
    space = load_space(args.space)
    summary = tune(args.data, args.family, args.output, space, args.trials, args.config, args.overrides, args.seed,
                   pick_device(args.device), args.startup, not args.no_prune, args.keep_runs, args.quiet)
    if not args.quiet:
        best = summary["best"]
        print(f"{args.output}: {len(summary['trials'])} trials; best " +
              (f"trial {best['number']} (score {best['value']:.5g}): {best['params']}; config in "
               f"{Path(args.output) / 'best.toml'}" if best else "none (no trial finished)"))
    return 0
