"""The one model abstraction: :class:`ShowerModel`, and saving/loading models as safetensors + JSON.

A shower model maps conditions (incident energy in MeV, incidence angle in degrees) to showers in MeV for one
detector. Every model is split into a *noise draw* and a *deterministic decoder*::

    showers = model.decode(energies, angles, *model.draw_noise(n, generator))

``sample`` is exactly that, and the ONNX export wraps ``decode`` with the noise as explicit inputs, so
torch and ONNX give identical showers for identical noise. Training goes through per-family hooks that the
generic :class:`caloforge.train.Trainer` calls: ``fit_preprocessing`` (constants stored as buffers, computed
once from the training data), ``configure_optimizers`` and ``training_step`` (the default does one optimiser
step on ``loss``; adversarial families override it).

A saved model is a directory with ``model.safetensors`` (weights and preprocessing buffers) and ``model.json``
(family, architecture config, detector description, training conditions range, provenance, version).
Loading reads only those two files and never executes code from them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from caloforge import __version__
from caloforge.detector import Detector, DetectorError, load_detector

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


class ModelError(ValueError):
    """A model file is missing, malformed, or does not fit what was asked of it."""


class ConditionsWarning(UserWarning):
    """Conditions requested outside the range the model was trained on."""


@dataclass
class TrainBatch:
    """One training batch on the model's device: energies (n,) MeV, angles (n,) deg, showers (n, n_cells) MeV."""

    energies: torch.Tensor
    angles: torch.Tensor
    showers: torch.Tensor

    def __len__(self) -> int:
        return int(self.energies.shape[0])


@dataclass
class ModelConfig:
    """Base of the per-family architecture configs (plain dataclasses of JSON-able values)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> ModelConfig:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ModelError(f"{source}: unknown model option(s) {unknown}; known: {sorted(names)}")
        kw = {}
        for k, v in d.items():
            default = getattr(cls(), k)
            if isinstance(default, bool):
                kw[k] = bool(v)
            elif isinstance(default, int) and not isinstance(v, bool):
                kw[k] = int(v)
            elif isinstance(default, float):
                kw[k] = float(v)
            elif isinstance(default, tuple):
                kw[k] = tuple(v)
            else:
                kw[k] = v
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ShowerModel(nn.Module):
    """Base class of all shower models: conditions -> non-negative showers (n, n_cells) in MeV.

    Subclasses set ``family`` and ``Config`` and implement ``_fit_preprocessing``, ``noise_shapes``,
    ``decode`` and either ``loss`` (likelihood models) or ``training_step`` (e.g. GANs).
    """

    family: ClassVar[str] = ""
    Config: ClassVar[type[ModelConfig]] = ModelConfig
    #: Condition names, in the order ``decode`` takes them (room for impact position / particle later).
    conditions: ClassVar[tuple[str, ...]] = ("energy", "angle")
    #: ``sample`` decodes in chunks of this many showers (cache-friendly on CPU); 0 = one call.
    sample_chunk: ClassVar[int] = 0

    def __init__(self, detector: Detector, n_cells: int | None = None, config: ModelConfig | None = None):
        super().__init__()
        self.detector = detector
        self.n_cells = int(n_cells if n_cells is not None else detector.n_cells())
        try:
            self.shape: tuple[int, int, int] = detector.shape_for_cells(self.n_cells)
        except DetectorError as err:
            raise ModelError(str(err)) from None
        self.config = config if config is not None else self.Config()
        # Condition standardisation: log E and angle -> zero mean, unit variance (set by fit_preprocessing).
        self.register_buffer("cond_mean", torch.zeros(2))
        self.register_buffer("cond_std", torch.ones(2))
        #: Metadata saved with the model: training conditions range, provenance (filled by the trainer).
        self.meta: dict[str, Any] = {}

    # ---- conditions -------------------------------------------------------------------------------
    def condition_features(self, energies: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """Standardised (log E, angle) features (n, 2) that every network sees."""
        raw = torch.stack([torch.log(energies.float()), angles.float()], dim=1)
        return (raw - self.cond_mean) / self.cond_std

    def fit_preprocessing(self, data: Any) -> None:
        """Compute the preprocessing constants (buffers) from the training data (a ``dataset.Batch``)."""
        e = np.asarray(data.energies, dtype=np.float64)
        a = np.asarray(data.angles, dtype=np.float64)
        raw = np.stack([np.log(e), a], axis=1)
        std = raw.std(axis=0)
        self.cond_mean.copy_(torch.as_tensor(raw.mean(axis=0), dtype=torch.float32))
        self.cond_std.copy_(torch.as_tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32))
        self.meta.setdefault("conditions", {
            "energy_mev": [float(e.min()), float(e.max())],
            "angle_deg": [float(a.min()), float(a.max())],
        })
        self._fit_preprocessing(data)

    def _fit_preprocessing(self, data: Any) -> None:
        """Family-specific constants; ``data`` has ``energies``, ``angles``, ``showers`` numpy arrays."""

    # ---- sampling ---------------------------------------------------------------------------------
    def noise_shapes(self, n: int) -> list[tuple[tuple[int, ...], str]]:
        """The noise tensors ``decode`` takes: a list of (shape, "normal" | "uniform")."""
        raise NotImplementedError

    def draw_noise(self, n: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Draw the noise tensors for ``n`` showers on the model's device."""
        device = self.cond_mean.device
        out = []
        for shape, kind in self.noise_shapes(n):
            if kind == "normal":
                out.append(torch.randn(shape, generator=generator, device=device))
            else:
                out.append(torch.rand(shape, generator=generator, device=device))
        return out

    def decode(self, energies: torch.Tensor, angles: torch.Tensor, *noise: torch.Tensor) -> torch.Tensor:
        """Deterministic map (conditions, noise) -> showers (n, n_cells) in MeV, >= 0."""
        raise NotImplementedError

    def check_conditions(self, energies: torch.Tensor | np.ndarray, angles: torch.Tensor | np.ndarray) -> None:
        """Warn (``ConditionsWarning``) when conditions fall outside the training range."""
        rng = self.meta.get("conditions")
        if not rng:
            return
        for name, values, key, unit in (("energy", energies, "energy_mev", "MeV"), ("angle", angles, "angle_deg",
                                                                                    "deg")):
            lo, hi = rng.get(key, (-math.inf, math.inf))
            v = torch.as_tensor(values, dtype=torch.float64)
            if len(v) and (float(v.min()) < lo * (1 - 1e-6) - 1e-9 or float(v.max()) > hi * (1 + 1e-6) + 1e-9):
                warnings.warn(
                    f"{self.family} model: requested {name} [{float(v.min()):g}, {float(v.max()):g}] {unit} lies "
                    f"outside the training range [{lo:g}, {hi:g}] {unit}; showers there are extrapolations",
                    ConditionsWarning, stacklevel=3)

    @torch.no_grad()
    def sample(self, energies: torch.Tensor | np.ndarray | float, angles: torch.Tensor | np.ndarray | float = 0.0,
               seed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Showers (n, n_cells) in MeV for energies (MeV) and angles (deg); seeded via ``seed`` or ``generator``."""
        device = self.cond_mean.device
        energies = torch.as_tensor(energies, dtype=torch.float32, device=device).reshape(-1)
        angles = torch.as_tensor(angles, dtype=torch.float32, device=device).reshape(-1)
        if angles.numel() == 1 and energies.numel() != 1:
            angles = angles.expand(energies.numel())
        if angles.shape != energies.shape:
            raise ValueError(f"energies {tuple(energies.shape)} and angles {tuple(angles.shape)} differ in length")
        if torch.any(energies <= 0):
            raise ValueError("incident energies must be > 0 MeV")
        self.check_conditions(energies, angles)
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(seed))
        was_training = self.training
        self.eval()
        try:
            noise = self.draw_noise(len(energies), generator)
            chunk = self.sample_chunk if self.sample_chunk > 0 and device.type == "cpu" else len(energies)
            if len(energies) <= chunk:
                out = self.decode(energies, angles, *noise)
            else:
                out = torch.cat([
                    self.decode(energies[i:i + chunk], angles[i:i + chunk], *(t[i:i + chunk] for t in noise))
                    for i in range(0, len(energies), chunk)])
        finally:
            self.train(was_training)
        return out

    # ---- training hooks ---------------------------------------------------------------------------
    def configure_optimizers(self, lr: float, weight_decay: float = 0.0) -> dict[str, torch.optim.Optimizer]:
        """Named optimisers; the default is one Adam over all parameters under the name ``"main"``."""
        return {"main": torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)}

    def loss(self, batch: TrainBatch) -> torch.Tensor:
        """Scalar loss of a batch (likelihood families)."""
        raise NotImplementedError

    def training_step(self, batch: TrainBatch, optimizers: dict[str, torch.optim.Optimizer], step: int,
                      grad_clip: float = 0.0, autocast: Any = None) -> dict[str, float]:
        """One optimisation step; returns the losses to log. Non-finite values make the trainer roll back."""
        opt = optimizers["main"]
        opt.zero_grad(set_to_none=True)
        with autocast if autocast is not None else _nullcontext():
            loss = self.loss(batch)
        if not torch.isfinite(loss):
            return {"loss": float(loss.detach())}
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.parameters(), grad_clip)
        opt.step()
        return {"loss": float(loss.detach())}

    # ---- description --------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The JSON metadata written next to the weights."""
        return {
            "format_version": FORMAT_VERSION,
            "family": self.family,
            "config": self.config.to_dict(),
            "detector": self.detector.to_dict(),
            "n_cells": self.n_cells,
            "shape": list(self.shape),
            "condition_names": list(self.conditions),
            "n_parameters": sum(p.numel() for p in self.parameters()),
            "caloforge_version": __version__,
            **self.meta,
        }


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# ---- saving and loading -----------------------------------------------------------------------------------
def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of the state dict (parameters and buffers) for safetensors."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model(model: ShowerModel, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``path/model.safetensors`` and ``path/model.json`` (each atomically). Returns the directory."""
    from safetensors.torch import save

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = model.describe()
    meta.update(extra or {})
    _atomic_write_bytes(path / WEIGHTS_FILE, save(state_tensors(model), metadata={"family": model.family}))
    _atomic_write_bytes(path / META_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return path


def _resolve(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_file() and p.name in (WEIGHTS_FILE, META_FILE):
        p = p.parent
    if not p.exists():
        raise ModelError(f"{p}: model not found (expected a directory with {WEIGHTS_FILE} and {META_FILE})")
    if not p.is_dir():
        raise ModelError(f"{p}: not a model directory (expected a directory with {WEIGHTS_FILE} and {META_FILE})")
    for name in (WEIGHTS_FILE, META_FILE):
        if not (p / name).is_file():
            raise ModelError(f"{p}: missing {name}; a saved model has {WEIGHTS_FILE} and {META_FILE}")
    return p / META_FILE, p / WEIGHTS_FILE


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``model.json`` of a saved model, validated for the fields every loader needs."""
    meta_path, _ = _resolve(path)
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{meta_path}: invalid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{meta_path}: expected a JSON object")
    for key in ("family", "config", "detector", "n_cells"):
        if key not in meta:
            raise ModelError(f"{meta_path}: missing field {key!r}")
    if int(meta.get("format_version", 1)) > FORMAT_VERSION:
        raise ModelError(f"{meta_path}: field 'format_version' is {meta['format_version']}; this caloforge reads "
                         f"<= {FORMAT_VERSION} (upgrade caloforge)")
    return meta


def load_model(path: str | Path, expected_detector: Detector | str | None = None,
               device: str | torch.device = "cpu") -> ShowerModel:
    """Load a saved model (safetensors + JSON only, no code execution) in eval mode.

    ``expected_detector``: raise :class:`ModelError` if the model was trained for another detector.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from caloforge.models import get_family

    meta_path, weights_path = _resolve(path)
    meta = read_meta(path)
    try:
        detector = Detector.from_dict(meta["detector"], f"{meta_path}: field 'detector'")
    except DetectorError as err:
        raise ModelError(str(err)) from None
    if expected_detector is not None:
        want = expected_detector if isinstance(expected_detector, Detector) else load_detector(expected_detector)
        if want.to_dict() != detector.to_dict():
            raise ModelError(f"{meta_path}: field 'detector' is {detector.name!r}; expected detector {want.name!r} "
                             f"(the model was trained for another detector)")
    cls = get_family(str(meta["family"]))
    config = cls.Config.from_dict(meta["config"], f"{meta_path}: field 'config'")
    model = cls(detector, int(meta["n_cells"]), config)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise ModelError(f"{weights_path}: unreadable safetensors file ({err})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelError(f"{weights_path}: weights do not match the architecture in {meta_path}: {err}") from None
    known = {"format_version", "family", "config", "detector", "n_cells", "shape", "condition_names",
             "n_parameters", "caloforge_version"}
    model.meta = {k: v for k, v in meta.items() if k not in known}
    model.meta["path"] = str(meta_path.parent)
    return model.to(device).eval()
