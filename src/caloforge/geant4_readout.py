"""Geant4 volumes and C++ scoring for per-layer readouts (grids of any cell size, hexagons, (r, phi) bins).

Every cell is a Geant4 volume, so Geant4 itself assigns each step's energy to its cell (no fine-mesh rebinning
error) and the scoring runs in C++ (``G4PSEnergyDeposit3D``); Python only reads one hits map per sensor type at
the end of an event. A readout layer's active slabs are all placed with the layer index as copy number, so
its samplings add up in the same cells. Per kind, inside a sensor slab of the detector's full transverse size:

- grid: a window box of the readout's extent, rows replicated along y, cells along x (exact cell edges);
- hex: a window box holding one hexagonal prism (``G4ExtrudedSolid``) per cell, copy number = cell index;
- polar: one full ring (``G4Tubs``) per radial bin, each replicated in phi (copy number = angular bin).

Energy in a sensor outside its cells and energy in passive slabs is scored too (``Outside``, ``Passive``), for
the sampling fraction and the containment (:attr:`caloforge.geant4_app.Geant4App.last_deposits`).
"""

from __future__ import annotations

import math

import numpy as np

from caloforge.detector import Detector
from caloforge.readout import GridCells, HexCells, PolarCells


class SegmentedReadout:
    """Builds the slabs of a detector with per-layer cells and reads each event's cell energies."""

    def __init__(self, g4, detector: Detector):
        self.g4, self.detector = g4, detector
        self.offsets = detector.layer_offsets()
        self.keep: list = []
        self.sensors: list[dict] = []  # one per distinct (cells, material, thickness): its LVs and index map
        self.passive_lvs: list = []
        self.outside_lvs: list = []
        self.hc_ids: list[int] | None = None

    # ---- geometry ---------------------------------------------------------------------------------------
    def build(self, calo_l, depth: float) -> None:
        """Place every slab of the stack in ``calo_l`` (a box of the detector's size centred at depth / 2)."""
        g4, d, mm = self.g4, self.detector, self.g4.mm
        nist = g4.G4NistManager.Instance()
        half_x, half_y = d.size_x_mm / 2, d.size_y_mm / 2
        slab_lvs: dict[tuple[str, float], object] = {}
        sensor_of: dict[tuple, dict] = {}
        for n, (layer, role, material, z_front, t) in enumerate(d.layer_slabs()):
            pos = g4.G4ThreeVector(0, 0, (z_front + t / 2 - depth / 2) * mm)
            if role != "active":
                key = (material, t)
                if key not in slab_lvs:
                    s = g4.G4Box(f"Passive{len(slab_lvs)}", half_x * mm, half_y * mm, t / 2 * mm)
                    lv = g4.G4LogicalVolume(s, nist.FindOrBuildMaterial(material), f"Passive{len(slab_lvs)}")
                    slab_lvs[key] = lv
                    self.passive_lvs.append(lv)
                    self.keep += [s, lv]
                lv = slab_lvs[key]
            else:
                cells = d.layers[layer].cells
                key = (cells, material, t)
                if key not in sensor_of:
                    sensor_of[key] = self._sensor(cells, material, t, len(self.sensors))
                    self.sensors.append(sensor_of[key])
                lv = sensor_of[key]["lv"]
                sensor_of[key]["layers"].add(layer)
            pv = g4.G4PVPlacement(None, pos, lv, f"{role}{n}", calo_l, False, layer)
            self.keep.append(pv)

    def _box(self, name: str, hx: float, hy: float, hz: float, mat):
        g4, mm = self.g4, self.g4.mm
        s = g4.G4Box(name, hx * mm, hy * mm, hz * mm)
        lv = g4.G4LogicalVolume(s, mat, name)
        self.keep += [s, lv]
        return lv

    def _sensor(self, cells, material: str, t: float, k: int) -> dict:
        """A sensor slab with its cells; returns its LV, its sensitive LVs and the scorer's dimensions."""
        g4, d, mm = self.g4, self.detector, self.g4.mm
        mat = g4.G4NistManager.Instance().FindOrBuildMaterial(material)
        sensor = self._box(f"Sensor{k}", d.size_x_mm / 2, d.size_y_mm / 2, t / 2, mat)
        self.outside_lvs.append(sensor)
        out = {"lv": sensor, "cells": cells, "sensitive": [], "layers": set(), "name": f"Sensor{k}"}
        if isinstance(cells, PolarCells):
            n_r, n_phi = cells.n_r, cells.n_phi
            dphi = 2 * math.pi / n_phi
            for ir in range(n_r):
                r0, r1 = cells.r_edges_mm[ir], cells.r_edges_mm[ir + 1]
                ring_s = g4.G4Tubs(f"Ring{k}_{ir}", r0 * mm, r1 * mm, t / 2 * mm, math.radians(cells.phi0_deg),
                                   2 * math.pi)
                ring = g4.G4LogicalVolume(ring_s, mat, f"Ring{k}_{ir}")
                seg_s = g4.G4Tubs(f"Seg{k}_{ir}", r0 * mm, r1 * mm, t / 2 * mm, -dphi / 2, dphi)
                seg = g4.G4LogicalVolume(seg_s, mat, f"Seg{k}_{ir}")
                rep = g4.G4PVReplica(f"Seg{k}_{ir}", seg, ring, g4.kPhi, n_phi, dphi, math.radians(cells.phi0_deg))
                pv = g4.G4PVPlacement(None, g4.G4ThreeVector(), ring, f"Ring{k}_{ir}", sensor, False, ir)
                self.keep += [ring_s, ring, seg_s, seg, rep, pv]
                out["sensitive"].append(seg)
            # index j = ring (1 up), k = phi copy (0); cell = phi * n_r + r
            out["dims"], out["depth"] = (n_r, n_phi), (2, 1, 0)
            jj, kk = np.meshgrid(np.arange(n_r), np.arange(n_phi), indexing="ij")
            out["map"] = (kk * n_r + jj).ravel()
            return out
        x0, x1, y0, y1 = cells.bounds()
        hx, hy = (x1 - x0) / 2, (y1 - y0) / 2
        window = self._box(f"Window{k}", hx, hy, t / 2, mat)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        pv = g4.G4PVPlacement(None, g4.G4ThreeVector(cx * mm, cy * mm, 0), window, f"Window{k}", sensor, False, 0)
        self.keep.append(pv)
        if isinstance(cells, GridCells):
            row = self._box(f"Row{k}", hx, cells.cell_y_mm / 2, t / 2, mat)
            cell = self._box(f"Cell{k}", cells.cell_x_mm / 2, cells.cell_y_mm / 2, t / 2, mat)
            r1 = g4.G4PVReplica(f"Row{k}", row, window, g4.kYAxis, cells.n_y, cells.cell_y_mm * mm)
            r2 = g4.G4PVReplica(f"Cell{k}", cell, row, g4.kXAxis, cells.n_x, cells.cell_x_mm * mm)
            self.keep += [r1, r2]
            out["sensitive"].append(cell)
            # index j = row (y, 1 up), k = cell (x, 0); the window is 2 up and the sensor (layer) 3 up
            out["dims"], out["depth"] = (cells.n_y, cells.n_x), (3, 1, 0)
            jj, kk = np.meshgrid(np.arange(cells.n_y), np.arange(cells.n_x), indexing="ij")
            out["map"] = (kk * cells.n_y + jj).ravel()
            return out
        assert isinstance(cells, HexCells)
        self.outside_lvs.append(window)
        poly = g4.G4TwoVectorVector()
        r = cells.circumradius_mm
        start = 90.0 if cells.orientation == "pointy" else 0.0
        for i in range(6):  # clockwise, as G4ExtrudedSolid wants
            a = math.radians(start - 60.0 * i)
            poly.append(g4.G4TwoVector(r * math.cos(a) * mm, r * math.sin(a) * mm))
        hex_s = g4.G4ExtrudedSolid(f"Hex{k}", poly, t / 2 * mm, g4.G4TwoVector(0, 0), 1.0, g4.G4TwoVector(0, 0), 1.0)
        hex_l = g4.G4LogicalVolume(hex_s, mat, f"Hex{k}")
        self.keep += [poly, hex_s, hex_l]
        xs, ys = cells.centres()
        for i, (x, y) in enumerate(zip(xs, ys)):
            pv = g4.G4PVPlacement(None, g4.G4ThreeVector((x - cx) * mm, (y - cy) * mm, 0), hex_l, f"Hex{k}", window,
                                  False, i)
            self.keep.append(pv)
        out["sensitive"].append(hex_l)
        out["dims"], out["depth"] = (1, cells.n_cells), (2, 1, 0)
        out["map"] = np.arange(cells.n_cells)
        return out

    # ---- scoring ----------------------------------------------------------------------------------------
    def make_sensitive(self, construction) -> None:
        """Register one ``G4PSEnergyDeposit3D`` per sensor type, and the Outside and Passive energy scorers."""
        g4 = self.g4
        sdm = g4.G4SDManager.GetSDMpointer()
        sdm.SetVerboseLevel(0)
        for s in self.sensors:
            mfd = g4.G4MultiFunctionalDetector(s["name"])
            scorer = g4.G4PSEnergyDeposit3D("edep", self.detector.n_layers, *s["dims"], *s["depth"])
            mfd.RegisterPrimitive(scorer)
            sdm.AddNewDetector(mfd)
            for lv in s["sensitive"]:
                construction.SetSensitiveDetector(lv, mfd)
            self.keep += [mfd, scorer]
        for name, lvs in (("Outside", self.outside_lvs), ("Passive", self.passive_lvs)):
            mfd = g4.G4MultiFunctionalDetector(name)
            scorer = g4.G4PSEnergyDeposit("edep", 0)
            mfd.RegisterPrimitive(scorer)
            sdm.AddNewDetector(mfd)
            for lv in lvs:
                construction.SetSensitiveDetector(lv, mfd)
            self.keep += [mfd, scorer]

    def read(self, hce, row: np.ndarray) -> tuple[float, float]:
        """Add one event's cell energies (MeV) to ``row``; returns (active energy outside cells, passive energy)."""
        g4 = self.g4
        if self.hc_ids is None:
            sdm = g4.G4SDManager.GetSDMpointer()
            self.hc_ids = [sdm.GetCollectionID(f"{s['name']}/edep") for s in self.sensors]
            self.hc_ids += [sdm.GetCollectionID(f"{n}/edep") for n in ("Outside", "Passive")]
        for s, hc_id in zip(self.sensors, self.hc_ids):
            pairs = [(k, v) for k, v in hce.GetHC(hc_id)]
            if not pairs:
                continue
            idx = np.fromiter((k for k, _ in pairs), np.int64, len(pairs))
            val = np.fromiter((v for _, v in pairs), np.float64, len(pairs)) / g4.MeV
            per_layer = s["dims"][0] * s["dims"][1]
            layer, rest = np.divmod(idx, per_layer)
            np.add.at(row, self.offsets[layer] + s["map"][rest], val.astype(np.float32))
        sums = []
        for hc_id in self.hc_ids[-2:]:
            sums.append(sum(v for _, v in hce.GetHC(hc_id)) / g4.MeV)
        return float(sums[0]), float(sums[1])


def sample(detector: Detector | str, pdg: int, energies_mev, positions_mm, seed: int = 1,
           physics: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Showers (n, n_cells) and deposits (n, 3): in the cells, in active material outside them and in passive
    material (MeV), for particles ``pdg`` at normal incidence. Builds a Geant4 application in this process (one
    per process: call it in a fresh worker process)."""
    from caloforge.conditions import Conditions
    from caloforge.detector import load_detector
    from caloforge.geant4_app import Geant4App

    det = detector if isinstance(detector, Detector) else load_detector(detector)
    energies = np.asarray(energies_mev, float).reshape(-1)
    pos = np.broadcast_to(np.asarray(positions_mm, float).reshape(-1, 2), (len(energies), 2))
    app = Geant4App(det, physics=physics, deposits=True)
    showers = app.simulate(Conditions.make(energies, 0.0, pos, int(pdg)), seed=seed)
    return showers, app.last_deposits
