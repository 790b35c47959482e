"""Sampling calorimeters described as data.

A detector is an ordered stack of readout layers, a transverse size, and the cells that a dataset stores.
A readout layer is ``samplings`` repetitions of (passive slabs, absorber, active sensor) whose active energy is
read out together. The simple case (the house detector) has one square cell size for every layer and a readout
window of (layer, x, y) cells; otherwise every layer carries its own cells (:mod:`caloforge.readout`: a grid of
its own cell size and extent, hexagons, or (r, phi) bins) and a shower is the concatenation of the layers' cells.
Built-in detectors live as TOML files in ``caloforge/detectors``; users load their own TOML/YAML/JSON file with
:func:`load_detector` (docs/detectors.md).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path

import numpy as np

from caloforge.materials import check_material
from caloforge.readout import Cells, ReadoutError, cells_from_dict


class DetectorError(ValueError):
    """A detector description is invalid or cannot be found."""


#: Sanity bounds of a detector description (ild-ecal: 30 layers, 30 x 60 cells).
MAX_LAYERS = 1000
MAX_SAMPLINGS = 1000
#: Radiation lengths (mm) of the NIST materials used by the built-in detectors (PDG tables), for the sampling
#: weights of stacks that mix absorber materials; other materials need a detector of one absorber material.
X0_MM = {"G4_W": 3.504, "G4_Pb": 5.612, "G4_Cu": 14.36, "G4_Fe": 17.57, "G4_Al": 88.97, "G4_Si": 93.70,
         "G4_lAr": 140.0, "G4_Galactic": float("inf"), "G4_AIR": 303_900.0, "G4_KAPTON": 285.7,
         "G4_POLYSTYRENE": 413.1, "G4_PLASTIC_SC_VINYLTOLUENE": 425.4, "G4_PbWO4": 8.903}
#: Minimum-ionising energy loss (MeV/mm: PDG <dE/dx>_min times the density) of the same materials, for MIP
#: sampling fractions (docs/detectors.md derives the expected sampling fraction of each built-in detector).
MIP_DEDX = {"G4_W": 2.210, "G4_Pb": 1.273, "G4_Cu": 1.257, "G4_Fe": 1.143, "G4_Al": 0.4359, "G4_Si": 0.3876,
            "G4_lAr": 0.2121, "G4_Galactic": 0.0, "G4_AIR": 0.0002187, "G4_KAPTON": 0.2492, "G4_POLYSTYRENE": 0.2052,
            "G4_PLASTIC_SC_VINYLTOLUENE": 0.2019, "G4_PbWO4": 1.040}
MAX_CELLS_PER_AXIS = 1000
MAX_CELLS = 2_000_000


@dataclass(frozen=True)
class Layer:
    """One readout layer: ``samplings`` times (``passive`` slabs, an absorber slab, an active slab), front to back;
    the energy of all its active slabs is read out in its ``cells`` (None: the detector's uniform grid)."""

    absorber: str
    absorber_mm: float
    active: str
    active_mm: float
    samplings: int = 1
    passive: tuple[tuple[str, float], ...] = ()
    cells: Cells | None = None

    @property
    def sampling_mm(self) -> float:
        """Thickness of one (passive, absorber, active) repetition."""
        return sum(t for _, t in self.passive) + self.absorber_mm + self.active_mm

    @property
    def depth_mm(self) -> float:
        return self.samplings * self.sampling_mm

    def passive_x0(self) -> float:
        """Radiation lengths of passive material (absorber and passive slabs) in the whole readout layer."""
        slabs = [*self.passive, (self.absorber, self.absorber_mm)]
        missing = [m for m, t in slabs if t > 0 and m not in X0_MM]
        if missing:
            raise DetectorError(f"no radiation length known for material {missing[0]!r} (known: {sorted(X0_MM)})")
        return self.samplings * sum(t / X0_MM[m] for m, t in slabs if t > 0)

    def mip_sampling_fraction(self) -> float:
        """Share of a minimum-ionising particle's energy loss that falls in the active slabs."""
        slabs = [*self.passive, (self.absorber, self.absorber_mm), (self.active, self.active_mm)]
        missing = [m for m, t in slabs if t > 0 and m not in MIP_DEDX]
        if missing:
            raise DetectorError(f"no MIP energy loss known for material {missing[0]!r} (known: {sorted(MIP_DEDX)})")
        active = MIP_DEDX[self.active] * self.active_mm
        return active / sum(MIP_DEDX[m] * t for m, t in slabs if t > 0)

    def to_dict(self) -> dict:
        d = {"absorber": self.absorber, "absorber_mm": self.absorber_mm, "active": self.active,
             "active_mm": self.active_mm}
        if self.samplings != 1:
            d["samplings"] = self.samplings
        if self.passive:
            d["passive"] = [[m, t] for m, t in self.passive]
        if self.cells is not None:
            d["cells"] = self.cells.to_dict()
        return d


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
    cell_size_mm: float | None
    readout: Readout | None
    description: str = ""
    world_material: str = "G4_Galactic"
    production_cut_mm: float = 0.7
    #: Cells that never read out (a dead pixel, a broken channel): (readout layer, cell index within the layer's
    #: cells), sorted. Their energy is zero in every shower Geant4 or a model makes. Uniform grids: the index
    #: ``ix * n_y + iy`` in the normal-incidence window (the angled window keeps ix and iy).
    dead_cells: tuple[tuple[int, int], ...] = ()
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise DetectorError(f"detector {self.name!r}: 'layers' is empty, expected at least one layer")
        if len(self.layers) > MAX_LAYERS:
            raise DetectorError(f"detector {self.name!r}: {len(self.layers)} layers; expected at most {MAX_LAYERS}")
        numbers = {"size_x_mm": self.size_x_mm, "size_y_mm": self.size_y_mm,
                   "production_cut_mm": self.production_cut_mm}
        for i, layer in enumerate(self.layers):
            numbers.update({f"layer {i} absorber_mm": layer.absorber_mm, f"layer {i} active_mm": layer.active_mm})
            numbers.update({f"layer {i} passive {m}": t for m, t in layer.passive})
        for key, v in numbers.items():
            if not np.isfinite(v) or abs(v) > 1e7:
                raise DetectorError(f"detector {self.name!r}: {key} is {v}; expected a finite length in mm")
        if not self.name.strip():
            raise DetectorError("detector: field 'name' is empty; expected a name")
        if self.production_cut_mm <= 0:
            raise DetectorError(f"detector {self.name!r}: production_cut_mm is {self.production_cut_mm}; expected a "
                                f"length > 0 in mm")
        check_material(self.world_material, f"detector {self.name!r}: world_material", DetectorError)
        for i, layer in enumerate(self.layers):
            if i and layer == self.layers[i - 1]:
                continue  # a layer group repeated by 'count': checked once
            for role, material in [("absorber", layer.absorber), ("active", layer.active),
                                   *(("passive", m) for m, _ in layer.passive)]:
                check_material(material, f"detector {self.name!r}: layer {i} {role}", DetectorError)
        for i, layer in enumerate(self.layers):
            if layer.absorber_mm < 0 or layer.active_mm <= 0 or any(t < 0 for _, t in layer.passive):
                raise DetectorError(
                    f"detector {self.name!r}: layer {i} has absorber_mm={layer.absorber_mm}, "
                    f"active_mm={layer.active_mm}; expected absorber_mm >= 0 and active_mm > 0"
                    + (" and passive thicknesses >= 0" if layer.passive else "")
                )
            if not 1 <= layer.samplings <= MAX_SAMPLINGS:
                raise DetectorError(f"detector {self.name!r}: layer {i} has samplings={layer.samplings}; expected "
                                    f"1 to {MAX_SAMPLINGS} (absorber, active) repetitions")
        segmented = [layer.cells is not None for layer in self.layers]
        if any(segmented):
            self._check_segmented(segmented)
        else:
            self._check_uniform()
        self._check_dead_cells()

    def _check_dead_cells(self) -> None:
        """Every dead cell names an existing readout layer and one of its cells, once, in sorted order."""
        per_layer = np.diff(self.layer_offsets()) if self.dead_cells else ()
        for layer, cell in self.dead_cells:
            if not 0 <= layer < self.n_layers:
                raise DetectorError(f"detector {self.name!r}: dead_cells entry [{layer}, {cell}]: layer {layer} does "
                                    f"not exist; expected 0 to {self.n_layers - 1}")
            if not 0 <= cell < per_layer[layer]:
                raise DetectorError(f"detector {self.name!r}: dead_cells entry [{layer}, {cell}]: layer {layer} has "
                                    f"{per_layer[layer]} cells; expected a cell index 0 to {per_layer[layer] - 1}")
        if list(self.dead_cells) != sorted(set(self.dead_cells)):
            raise DetectorError(f"detector {self.name!r}: dead_cells must be distinct [layer, cell] pairs in "
                                f"increasing order")

    def _check_segmented(self, segmented: list[bool]) -> None:
        """Per-layer cells: every layer has its own, inside the transverse size; no uniform grid fields."""
        if not all(segmented):
            i = segmented.index(False)
            raise DetectorError(f"detector {self.name!r}: layer {i} has no 'cells' while others do; expected "
                                f"'cells' on every layer group (or on none, with cell_size_mm and readout)")
        if self.size_x_mm <= 0 or self.size_y_mm <= 0:
            raise DetectorError(f"detector {self.name!r}: size_x_mm and size_y_mm must be > 0")
        if self.cell_size_mm is not None or self.readout is not None:
            raise DetectorError(f"detector {self.name!r}: with per-layer 'cells', 'cell_size_mm' and 'readout' "
                                f"must be left out (each layer's cells give its cell sizes and extent)")
        if self.n_cells() > MAX_CELLS:
            raise DetectorError(f"detector {self.name!r}: {self.n_cells()} cells per shower; expected at most "
                                f"{MAX_CELLS}")
        hx, hy = self.size_x_mm / 2 + 1e-9, self.size_y_mm / 2 + 1e-9
        for i, layer in enumerate(self.layers):
            x0, x1, y0, y1 = layer.cells.bounds()
            if x0 < -hx or x1 > hx or y0 < -hy or y1 > hy:
                raise DetectorError(f"detector {self.name!r}: layer {i} cells cover x {x0:g}..{x1:g}, y {y0:g}..{y1:g}"
                                    f" mm, which leaves the detector ({self.size_x_mm:g} x {self.size_y_mm:g} mm)")

    def _check_uniform(self) -> None:
        if self.cell_size_mm is None or self.readout is None:
            raise DetectorError(f"detector {self.name!r}: missing field "
                                f"{'cell_size_mm' if self.cell_size_mm is None else 'readout'!r} (or give every "
                                f"layer its own 'cells')")
        numbers = {"cell_size_mm": self.cell_size_mm, "readout.x_min_mm": self.readout.x_min_mm,
                   "readout.y_min_mm": self.readout.y_min_mm}
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
    def is_uniform(self) -> bool:
        """True for one square cell grid and a (layer, x, y) window (the house detector's kind of readout)."""
        return self.layers[0].cells is None

    @property
    def depth_mm(self) -> float:
        if self.is_uniform and all(ly.samplings == 1 and not ly.passive for ly in self.layers):
            return float(sum(layer.absorber_mm + layer.active_mm for layer in self.layers))
        return float(sum(layer.depth_mm for layer in self.layers))

    def shape(self, angled: bool = False) -> tuple[int, ...]:
        """Cell-array shape stored for normal (``angled=False``) or angled incidence: (layer, x, y) for a uniform
        detector, (n_cells,) (the layers' cells one after the other) for per-layer cells, any angle."""
        if not self.is_uniform:
            return (int(sum(layer.cells.n_cells for layer in self.layers)),)
        n_y = self.readout.n_y_angled if (angled and self.readout.n_y_angled) else self.readout.n_y
        return (self.n_layers, self.readout.n_x, n_y)

    def n_cells(self, angled: bool = False) -> int:
        return int(np.prod(self.shape(angled)))

    def shape_for_cells(self, n_cells: int) -> tuple[int, ...]:
        """The window shape that holds ``n_cells`` cells, or a DetectorError."""
        for angled in (False, True):
            if self.n_cells(angled) == n_cells:
                return self.shape(angled)
        if not self.is_uniform:
            raise DetectorError(f"detector {self.name!r}: {n_cells} cells per shower; its readout has "
                                f"{self.n_cells()} cells")
        raise DetectorError(
            f"detector {self.name!r}: {n_cells} cells per shower match neither window "
            f"{self.shape(False)} nor {self.shape(True)}"
        )

    def impact_region(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((x_lo, x_hi), (y_lo, y_hi)) mm where a shower may hit the face: the normal-incidence readout window less
        a margin that keeps the core in it (3 cells, at most a quarter of the window). Per-layer cells: the middle
        half of the area that every layer's cells cover."""
        if not self.is_uniform:
            b = np.array([layer.cells.bounds() for layer in self.layers])
            x0, x1, y0, y1 = b[:, 0].max(), b[:, 1].min(), b[:, 2].max(), b[:, 3].min()
            mx, my = max(x1 - x0, 0) / 4, max(y1 - y0, 0) / 4
            return ((float(x0 + mx), float(x1 - mx)), (float(y0 + my), float(y1 - my)))
        r, c = self.readout, self.cell_size_mm
        mx, my = min(3, r.n_x // 4) * c, min(3, r.n_y // 4) * c
        return ((r.x_min_mm + mx, r.x_min_mm + r.n_x * c - mx), (r.y_min_mm + my, r.y_min_mm + r.n_y * c - my))

    def layer_z_mm(self) -> np.ndarray:
        """z of the centre of each readout layer's active slabs (their mean for several samplings), mm; the front
        face of layer 0 is at z = 0."""
        z, out = 0.0, []
        for layer in self.layers:
            if layer.samplings == 1 and not layer.passive:
                z += layer.absorber_mm
                out.append(z + layer.active_mm / 2)
                z += layer.active_mm
                continue
            centres = []
            for _ in range(layer.samplings):
                z += sum(t for _, t in layer.passive) + layer.absorber_mm
                centres.append(z + layer.active_mm / 2)
                z += layer.active_mm
            out.append(float(np.mean(centres)))
        return np.asarray(out)

    def layer_slabs(self) -> list[tuple[int, str, str, float, float]]:
        """Every slab front to back: (readout layer, role 'passive'|'absorber'|'active', material, z_front, mm)."""
        z, out = 0.0, []
        for i, layer in enumerate(self.layers):
            for _ in range(layer.samplings):
                for m, t in [*layer.passive, (layer.absorber, layer.absorber_mm)]:
                    if t > 0:
                        out.append((i, "passive" if (m, t) in layer.passive else "absorber", m, z, t))
                        z += t
                out.append((i, "active", layer.active, z, layer.active_mm))
                z += layer.active_mm
        return out

    def cell_centers_mm(self, angled: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Centres (x along axis 1, y along axis 2, z along axis 0) of the stored cells, in mm (uniform detectors;
        :meth:`cell_table` works for every readout)."""
        if not self.is_uniform:
            raise DetectorError(f"detector {self.name!r} has per-layer cells, not one (layer, x, y) grid; use "
                                f"cell_table()")
        n_l, n_x, n_y = self.shape(angled)
        c = self.cell_size_mm
        x = self.readout.x_min_mm + (np.arange(n_x) + 0.5) * c
        y = self.readout.y_min_mm + (np.arange(n_y) + 0.5) * c
        return x, y, self.layer_z_mm()

    def cell_table(self, angled: bool = False) -> dict[str, np.ndarray]:
        """Every stored cell in file order: ``layer`` (int), centre ``x``, ``y``, ``z`` (mm) and ``area`` (mm^2)."""
        z_layer = self.layer_z_mm()
        if self.is_uniform:
            n_l, n_x, n_y = self.shape(angled)
            x, y, _ = self.cell_centers_mm(angled)
            cx, cy = np.meshgrid(x, y, indexing="ij")
            layer = np.repeat(np.arange(n_l), n_x * n_y)
            return {"layer": layer, "x": np.tile(cx.ravel(), n_l), "y": np.tile(cy.ravel(), n_l),
                    "z": z_layer[layer], "area": np.full(len(layer), self.cell_size_mm**2)}
        parts: dict[str, list] = {"layer": [], "x": [], "y": [], "area": []}
        for i, layer in enumerate(self.layers):
            x, y = layer.cells.centres()
            parts["layer"].append(np.full(len(x), i))
            parts["x"].append(x)
            parts["y"].append(y)
            parts["area"].append(layer.cells.areas())
        out = {k: np.concatenate(v) for k, v in parts.items()}
        out["z"] = z_layer[out["layer"]]
        return out

    def dead_cell_indices(self, angled: bool = False) -> np.ndarray:
        """Flat indices of the dead cells in a stored shower row (normal or angled window), increasing."""
        if not self.dead_cells:
            return np.zeros(0, np.int64)
        dead = np.asarray(self.dead_cells, np.int64)
        if not self.is_uniform:
            return self.layer_offsets()[dead[:, 0]] + dead[:, 1]
        _, n_x, n_y = self.shape(angled)
        ix, iy = np.divmod(dead[:, 1], self.readout.n_y)
        return np.sort((dead[:, 0] * n_x + ix) * n_y + iy)

    def dead_cells_summary(self) -> str:
        """One line: ``3 dead cells: layer 0: 5, 17; layer 3: 40`` (or ``none``)."""
        if not self.dead_cells:
            return "none"
        by_layer: dict[int, list[int]] = {}
        for layer, cell in self.dead_cells:
            by_layer.setdefault(layer, []).append(cell)
        parts = "; ".join(f"layer {k}: {', '.join(map(str, v))}" for k, v in by_layer.items())
        return f"{len(self.dead_cells)}: {parts}"

    def layer_offsets(self) -> np.ndarray:
        """Index of each layer's first cell in a shower row, and the total: (n_layers + 1,)."""
        if self.is_uniform:
            per = self.n_cells() // self.n_layers
            return np.arange(self.n_layers + 1) * per
        return np.concatenate([[0], np.cumsum([layer.cells.n_cells for layer in self.layers])])

    def sampling_weights(self) -> np.ndarray:
        """Per-layer weights that equalise the sampling: absorber thickness relative to the thinnest.

        For ild-ecal this is 1 for layers 0-19 and 2 for layers 20-29. Stacks with several absorber materials,
        passive slabs or several samplings per layer: the passive radiation lengths per active slab, relative to
        the inverse MIP sampling fraction of each layer relative to the smallest, so that ``sum_l w_l E_l`` is
        proportional to the energy deposited in the whole stack.
        """
        t = np.array([layer.absorber_mm for layer in self.layers], dtype=float)
        simple = (len({ly.absorber for ly in self.layers}) == 1 and len({ly.active_mm for ly in self.layers}) == 1
                  and all(ly.samplings == 1 and not ly.passive for ly in self.layers))
        if simple:
            thinnest = t[t > 0].min() if np.any(t > 0) else 1.0
            return np.where(t > 0, t / thinnest, 1.0)
        inv = 1.0 / np.array([ly.mip_sampling_fraction() for ly in self.layers])
        return inv / inv.min()

    def readout_summary(self) -> str:
        """One line: the layers' cells, e.g. ``7 layers x 128 hex (11.2 mm)`` or ``30 x 30 x 30 grid (5 mm)``."""
        if self.is_uniform:
            return f"{' x '.join(map(str, self.shape()))} grid of {self.cell_size_mm:g} mm cells"
        groups: list[list] = []
        for layer in self.layers:
            if groups and groups[-1][0] == layer.cells:
                groups[-1][1] += 1
            else:
                groups.append([layer.cells, 1])
        parts = []
        for c, k in groups:
            if c.kind == "grid":
                what = f"{c.n_x} x {c.n_y} grid of {c.cell_x_mm:g} x {c.cell_y_mm:g} mm"
            elif c.kind == "hex":
                what = f"{c.n_cells} hexagons of {c.pitch_mm:g} mm"
            else:
                what = f"{c.n_phi} phi x {c.n_r} r bins to {c.r_edges_mm[-1]:g} mm"
            parts.append(f"{k} x [{what}]" if k > 1 else what)
        return f"{self.n_cells()} cells: " + " + ".join(parts)

    # ---- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The description as plain data (one entry per layer); fields of the per-layer readout appear only when
        used, so a uniform detector's description is what it always was."""
        d = asdict(self) if self.is_uniform else {f.name: getattr(self, f.name) for f in fields(self)}
        d["layers"] = [layer.to_dict() for layer in self.layers]
        d.pop("extra")
        if self.dead_cells:  # only when there are some: the description of a detector without is what it was
            d["dead_cells"] = [list(c) for c in self.dead_cells]
        else:
            d.pop("dead_cells")
        if not self.is_uniform:
            d.pop("cell_size_mm")
            d.pop("readout")
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
            _known_fields(d, TOP_FIELDS, source)
            for group in d["layers"]:
                if not isinstance(group, dict):
                    raise DetectorError(f"{source}: layer {len(layers)} is {group!r:.60}; expected a table of fields")
                _known_fields(group, LAYER_FIELDS, f"{source}: layer {len(layers)}")
                count = _integer(group.get("count", 1), f"{source}: layer {len(layers)} 'count'")
                if not 1 <= count <= MAX_LAYERS - len(layers):
                    raise DetectorError(f"{source}: layer 'count' is {count}; expected 1 to {MAX_LAYERS} layers in all")
                where = f"{source}: layer {len(layers)}"
                layer = Layer(
                    absorber=str(group["absorber"]),
                    absorber_mm=float(group["absorber_mm"]),
                    active=str(group["active"]),
                    active_mm=float(group["active_mm"]),
                    samplings=_integer(group.get("samplings", 1), f"{where}: 'samplings'"),
                    passive=_passive(group.get("passive", []), where),
                    cells=cells_from_dict(group["cells"], f"{where} cells") if "cells" in group else None,
                )
                layers.extend([layer] * count)
            segmented = layers and layers[0].cells is not None
            readout = None
            if not segmented or "readout" in d:
                r = d["readout"]
                if not isinstance(r, dict):
                    raise DetectorError(f"{source}: field 'readout' is {r!r:.60}; expected a table of fields")
                _known_fields(r, READOUT_FIELDS, f"{source}: readout")
                readout = Readout(
                    x_min_mm=float(r["x_min_mm"]),
                    n_x=_integer(r["n_x"], f"{source}: readout 'n_x'"),
                    y_min_mm=float(r["y_min_mm"]),
                    n_y=_integer(r["n_y"], f"{source}: readout 'n_y'"),
                    n_y_angled=_integer(r["n_y_angled"], f"{source}: readout 'n_y_angled'")
                    if r.get("n_y_angled") is not None else None,
                )
            return cls(
                name=str(d["name"]),
                layers=tuple(layers),
                size_x_mm=float(d["size_x_mm"]),
                size_y_mm=float(d["size_y_mm"]),
                cell_size_mm=float(d["cell_size_mm"]) if (not segmented or "cell_size_mm" in d) else None,
                readout=readout,
                description=str(d.get("description", "")),
                world_material=str(d.get("world_material", "G4_Galactic")),
                production_cut_mm=float(d.get("production_cut_mm", 0.7)),
                dead_cells=_dead_cells(d.get("dead_cells", []), source),
            )
        except KeyError as err:
            raise DetectorError(f"{source}: missing field {err.args[0]!r} in detector description") from None
        except (TypeError, ValueError, AttributeError, OverflowError) as err:
            if isinstance(err, DetectorError | ReadoutError):
                if str(err).startswith(source):
                    raise DetectorError(str(err)) from None
                raise DetectorError(f"{source}: {err}") from None
            raise DetectorError(f"{source}: invalid detector description: {err}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "<json>") -> Detector:
        return cls.from_dict(json.loads(text), source)


#: The fields a description may have (a typo'd field would otherwise be ignored and its default used).
TOP_FIELDS = {"name", "layers", "size_x_mm", "size_y_mm", "cell_size_mm", "readout", "description", "world_material",
              "production_cut_mm", "dead_cells"}
LAYER_FIELDS = {"absorber", "absorber_mm", "active", "active_mm", "samplings", "passive", "cells", "count"}
READOUT_FIELDS = {"x_min_mm", "n_x", "y_min_mm", "n_y", "n_y_angled"}


def _known_fields(d: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(map(str, set(d) - allowed))
    if unknown:
        raise DetectorError(f"{where}: unknown field {unknown[0]!r}; expected some of {', '.join(sorted(allowed))}")


def _integer(v, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v) or float(v) != int(v):
        raise DetectorError(f"{where} is {v!r:.60}; expected an integer")
    return int(v)


def _passive(v, where: str) -> tuple[tuple[str, float], ...]:
    """``passive = [["G4_Cu", 6.0], ...]``: extra slabs (material, mm) in front of each absorber."""
    try:
        out = tuple((str(m), float(t)) for m, t in v)
    except (TypeError, ValueError):
        raise DetectorError(f"{where}: 'passive' is {v!r:.60}; expected a list of [material, thickness_mm]") from None
    return out


def _dead_cells(v, source: str) -> tuple[tuple[int, int], ...]:
    """``dead_cells = [[layer, cell], ...]``: sorted; ranges and duplicates are checked by the Detector."""
    if not isinstance(v, list | tuple) or not all(isinstance(c, list | tuple) and len(c) == 2 for c in v):
        raise DetectorError(f"{source}: 'dead_cells' is {v!r:.60}; expected a list of [layer, cell] pairs (the "
                            f"readout layer and the cell's index within that layer)")
    out = [(_integer(a, f"{source}: dead_cells layer"), _integer(b, f"{source}: dead_cells cell")) for a, b in v]
    if len(set(out)) != len(out):
        dup = next(c for c in out if out.count(c) > 1)
        raise DetectorError(f"{source}: dead_cells lists [{dup[0]}, {dup[1]}] twice; expected each dead cell once")
    return tuple(sorted(out))


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
