"""Convert between caloforge and CaloChallenge 2022 shower files; read CaloChallenge binning XML.

CaloChallenge layout: ``incident_energies`` (N, 1) float64 MeV and ``showers`` (N, n_voxels) MeV, gzip. Voxels
are ordered by layer, then angular bin, then radial bin (radius fastest). The binning XML
(``binning_dataset_2.xml``) gives per layer ``r_edges`` (mm) and ``n_bin_alpha``; :func:`read_binning` turns it
into a :class:`CaloChallengeGeometry` that the observables accept wherever they accept a Detector.

    caloforge convert IN.h5 OUT.h5 --to calochallenge [--max-showers N]
    caloforge convert IN.h5 OUT.h5 --to caloforge --binning binning_dataset_2.xml [--particle electron]
"""

from __future__ import annotations

import argparse
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BATCH = 1000


@dataclass(frozen=True, eq=False)
class CaloChallengeGeometry:
    """Per-voxel layer, r, alpha and x, y centres of a CaloChallenge readout (follows observables.Geometry).

    Radial centres are bin midpoints; angular centres are the midpoints of ``n_bin_alpha`` equal bins on
    [-pi, pi); layers with a single angular bin get x = y = 0 (a ring has no transverse centre). ``layer_z`` is
    the layer index times ``layer_pitch_mm`` (the XML gives no depths); sampling weights are 1.
    """

    cell_x: np.ndarray
    cell_y: np.ndarray
    cell_layer: np.ndarray
    cell_r: np.ndarray
    cell_alpha: np.ndarray
    layer_z: np.ndarray
    layer_weights: np.ndarray
    r_edges: tuple[np.ndarray, ...]
    n_alpha: tuple[int, ...]
    name: str = ""

    @property
    def n_cells(self) -> int:
        return len(self.cell_x)

    @property
    def n_layers(self) -> int:
        return len(self.layer_z)


def parse_binning(text: str, particle: str | None = None, layer_pitch_mm: float = 1.0,
                  source: str = "<xml>") -> CaloChallengeGeometry:
    """A :class:`CaloChallengeGeometry` from the text of a CaloChallenge binning XML."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise ValueError(f"{source}: not a valid binning XML ({err})") from None
    # dataset 1 files hold <Particle> elements, datasets 2 and 3 <Bin> elements (the evaluator reads either)
    particles = root.findall("Particle") + root.findall("Bin") if root.tag not in ("Particle", "Bin") else [root]
    if not particles:
        raise ValueError(f"{source}: no <Particle> or <Bin> element in the binning XML")
    names = [p.get("name", "") for p in particles]
    if particle is None:
        node = particles[0]
    elif particle in names:
        node = particles[names.index(particle)]
    else:
        raise ValueError(f"{source}: particle {particle!r} not in the binning XML (it has {names})")
    try:
        layers = sorted(node.findall("Layer"), key=lambda e: int(e.get("id", 0)))
    except ValueError:
        raise ValueError(f"{source}: a <Layer> has a non-integer 'id'") from None
    if not layers:
        raise ValueError(f"{source}: particle {node.get('name')!r} has no <Layer> elements")
    if len(layers) > 1000:
        raise ValueError(f"{source}: {len(layers)} <Layer> elements; expected at most 1000")
    parts: dict[str, list] = {"x": [], "y": [], "l": [], "r": [], "a": []}
    r_edges, n_alpha = [], []
    n_voxels = 0
    for i, layer in enumerate(layers):
        try:
            edges = np.array([float(v) for v in layer.get("r_edges", "0").split(",") if v.strip()])
            na = int(layer.get("n_bin_alpha", 1))
        except ValueError:
            raise ValueError(f"{source}: layer {layer.get('id', i)}: 'r_edges' must be comma-separated numbers and "
                             f"'n_bin_alpha' an integer") from None
        if len(edges) < 2 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0) or edges[0] < 0:
            raise ValueError(f"{source}: layer {layer.get('id', i)}: 'r_edges' must hold at least two increasing, "
                             f"finite radii >= 0 (mm)")
        n_voxels += na * (len(edges) - 1)
        if not 1 <= na <= 4096 or n_voxels > 2_000_000:
            raise ValueError(f"{source}: layer {layer.get('id', i)}: 'n_bin_alpha' is {na}; expected 1 to 4096 "
                             f"(and at most 2000000 voxels in all)")
        r_c = 0.5 * (edges[:-1] + edges[1:])
        a_c = -np.pi + (np.arange(na) + 0.5) * 2 * np.pi / na
        aa, rr = np.meshgrid(a_c, r_c, indexing="ij")  # angle slow, radius fast
        rr, aa = rr.ravel(), aa.ravel()
        ring = na == 1
        parts["x"].append(np.zeros_like(rr) if ring else rr * np.cos(aa))
        parts["y"].append(np.zeros_like(rr) if ring else rr * np.sin(aa))
        parts["l"].append(np.full(len(rr), i))
        parts["r"].append(rr)
        parts["a"].append(aa)
        r_edges.append(edges)
        n_alpha.append(na)
    n_layers = len(layers)
    return CaloChallengeGeometry(
        cell_x=np.concatenate(parts["x"]), cell_y=np.concatenate(parts["y"]),
        cell_layer=np.concatenate(parts["l"]).astype(int), cell_r=np.concatenate(parts["r"]),
        cell_alpha=np.concatenate(parts["a"]), layer_z=np.arange(n_layers) * float(layer_pitch_mm),
        layer_weights=np.ones(n_layers), r_edges=tuple(r_edges), n_alpha=tuple(n_alpha),
        name=f"calochallenge:{node.get('name', '')}",
    )


#: The particle names of CaloChallenge binning XML files and their PDG codes.
BINNING_PARTICLES = {"electron": 11, "photon": 22, "pion": 211}


def binning_xml(detector, particle: str = "electron", pid: int | None = None) -> str:
    """The CaloChallenge binning XML of a detector whose every layer has (r, phi) cells starting at -180 degrees
    (e.g. ``cc-ds2``): what the community's evaluator (``XMLHandler``) reads. Other readouts raise ValueError.
    ``particle`` is one of the challenge's names (the evaluator looks the binning up by it); ``pid`` its PDG code."""
    from caloforge.readout import PolarCells

    if particle not in BINNING_PARTICLES:
        raise ValueError(f"--particle {particle!r}: expected one of {', '.join(BINNING_PARTICLES)} (the CaloChallenge "
                         f"binning names)")
    pid = BINNING_PARTICLES[particle] if pid is None else int(pid)
    lines = ["<Bins>", f'   <Bin pid="{pid}" name="{particle}">']
    for i, layer in enumerate(detector.layers):
        c = layer.cells
        if not isinstance(c, PolarCells) or abs(c.phi0_deg + 180.0) > 1e-9:
            raise ValueError(f"detector {detector.name!r}: layer {i} is not read out in (r, phi) bins from -180 "
                             f"degrees; the CaloChallenge binning XML describes only such bins")
        edges = ",".join(f"{e:g}" for e in c.r_edges_mm)
        lines.append(f'      <Layer id="{i}" r_edges="{edges}" n_bin_alpha="{c.n_phi}" />')
    return "\n".join([*lines, "   </Bin>", "</Bins>", ""])


def read_binning(path: str | Path, particle: str | None = None, layer_pitch_mm: float = 1.0) -> CaloChallengeGeometry:
    """A :class:`CaloChallengeGeometry` from a CaloChallenge binning XML file."""
    return parse_binning(_read_xml(path), particle, layer_pitch_mm, str(path))


def _read_xml(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: binning XML not found")
    if not path.is_file():
        raise ValueError(f"{path}: is a directory; expected a binning XML file")
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; expected a binning XML file") from None


# ---- conversion -------------------------------------------------------------------------------------------
def _count(n: int, max_showers: int | None) -> int:
    if max_showers is not None and max_showers <= 0:
        raise ValueError(f"--max-showers {max_showers}: expected a positive number of showers")
    return n if max_showers is None else min(max_showers, n)


def to_calochallenge(src: str | Path, dst: str | Path, max_showers: int | None = None,
                     showers_dtype: str = "float32") -> int:
    """Write a caloforge file in the CaloChallenge layout (float64 energies, gzip); returns the shower count.

    The official evaluator needs equal N in both files: use ``max_showers`` to cut both to the same size.
    Angles are dropped (the CaloChallenge format has none); cell order (layer, x, y) is kept.
    """
    import h5py

    from caloforge.dataset import ShowerFile

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    with ShowerFile(src) as f, h5py.File(tmp, "w") as out:
        n = _count(len(f), max_showers)
        e_ds = out.create_dataset("incident_energies", (n, 1), dtype="f8", compression="gzip")
        s_ds = out.create_dataset("showers", (n, f.n_cells), dtype=showers_dtype, compression="gzip",
                                  chunks=(min(100, max(n, 1)), f.n_cells))
        for i, b in enumerate(f.iter_batches(BATCH, stop=n)):
            e_ds[i * BATCH:i * BATCH + len(b), 0] = b.energies
            s_ds[i * BATCH:i * BATCH + len(b)] = b.showers
    tmp.replace(dst)
    return n


def from_calochallenge(src: str | Path, dst: str | Path, binning: str | Path | None = None,
                       particle: str | None = None, detector: str | None = None,
                       max_showers: int | None = None) -> int:
    """Write a CaloChallenge file as a caloforge file; returns the shower count.

    With ``detector`` the cells must match that caloforge detector's window. Otherwise the binning XML text is
    stored in the file attribute ``binning_xml`` (and ``particle``) so ``caloforge evaluate`` finds the geometry.
    Angles are set to 0.
    """
    import h5py

    from caloforge.dataset import ShowerFile, ShowerWriter
    from caloforge.detector import load_detector

    with ShowerFile(src) as f:
        n = _count(len(f), max_showers)
        if detector is not None:
            with ShowerWriter(dst, load_detector(detector), f.n_cells, {"source": "calochallenge"}) as w:
                for b in f.iter_batches(BATCH, stop=n):
                    w.append(b.energies, np.zeros(len(b)), b.showers)
            return n
        if binning is None:
            raise ValueError("from CaloChallenge: give --binning XML (or --detector NAME) to describe the cells")
        xml_text = _read_xml(binning)
        geom = parse_binning(xml_text, particle, source=str(binning))
        if geom.n_cells != f.n_cells:
            raise ValueError(f"{src}: {f.n_cells} voxels per shower but {binning} describes {geom.n_cells}")
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        with h5py.File(tmp, "w") as out:
            out.create_dataset("incident_energies", (n, 1), dtype="f8")
            out.create_dataset("incident_angles", data=np.zeros((n, 1)))
            s_ds = out.create_dataset("showers", (n, f.n_cells), dtype="f4", compression="gzip",
                                      chunks=(min(100, max(n, 1)), f.n_cells))
            for i, b in enumerate(f.iter_batches(BATCH, stop=n)):
                out["incident_energies"][i * BATCH:i * BATCH + len(b), 0] = b.energies
                s_ds[i * BATCH:i * BATCH + len(b)] = b.showers
            out.attrs.update({"source": "calochallenge", "binning_xml": xml_text, "particle": particle or "",
                              "shape": [f.n_cells], "energy_unit": "MeV", "complete": True, "n_showers": n})
        tmp.replace(dst)
        return n


# ---- command line -----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="file to convert")
    parser.add_argument("output", help="file to write")
    parser.add_argument("--to", choices=["calochallenge", "caloforge"], required=True, help="target layout")
    parser.add_argument("--binning", help="CaloChallenge binning XML (for --to caloforge)")
    parser.add_argument("--particle", help="particle name in the binning XML (default: the first)")
    parser.add_argument("--detector", help="caloforge detector whose window the cells match (for --to caloforge)")
    parser.add_argument("--max-showers", type=int, help="write only the first N showers (equal N for the "
                                                          "official evaluator)")
    parser.add_argument("--showers-dtype", choices=["float32", "float64"], default="float32",
                        help="dtype of the CaloChallenge showers dataset")
    parser.add_argument("--binning-out", help="also write the file's binning XML here (--to calochallenge; detectors "
                                              "read out in (r, phi) bins, e.g. cc-ds2)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args: argparse.Namespace) -> int:
    from caloforge.validate import check_int, check_output_file, same_file

    check_int(args.max_showers, "--max-showers", 1)
    if same_file(args.input, args.output):
        raise ValueError(f"{args.output}: is the input file; write to another file")
    check_output_file(args.output, "output", overwrite=args.overwrite)
    if args.binning_out and args.to != "calochallenge":
        raise ValueError("--binning-out goes with --to calochallenge")
    if args.to == "calochallenge":
        xml = None
        if args.binning_out:
            from caloforge.dataset import ShowerFile

            check_output_file(args.binning_out, "--binning-out", overwrite=args.overwrite)
            with ShowerFile(args.input) as f:
                if f.detector is None:
                    raise ValueError(f"{args.input}: no detector description in the file (attribute 'detector_json')")
                xml = binning_xml(f.detector, args.particle or "electron")
        n = to_calochallenge(args.input, args.output, args.max_showers, args.showers_dtype)
        if xml is not None:
            Path(args.binning_out).write_text(xml)
            print(f"wrote the binning XML to {args.binning_out}")
    else:
        n = from_calochallenge(args.input, args.output, args.binning, args.particle, args.detector, args.max_showers)
    print(f"wrote {n} showers to {args.output} ({args.to} layout)")
    return 0
