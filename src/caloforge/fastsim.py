"""Fast simulation inside a Geant4 run: e-, e+ and gamma entering the calorimeter get their shower from a model.

geant4-pybind 0.1.3 binds no ``G4VFastSimulationModel`` (nor ``G4FastSimulationManagerProcess``), and a compiled
extension would have to link against the wheel's statically linked Geant4 (no headers ship with it). The route
taken is plain Geant4 user code: a thin **gate** volume (0.5 mm of the world material) in front of the
calorimeter face carries a Python sensitive detector. Its ``ProcessHits`` runs only for steps inside the gate, so
once per particle crossing it (never for the ~10^5 steps of a shower: those happen in the calorimeter). A particle
leaving the gate into the calorimeter that the model can take (particle, energy above the threshold and within the
training range, tilt and impact point) is recorded and killed there (``fStopAndKill``); anything else goes on into
the calorimeter and Geant4 tracks it as usual. After the events of a batch, one model call makes the showers of
every recorded particle (model calls are batched over particles and events) and adds them into the events' readout.

This is what Par04's ``G4VFastSimulationModel`` does at its envelope entry (ModelTrigger = the acceptance test,
DoIt = kill + deposit), with the deposit done after the event rather than through hits in ``DoIt``: the readout
is the same file. Records of every particle that crossed the gate inwards (which ones the model made, and why the
others were left to Geant4) go into the output file's ``fastsim`` group.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from caloforge.conditions import PARTICLE_PDG, Conditions

#: Thickness of the gate volume in front of the calorimeter face (mm).
GATE_MM = 0.5

#: Why a particle crossing the gate was (0) or was not (> 0) handed to the model.
REASONS = {
    0: "fast: shower made by the model",
    1: "full: not a particle the model was trained for",
    2: "full: below the fast-simulation threshold",
    3: "full: above the model's training energy range",
    4: "full: incidence angle outside the model's range (or tilted along x beyond max_xtilt_deg)",
    5: "full: impact point outside the model's region",
    6: "full: fast simulation off (a full-simulation run of the same application)",
}

#: Columns of a record (one row per particle crossing the gate inwards).
RECORD_FIELDS = ("event", "pdg", "energy", "angle", "xtilt", "x", "y", "reason")


def empty_records() -> dict[str, np.ndarray]:
    return {k: np.zeros(0, np.int64 if k in ("event", "pdg", "reason") else np.float64) for k in RECORD_FIELDS}


@dataclass
class FastSim:
    """A model with its acceptance rules. ``threshold_mev``: e/gamma below it are tracked by Geant4 (default: the
    model's lowest training energy). ``max_xtilt_deg``: the models are conditioned on a tilt towards +y only, so a
    particle tilted along x by more than this is left to Geant4. ``seed`` seeds the model's noise per batch."""

    model: object
    threshold_mev: float | None = None
    max_xtilt_deg: float = 1.0
    angle_tolerance_deg: float = 0.5
    seed: int = 0
    enabled: bool = True
    _calls: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        m = self.model
        ranges = m.meta.get("conditions", {})
        self.energy_range = tuple(ranges.get("energy_mev", (0.0, math.inf)))
        self.angle_range = tuple(ranges.get("angle_deg", (0.0, 0.0)))
        particles = m.meta.get("particles") or [str(m.meta.get("particle") or "gamma")]
        self.pdgs = {PARTICLE_PDG[p] for p in particles if p in PARTICLE_PDG}
        self.takes_position = "position" in m.condition_names
        self.impact_region = m.detector.impact_region()
        if self.threshold_mev is None:
            self.threshold_mev = float(self.energy_range[0])
        if not self.threshold_mev > 0:
            raise ValueError(f"fast-simulation threshold {self.threshold_mev!r} MeV: expected > 0")
        if self.threshold_mev < self.energy_range[0]:
            warnings.warn(f"fast-simulation threshold {self.threshold_mev:g} MeV lies below the model's training "
                          f"range ({self.energy_range[0]:g} MeV): showers there are extrapolations", stacklevel=2)

    @classmethod
    def load(cls, model: str | Path, detector=None, **kw) -> FastSim:
        """A shipped model name or a model directory, on the CPU with one thread (one Geant4 per process)."""
        from caloforge.models import load_model

        return cls(load_model(model, expected_detector=detector, device="cpu"), **kw)

    def reason(self, pdg: int, energy: float, angle: float, xtilt: float, x: float, y: float) -> int:
        """0 when the model takes this particle, else the :data:`REASONS` code of why Geant4 tracks it."""
        if not self.enabled:
            return 6
        if pdg not in self.pdgs:
            return 1
        if energy < self.threshold_mev:
            return 2
        if energy > self.energy_range[1]:
            return 3
        tol = self.angle_tolerance_deg
        if not (self.angle_range[0] - tol <= angle <= self.angle_range[1] + tol) or abs(xtilt) > self.max_xtilt_deg:
            return 4
        if self.takes_position:
            (lo_x, hi_x), (lo_y, hi_y) = self.impact_region
            if not (lo_x <= x <= hi_x and lo_y <= y <= hi_y):
                return 5
        elif abs(x) > 1e-3 or abs(y) > 1e-3:  # a model without the position condition knows the origin only
            return 5
        return 0

    def showers(self, records: dict[str, np.ndarray], angled: bool) -> np.ndarray:
        """Showers (m, window cells) in MeV for the records the model takes (reason 0), one batched model call."""
        import torch

        fast = records["reason"] == 0
        lo, hi = self.angle_range
        angle = np.clip(records["angle"][fast], lo, hi)
        x, y = records["x"][fast], records["y"][fast]
        if not self.takes_position:
            x, y = np.zeros_like(x), np.zeros_like(y)
        cond = Conditions(records["energy"][fast], angle, x, y, records["pdg"][fast])
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self._calls]).generate_state(1)[0]))
        self._calls += 1
        with warnings.catch_warnings():
            from caloforge.models import ConditionsWarning

            warnings.simplefilter("ignore", ConditionsWarning)  # below-range thresholds were warned about once
            return self.model.sample(cond, generator=gen, angled=angled).float().numpy()


def gate_detector(g4, app) -> object:
    """The Python sensitive detector of the gate: records every particle leaving the gate into the calorimeter and
    kills those the model takes (``app.fastsim``; with none, it only records)."""

    class Gate(g4.G4VSensitiveDetector):
        def __init__(self) -> None:
            super().__init__("CaloforgeFastSimGate")
            self.rows: list[tuple] = []

        def ProcessHits(self, step, history) -> bool:
            post = step.GetPostStepPoint()
            if post.GetStepStatus() != g4.fGeomBoundary:
                return False
            d = post.GetMomentumDirection()
            pos = post.GetPosition()
            if d.z <= 0 or pos.z < -1e-6:  # going back upstream, or leaving through the upstream side
                return False
            track = step.GetTrack()
            pdg = int(track.GetDefinition().GetPDGEncoding())
            energy = post.GetKineticEnergy() / g4.MeV
            angle = math.degrees(math.atan2(d.y, d.z))
            xtilt = math.degrees(math.atan2(d.x, d.z))
            x, y = pos.x / g4.mm, pos.y / g4.mm
            fs = app.fastsim
            reason = fs.reason(pdg, energy, angle, xtilt, x, y) if fs is not None else 6
            self.rows.append((app.current_event, pdg, energy, angle,
                              xtilt, x, y, reason))
            if reason == 0:
                track.SetTrackStatus(g4.fStopAndKill)
            return True

    return Gate()


def records_from_rows(rows: list[tuple]) -> dict[str, np.ndarray]:
    if not rows:
        return empty_records()
    cols = list(zip(*rows))
    return {k: np.asarray(v, np.int64 if k in ("event", "pdg", "reason") else np.float64)
            for k, v in zip(RECORD_FIELDS, cols)}
