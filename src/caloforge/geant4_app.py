"""One Geant4 instance: the calorimeter built from a :class:`~caloforge.detector.Detector`, a particle gun and
per-cell energy scoring in C++ (``G4PSEnergyDeposit3D`` on replicated Si cells), driven from Python one
batch of showers at a time. Geant4 allows one instance per process: :mod:`caloforge.simulate` runs several
processes for parallelism.
"""

from __future__ import annotations

import numpy as np

from caloforge.conditions import PDG_PARTICLE, Conditions, canonical_particle, hadron_names
from caloforge.detector import Detector
from caloforge.geant4_setup import import_geant4, real_em_data

__all__ = ["Geant4App", "canonical_particle", "geant4_version"]


def geant4_version() -> str:
    g4 = import_geant4()
    return str(g4.G4Version).strip("$ ").removeprefix("Name: ").strip()


class Geant4App:
    """A ready-to-run Geant4 application for one detector; each event's particle, energy, angle and impact point
    come from the :class:`~caloforge.conditions.Conditions` passed to :meth:`simulate`."""

    def __init__(self, detector: Detector, particle: str = "gamma", physics: str = "auto", verbose: int = 0,
                 fastsim=None, gate: bool | None = None, deposits: bool = False, hadronic: str = "none"):
        """``fastsim``: a :class:`caloforge.fastsim.FastSim`: e/gamma entering the calorimeter that its model takes
        get their shower from the model. ``gate`` (default: with ``fastsim``): build the gate volume in front of
        the face that records (and, with ``fastsim``, intercepts) the particles entering the calorimeter; a gate
        without ``fastsim`` is the full-simulation run of the same application. ``deposits``: also score the energy
        in the passive slabs and in active material outside the stored cells (:attr:`last_deposits`; always on
        for detectors with per-layer cells). ``hadronic``: ``"none"`` (e/gamma showers) or ``"bertini"``, the data-free
        Bertini placeholder that pions and protons need (:mod:`caloforge.hadronic`)."""
        self.g4 = g4 = import_geant4()
        self.detector = detector
        self.fastsim = fastsim
        self.gate = fastsim is not None if gate is None else bool(gate)
        self.current_event = 0
        self.multiplicity = 1
        self.last_records: dict[str, np.ndarray] | None = None
        #: per event of the last :meth:`simulate`: (energy in the stored cells, in active material outside them,
        #: in passive material), MeV; with ``deposits`` or per-layer cells, else None.
        self.last_deposits: np.ndarray | None = None
        self.deposits = bool(deposits) or not detector.is_uniform
        self.particle = canonical_particle(particle)  # the default for simulate(energies, angles)
        if physics == "auto":
            use_standard = real_em_data() is not None
        elif physics in ("standard", "data-free"):
            use_standard = physics == "standard"
            if use_standard and real_em_data() is None:
                raise ValueError("physics 'standard' needs Geant4 data sets: set GEANT4_DATA_DIR or G4LEDATA")
        else:
            raise ValueError(f"physics {physics!r}: expected 'auto', 'standard' or 'data-free'")

        from caloforge.physics import HADRONIC, make_physics_list

        if hadronic not in HADRONIC:
            raise ValueError(f"hadronic physics {hadronic!r}: expected one of {', '.join(HADRONIC)}")
        self.hadronic = hadronic
        check_hadronic([self.particle], hadronic)

        g4.G4UImanager.GetUIpointer().ApplyCommand("/control/verbose 0")
        self.run_manager = g4.G4RunManagerFactory.CreateRunManager(g4.G4RunManagerType.Serial)
        self._geometry = _Geometry(g4, detector, self)
        self.run_manager.SetUserInitialization(self._geometry)
        self.physics_list, self.physics_name = make_physics_list(g4, use_standard, hadronic)
        self.run_manager.SetUserInitialization(self.physics_list)
        self._actions = _Actions(g4, self)
        self.run_manager.SetUserInitialization(self._actions)
        ui = g4.G4UImanager.GetUIpointer()
        for cmd in ("/run/verbose 0", "/event/verbose 0", "/tracking/verbose 0", "/process/verbose 0",
                    "/process/em/verbose 0", "/process/had/verbose 0"):
            ui.ApplyCommand(cmd)
        self.run_manager.Initialize()
        # A default cut set before Initialize() is silently ignored: apply it now.
        ui.ApplyCommand(f"/run/setCut {detector.production_cut_mm} mm")
        self._cond = Conditions.make(np.zeros(0))
        self._out: np.ndarray = np.zeros((0, 0), np.float32)

    def simulate(self, conditions: Conditions | np.ndarray, angles_deg: np.ndarray | None = None, seed: int = 1,
                 angled: bool | None = None, multiplicity: int = 1) -> np.ndarray:
        """Showers (n, n_cells) in MeV for the given conditions, reproducible for a seed.

        ``conditions``: a :class:`Conditions`, or incident energies (MeV) with ``angles_deg`` (this app's particle,
        impact at the origin). ``angled`` selects the readout window (default: angled if any angle is > 0).
        ``multiplicity``: primaries per event; event ``i`` fires rows ``i * multiplicity ...`` of the conditions and
        its readout holds all their showers. With a gate, :attr:`last_records` holds the particles that entered the
        calorimeter (:mod:`caloforge.fastsim`); with fast simulation on, the model's showers are added in. The
        detector's dead cells read zero (their energy counts as active energy outside the cells in the deposits).
        """
        if not isinstance(conditions, Conditions):
            conditions = Conditions.make(conditions, 0.0 if angles_deg is None else angles_deg,
                                         particle=self.particle)
        cond = conditions
        check_hadronic(np.unique(cond.pdg), self.hadronic)
        if angled is None:
            angled = bool(np.any(cond.angle > 0))
        self._window = self._geometry.window(angled)
        n_cells = int(np.prod(self.detector.shape(angled)))
        if multiplicity < 1 or len(cond) % multiplicity:
            raise ValueError(f"{len(cond)} rows of conditions do not make events of {multiplicity} primaries")
        n_events = len(cond) // multiplicity
        self._cond, self.multiplicity = cond, multiplicity
        self._out = np.zeros((n_events, n_cells), np.float32)
        self._dep = np.zeros((n_events, 2))
        self.g4.HepRandom.setTheSeed(int(seed) % 2_147_483_647)
        self.run_manager.BeamOn(n_events)
        dead = self.detector.dead_cell_indices(angled)
        if dead.size:  # dead cells read nothing: their energy stays in the active material, outside the readout
            self._dep[:, 0] += self._out[:, dead].sum(axis=1, dtype=np.float64)
            self._out[:, dead] = 0.0
        if self.deposits:
            self.last_deposits = np.column_stack([self._out.sum(axis=1, dtype=np.float64), self._dep])
        if self.gate:
            from caloforge.fastsim import records_from_rows

            sd = self._geometry.gate_sd
            self.last_records, sd.rows = records_from_rows(sd.rows), []
            fast = self.last_records["reason"] == 0
            if self.fastsim is not None and fast.any():
                np.add.at(self._out, self.last_records["event"][fast], self.fastsim.showers(self.last_records, angled))
                self._out[:, dead] = 0.0
        return self._out


def check_hadronic(particles, hadronic: str) -> None:
    """Refuse hadrons (pi+, pi-, proton) without hadronic physics: their showers would be ionisation tracks only."""
    hadrons = hadron_names([p for p in particles if isinstance(p, str) or int(p) in PDG_PARTICLE])
    if hadrons and hadronic == "none":
        raise ValueError(f"particle {', '.join(hadrons)}: hadron showers need hadronic physics; caloforge has only a "
                         f"placeholder that runs without Geant4 data sets: add --hadronic bertini (the Bertini "
                         f"cascade at all energies, crude low-energy neutrons, not a validated hadronic reference; "
                         f"docs/detectors.md 'Hadrons')")


class _Geometry:
    """Factory for the G4VUserDetectorConstruction subclass (defined lazily: needs the geant4 module)."""

    def __new__(cls, g4, detector: Detector, app: Geant4App):
        class Construction(g4.G4VUserDetectorConstruction):
            def __init__(self) -> None:
                super().__init__()
                self.detector = detector
                self._keep: list = []
                self.segmented = None
                if not detector.is_uniform:
                    from caloforge.geant4_readout import SegmentedReadout

                    self.segmented = SegmentedReadout(g4, detector)
                    return
                c = detector.cell_size_mm
                self.n_x_total = int(round(detector.size_x_mm / c))
                self.n_y_total = int(round(detector.size_y_mm / c))

            def window(self, angled: bool) -> tuple[slice, slice] | None:
                """Slices of the full x and y cell ranges that form the stored readout window."""
                if self.segmented is not None:
                    return None
                d, c = self.detector, self.detector.cell_size_mm
                _, n_x, n_y = d.shape(angled)
                x0 = int(round((d.readout.x_min_mm + d.size_x_mm / 2) / c))
                y0 = int(round((d.readout.y_min_mm + d.size_y_mm / 2) / c))
                return slice(x0, x0 + n_x), slice(y0, y0 + n_y)

            def Construct(self):
                d, mm = self.detector, g4.mm
                nist = g4.G4NistManager.Instance()
                world_mat = nist.FindOrBuildMaterial(d.world_material)
                half_x, half_y, depth = d.size_x_mm / 2, d.size_y_mm / 2, d.depth_mm
                world_s = g4.G4Box("World", 1.2 * half_x * mm, 1.2 * half_y * mm, (depth + 100) * mm)
                world_l = g4.G4LogicalVolume(world_s, world_mat, "World")
                world_p = g4.G4PVPlacement(None, g4.G4ThreeVector(), world_l, "World", None, False, 0)
                calo_s = g4.G4Box("Calo", half_x * mm, half_y * mm, depth / 2 * mm)
                calo_l = g4.G4LogicalVolume(calo_s, world_mat, "Calo")
                calo_p = g4.G4PVPlacement(None, g4.G4ThreeVector(0, 0, depth / 2 * mm), calo_l, "Calo",
                                          world_l, False, 0)
                self._keep += [world_s, world_l, world_p, calo_s, calo_l, calo_p]
                self.gate_volume = None
                if app.gate:  # fast simulation: a slab of the world material just upstream of the face
                    from caloforge.fastsim import GATE_MM

                    gate_s = g4.G4Box("Gate", half_x * mm, half_y * mm, GATE_MM / 2 * mm)
                    self.gate_volume = g4.G4LogicalVolume(gate_s, world_mat, "Gate")
                    gate_p = g4.G4PVPlacement(None, g4.G4ThreeVector(0, 0, -GATE_MM / 2 * mm), self.gate_volume,
                                              "Gate", world_l, False, 0)
                    self._keep += [gate_s, self.gate_volume, gate_p]
                self.cell_volumes = []
                self.passive_volumes = []
                if self.segmented is not None:
                    self.segmented.build(calo_l, depth)
                    return world_p
                active_cache: dict[tuple[str, float], object] = {}
                z = -depth / 2
                for i, layer in enumerate(d.layers):
                    if layer.absorber_mm > 0:
                        key = f"Abs{i}"
                        s = g4.G4Box(key, half_x * mm, half_y * mm, layer.absorber_mm / 2 * mm)
                        lv = g4.G4LogicalVolume(s, nist.FindOrBuildMaterial(layer.absorber), key)
                        pv = g4.G4PVPlacement(None, g4.G4ThreeVector(0, 0, (z + layer.absorber_mm / 2) * mm), lv,
                                              key, calo_l, False, i)
                        self._keep += [s, lv, pv]
                        self.passive_volumes.append(lv)
                        z += layer.absorber_mm
                    akey = (layer.active, layer.active_mm)
                    if akey not in active_cache:
                        active_cache[akey] = self._segmented_layer(layer.active, layer.active_mm, len(active_cache))
                    pv = g4.G4PVPlacement(None, g4.G4ThreeVector(0, 0, (z + layer.active_mm / 2) * mm),
                                          active_cache[akey], f"Active{i}", calo_l, False, i)
                    self._keep.append(pv)
                    z += layer.active_mm
                return world_p

            def _segmented_layer(self, material: str, thickness: float, k: int):
                """An active slab split into rows along y (replica) and cells along x (replica)."""
                d, mm = self.detector, g4.mm
                c = d.cell_size_mm
                mat = g4.G4NistManager.Instance().FindOrBuildMaterial(material)
                half_x, half_y, half_t = d.size_x_mm / 2, d.size_y_mm / 2, thickness / 2
                slab_s = g4.G4Box(f"Slab{k}", half_x * mm, half_y * mm, half_t * mm)
                slab_l = g4.G4LogicalVolume(slab_s, mat, f"Slab{k}")
                row_s = g4.G4Box(f"Row{k}", half_x * mm, c / 2 * mm, half_t * mm)
                row_l = g4.G4LogicalVolume(row_s, mat, f"Row{k}")
                row_p = g4.G4PVReplica(f"Row{k}", row_l, slab_l, g4.kYAxis, self.n_y_total, c * mm)
                cell_s = g4.G4Box(f"Cell{k}", c / 2 * mm, c / 2 * mm, half_t * mm)
                cell_l = g4.G4LogicalVolume(cell_s, mat, f"Cell{k}")
                cell_p = g4.G4PVReplica(f"Cell{k}", cell_l, row_l, g4.kXAxis, self.n_x_total, c * mm)
                self._keep += [slab_s, slab_l, row_s, row_l, row_p, cell_s, cell_l, cell_p]
                self.cell_volumes.append(cell_l)
                return slab_l

            def ConstructSDandField(self) -> None:
                sdm = g4.G4SDManager.GetSDMpointer()
                sdm.SetVerboseLevel(0)
                if self.segmented is not None:
                    self.segmented.make_sensitive(self)
                    self._gate_sd()
                    return
                mfd = g4.G4MultiFunctionalDetector("CaloSi")
                # index = layer * (ny * nx) + y * nx + x: layer is the copy number two levels up.
                scorer = g4.G4PSEnergyDeposit3D("edep", self.detector.n_layers, self.n_y_total, self.n_x_total,
                                                2, 1, 0)
                mfd.RegisterPrimitive(scorer)
                sdm.AddNewDetector(mfd)
                for lv in self.cell_volumes:
                    self.SetSensitiveDetector(lv, mfd)
                self._keep += [mfd, scorer]
                if app.deposits:  # energy in the absorbers (the active slabs are all scored above)
                    pmfd = g4.G4MultiFunctionalDetector("Passive")
                    pscorer = g4.G4PSEnergyDeposit("edep", 0)
                    pmfd.RegisterPrimitive(pscorer)
                    sdm.AddNewDetector(pmfd)
                    for lv in self.passive_volumes:
                        self.SetSensitiveDetector(lv, pmfd)
                    self._keep += [pmfd, pscorer]
                self._gate_sd()

            def _gate_sd(self) -> None:
                sdm = g4.G4SDManager.GetSDMpointer()
                if self.gate_volume is not None:
                    from caloforge.fastsim import gate_detector

                    self.gate_sd = gate_detector(g4, app)
                    sdm.AddNewDetector(self.gate_sd)
                    self.SetSensitiveDetector(self.gate_volume, self.gate_sd)

        return Construction()


class _Actions:
    """Factory for the action initialisation: particle gun per event, hits read out at the end of event."""

    def __new__(cls, g4, app: Geant4App):
        class Gun(g4.G4VUserPrimaryGeneratorAction):
            def __init__(self) -> None:
                super().__init__()
                self.gun = g4.G4ParticleGun(1)
                table = g4.G4ParticleTable.GetParticleTable()
                self.definitions = {code: table.FindParticle(name) for code, name in PDG_PARTICLE.items()}

            def GeneratePrimaries(self, event) -> None:
                app.current_event = event.GetEventID()
                c, k = app._cond, app.multiplicity
                for i in range(app.current_event * k, (app.current_event + 1) * k):
                    a = np.radians(c.angle[i])
                    # Start 1 mm upstream in vacuum, aimed to reach (x, y, 0) on the front face.
                    d = 1.0
                    pdg = int(c.pdg[i])
                    if pdg not in self.definitions:  # any particle Geant4 knows (tests fire muons)
                        self.definitions[pdg] = g4.G4ParticleTable.GetParticleTable().FindParticle(pdg)
                    self.gun.SetParticleDefinition(self.definitions[pdg])
                    self.gun.SetParticleEnergy(float(c.energy[i]) * g4.MeV)
                    self.gun.SetParticlePosition(g4.G4ThreeVector(float(c.x[i]) * g4.mm,
                                                                  (float(c.y[i]) - np.tan(a) * d) * g4.mm,
                                                                  -d * g4.mm))
                    self.gun.SetParticleMomentumDirection(g4.G4ThreeVector(0, np.sin(a), np.cos(a)))
                    self.gun.GeneratePrimaryVertex(event)

        class EventAction(g4.G4UserEventAction):
            def __init__(self) -> None:
                super().__init__()
                self.hc_id = -1
                self.passive_id = -1

            def EndOfEventAction(self, event) -> None:
                if self.hc_id < 0 and app._geometry.segmented is None:
                    self.hc_id = g4.G4SDManager.GetSDMpointer().GetCollectionID("CaloSi/edep")
                hce = event.GetHCofThisEvent()
                if hce is None:
                    return
                geo = app._geometry
                if geo.segmented is not None:
                    app._dep[event.GetEventID()] = geo.segmented.read(hce, app._out[event.GetEventID()])
                    return
                hits = hce.GetHC(self.hc_id)
                n_l, n_yt, n_xt = app.detector.n_layers, geo.n_y_total, geo.n_x_total
                xs, ys = app._window
                n_x, n_y = xs.stop - xs.start, ys.stop - ys.start
                pairs = [(k, v) for k, v in hits]
                if app.deposits:
                    if self.passive_id < 0:
                        self.passive_id = g4.G4SDManager.GetSDMpointer().GetCollectionID("Passive/edep")
                    passive = sum(v for _, v in hce.GetHC(self.passive_id)) / g4.MeV
                    total = sum(v for _, v in pairs) / g4.MeV
                if not pairs:
                    if app.deposits:
                        app._dep[event.GetEventID()] = (0.0, passive)
                    return
                idx = np.fromiter((k for k, _ in pairs), np.int64, len(pairs))
                val = np.fromiter((v for _, v in pairs), np.float64, len(pairs)) / g4.MeV
                layer, rest = np.divmod(idx, n_yt * n_xt)
                y, x = np.divmod(rest, n_xt)
                keep = (x >= xs.start) & (x < xs.stop) & (y >= ys.start) & (y < ys.stop) & (layer < n_l)
                flat = (layer[keep] * n_x + (x[keep] - xs.start)) * n_y + (y[keep] - ys.start)
                row = app._out[event.GetEventID()]
                np.add.at(row, flat, val[keep].astype(np.float32))
                if app.deposits:
                    app._dep[event.GetEventID()] = (total - float(val[keep].sum()), passive)

        class Actions(g4.G4VUserActionInitialization):
            def Build(self) -> None:
                self._gun, self._event = Gun(), EventAction()
                self.SetUserAction(self._gun)
                self.SetUserAction(self._event)

        return Actions()
