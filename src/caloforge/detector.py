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


#: Sanity bounds of a detector description (ild-ecal: 30 layers, 30 x 60 cells).
MAX_LAYERS = 1000
MAX_CELLS_PER_AXIS = 1000
MAX_CELLS = 2_000_000


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
        if len(self.layers) > MAX_LAYERS:
            raise DetectorError(f"detector {self.name!r}: {len(self.layers)} layers; expected at most {MAX_LAYERS}")
        numbers = {"size_x_mm": self.size_x_mm, "size_y_mm": self.size_y_mm, "cell_size_mm": self.cell_size_mm,
                   "production_cut_mm": self.production_cut_mm, "readout.x_min_mm": self.readout.x_min_mm,
                   "readout.y_min_mm": self.readout.y_min_mm}
        for i, layer in enumerate(self.layers):
            numbers.update({f"layer {i} absorber_mm": layer.absorber_mm, f"layer {i} active_mm": layer.active_mm})
        for key, v in numbers.items():
            if not np.isfinite(v) or abs(v) > 1e7:
                raise DetectorError(f"detector {self.name!r}: {key} is {v}; expected a finite length in mm")
        for key in ("n_x", "n_y", "n_y_angled"):
            v = getattr(self.readout, key)
            if v is not None and not 1 <= v <= MAX_CELLS_PER_AXIS:
                raise DetectorError(f"detector {self.name!r}: readout.{key} is {v}; expected 1 to "
                                    f"{MAX_CELLS_PER_AXIS} cells")
        if self.n_cells(True) > MAX_CELLS:
            raise DetectorError(f"detector {self.name!r}: {self.n_cells(True)} cells per shower; expected at most "
                                f"{MAX_CELLS}")
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

    def impact_region(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((x_lo, x_hi), (y_lo, y_hi)) mm where a shower may hit the face: the normal-incidence readout window less
        a margin that keeps the core in it (3 cells, at most a quarter of the window)."""
        r, c = self.readout, self.cell_size_mm
        mx, my = min(3, r.n_x // 4) * c, min(3, r.n_y // 4) * c
        return ((r.x_min_mm + mx, r.x_min_mm + r.n_x * c - mx), (r.y_min_mm + my, r.y_min_mm + r.n_y * c - my))

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
        if not isinstance(d, dict):
            raise DetectorError(f"{source}: detector description is {type(d).__name__}; expected a table of fields")
        try:
            layers: list[Layer] = []
            if not isinstance(d["layers"], list):
                raise DetectorError(f"{source}: field 'layers' is {d['layers']!r:.60}; expected a list of layers")
            for group in d["layers"]:
                count = int(group.get("count", 1))
                if not 1 <= count <= MAX_LAYERS - len(layers):
                    raise DetectorError(f"{source}: layer 'count' is {count}; expected 1 to {MAX_LAYERS} layers in all")
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
        except (TypeError, ValueError, AttributeError, OverflowError) as err:
            if isinstance(err, DetectorError):
                if str(err).startswith(source):
                    raise
                raise DetectorError(f"{source}: {err}") from None
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
        if not path.is_file():
            raise DetectorError(f"{path}: is a directory; expected a detector file (.toml, .yaml or .json) or a "
                                f"built-in detector name {builtin_detectors()}")
        suffix = path.suffix.lower()
        try:
            text = path.read_text()
            if suffix == ".toml":
                data = tomllib.loads(text)
            elif suffix in {".yaml", ".yml"}:
                import yaml

                try:
                    data = yaml.safe_load(text)
                except yaml.YAMLError as err:
                    raise ValueError(str(err)) from None
            else:
                data = json.loads(text)
        except ValueError as err:  # TOML, JSON and YAML syntax errors, a binary file
            kind = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}.get(suffix, "JSON")
            raise DetectorError(f"{path}: not a valid {kind} detector description ({' '.join(str(err).split())})"
                                ) from None
        return Detector.from_dict(data, str(path))
    name = str(name_or_path)
    if name not in builtin_detectors():
        raise DetectorError(
            f"unknown detector {name!r}: built-in detectors are {builtin_detectors()}, or give a .toml/.yaml file"
        )
    text = resources.files("caloforge.detectors").joinpath(f"{name}.toml").read_text()
    return Detector.from_dict(tomllib.loads(text), f"built-in detector {name}")
