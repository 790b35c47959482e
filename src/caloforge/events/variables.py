"""The talk's 26 high-level and 32 low-level variables of a selected single-lepton event.

High level (all from the selected jets, pT > 25 GeV, |eta| < 2.4, and the lepton; see docs/events.md for each):
event shapes of jets + lepton (aplanarity, centrality, sphericity, transverse sphericity, Fox-Wolfram H0..H4 of the
jets), jet-pair |Delta eta| and Delta R (min, max, mean), the jet pair with mass closest to 125 GeV (mass, pT), the
closest jet pair in Delta R (mass, pT), jet-lepton |Delta eta| and Delta R (min, max), the scalar jet pT sum, and the
W helicity angles of the reconstructed hadronic and leptonic W.

Low level: (E, px, py, pz) of the best ttH hypothesis's objects: b from the hadronic top (Bhad), the two Higgs
b candidates (Bj1, Bj2, pT ordered), b from the leptonic top (Blep), the two W jets (Lj1, Lj2, pT ordered), the
lepton (Lep1) and the neutrino (Nu1, pz from the W mass constraint).

The hypothesis: among up to six candidate jets (the four highest-pT b-tagged jets, filled up with the highest-pT
untagged ones) the assignment minimising chi2 = ((m_jj - m_W)/sigma_W)^2 + ((m_jjb - m_t)/sigma_thad)^2 +
((m_lnub - m_t)/sigma_tlep)^2 + 4 x (b slots without a b-tag + W-jet slots with one); the Higgs mass is not used,
so the hypothesis does not sculpt ttbb towards ttH. With 4 or 5 selected jets the Higgs slots left empty hold
zeros (Bj2, or Bj1 and Bj2).
"""

from __future__ import annotations

import itertools

import numpy as np

from caloforge.events.response import Reconstructed, delta_r, pt_eta_phi

HIGH_LEVEL = [
    "aplanarity", "centrality",
    "fox_wolfram_0", "fox_wolfram_1", "fox_wolfram_2", "fox_wolfram_3", "fox_wolfram_4",
    "jet_min_abs_deta", "jet_max_abs_deta", "jet_avg_abs_deta",
    "jet_min_dr", "jet_max_dr", "jet_avg_dr",
    "jet_closest_pair_125_mass", "jet_closest_pair_125_pt",
    "jet_closest_pair_mass", "jet_closest_pair_pt",
    "jet_lep_min_abs_deta", "jet_lep_max_abs_deta",
    "jet_lep_min_dr", "jet_lep_max_dr",
    "jet_sum_pt", "sphericity", "transverse_sphericity",
    "whad_helicity", "wlep_helicity",
]
LOW_LEVEL_OBJECTS = ["bhad", "bj1", "bj2", "blep", "lj1", "lj2", "lep1", "nu1"]
LOW_LEVEL = [f"{o}_{c}" for o in LOW_LEVEL_OBJECTS for c in ("e", "px", "py", "pz")]
AUX = ["n_jets", "n_btags", "met", "lepton_pdg"]

M_W, M_T, M_H = 80.4, 172.5, 125.0
SIGMA_W, SIGMA_THAD, SIGMA_TLEP = 10.0, 15.0, 20.0
TAG_PENALTY = 4.0



def _assignments(n: int) -> np.ndarray:
    """Assignments of n (4..6) jets to (bhad, blep, lj1, lj2, bj1, bj2); -1 = empty slot; W and H pairs unordered."""
    rows = []
    for bh in range(n):
        for bl in range(n):
            if bl == bh:
                continue
            for w in itertools.combinations(sorted(set(range(n)) - {bh, bl}), 2):
                rest = sorted(set(range(n)) - {bh, bl, *w})
                rows.append((bh, bl, *w, *rest, *[-1] * (2 - len(rest))))
    return np.array(rows)


_PERMS = {n: _assignments(n) for n in (4, 5, 6)}

def mass(p: np.ndarray) -> np.ndarray:
    m2 = p[..., 0] ** 2 - p[..., 1] ** 2 - p[..., 2] ** 2 - p[..., 3] ** 2
    return np.sqrt(np.maximum(m2, 0.0))


def neutrino(lepton: np.ndarray, met: np.ndarray) -> np.ndarray:
    """Neutrino four-vector with pz from the W mass constraint (smaller |pz|; real part if no real solution)."""
    el, pxl, pyl, pzl = lepton
    ptl2 = pxl**2 + pyl**2
    mx, my = met
    mu = 0.5 * M_W**2 + pxl * mx + pyl * my
    a = mu * pzl / ptl2
    disc = a**2 - (el**2 * (mx**2 + my**2) - mu**2) / ptl2
    if disc < 0:
        pz = a
    else:
        r = np.sqrt(disc)
        pz = a - r if abs(a - r) < abs(a + r) else a + r
    return np.array([np.sqrt(mx**2 + my**2 + pz**2), mx, my, pz])


def candidate_jets(jets: np.ndarray, btag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The six jets the hypothesis uses: the four leading b-tagged ones, then the leading untagged (pT order)."""
    tagged = np.flatnonzero(btag)[:4]
    untagged = np.flatnonzero(~btag)[: 6 - len(tagged)]
    idx = np.sort(np.concatenate([tagged, untagged]))
    return jets[idx], btag[idx]


def best_hypothesis(jets6: np.ndarray, tag6: np.ndarray, lepton: np.ndarray, nu: np.ndarray) -> np.ndarray:
    """The assignment (bhad, blep, lj1, lj2, bj1, bj2; -1 = empty) with the smallest chi2."""
    perms = _PERMS[len(jets6)]
    j = jets6[perms[:, :4]]  # (n_perm, 4, 4)
    t = np.where(perms >= 0, tag6[perms], True)  # empty Higgs slots are not penalised
    w = j[:, 2] + j[:, 3]
    chi2 = ((mass(w) - M_W) / SIGMA_W) ** 2 + ((mass(w + j[:, 0]) - M_T) / SIGMA_THAD) ** 2 \
        + ((mass(lepton + nu + j[:, 1]) - M_T) / SIGMA_TLEP) ** 2
    chi2 = chi2 + TAG_PENALTY * ((~t[:, [0, 1, 4, 5]]).sum(axis=1) + t[:, [2, 3]].sum(axis=1))
    return perms[int(np.argmin(chi2))]

def _boost_to(p: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Lorentz boost of four-vector p into the rest frame of four-vector frame."""
    b = frame[1:] / frame[0]
    b2 = float(b @ b)
    if b2 <= 0 or b2 >= 1:
        return p.copy()
    g = 1.0 / np.sqrt(1.0 - b2)
    bp = float(b @ p[1:])
    e = g * (p[0] - bp)
    vec = p[1:] + ((g - 1.0) * bp / b2 - g * p[0]) * b
    return np.concatenate([[e], vec])


def helicity(daughter: np.ndarray, w: np.ndarray, top: np.ndarray) -> float:
    """cos theta*: the daughter's direction in the W frame against the W direction in the top frame."""
    w_in_top = _boost_to(w, top)
    d_in_w = _boost_to(_boost_to(daughter, top), w_in_top)
    a, b = d_in_w[1:], w_in_top[1:]
    n = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / n) if n > 0 else 0.0


def _shapes(objs: np.ndarray) -> tuple[float, float, float, float]:
    """Aplanarity, sphericity, transverse sphericity, centrality of (n, 4) four-vectors."""
    p = objs[:, 1:]
    s = p.T @ p / np.sum(p**2)
    lam = np.sort(np.linalg.eigvalsh(s))[::-1]
    st = p[:, :2].T @ p[:, :2]
    lt = np.sort(np.linalg.eigvalsh(st))[::-1]
    pt = np.hypot(p[:, 0], p[:, 1])
    return 1.5 * lam[2], 1.5 * (lam[1] + lam[2]), 2 * lt[1] / (lt[0] + lt[1]), pt.sum() / objs[:, 0].sum()


def _fox_wolfram(jets: np.ndarray) -> np.ndarray:
    """H0..H4 = sum_ij |p_i| |p_j| P_l(cos theta_ij) / (sum_i E_i)^2 over the jets."""
    p = jets[:, 1:]
    a = np.linalg.norm(p, axis=1)
    c = np.clip((p @ p.T) / np.outer(a, a), -1.0, 1.0)
    legendre = [np.ones_like(c), c, 0.5 * (3 * c**2 - 1), 0.5 * (5 * c**3 - 3 * c), (35 * c**4 - 30 * c**2 + 3) / 8]
    w = np.outer(a, a) / jets[:, 0].sum() ** 2
    return np.array([(w * pl).sum() for pl in legendre])


def event_variables(ev: Reconstructed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(high level (26,), low level (32,), aux (4,)) of one selected event."""
    jets, lep = ev.jets, ev.lepton
    pt, eta, phi = pt_eta_phi(jets)
    lpt, leta, lphi = pt_eta_phi(lep)
    iu = np.triu_indices(len(jets), k=1)
    deta = np.abs(eta[:, None] - eta[None, :])[iu]
    dr = delta_r(eta[:, None], phi[:, None], eta[None, :], phi[None, :])[iu]
    pairs = jets[iu[0]] + jets[iu[1]]
    mpairs = mass(pairs)
    ppt = np.hypot(pairs[:, 1], pairs[:, 2])
    i125, iclose = int(np.argmin(np.abs(mpairs - M_H))), int(np.argmin(dr))
    jl_deta = np.abs(eta - leta)
    jl_dr = delta_r(eta, phi, leta, lphi)
    apl, sph, tsph, cen = _shapes(np.vstack([jets, lep]))
    fw = _fox_wolfram(jets)

    nu = neutrino(lep, ev.met)
    jets6, tag6 = candidate_jets(jets, ev.btag)
    bh, bl, l1, l2, h1, h2 = best_hypothesis(jets6, tag6, lep, nu)
    j = np.vstack([jets6, np.zeros(4)])  # index -1: the empty slot (zeros)
    lj = sorted((l1, l2), key=lambda k: -np.hypot(j[k, 1], j[k, 2]))
    hj = sorted((h1, h2), key=lambda k: (k < 0, -np.hypot(j[k, 1], j[k, 2])))
    w_had, w_lep = j[l1] + j[l2], lep + nu
    whad_hel = abs(helicity(j[lj[0]], w_had, w_had + j[bh]))  # the two W jets are indistinguishable: |cos|
    wlep_hel = helicity(lep, w_lep, w_lep + j[bl])

    high = np.array([apl, cen, *fw, deta.min(), deta.max(), deta.mean(), dr.min(), dr.max(), dr.mean(),
                     mpairs[i125], ppt[i125], mpairs[iclose], ppt[iclose], jl_deta.min(), jl_deta.max(),
                     jl_dr.min(), jl_dr.max(), pt.sum(), sph, tsph, whad_hel, wlep_hel])
    low = np.concatenate([j[bh], j[hj[0]], j[hj[1]], j[bl], j[lj[0]], j[lj[1]], lep, nu])
    aux = np.array([len(jets), int(ev.btag.sum()), float(np.hypot(*ev.met)), ev.lepton_pdg], dtype=np.float64)
    return high, low, aux
