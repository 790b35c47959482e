"""A parametrised detector response and the single-lepton selection (no Delphes: documented parameters instead).

From each event's final state (:class:`caloforge.events.pythia.Particles`):

- **Leptons**: e and mu with pT > 25 GeV, |eta| < 2.4, isolated (scalar pT sum of the other visible particles within
  Delta R < 0.4 below 15 % of the lepton pT); efficiency 90 % (e) and 95 % (mu); energy smeared by
  2 %/sqrt(E/GeV) (+) 0.5 % (e), transverse momentum by 1 % (+) 0.01 % x pT/GeV (mu).
- **Jets**: FastJet anti-kt R = 0.4 on all other visible particles (the isolated leptons removed), energy smeared
  by 100 %/sqrt(E/GeV) (+) 5 % (the four-vector scaled); kept with pT > 25 GeV and |eta| < 2.4 after smearing.
- **Flavour and b-tagging**: a jet is b (c) if a last b (c) hadron with pT > 5 GeV lies within Delta R < 0.4 of it
  (closest jet wins); tagged with probability 70 % (b), 12 % (c), 1 % (light).
- **Missing pT**: the neutrinos' summed pT, corrected for the jet (pT > 20 GeV) and lepton smearing.
- **Selection**: exactly one lepton (and none other isolated above 15 GeV), at least 4 jets, at least
  ``min_btags`` (default 2) b-tagged jets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

JET_R = 0.4
JET_PT_MIN, JET_ETA_MAX = 25.0, 2.4
JET_PT_RAW_MIN = 20.0
LEP_PT_MIN, LEP_ETA_MAX, LEP_VETO_PT = 25.0, 2.4, 15.0
ISO_CONE, ISO_MAX = 0.4, 0.15
LEP_EFF = {11: 0.90, 13: 0.95}
BTAG_EFF = {"b": 0.70, "c": 0.12, "light": 0.01}
MIN_JETS = 4
MIN_BTAGS = 2
HADRON_PT_MIN = 5.0

RESPONSE_DOC = {
    "jets": "anti-kt R=0.4 (FastJet); sigma_E/E = 100%/sqrt(E) (+) 5%; pT > 25 GeV, |eta| < 2.4",
    "electrons": "pT > 25 GeV, |eta| < 2.4, rel. iso (dR 0.4) < 0.15, eff 90%, sigma_E/E = 2%/sqrt(E) (+) 0.5%",
    "muons": "pT > 25 GeV, |eta| < 2.4, rel. iso (dR 0.4) < 0.15, eff 95%, sigma_pT/pT = 1% (+) 0.01% pT",
    "btag": "b 70%, c 12%, light 1% (hadron within dR 0.4)",
    "met": "neutrino pT sum corrected for jet (pT > 20 GeV) and lepton smearing",
    "selection": "exactly 1 lepton, >= 4 jets, >= min_btags b-tags",
    "delphes": "not used: this parametrised response replaces it",
}


@dataclass
class Reconstructed:
    """One selected event: four-vectors as (E, px, py, pz) in GeV."""

    lepton: np.ndarray  # (4,)
    lepton_pdg: int
    jets: np.ndarray  # (n, 4), pT ordered
    btag: np.ndarray  # (n,) bool
    met: np.ndarray  # (2,) px, py


def pt_eta_phi(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pT, pseudorapidity and phi of (..., 4) arrays (E, px, py, pz)."""
    px, py, pz = p[..., 1], p[..., 2], p[..., 3]
    pt = np.hypot(px, py)
    eta = np.arcsinh(np.divide(pz, pt, out=np.zeros_like(pz), where=pt > 0))
    return pt, eta, np.arctan2(py, px)


def delta_r(eta1, phi1, eta2, phi2) -> np.ndarray:
    dphi = (phi1 - phi2 + np.pi) % (2 * np.pi) - np.pi
    return np.hypot(eta1 - eta2, dphi)


def _isolated_leptons(vis: np.ndarray) -> np.ndarray:
    """Indices of isolated e/mu with pT > LEP_VETO_PT (truth level)."""
    p4 = vis[:, [3, 0, 1, 2]]
    pt, eta, phi = pt_eta_phi(p4)
    cand = np.flatnonzero(np.isin(np.abs(vis[:, 4]), (11, 13)) & (pt > LEP_VETO_PT) & (np.abs(eta) < 2.5))
    keep = []
    for i in cand:
        dr = delta_r(eta[i], phi[i], eta, phi)
        iso = pt[(dr < ISO_CONE)].sum() - pt[i]
        if iso < ISO_MAX * pt[i]:
            keep.append(i)
    return np.array(keep, dtype=int)


def _smear_lepton(p4: np.ndarray, pdg: int, rng: np.random.Generator) -> np.ndarray:
    if pdg == 11:
        e = p4[0]
        sigma = np.hypot(0.02 / np.sqrt(e), 0.005)
    else:
        sigma = np.hypot(0.01, 1e-4 * np.hypot(p4[1], p4[2]))
    return p4 * max(1.0 + sigma * rng.standard_normal(), 0.01)


def cluster(inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Anti-kt R = 0.4 jets (E, px, py, pz), pT > JET_PT_RAW_MIN, of many events in one FastJet call."""
    import awkward as ak
    import fastjet

    counts = [len(x) for x in inputs]
    flat = np.concatenate(inputs) if inputs else np.zeros((0, 4))
    arr = ak.unflatten(ak.zip({"px": flat[:, 1], "py": flat[:, 2], "pz": flat[:, 3], "E": flat[:, 0]}), counts)
    jetdef = fastjet.JetDefinition(fastjet.antikt_algorithm, JET_R)
    jets = fastjet.ClusterSequence(arr, jetdef).inclusive_jets(min_pt=JET_PT_RAW_MIN)
    out = []
    for j in ak.to_list(jets):
        a = np.array([[x["E"], x["px"], x["py"], x["pz"]] for x in j], dtype=np.float64).reshape(-1, 4)
        out.append(a[np.argsort(-np.hypot(a[:, 1], a[:, 2]), kind="stable")])
    return out


def _flavours(jets: np.ndarray, b_had: np.ndarray, c_had: np.ndarray) -> np.ndarray:
    """'b', 'c' or 'light' per jet from Delta R matching of the heavy hadrons (closest jet within R)."""
    flav = np.array(["light"] * len(jets), dtype=object)
    if len(jets) == 0:
        return flav
    _, jeta, jphi = pt_eta_phi(jets)
    for hadrons, label in ((c_had, "c"), (b_had, "b")):  # b overrides c
        if len(hadrons) == 0:
            continue
        h4 = hadrons[:, [3, 0, 1, 2]]
        hpt, heta, hphi = pt_eta_phi(h4)
        for k in np.flatnonzero(hpt > HADRON_PT_MIN):
            dr = delta_r(heta[k], hphi[k], jeta, jphi)
            j = int(np.argmin(dr))
            if dr[j] < JET_R:
                flav[j] = label
    return flav


def reconstruct(events: list, rng: np.random.Generator, min_btags: int = MIN_BTAGS) -> list[Reconstructed | None]:
    """Apply the response and the selection to a list of Particles; None for rejected events."""
    lep_idx = [_isolated_leptons(ev.visible) for ev in events]
    inputs = []
    for ev, li in zip(events, lep_idx):
        mask = np.ones(len(ev.visible), dtype=bool)
        mask[li] = False
        inputs.append(ev.visible[mask][:, [3, 0, 1, 2]])
    all_jets = cluster(inputs)
    out: list[Reconstructed | None] = []
    for ev, li, jets in zip(events, lep_idx, all_jets):
        # every event draws the same number of random numbers per object, in a fixed order
        leptons = []
        met = ev.invisible_pxy.copy()
        for i in li:
            pdg = int(abs(ev.visible[i, 4]))
            true = ev.visible[i, [3, 0, 1, 2]]
            sm = _smear_lepton(true, pdg, rng)
            found = rng.random() < LEP_EFF[pdg]
            met -= sm[1:3] - true[1:3]
            pt, eta, _ = pt_eta_phi(sm)
            if found:
                leptons.append((sm, pdg, pt, eta))
        jes = 1.0 + np.sqrt(1.0 / np.maximum(jets[:, 0], 1e-3) + 0.05**2) * rng.standard_normal(len(jets))
        smeared = jets * np.maximum(jes, 0.01)[:, None]
        met -= (smeared[:, 1:3] - jets[:, 1:3]).sum(axis=0)
        flav = _flavours(smeared, ev.b_hadrons, ev.c_hadrons)
        eff = np.array([BTAG_EFF[f] for f in flav])
        tagged = rng.random(len(jets)) < eff
        good = [lp for lp in leptons if lp[2] > LEP_PT_MIN and abs(lp[3]) < LEP_ETA_MAX]
        if len(good) != 1 or len(leptons) != 1:
            out.append(None)
            continue
        pt, eta, _ = pt_eta_phi(smeared)
        sel = (pt > JET_PT_MIN) & (np.abs(eta) < JET_ETA_MAX)
        jets_sel, tag_sel = smeared[sel], tagged[sel]
        order = np.argsort(-pt[sel], kind="stable")
        jets_sel, tag_sel = jets_sel[order], tag_sel[order]
        if len(jets_sel) < MIN_JETS or tag_sel.sum() < min_btags:
            out.append(None)
            continue
        out.append(Reconstructed(good[0][0], good[0][1], jets_sel, tag_sel, met))
    return out
