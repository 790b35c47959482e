"""Train a generative shower model on a shower file: seeded, resumable, self-validating.

``caloforge train --data TRAIN.h5 --model layerflow -o runs/NAME`` writes into runs/NAME:
``run.json`` (the resolved configuration), ``checkpoint.safetensors`` (weights, optimiser and RNG states; written
atomically every ``checkpoint_every`` steps and at the end), ``history.jsonl`` (losses and validation metrics),
``model.safetensors`` + ``model.json`` (the best model on the validation split, or the final weights with
``select = "last"``: what generate/export use) and ``last/`` (the final weights). ``--resume`` continues a killed
run exactly where its last checkpoint stopped. ``torchrun --nproc-per-node N -m caloforge train ...`` trains with N
processes, each on a shard of every batch, as one process would (:mod:`caloforge.distributed`; rank 0 writes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

CHECKPOINT = "checkpoint.safetensors"
RUN_FILE = "run.json"
HISTORY = "history.jsonl"


class TrainingError(ValueError):
    """Training cannot go on (divergence beyond the rollback budget, an incompatible resume, ...)."""


@dataclass
class TrainConfig:
    """Optimisation, checkpointing and validation settings (the ``[train]`` table of a config file)."""

    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: float = 0.0  # > 0: train this many epochs (overrides max_steps)
    max_steps: int = 2000
    lr_schedule: str = "cosine"  # "cosine" (to lr * lr_min_factor) or "constant"
    lr_min_factor: float = 0.05
    warmup_steps: int = 0
    grad_clip: float = 5.0
    checkpoint_every: int = 200
    val_every: int = 500
    val_fraction: float = 0.1
    val_max_showers: int = 2000
    select: str = "best"  # runs/NAME holds the "best" model on the validation split, or the "last" (final) weights
    split_seed: int = 0  # the train/validation split depends only on this, not on the training seed
    log_every: int = 50
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5
    divergence_threshold: float = 1e7  # |loss| above this counts as divergence
    amp: bool = False  # bf16 autocast on CUDA (ignored on CPU); measured no faster for layerflow on an H200
    deterministic: bool = True  # deterministic kernels: same seed, same weights, and resumes bit-identical
    mirror_x: bool = False  # mirror a random half of each batch in x (the detector's symmetry; shower-axis frame)
    freeze: str = ""  # parameters kept as they are, comma-separated names or prefixes ("blocks,count_blocks": a
    # layerflow fine-tune that trains the cell laws alone); every name must match a parameter
    threads: int = 1  # torch CPU threads: 1 is fastest on a machine shared with Geant4 jobs
    seed: int = 0

    #: Inclusive bounds of the numeric options, choices of the string options (checked by ``from_dict``).
    bounds: ClassVar[dict[str, tuple]] = {
        "batch_size": (1, 10**6), "lr": (1e-12, 10.0), "weight_decay": (0.0, 1e3), "epochs": (0.0, 1e6),
        "max_steps": (1, 10**9), "lr_schedule": ("cosine", "constant"), "lr_min_factor": (0.0, 1.0),
        "warmup_steps": (0, 10**9), "grad_clip": (0.0, 1e12), "checkpoint_every": (1, 10**9),
        "val_every": (0, 10**9), "val_fraction": (0.0, 0.95), "val_max_showers": (1, 10**9),
        "select": ("best", "last"), "split_seed": (0, 2**63 - 1), "log_every": (0, 10**9),
        "max_rollbacks": (0, 1000), "rollback_lr_factor": (1e-6, 1.0), "divergence_threshold": (1e-12, 1e300),
        "threads": (0, 4096), "seed": (0, 2**63 - 1),
    }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "train config [train]") -> TrainConfig:
        from caloforge.validate import coerce_option

        if not isinstance(d, dict):
            raise TrainingError(f"{source}: [train] is {d!r:.60}; expected a table of options")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainingError(f"{source}: unknown [train] option(s) {unknown}; known: {sorted(names)}")
        defaults = cls()
        kw = {k: coerce_option(k, v, getattr(defaults, k), f"{source}:", cls.bounds.get(k), TrainingError)
              for k, v in d.items()}
        return cls(**kw)


# ---- configuration ------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def resolve_config(family: str, config_file: str | None, overrides: list[str]) -> tuple[TrainConfig, dict[str, Any]]:
    """(train config, model config dict) from defaults < config file < ``--set key=value`` overrides."""
    from caloforge.models import get_family

    cls = get_family(family)
    train_d: dict[str, Any] = {}
    model_d: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise TrainingError(f"{path}: invalid TOML ({err})") from None
        if "family" in data and data["family"] != family:
            raise TrainingError(f"{path}: field 'family' is {data['family']!r} but --model is {family!r}")
        unknown = sorted(set(data) - {"family", "train", "model"})
        if unknown:
            raise TrainingError(f"{path}: unknown top-level key(s) {unknown}; expected [train] and [model] tables")
        for key, dest in (("train", train_d), ("model", model_d)):
            if not isinstance(data.get(key, {}), dict):
                raise TrainingError(f"{path}: [{key}] is {data[key]!r:.60}; expected a table of options")
            dest.update(data.get(key, {}))
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    model_names = {f.name for f in dataclasses.fields(cls.Config)}
    for item in overrides:
        if "=" not in item:
            raise TrainingError(f"--set {item!r}: expected key=value (e.g. train.lr=1e-4 or model.flow_hidden=128)")
        key, value = item.split("=", 1)
        key = key.strip()
        section, _, name = key.rpartition(".")
        if section == "train" or (not section and name in train_names):
            train_d[name] = _parse_value(value)
        elif section == "model" or (not section and name in model_names):
            model_d[name] = _parse_value(value)
        else:
            raise TrainingError(f"--set {item!r}: unknown key {key!r}; train keys {sorted(train_names)}, "
                                f"model keys {sorted(model_names)}")
    source = f"{config_file} and --set" if config_file else "--set"
    train_cfg = TrainConfig.from_dict(train_d, f"{source} [train]")
    cls.Config.from_dict(model_d, f"{source} [model]")  # validate now
    return train_cfg, model_d


# ---- data ---------------------------------------------------------------------------------------------
def load_training_data(path: str | Path, val_fraction: float, split_seed: int, quiet: bool = True,
                       to_local=None, n_local: int | None = None):
    """Read a shower file into memory, split into (train Batch, val Batch, detector, provenance dict).

    The validation rows are a seeded random subset of the *training* file (never the test file). ``to_local``
    (``ShowerModel.to_local``) maps the training showers into the model's own cells (``n_local`` of them) while
    reading; the validation showers stay in the file's readout window, where generated showers are compared.
    """
    from caloforge.dataset import Batch, DatasetError, ShowerFile
    from caloforge.progress import progress

    if not 0 <= val_fraction < 1:
        raise TrainingError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    with ShowerFile(path) as f:
        if f.detector is None:
            raise DatasetError(f"{path}: no detector description in the file attributes; cannot train")
        n = len(f)
        if n < 2:
            raise DatasetError(f"{path}: {n} showers; training needs at least 2")
        perm = np.random.default_rng(split_seed).permutation(n)
        n_val = int(round(n * val_fraction))
        is_val = np.zeros(n, bool)
        is_val[perm[:n_val]] = True
        dest = np.where(is_val, np.cumsum(is_val) - 1, np.cumsum(~is_val) - 1)
        cond_all = f.conditions
        cond_all.validate(str(path))  # finite, physical (<= 10 TeV) conditions before any fit sees them
        train = np.empty((n - n_val, n_local if to_local is not None else f.n_cells), np.float32)
        val = np.empty((n_val, f.n_cells), np.float32)
        with progress(n, desc="loading data", unit="shower", quiet=quiet) as bar:
            for start in range(0, n, 1000):
                b = f.read(start, start + 1000)
                sl = slice(start, start + len(b))
                m = is_val[sl]
                rows = b.showers[~m]
                if to_local is not None:
                    rows = to_local(rows, b.conditions[~m].as_array())
                train[dest[sl][~m]] = rows
                val[dest[sl][m]] = b.showers[m]
                bar.update(len(b))
        provenance = {
            "path": str(Path(path).resolve()),
            "n_showers": n,
            "n_train": n - n_val,
            "n_val": n_val,
            "val_fraction": val_fraction,
            "split_seed": split_seed,
            "file_size": os.path.getsize(path),
            "attrs": {k: v for k, v in f.attrs.items()
                      if k in ("source", "particle", "physics_list", "geant4_version", "seed", "energy_spec",
                               "angle_spec", "position_spec", "caloforge_version", "detector")},
        }
        return (Batch(cond_all[~is_val], train), Batch(cond_all[is_val], val), f.detector, provenance)


def training_range(train, val, provenance: dict) -> dict[str, list[float]]:
    """The conditions range a model is trained for: the data's range, widened to the file's specs if known."""
    return conditions_range(np.concatenate([train.energies, val.energies]), np.concatenate([train.angles, val.angles]),
                            np.concatenate([train.conditions.position, val.conditions.position]),
                            provenance.get("attrs", {}))


def conditions_range(e: np.ndarray, a: np.ndarray, pos: np.ndarray, attrs: dict) -> dict[str, list[float]]:
    """Energies (MeV), angles (deg) and impact points (n, 2) mm -> their ranges, energy and angle widened to the
    ``energy_spec`` / ``angle_spec`` of the file's attributes ``attrs`` (a grid at 10 GeV is inside a 10:100 spec
    even where the lowest drawn energy is 10003 MeV)."""
    from caloforge.conditions import parse_angle_spec, parse_energy_spec

    rng = {"energy_mev": [float(e.min()), float(e.max())], "angle_deg": [float(a.min()), float(a.max())],
           "x_mm": [float(pos[:, 0].min()), float(pos[:, 0].max())],
           "y_mm": [float(pos[:, 1].min()), float(pos[:, 1].max())]}
    for key, attr, parse in (("energy_mev", "energy_spec", parse_energy_spec), ("angle_deg", "angle_spec",
                                                                                  parse_angle_spec)):
        try:
            lo, hi = parse(str(attrs[attr])).bounds
        except (KeyError, ValueError):
            continue
        rng[key] = [min(lo, rng[key][0]), max(hi, rng[key][1])]
    return rng


# ---- resuming -----------------------------------------------------------------------------------------
_FINGERPRINT_BYTES = 1 << 20


def data_fingerprint(path: str | Path) -> dict[str, Any]:
    """Size, modification time and a hash of the first and last MiB of a data file: cheap, and it changes when the
    file is rewritten or replaced."""
    import hashlib

    p = Path(path)
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        if st.st_size > _FINGERPRINT_BYTES:
            f.seek(max(st.st_size - _FINGERPRINT_BYTES, _FINGERPRINT_BYTES))
            h.update(f.read(_FINGERPRINT_BYTES))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail_sha256": h.hexdigest()}


def _read_run_file(path: Path) -> dict[str, Any]:
    try:
        run = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TrainingError(f"{path}: invalid JSON ({err}); the run cannot be resumed") from None
    if not isinstance(run, dict):
        raise TrainingError(f"{path}: expected a JSON object; the run cannot be resumed")
    for key, kind in (("family", str), ("data", str), ("train", dict), ("model", dict)):
        if not isinstance(run.get(key), kind):
            raise TrainingError(f"{path}: field {key!r} is {run.get(key)!r:.60}; expected a {kind.__name__} (a run "
                                f"written by `caloforge train`)")
    return run


def check_data_unchanged(run: dict[str, Any], run_file: Path) -> None:
    """Refuse to resume when the training data file changed since the run started (its fingerprint in run.json)."""
    want = run.get("data_fingerprint")
    data = Path(run["data"])
    if not want:
        return  # a run started before fingerprints were recorded
    if not data.is_file():
        raise TrainingError(f"{run_file}: the training data {data} is gone; the run cannot be resumed")
    got = data_fingerprint(data)
    changed = [k for k in ("size", "mtime_ns", "head_tail_sha256") if got.get(k) != want.get(k)]
    if changed:
        raise TrainingError(f"{data}: the training data changed since the run in {run_file.parent} started "
                            f"({', '.join(changed)} differ); resuming would train on other data: start a new run "
                            f"(another -o)")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON file atomically (other ranks of a torchrun job may read it meanwhile)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def truncate_history(path: Path, step: int) -> None:
    """Drop the history records past the checkpoint ``step`` (and any torn last line): the resumed run logs them
    again, so every step appears once."""
    if not path.is_file():
        return
    keep, dropped = [], False
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and int(rec.get("step", 0)) <= step
        except (json.JSONDecodeError, TypeError, ValueError):
            ok = False
        if ok:
            keep.append(line)
        else:
            dropped = True
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


# ---- checkpoints --------------------------------------------------------------------------------------
def _optim_to_tensors(name: str, opt) -> tuple[dict, dict]:
    import torch

    sd = opt.state_dict()
    tensors, kinds = {}, {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            tk = f"optim/{name}/{pid}/{key}"
            if isinstance(val, torch.Tensor):
                tensors[tk] = val.detach().to("cpu").contiguous().clone()
                kinds[f"{pid}/{key}"] = "tensor"
            else:
                tensors[tk] = torch.tensor(float(val), dtype=torch.float64)
                kinds[f"{pid}/{key}"] = "int" if isinstance(val, int) else "float"
    groups = json.loads(json.dumps(sd["param_groups"], default=lambda o: list(o) if isinstance(o, tuple) else None))
    return tensors, {"param_groups": groups, "state": kinds}


def _optim_from_tensors(name: str, opt, tensors: dict, meta: dict, device) -> None:
    state: dict[int, dict] = {}
    for key, kind in meta["state"].items():
        pid, sub = key.split("/", 1)
        t = tensors[f"optim/{name}/{pid}/{sub}"]
        if kind == "tensor":
            val = t.to(device) if t.dim() > 0 else t
        else:
            val = int(t.item()) if kind == "int" else float(t.item())
        state.setdefault(int(pid), {})[sub] = val
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(path: Path, model, optimizers: dict, trainer_state: dict) -> None:
    """One safetensors file (weights, optimiser states, RNG states) + JSON metadata, written atomically."""
    import torch
    from safetensors.torch import save

    from caloforge.models.base import _atomic_write_bytes, state_tensors

    tensors = {f"model/{k}": v for k, v in state_tensors(model).items()}
    optim_meta = {}
    for name, opt in optimizers.items():
        t, m = _optim_to_tensors(name, opt)
        tensors.update(t)
        optim_meta[name] = m
    tensors["rng/torch"] = torch.get_rng_state().clone()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state().clone()
    metadata = {"trainer": json.dumps(trainer_state), "optimizers": json.dumps(optim_meta)}
    _atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_checkpoint(path: Path, model, optimizers: dict, device) -> dict:
    """Restore weights, optimiser and RNG states; return the trainer state saved with them."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise TrainingError(f"{path}: no checkpoint to resume from")
    from safetensors import SafetensorError

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as err:
        raise TrainingError(f"{path}: unreadable checkpoint ({err}); start a new run (another -o)") from None
    try:
        trainer_state = json.loads(metadata["trainer"])
        optim_meta = json.loads(metadata["optimizers"])
    except (KeyError, json.JSONDecodeError) as err:
        raise TrainingError(f"{path}: checkpoint metadata missing or invalid ({err})") from None
    try:
        model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")},
                              strict=True)
        for name, opt in optimizers.items():
            if name not in optim_meta:
                raise TrainingError(f"{path}: checkpoint has no state for optimiser {name!r}")
            _optim_from_tensors(name, opt, tensors, optim_meta[name], device)
    except (RuntimeError, KeyError, TypeError, AttributeError) as err:
        raise TrainingError(f"{path}: checkpoint does not match the run's model and optimisers ({err})") from None
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return trainer_state


# ---- validation ---------------------------------------------------------------------------------------
class Validator:
    """W1 distances of visible energy fraction, number of hits and longitudinal CoG on the validation split.

    Each W1 is divided by the spread of the reference observable, and the score is their mean (lower is better).
    Beside the score, ``emptied_layers`` counts the layers empty in at least half more of the generated showers than
    of the real ones: a layer a generator has stopped filling (ReLU cells with no gradient left), which the score
    sees only through the visible energy and the trainer reports at once.
    """

    def __init__(self, val, detector, shape, max_showers: int, seed: int = 12345):
        from caloforge import observables as obs

        n = min(len(val.energies), max_showers)
        self.conditions = val.conditions[:n]
        self.energies = self.conditions.energy
        self.angled = val.showers.shape[1] != detector.n_cells(False)
        self.detector, self.shape, self.seed = detector, detector.shape_for_cells(val.showers.shape[1]), seed
        self.reference = self._observables(val.showers[:n])
        self.scale = {k: max(float(np.nanstd(v)), 1e-9) for k, v in self.reference.items()}
        self.real_empty = self._empty_layers(val.showers[:n])
        self._obs = obs

    def _empty_layers(self, showers: np.ndarray) -> np.ndarray:
        """Fraction of the showers in which each layer holds no energy (L,)."""
        from caloforge import observables as obs

        if not len(showers):
            return np.zeros(0)
        return (obs.layer_energies(showers, obs.as_geometry(self.detector, self.shape)) <= 0).mean(axis=0)

    def _observables(self, showers: np.ndarray) -> dict[str, np.ndarray]:
        from caloforge import observables as obs

        return {
            "vis_frac": obs.visible_energy(showers) / self.energies,
            "n_hits": obs.n_hits(showers).astype(np.float64),
            "cog_z": obs.longitudinal_cog(showers, self.detector, self.shape),
        }

    def __call__(self, model) -> dict[str, float]:
        import torch

        from caloforge.metrics import wasserstein1

        g = torch.Generator(device=model.cond_mean.device).manual_seed(self.seed)
        out = []
        for i in range(0, len(self.energies), 500):
            out.append(model.sample(self.conditions[i:i + 500], generator=g, angled=self.angled).cpu().numpy())
        showers = np.concatenate(out) if out else np.zeros((0, int(np.prod(self.shape))), np.float32)
        gen = self._observables(showers)
        res = {f"w1_{k}": wasserstein1(self.reference[k], gen[k]) / self.scale[k] for k in self.reference}
        vals = [v for v in res.values() if math.isfinite(v)]
        res["score"] = float(np.mean(vals)) if len(vals) == len(res) else float("inf")
        if len(showers) and len(self.real_empty):
            gen_empty = self._empty_layers(showers)
            emptied = np.flatnonzero(gen_empty - self.real_empty >= 0.5)
            res["emptied_layers"] = len(emptied)
            self.emptied = [(int(i), float(gen_empty[i]), float(self.real_empty[i])) for i in emptied]
        return res


def enable_determinism() -> None:
    """Deterministic kernels for the rest of the process, so that the same seed gives the same weights and a resumed
    run ends bit-identical to an uninterrupted one. Without them, scatter-adds and index_put accumulations reorder
    floating-point sums: measured here, two identical 40-step CPU runs differed (no cost for being deterministic,
    2.3-2.8 steps/s either way), and on an H200 a resumed 200-step run differed from an uninterrupted one by 1.4e-3 in
    the weights (identical with this on; BENCHMARKS.md)."""
    import os

    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
    torch.use_deterministic_algorithms(True, warn_only=True)


# ---- the trainer --------------------------------------------------------------------------------------
class Trainer:
    """Generic training loop over the per-family hooks of :class:`~caloforge.models.ShowerModel`."""

    def __init__(self, out_dir: str | Path, run: dict[str, Any], device: str = "cpu", quiet: bool = True,
                 data=None):
        import torch

        from caloforge import distributed
        from caloforge.dataset import ShowerFile
        from caloforge.models import get_family

        self.out = Path(out_dir)
        self.run = run
        self.cfg = TrainConfig.from_dict(run["train"], f"{self.out / RUN_FILE} [train]")
        self.dist = distributed.context()  # None, or this rank of a torchrun process group
        self.is_main = self.dist is None or self.dist.is_main
        self.quiet = quiet or not self.is_main
        self.device = torch.device(device)
        if self.cfg.threads > 0:
            torch.set_num_threads(self.cfg.threads)
        if self.cfg.deterministic:
            enable_determinism()
        cls = get_family(run["family"])
        config = cls.Config.from_dict(run["model"], f"{self.out / RUN_FILE} [model]")
        features = run.get("features")
        if features is not None and (not isinstance(features, list) or not all(isinstance(f, str) for f in features)):
            raise TrainingError(f"{self.out / RUN_FILE}: field 'features' is {features!r:.80}; expected a list of "
                                f"condition feature names")
        if data is None:
            with ShowerFile(run["data"]) as f:
                det = f.detector
            if det is None:
                raise TrainingError(f"{run['data']}: no detector description in the file attributes; cannot train")
            # Every model trained now works in the shower-axis frame (the normal-incidence window's shape, or wider
            # in y with a family's pad_y).
            shell = cls(det, None, config, features=features)
            data = load_training_data(run["data"], self.cfg.val_fraction, self.cfg.split_seed, quiet,
                                      to_local=shell.to_local, n_local=shell.n_cells)
        train, val, detector, provenance = data
        self.train_data, self.val_data, self.provenance = train, val, provenance
        torch.manual_seed(self.cfg.seed)
        self.model = cls(detector, train.showers.shape[1], config, features=features)
        self.model.meta["conditions"] = training_range(train, val, provenance)
        self.model.fit_preprocessing(train)
        if run.get("init_from") and not (self.out / CHECKPOINT).exists():  # fine-tuning (a resume has its weights)
            init_from_model(self.model, run["init_from"], f"{self.out / RUN_FILE}")
        particle = provenance.get("attrs", {}).get("particle")
        self.model.meta["training"] = {"data": provenance, "seed": self.cfg.seed, "train": dataclasses.asdict(self.cfg)}
        if run.get("init_from"):
            self.model.meta["training"]["init_from"] = run["init_from"]
        if particle is not None:
            self.model.meta["particle"] = str(particle)
        if self.dist is not None:
            self.model.meta["training"]["processes"] = self.dist.world
        self.model.to(self.device)
        distributed.broadcast_state(self.model)  # rank 0's initial weights and preprocessing on every rank
        self._sync_buffers = self.dist is not None and any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        self._freeze(self.cfg.freeze)
        self.optimizers = self.model.configure_optimizers(self.cfg.lr, self.cfg.weight_decay)
        self._base_lrs = {k: [g["lr"] for g in o.param_groups] for k, o in self.optimizers.items()}
        self.validator = (Validator(val, detector, self.model.shape, self.cfg.val_max_showers)
                          if len(val.energies) and self.is_main else None)  # rank 0 validates
        self.latest_validation: dict[str, float] | None = None
        if self.cfg.mirror_x and self.model.frame != "axis":
            raise TrainingError(f"{self.out / RUN_FILE}: train.mirror_x needs a model in the shower-axis frame")
        self.showers = torch.from_numpy(train.showers)
        self.cond = torch.as_tensor(train.conditions.as_array(), dtype=torch.float32)
        if self.device.type == "cuda":
            self.showers, self.cond = self.showers.to(self.device), self.cond.to(self.device)
        self.n_train = len(self.cond)
        self.batch_size = min(self.cfg.batch_size, self.n_train)
        self.steps_per_epoch = max(1, self.n_train // self.batch_size)
        self.total_steps = (int(math.ceil(self.cfg.epochs * self.steps_per_epoch)) if self.cfg.epochs > 0
                            else self.cfg.max_steps)
        self.state: dict[str, Any] = {"step": 0, "best_score": None, "best_step": None, "rollbacks": 0,
                                      "lr_scale": 1.0}
        self._perm_epoch, self._perm = -1, None

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, data: str, family: str, out_dir: str | Path, train_cfg: TrainConfig, model_cfg: dict,
               device: str = "cpu", quiet: bool = True, command: list[str] | None = None,
               features: list[str] | None = None, init_from: str | None = None) -> Trainer:
        """A new run in ``out_dir`` (refuses a directory that already holds a run); ``features``: the model's
        condition features (None: the family's default); ``init_from``: a trained model (directory or zoo name)
        whose weights and preprocessing the run starts from (same family, detector, shape and options)."""
        from caloforge import __version__, distributed
        from caloforge.validate import check_output_dir

        out = check_output_dir(out_dir)
        main = distributed.is_main()  # under torchrun rank 0 alone writes the run directory
        if main and ((out / CHECKPOINT).exists() or (out / RUN_FILE).exists()):
            raise TrainingError(f"{out}: already holds a training run; use --resume to continue it, or another -o")
        if main:
            out.mkdir(parents=True, exist_ok=True)
        run = {"family": family, "data": str(Path(data).resolve()), "train": dataclasses.asdict(train_cfg),
               "model": model_cfg, **({"features": list(features)} if features else {}),
               **({"init_from": str(init_from)} if init_from else {}),
               "caloforge_version": __version__, "command": command or [],
               "data_fingerprint": data_fingerprint(data) if Path(data).is_file() else None}
        trainer = cls(out, run, device, quiet)
        if main:
            _write_json(out / RUN_FILE, run)
        return trainer

    @classmethod
    def resume(cls, out_dir: str | Path, device: str = "cpu", quiet: bool = True,
               max_steps: int | None = None, epochs: float | None = None) -> Trainer:
        """Reopen a run from ``run.json`` and its checkpoint; optionally extend its length."""
        from caloforge import distributed

        out = Path(out_dir)
        if not (out / RUN_FILE).is_file():
            raise TrainingError(f"{out}: no {RUN_FILE}; nothing to resume (start a run without --resume)")
        run = _read_run_file(out / RUN_FILE)
        check_data_unchanged(run, out / RUN_FILE)
        if max_steps is not None or epochs is not None:
            run["train"]["max_steps"] = max_steps if max_steps is not None else run["train"]["max_steps"]
            run["train"]["epochs"] = epochs if epochs is not None else (0.0 if max_steps is not None
                                                                        else run["train"]["epochs"])
            TrainConfig.from_dict(run["train"], "--max-steps/--epochs [train]")  # refuse before run.json is rewritten
            if distributed.is_main():
                _write_json(out / RUN_FILE, run)
        trainer = cls(out, run, device, quiet)
        if (out / CHECKPOINT).is_file():
            trainer.state.update(load_checkpoint(out / CHECKPOINT, trainer.model, trainer.optimizers, trainer.device))
        if trainer.is_main:
            truncate_history(out / HISTORY, int(trainer.state["step"]))
        return trainer

    # ---- pieces -------------------------------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        c = self.cfg
        f = 1.0
        if c.warmup_steps and step < c.warmup_steps:
            f = (step + 1) / c.warmup_steps
        elif c.lr_schedule == "cosine":
            t = min(1.0, step / max(1, self.total_steps))
            f = c.lr_min_factor + (1 - c.lr_min_factor) * 0.5 * (1 + math.cos(math.pi * t))
        return f * self.state["lr_scale"]

    def _set_lr(self, step: int) -> None:
        f = self._lr_factor(step)
        for name, opt in self.optimizers.items():
            for g, base in zip(opt.param_groups, self._base_lrs[name]):
                g["lr"] = base * f

    def _batch(self, step: int):
        import torch

        from caloforge import distributed
        from caloforge.models.base import TrainBatch

        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(self.n_train)
            self._perm, self._perm_epoch = torch.as_tensor(perm, device=self.showers.device), epoch
        idx = self._perm[i * self.batch_size:(i + 1) * self.batch_size]
        if self.cfg.mirror_x:  # the same rows mirrored whatever the number of processes
            flip = torch.as_tensor(np.random.default_rng([self.cfg.seed, 7, step]).random(len(idx)) < 0.5)
        if self.dist is not None:  # this rank's shard of the global batch
            rows = distributed.shard(len(idx))
            mine = idx[rows]
            cond, showers = self.cond[mine].to(self.device), self.showers[mine].to(self.device, non_blocking=True)
            if self.cfg.mirror_x:
                cond, showers = self._mirror_x(cond, showers, flip[rows].to(self.device))
            return TrainBatch(cond, showers, rows=rows, total=len(idx))
        cond, showers = self.cond[idx].to(self.device), self.showers[idx].to(self.device, non_blocking=True)
        if self.cfg.mirror_x:
            cond, showers = self._mirror_x(cond, showers, flip.to(self.device))
        return TrainBatch(cond, showers)

    def _freeze(self, spec: str) -> None:
        """Keep the parameters named (or under the prefixes) in ``spec`` fixed: no gradients, so Adam leaves them."""
        names = [n.strip() for n in spec.split(",") if n.strip()]
        params = dict(self.model.named_parameters())
        for name in names:
            hit = [k for k in params if k == name or k.startswith(name + ".")]
            if not hit:
                tops = sorted({k.split(".")[0] for k in params})
                raise TrainingError(f"{self.out / RUN_FILE}: train.freeze {name!r} matches no parameter of the "
                                    f"{self.model.family} model; expected names or prefixes among {tops}")
            for k in hit:
                params[k].requires_grad_(False)

    def _mirror_x(self, cond, showers, mask):
        """Showers of the rows in ``mask`` mirrored in x (x -> -x): the calorimeter is symmetric under it at any
        angle (the tilt is in the y-z plane). In the shower-axis frame the local column i becomes 30 - i (the
        axis cell moves by one), so the mirrored grid shifts by one column; its outermost column (75 mm from the
        axis) is dropped. An impact on a cell boundary (x = k c) keeps its axis cell: there i becomes 29 - i."""
        import torch

        n_l, nx, ny = self.model.shape
        s = showers[mask].reshape(-1, n_l, nx, ny).flip(2)
        moved = torch.zeros_like(s)
        moved[:, :, 1:, :] = s[:, :, :-1, :]
        showers, cond = showers.clone(), cond.clone()
        cond[mask, 2] = -cond[mask, 2]
        # an impact on a cell boundary (x = k c, e.g. the corner photons) keeps its axis cell: no shift
        on_edge = (self.model.axis_cells(cond[mask])[2] == 0)[:, None, None, None]
        showers[mask] = torch.where(on_edge, s, moved).reshape(len(moved), -1)
        return cond, showers

    def _autocast(self):
        import torch

        if self.device.type == "cuda" and self.cfg.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return None

    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.out / HISTORY, "a") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint(self) -> None:
        from caloforge import distributed

        if self.is_main:
            save_checkpoint(self.out / CHECKPOINT, self.model, self.optimizers, self.state)
        distributed.barrier()  # every rank may read it (a rollback) once it is complete

    def export(self, path: Path) -> None:
        from caloforge.models import save_model

        if not self.is_main:
            return
        meta = dict(self.model.meta.get("training", {}))
        meta.update(step=self.state["step"], best_score=self.state["best_score"])
        self.model.meta["training"] = meta
        save_model(self.model, path)

    def validate(self) -> dict[str, float] | None:
        if self.validator is None:
            return None
        res = self.validator(self.model)
        self.latest_validation = res
        record = {"step": self.state["step"], "kind": "val", **res}
        self._log(record)
        if res.get("emptied_layers") and self.is_main:
            which = ", ".join(f"layer {i} in {100 * g:.0f} % (real {100 * r:.0f} %)"
                              for i, g, r in self.validator.emptied)
            print(f"caloforge train: warning: step {self.state['step']}: the model leaves layers empty that the "
                  f"validation showers fill ({which}): a generator that stopped filling a layer (dead ReLU cells) "
                  f"does not recover by itself; see docs/models.md (layer_flow_anchor)", file=sys.stderr)
        best = self.state["best_score"]
        if math.isfinite(res["score"]) and (best is None or res["score"] < best):
            self.state["best_score"], self.state["best_step"] = res["score"], self.state["step"]
            if self.cfg.select == "best":
                self.model.meta["validation"] = res
                self.export(self.out)
        return res

    def _diverged(self, losses: dict[str, float]) -> str | None:
        for k, v in losses.items():
            if not math.isfinite(v):
                return f"loss {k!r} is {v}"
            if abs(v) > self.cfg.divergence_threshold:
                return f"loss {k!r} = {v:.3g} exceeds divergence_threshold {self.cfg.divergence_threshold:g}"
        for name, p in self.model.named_parameters():
            if not bool(p.detach().isfinite().all()):
                return f"parameter {name!r} is no longer finite"
        return None

    def _rollback(self, reason: str) -> None:
        st = self.state
        if st["rollbacks"] >= self.cfg.max_rollbacks:
            raise TrainingError(
                f"training diverged at step {st['step']} ({reason}) after {st['rollbacks']} rollbacks with "
                f"lowered learning rates; lower train.lr or raise train.max_rollbacks")
        rollbacks, lr_scale = st["rollbacks"] + 1, st["lr_scale"] * self.cfg.rollback_lr_factor
        bad_step = st["step"]
        st.update(load_checkpoint(self.out / CHECKPOINT, self.model, self.optimizers, self.device))
        st["rollbacks"], st["lr_scale"] = rollbacks, lr_scale
        # The checkpoint brought back the random streams too: a retry would draw the same training noise, and a
        # NaN that one noise draw caused (stop 28: one shower's dequantisation) would recur at every learning rate.
        # Retry with fresh noise, the same on every process; later checkpoints keep resumes exact.
        import torch

        torch.manual_seed(int(np.random.SeedSequence([self.cfg.seed, int(st["step"]), rollbacks]).generate_state(1)[0]))
        msg = (f"step {bad_step}: {reason}; rolled back to the checkpoint at step {st['step']} with learning rate "
               f"x{lr_scale:g} (rollback {rollbacks}/{self.cfg.max_rollbacks})")
        if self.is_main:
            print(f"caloforge train: warning: {msg}", file=sys.stderr)
        self._log({"step": bad_step, "kind": "rollback", "reason": reason, "to_step": st["step"],
                   "lr_scale": lr_scale})

    # ---- the loop -----------------------------------------------------------------------------------------
    def fit(self, callback=None) -> dict[str, Any]:
        """Train to ``total_steps``; ``callback(trainer)`` runs after each step (tests use it to interrupt)."""
        from caloforge import distributed
        from caloforge.progress import progress

        st, cfg = self.state, self.cfg
        if distributed.agree(not (self.out / CHECKPOINT).exists()):  # rank 0 decides: it writes the file
            self.checkpoint()  # the rollback target before the first step
        t0 = time.time()
        avg: dict[str, float] = {}
        self.model.train()
        with progress(self.total_steps, desc=f"train {self.model.family}", unit="step", quiet=self.quiet,
                      initial=st["step"]) as bar:
            while st["step"] < self.total_steps:
                step = st["step"]
                self._set_lr(step)
                batch = self._batch(step)
                losses = self.model.training_step(batch, self.optimizers, step, cfg.grad_clip, self._autocast())
                losses = distributed.mean_losses(losses, batch.share)  # the whole batch's losses (all ranks)
                reason = self._diverged(losses)
                if reason:
                    self._rollback(reason)
                    bar.n = st["step"]
                    continue
                st["step"] = step + 1
                if self._sync_buffers:
                    distributed.broadcast_buffers(self.model)
                for k, v in losses.items():
                    avg[k] = v if k not in avg else 0.95 * avg[k] + 0.05 * v
                bar.update(1)
                if st["step"] % 10 == 0:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in avg.items()}, refresh=False)
                if cfg.log_every and st["step"] % cfg.log_every == 0:
                    self._log({"step": st["step"], "kind": "train", "time_s": round(time.time() - t0, 2),
                               "lr": self._lr_factor(step) * cfg.lr, **losses})
                if (cfg.val_every and st["step"] % cfg.val_every == 0) or st["step"] == self.total_steps:
                    res = self.validate()
                    distributed.sync_rng()
                    if res is not None and not self.quiet:
                        bar.write(f"step {st['step']}: validation " +
                                  " ".join(f"{k}={v:.4f}" for k, v in res.items()))
                    self.model.train()
                if st["step"] % cfg.checkpoint_every == 0 or st["step"] == self.total_steps:
                    self.checkpoint()
                if callback is not None:
                    callback(self)
        if self.latest_validation is not None:
            self.model.meta["validation"] = self.latest_validation  # what last/ (and select = "last") holds
        self.export(self.out / "last")
        if self.validator is None or st["best_score"] is None or cfg.select == "last":
            self.export(self.out)
        return dict(st)


# ---- CLI ----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="training shower file (HDF5); a validation split is held out of it")
    p.add_argument("--model", dest="family", help="model family: layerflow, wgan, densewgan, calogan, gan3d, bibae, "
                   "cfm (docs/models.md); eventwgan for event files (docs/events.md)")
    p.add_argument("--features", help="condition features the model sees, comma-separated, 'log_e' first (default: "
                   "the family's own; e.g. log_e,is_photon,charge to tell particles apart in a family that takes "
                   "the energy alone; docs/models.md)")
    p.add_argument("--config", help="TOML file with [train] and [model] tables (configs/*.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 --set model.flow_hidden=128")
    p.add_argument("-o", "--output", required=True, help="run directory, e.g. runs/NAME")
    p.add_argument("--resume", action="store_true", help="continue the run in -o from its last checkpoint")
    p.add_argument("--init-from", metavar="MODEL", help="start a new run from a trained model's weights (a run "
                   "directory or zoo name of the same family, detector and options): fine-tuning, or training on")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, help="number of epochs (overrides the config)")
    g.add_argument("--max-steps", type=int, help="number of optimisation steps (overrides the config)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available; default)")
    p.add_argument("--seed", type=int, help="training seed (default from config, 0)")
    p.add_argument("--val-fraction", type=float, help="fraction of the training file held out for validation")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1: the machine is shared)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def init_from_model(model, source: str, where: str) -> None:
    """Copy a trained model's weights and buffers (preprocessing included) into ``model``, a new model of the same
    family, detector, cell shape, condition features and options; otherwise a TrainingError naming what differs."""
    from caloforge.models.base import load_model

    try:
        src = load_model(source)
    except Exception as err:
        raise TrainingError(f"{where}: init_from {source!r}: {err}") from None
    free = getattr(model, "fine_tune_options", ())  # options a fine-tune may change (the weights keep their meaning)
    checks = (("family", src.family, model.family), ("detector", src.detector.name, model.detector.name),
              ("shape", tuple(src.shape), tuple(model.shape)),
              ("condition features", list(src.features), list(model.features)),
              ("model options", {k: v for k, v in src.config.to_dict().items() if k not in free},
               {k: v for k, v in model.config.to_dict().items() if k not in free}))
    for what, theirs, ours in checks:
        if theirs != ours:
            raise TrainingError(f"{where}: init_from {source!r}: its {what} {theirs!r:.200} differ from this run's "
                                f"{ours!r:.200}; expected the same (give the source's config and features)")
    model.load_state_dict(src.state_dict())


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device available (use --device cpu)")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"--device {name!r}: expected cpu, cuda or auto")
    return name


def run(args: argparse.Namespace) -> int:
    """Train in this process, or as one rank of ``torchrun --nproc-per-node N -m caloforge train ...``."""
    if args.family == "eventwgan":  # event-level files have their own trainer (docs/events.md)
        from caloforge.events.wgan import train as train_events

        if not args.data:
            raise ValueError("--model eventwgan: give --data EVENTS.h5 (an event file)")
        train_events(args.data, args.output, steps=20000 if args.max_steps is None else args.max_steps,
                     seed=0 if args.seed is None else args.seed, threads=1 if args.threads is None else args.threads,
                     resume=args.resume, quiet=args.quiet, device=pick_device(args.device))
        return 0
    from caloforge import distributed

    ctx, device = distributed.init_from_env(pick_device(args.device))
    try:
        code = _run(args, device, ctx is None or ctx.is_main)
        distributed.barrier()  # no rank tears its group down while another still talks (gloo aborted at exit once)
        return code
    finally:
        distributed.shutdown()


def _run(args: argparse.Namespace, device: str, main: bool) -> int:
    if args.resume:
        trainer = Trainer.resume(args.output, device, args.quiet, args.max_steps, args.epochs)
    else:
        if not args.data or not args.family:
            raise ValueError("--data and --model are required for a new run (or give --resume)")
        from caloforge.models import get_family

        get_family(args.family)
        overrides = list(args.overrides)
        for flag, key in ((args.seed, "seed"), (args.val_fraction, "val_fraction"), (args.threads, "threads"),
                          (args.max_steps, "max_steps"), (args.epochs, "epochs")):
            if flag is not None:
                overrides.append(f"train.{key}={flag}")
        if args.max_steps is not None:
            overrides.append("train.epochs=0")
        train_cfg, model_cfg = resolve_config(args.family, args.config, overrides)
        features = [f.strip() for f in args.features.split(",")] if args.features else None
        trainer = Trainer.create(args.data, args.family, args.output, train_cfg, model_cfg, device, args.quiet,
                                 command=sys.argv, features=features, init_from=args.init_from)
    t0 = time.time()
    state = trainer.fit()
    if not args.quiet and main:
        print(f"trained {trainer.model.family} for {state['step']} steps in {time.time() - t0:.0f} s; "
              f"best validation score {state['best_score']} at step {state['best_step']}; "
              f"model in {trainer.out}", file=sys.stderr)
    return 0
