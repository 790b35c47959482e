"""Geant4 physics lists for electromagnetic showers.

``standard``: Geant4's ``G4EmStandardPhysics`` (needs the G4EMLOW data set) plus decay physics.

``data-free``: a list built from Geant4's own processes whose models use only built-in parametrisations,
for machines without Geant4 data sets:

* gamma: photo-electric effect (Sandia parametrisation, ``G4PEEffectFluoModel``), Compton (Klein-Nishina),
  conversion (Bethe-Heitler with LPM);
* e-/e+: Urban multiple scattering, Moller/Bhabha ionisation, bremsstrahlung with the relativistic model
  ``G4eBremsstrahlungRelModel`` at all energies (replacing the data-reading Seltzer-Berger model below 1 GeV);
  e+: annihilation.

Differences from ``G4EmStandardPhysics``: no Seltzer-Berger below 1 GeV, no fluorescence, no Rayleigh
scattering, Urban msc at all energies, Compton without shell effects; expected effect on showers is at
the percent level. Datasets record which list was used.

geant4-pybind binds physics constructors but not individual processes, so the data-free list creates the
processes through ``ctypes`` from the C++ symbols that the geant4-pybind extension exports. This ties it to
exactly geant4-pybind 0.1.3 (Geant4 11.4.p1, C++11 string ABI); :func:`check_symbols` fails loudly if a
symbol is missing.

``hadronic="bertini"`` adds the data-free Bertini placeholder of :mod:`caloforge.hadronic` (pions, protons).
"""

from __future__ import annotations

import ctypes

DATA_FREE = "caloforge-data-free-em (Geant4 processes: phot/compt/conv, eMsc(Urban)/eIoni/eBrem(RelModel)/annihil)"
STANDARD = "G4EmStandardPhysics + G4DecayPhysics"
#: Hadronic physics choices: none (e/gamma showers) or the data-free Bertini placeholder (pions, protons).
HADRONIC = ("none", "bertini")

F_ELECTROMAGNETIC = 2  # G4ProcessType::fElectromagnetic
_OBJECT_BYTES = 8192  # generous: class sizes are not exported; objects are never freed (Geant4 owns them)

_SYMBOLS = {
    "phot": "_ZN21G4PhotoElectricEffectC1ERK8G4String13G4ProcessType",
    "compt": "_ZN19G4ComptonScatteringC1ERK8G4String13G4ProcessType",
    "conv": "_ZN17G4GammaConversionC1ERK8G4String13G4ProcessType",
    "msc": "_ZN21G4eMultipleScatteringC1ERK8G4String",
    "eIoni": "_ZN13G4eIonisationC1ERK8G4String",
    "eBrem": "_ZN17G4eBremsstrahlungC1ERK8G4String",
    "annihil": "_ZN19G4eplusAnnihilationC1ERK8G4String",
    "relmodel": "_ZN25G4eBremsstrahlungRelModelC1EPK20G4ParticleDefinitionRK8G4String",
    "set_model": "_ZN20G4VEnergyLossProcess10SetEmModelEP10G4VEmModeli",
    "helper": "_ZN19G4PhysicsListHelper20GetPhysicsListHelperEv",
    "register": "_ZN19G4PhysicsListHelper15RegisterProcessEP10G4VProcessP20G4ParticleDefinition",
    "gamma": "_ZN7G4Gamma5GammaEv",
    "electron": "_ZN10G4Electron8ElectronEv",
    "positron": "_ZN10G4Positron8PositronEv",
}


def _all_symbols() -> dict[str, str]:
    from caloforge.hadronic import SYMBOLS as hadronic

    return {**_SYMBOLS, **hadronic}


class PhysicsError(RuntimeError):
    """The Geant4 physics list cannot be built."""


def _library(g4) -> ctypes.CDLL:
    # dlopen of the already-imported extension returns the same handle, so Geant4's singletons are shared.
    return ctypes.CDLL(g4.__file__)


def check_symbols(g4) -> None:
    """Raise PhysicsError naming any C++ symbol that the data-free EM list or the Bertini placeholder needs and
    geant4-pybind lacks."""
    lib = _library(g4)
    missing = [name for name in _all_symbols().values() if not hasattr(lib, name)]
    if missing:
        raise PhysicsError(
            "caloforge's data-free physics lists need C++ symbols that this geant4-pybind does not export: "
            f"{missing}. caloforge requires geant4-pybind==0.1.3 (or real Geant4 data sets)."
        )


class _Native:
    """Thin ctypes access to the Geant4 C++ API inside the geant4-pybind extension."""

    def __init__(self, g4):
        check_symbols(g4)
        self.symbols = _all_symbols()
        self.lib = _library(g4)
        libc = ctypes.CDLL(None)
        self.calloc = libc.calloc
        self.calloc.restype = ctypes.c_void_p
        self.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
        for key in ("helper", "gamma", "electron", "positron"):
            getattr(self.lib, _SYMBOLS[key]).restype = ctypes.c_void_p
        reg = getattr(self.lib, _SYMBOLS["register"])
        reg.restype = ctypes.c_bool
        reg.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        getattr(self.lib, _SYMBOLS["set_model"]).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]

    def string(self, text: str) -> int:
        """A ``G4String`` (std::string, C++11 ABI: data pointer, size, 16-byte inline buffer) in C memory."""
        raw = text.encode()
        obj = self.calloc(1, 32)
        if len(raw) < 16:
            data = obj + 16
        else:
            data = self.calloc(1, len(raw) + 1)
            ctypes.c_size_t.from_address(obj + 16).value = len(raw)  # capacity
        ctypes.memmove(data, raw, len(raw))
        ctypes.c_void_p.from_address(obj).value = data
        ctypes.c_size_t.from_address(obj + 8).value = len(raw)
        return obj

    def new(self, key: str, *args) -> int:
        obj = self.calloc(1, _OBJECT_BYTES)
        ctor = getattr(self.lib, self.symbols[key])
        ctor.restype = None
        ctor(ctypes.c_void_p(obj), *args)
        return obj

    def process(self, key: str, name: str, with_type: bool | int) -> int:
        """A process made by its constructor ``(name)`` or, with ``with_type``, ``(name, G4ProcessType)``
        (``True``: electromagnetic, an int: that type)."""
        args = [ctypes.c_void_p(self.string(name))]
        if with_type is not False:
            args.append(ctypes.c_int(F_ELECTROMAGNETIC if with_type is True else int(with_type)))
        return self.new(key, *args)

    def particle(self, key: str) -> int:
        return self.call(key)

    def call(self, key: str, *args, restype=ctypes.c_void_p):
        """Call a function (a static or member function: pass ``this`` first) by its key."""
        fn = getattr(self.lib, self.symbols[key])
        fn.restype = restype
        return fn(*args)

    def register(self, process: int, particle: int) -> None:
        helper = getattr(self.lib, _SYMBOLS["helper"])()
        ok = getattr(self.lib, _SYMBOLS["register"])(helper, process, particle)
        if not ok:
            raise PhysicsError("G4PhysicsListHelper::RegisterProcess refused a process")


def _data_free_em_constructor(g4):
    class DataFreeEmPhysics(g4.G4VPhysicsConstructor):
        """Electromagnetic physics for e-, e+ and gamma without Geant4 data sets."""

        def __init__(self) -> None:
            super().__init__("caloforge-data-free-em")

        def ConstructParticle(self) -> None:  # particles come from G4DecayPhysics
            pass

        def ConstructProcess(self) -> None:
            n = _Native(g4)
            gamma, electron, positron = n.particle("gamma"), n.particle("electron"), n.particle("positron")
            n.register(n.process("phot", "phot", True), gamma)
            n.register(n.process("compt", "compt", True), gamma)
            n.register(n.process("conv", "conv", True), gamma)
            for particle in (electron, positron):
                n.register(n.process("msc", "msc", False), particle)
                n.register(n.process("eIoni", "eIoni", False), particle)
                brem = n.process("eBrem", "eBrem", False)
                model = n.new("relmodel", ctypes.c_void_p(None), ctypes.c_void_p(n.string("eBremLPM")))
                getattr(n.lib, _SYMBOLS["set_model"])(brem, model, 0)
                n.register(brem, particle)
            n.register(n.process("annihil", "annihil", False), positron)

    return DataFreeEmPhysics


def make_physics_list(g4, use_standard: bool, hadronic: str = "none"):
    """A ``G4VModularPhysicsList`` and its description string.

    ``hadronic``: ``"none"`` (electromagnetic showers only: the list e/gamma runs have always used) or
    ``"bertini"`` (adds :mod:`caloforge.hadronic`'s data-free Bertini placeholder)."""
    if hadronic not in HADRONIC:
        raise ValueError(f"hadronic physics {hadronic!r}: expected one of {', '.join(HADRONIC)}")

    class CaloforgePhysics(g4.G4VModularPhysicsList):
        def __init__(self) -> None:
            super().__init__()
            self.SetVerboseLevel(0)
            # keep Python references: Geant4 holds raw pointers to these constructors
            self._constructors = [
                g4.G4DecayPhysics(),
                g4.G4EmStandardPhysics(0) if use_standard else _data_free_em_constructor(g4)(),
            ]
            if hadronic == "bertini":
                from caloforge.hadronic import bertini_constructor

                self._constructors.append(bertini_constructor(g4, with_charged_em=not use_standard)())
            for constructor in self._constructors:
                self.RegisterPhysics(constructor)

    return CaloforgePhysics(), physics_list_name(use_standard, hadronic)


def physics_list_name(use_standard: bool, hadronic: str = "none") -> str:
    """The physics list name that datasets record."""
    em = STANDARD if use_standard else DATA_FREE
    if hadronic == "bertini":
        from caloforge.hadronic import BERTINI

        return f"{em} + {BERTINI}"
    return em
