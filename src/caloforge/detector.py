"""Sampling calorimeters described as data.

A detector is an ordered stack of layers (absorber then active sensor), a transverse size, a square
cell size, and the readout window of cells that a dataset stores. Built-in detectors live as TOML files
in ``caloforge/detectors``; users load their own TOML/YAML/JSON file with :func:`load_detector`.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np


class DetectorError(ValueError):
    """A detector description is invalid or cannot be found."""


@dataclass(frozen=True)
class Layer:
    """One sampling layer: an absorber slab followed immediately by an active (scored) slab."""

    absorber: str
    absorber_mm: float
    active: str
    active_mm: float


@dataclass(frozen=True)
class Readout:
    """The window of cells stored in a dataset, in mm, with cell edges at multiples of the cell size."""

    x_min_mm: float
    n_x: int
    y_min_mm: float
    n_y: int
    n_y_angled: int | None = None


@dataclass(frozen=True)
class Detector:
    name: str
    layers: tuple[Layer, ...]
    size_x_mm: float
    size_y_mm: float
    cell_size_mm: float
    readout: Readout
    description: str = ""
    world_material: str = "G4_Galactic"
    production_cut_mm: float = 0.7
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise DetectorError(f"detector {self.name!r}: 'layers' is empty, expected at least one layer")
        for i, layer in enumerate(self.layers):
            if layer.absorber_mm < 0 or layer.active_mm <= 0:
                raise DetectorError(
                    f"detector {self.name!r}: layer {i} has absorber_mm={layer.absorber_mm}, "
                    f"active_mm={layer.active_mm}; expected absorber_mm >= 0 and active_mm > 0"
                )
        if self.cell_size_mm <= 0:
            raise DetectorError(f"detector {self.name!r}: cell_size_mm must be > 0, got {self.cell_size_mm}")
        for axis in ("x", "y"):
            edge = getattr(self.readout, f"{axis}_min_mm") / self.cell_size_mm
            if abs(edge - round(edge)) > 1e-9:
                raise DetectorError(
                    f"detector {self.name!r}: readout.{axis}_min_mm must be a multiple of cell_size_mm"
                )
        nx_total = self.size_x_mm / self.cell_size_mm
        ny_total = self.size_y_mm / self.cell_size_mm
        if abs(nx_total - round(nx_total)) > 1e-9 or abs(ny_total - round(ny_total)) > 1e-9:
            raise DetectorError(f"detector {self.name!r}: size_x_mm and size_y_mm must be multiples of cell_size_mm")
        for n_y in (self.readout.n_y, self.readout.n_y_angled or self.readout.n_y):
            x_hi = self.readout.x_min_mm + self.readout.n_x * self.cell_size_mm
            y_hi = self.readout.y_min_mm + n_y * self.cell_size_mm
            if self.readout.x_min_mm < -self.size_x_mm / 2 - 1e-9 or x_hi > self.size_x_mm / 2 + 1e-9:
                raise DetectorError(f"detector {self.name!r}: readout window in x leaves the detector")
            if self.readout.y_min_mm < -self.size_y_mm / 2 - 1e-9 or y_hi > self.size_y_mm / 2 + 1e-9:
                raise DetectorError(f"detector {self.name!r}: readout window in y leaves the detector")

    # ---- geometry -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def depth_mm(self) -> float:
        return float(sum(layer.absorber_mm + layer.active_mm for layer in self.layers))

    def shape(self, angled: bool = False) -> tuple[int, int, int]:
        """Cell-array shape (layer, x, y) stored for normal (``angled=False``) or angled incidence."""
        n_y = self.readout.n_y_angled if (angled and self.readout.n_y_angled) else self.readout.n_y
        return (self.n_layers, self.readout.n_x, n_y)

    def n_cells(self, angled: bool = False) -> int:
        return int(np.prod(self.shape(angled)))

    def shape_for_cells(self, n_cells: int) -> tuple[int, int, int]:
        """The window shape that holds ``n_cells`` cells, or a DetectorError."""
        for angled in (False, True):
            if self.n_cells(angled) == n_cells:
                return self.shape(angled)
        raise DetectorError(
            f"detector {self.name!r}: {n_cells} cells per shower match neither window "
            f"{self.shape(False)} nor {self.shape(True)}"
        )

    def layer_z_mm(self) -> np.ndarray:
        """z of the centre of each active layer (mm); the front face of layer 0 is at z = 0."""
        z, out = 0.0, []
        for layer in self.layers:
            z += layer.absorber_mm
            out.append(z + layer.active_mm / 2)
            z += layer.active_mm
        return np.asarray(out)

    def cell_centers_mm(self, angled: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Centres (x along axis 1, y along axis 2, z along axis 0) of the stored cells, in mm."""
        n_l, n_x, n_y = self.shape(angled)
        c = self.cell_size_mm
        x = self.readout.x_min_mm + (np.arange(n_x) + 0.5) * c
        y = self.readout.y_min_mm + (np.arange(n_y) + 0.5) * c
        return x, y, self.layer_z_mm()

    def sampling_weights(self) -> np.ndarray:
        """Per-layer weights that equalise the sampling: absorber thickness relative to the thinnest.

        For ild-ecal this is 1 for layers 0-19 and 2 for layers 20-29.
        """
        t = np.array([layer.absorber_mm for layer in self.layers], dtype=float)
        thinnest = t[t > 0].min() if np.any(t > 0) else 1.0
        return np.where(t > 0, t / thinnest, 1.0)

    # ---- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [asdict(layer) for layer in self.layers]
        d.pop("extra")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> Detector:
        try:
            layers: list[Layer] = []
            for group in d["layers"]:
                count = int(group.get("count", 1))
                layer = Layer(
                    absorber=str(group["absorber"]),
                    absorber_mm=float(group["absorber_mm"]),
                    active=str(group["active"]),
                    active_mm=float(group["active_mm"]),
                )
                layers.extend([layer] * count)
            r = d["readout"]
            readout = Readout(
                x_min_mm=float(r["x_min_mm"]),
                n_x=int(r["n_x"]),
                y_min_mm=float(r["y_min_mm"]),
                n_y=int(r["n_y"]),
                n_y_angled=int(r["n_y_angled"]) if r.get("n_y_angled") is not None else None,
            )
            return cls(
                name=str(d["name"]),
                layers=tuple(layers),
                size_x_mm=float(d["size_x_mm"]),
                size_y_mm=float(d["size_y_mm"]),
                cell_size_mm=float(d["cell_size_mm"]),
                readout=readout,
                description=str(d.get("description", "")),
                world_material=str(d.get("world_material", "G4_Galactic")),
                production_cut_mm=float(d.get("production_cut_mm", 0.7)),
            )
        except KeyError as err:
            raise DetectorError(f"{source}: missing field {err.args[0]!r} in detector description") from None
        except (TypeError, ValueError) as err:
            if isinstance(err, DetectorError):
                raise
            raise DetectorError(f"{source}: invalid detector description: {err}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "<json>") -> Detector:
        return cls.from_dict(json.loads(text), source)


def builtin_detectors() -> list[str]:
    """Names of the detectors shipped with caloforge."""
    files = resources.files("caloforge.detectors").iterdir()
    return sorted(f.name.removesuffix(".toml") for f in files if f.name.endswith(".toml"))


def load_detector(name_or_path: str | Path) -> Detector:
    """A built-in detector by name (``"ild-ecal"``) or a detector file (.toml, .yaml/.yml, .json)."""
    path = Path(name_or_path)
    if path.suffix.lower() in {".toml", ".yaml", ".yml", ".json"} or path.exists():
        if not path.exists():
            raise DetectorError(f"{path}: detector file not found")
        text = path.read_text()
        suffix = path.suffix.lower()
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in {".yaml", ".yml"}:
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        return Detector.from_dict(data, str(path))
    name = str(name_or_path)
    if name not in builtin_detectors():
        raise DetectorError(
            f"unknown detector {name!r}: built-in detectors are {builtin_detectors()}, or give a .toml/.yaml file"
        )
    text = resources.files("caloforge.detectors").joinpath(f"{name}.toml").read_text()
    return Detector.from_dict(tomllib.loads(text), f"built-in detector {name}")
