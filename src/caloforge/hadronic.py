"""A hadronic physics placeholder that runs without Geant4 data sets: the Bertini cascade at all energies.

Geant4's hadronic physics lists (``FTFP_BERT``, ``QGSP_BERT``, ``QBBC``) and ``G4HadronElasticPhysics`` read
nucleon cross sections from ``G4PARTICLEXSDATA``, which cannot be had here. This list is built process by
process from Geant4 parts whose models and cross sections are built-in parametrisations:

* pi+, pi-: ``G4HadronInelasticProcess`` with ``G4BGGPionInelasticXS`` and the Bertini cascade
  (``G4CascadeInterface``); ``G4HadronElasticProcess`` with ``G4BGGPionElasticXS`` and ``G4HadronElastic``;
* p, n: the same with ``G4BGGNucleonInelasticXS`` / ``G4BGGNucleonElasticXS``;
* K+, K-, K0L, K0S: Bertini with Glauber-Gribov inelastic and elastic cross sections;
* pi- and K- at rest: ``G4HadronicAbsorptionBertini``;
* neutrons are killed 10 us after the primary (``G4NeutronKiller``, as ``G4NeutronTrackingCut``);
* without real EM data sets, also the charged-particle EM physics of ``G4EmStandardPhysics``
  (``G4EmBuilder::ConstructCharged``: muons, pions, kaons, protons, ions).

Limits (recorded in every file as :data:`LIMITS`): Bertini is used far beyond its validity (about 10 GeV;
``FTFP_BERT`` hands over to the FTF string model from 3-12 GeV), low-energy neutrons are crude (no capture, no
high-precision data below 20 MeV), hyperons, anti-nucleons and ions have no nuclear interactions, and nothing is
validated against test-beam data. These showers are a placeholder for pipelines and models, never a validated
hadronic reference.

The processes are created through ``ctypes`` with :class:`caloforge.physics._Native`, like the data-free EM list.
"""

from __future__ import annotations

import ctypes

#: The name datasets record (after the EM list's name) and the limits they record with it.
BERTINI = ("caloforge-bertini-placeholder (Geant4 processes: Bertini cascade G4CascadeInterface at all energies "
           "with BGG pion/nucleon and Glauber-Gribov kaon cross sections, G4HadronElastic, "
           "G4HadronicAbsorptionBertini, neutron kill at 10 us; no data sets)")
LIMITS = ("PLACEHOLDER, not a validated hadronic reference: Bertini cascade at all energies (valid up to about "
          "10 GeV; FTFP_BERT uses the FTF string model above 3-12 GeV), no neutron capture or low-energy neutron "
          "data (neutrons below 20 MeV crude, killed after 10 us), no nuclear interactions of hyperons, "
          "anti-nucleons or ions, built without Geant4 data sets")
#: Particles the placeholder gives nuclear interactions and that ``simulate`` fires with it.
HADRONS = ("pi+", "pi-", "proton")
NEUTRON_TIME_LIMIT_NS = 10_000.0  # 10 us, G4NeutronTrackingCut's default
_F_GENERAL = 7  # G4ProcessType::fGeneral

SYMBOLS = {
    "inelastic": "_ZN24G4HadronInelasticProcessC1ERK8G4StringPK20G4ParticleDefinition",
    "elastic": "_ZN22G4HadronElasticProcessC1ERK8G4String",
    "add_dataset": "_ZN17G4HadronicProcess10AddDataSetEP22G4VCrossSectionDataSet",
    "register_me": "_ZN17G4HadronicProcess10RegisterMeEP21G4HadronicInteraction",
    "bertini": "_ZN18G4CascadeInterfaceC1ERK8G4String",
    "elastic_model": "_ZN15G4HadronElasticC1ERK8G4String",
    "pion_inelastic_xs": "_ZN20G4BGGPionInelasticXSC1EPK20G4ParticleDefinition",
    "pion_elastic_xs": "_ZN18G4BGGPionElasticXSC1EPK20G4ParticleDefinition",
    "nucleon_inelastic_xs": "_ZN23G4BGGNucleonInelasticXSC1EPK20G4ParticleDefinition",
    "nucleon_elastic_xs": "_ZN21G4BGGNucleonElasticXSC1EPK20G4ParticleDefinition",
    "gg_inelastic_xs": "_ZN14G4HadProcesses11InelasticXSERK8G4String",
    "gg_elastic_xs": "_ZN14G4HadProcesses9ElasticXSERK8G4String",
    "absorption": "_ZN27G4HadronicAbsorptionBertiniC1EP20G4ParticleDefinition",
    "neutron_killer": "_ZN15G4NeutronKillerC1ERK8G4String13G4ProcessType",
    "killer_time": "_ZN15G4NeutronKiller12SetTimeLimitEd",
    "hmsc": "_ZN21G4hMultipleScatteringC1ERK8G4String",
    "ion_ionisation": "_ZN15G4ionIonisationC1ERK8G4String",
    "GenericIon": "_ZN12G4GenericIon10GenericIonEv",
    "charged_em": "_ZN11G4EmBuilder16ConstructChargedEP21G4hMultipleScatteringP17G4NuclearStoppingb",
    "pi+": "_ZN10G4PionPlus8PionPlusEv",
    "pi-": "_ZN11G4PionMinus9PionMinusEv",
    "proton": "_ZN8G4Proton6ProtonEv",
    "neutron": "_ZN9G4Neutron7NeutronEv",
    "kaon+": "_ZN10G4KaonPlus8KaonPlusEv",
    "kaon-": "_ZN11G4KaonMinus9KaonMinusEv",
    "kaon0L": "_ZN14G4KaonZeroLong12KaonZeroLongEv",
    "kaon0S": "_ZN15G4KaonZeroShort13KaonZeroShortEv",
}

# particle: (inelastic cross section, elastic cross section); "gg_*" take a component name, the others a particle
_CROSS_SECTIONS = {
    "pi+": ("pion_inelastic_xs", "pion_elastic_xs"),
    "pi-": ("pion_inelastic_xs", "pion_elastic_xs"),
    "proton": ("nucleon_inelastic_xs", "nucleon_elastic_xs"),
    "neutron": ("nucleon_inelastic_xs", "nucleon_elastic_xs"),
    "kaon+": ("gg_inelastic_xs", "gg_elastic_xs"),
    "kaon-": ("gg_inelastic_xs", "gg_elastic_xs"),
    "kaon0L": ("gg_inelastic_xs", "gg_elastic_xs"),
    "kaon0S": ("gg_inelastic_xs", "gg_elastic_xs"),
}


def bertini_constructor(g4, with_charged_em: bool):
    """The ``G4VPhysicsConstructor`` subclass of the placeholder; ``with_charged_em``: also the EM physics of
    charged hadrons, muons and ions (needed on top of the data-free EM list, which has e-, e+ and gamma only)."""
    from caloforge.physics import _Native

    class BertiniPlaceholder(g4.G4VPhysicsConstructor):
        """Nuclear interactions of pions, nucleons and kaons without Geant4 data sets (a placeholder)."""

        def __init__(self) -> None:
            super().__init__("caloforge-bertini-placeholder")

        def ConstructParticle(self) -> None:  # particles come from G4DecayPhysics
            pass

        def ConstructProcess(self) -> None:
            n = _Native(g4)
            ptr = ctypes.c_void_p
            if with_charged_em:
                hmsc = n.process("hmsc", "ionmsc", False)
                ion = n.particle("GenericIon")  # nuclear fragments and recoils, as in G4EmStandardPhysics
                n.register(hmsc, ion)
                n.register(n.process("ion_ionisation", "ionIoni", False), ion)
                n.call("charged_em", ptr(hmsc), ptr(None), ctypes.c_bool(True), restype=None)
            bertini = n.process("bertini", "BertiniCascade", False)
            elastic_model = n.process("elastic_model", "hElasticLHEP", False)
            for name, (inel_key, el_key) in _CROSS_SECTIONS.items():
                particle = n.particle(name)
                inelastic = n.new("inelastic", ptr(n.string(f"{name}Inelastic")), ptr(particle))
                elastic = n.process("elastic", "hadElastic", False)
                for process, key in ((inelastic, inel_key), (elastic, el_key)):
                    if key.startswith("gg_"):
                        xs = n.call(key, ptr(n.string("Glauber-Gribov")))
                    else:
                        xs = n.new(key, ptr(particle))
                    n.call("add_dataset", ptr(process), ptr(xs), restype=None)
                n.call("register_me", ptr(inelastic), ptr(bertini), restype=None)
                n.call("register_me", ptr(elastic), ptr(elastic_model), restype=None)
                n.register(inelastic, particle)
                n.register(elastic, particle)
            absorption = n.new("absorption", ptr(None))
            for name in ("pi-", "kaon-"):
                n.register(absorption, n.particle(name))
            killer = n.process("neutron_killer", "nKiller", _F_GENERAL)
            n.call("killer_time", ptr(killer), ctypes.c_double(NEUTRON_TIME_LIMIT_NS), restype=None)
            n.register(killer, n.particle("neutron"))

    return BertiniPlaceholder
