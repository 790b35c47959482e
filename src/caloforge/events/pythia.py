"""Pythia 8 ttH and ttbb events at 13 TeV, reduced to the particle lists the detector response needs.

ttH: ``HiggsSM:gg2Httbar`` + ``HiggsSM:qqbar2Httbar`` with H -> bb forced (m_H = 125 GeV).
ttbb: ``Top:gg2ttbar`` + ``Top:qqbar2ttbar`` with a b-pair requirement at parton level: the event is kept only if,
after the parton shower and multiple interactions, it holds at least four b quarks (the two from the top decays plus
an extra b-bbar pair from g -> bb splitting in ISR/FSR or MPI); Pythia has no tt+bb matrix element, so this is the
shower approximation of ttbb (documented in docs/events.md). The filter runs before hadronisation (``HadronLevel:all
= off`` then ``forceHadronLevel``) so that rejected events cost only their parton level.

Both processes are semi-leptonic by construction: one W decays to e nu or mu nu, the other to quarks. Which W is
leptonic alternates between chunks (``lepton_charge`` +1 or -1), so the sample is charge symmetric; both processes
get the same factor, so the ttH / ttbb comparison is unchanged (cross sections are not modelled: events are
unweighted and the two processes are produced in equal numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ECM_GEV = 13000.0
MIN_B_QUARKS_TTBB = 4


@dataclass
class Particles:
    """One event's final state: visible particles, neutrinos, and the last b and c hadrons (for jet flavour)."""

    visible: np.ndarray  # (n, 5): px, py, pz, E, pdg id
    invisible_pxy: np.ndarray  # (2,): summed neutrino px, py
    b_hadrons: np.ndarray  # (nb, 4)
    c_hadrons: np.ndarray  # (nc, 4)


def settings(process: str, seed: int, lepton_charge: int) -> list[str]:
    """The Pythia settings of one chunk."""
    if process not in ("tth", "ttbb"):
        raise ValueError(f"process {process!r}: expected 'tth' or 'ttbb'")
    lines = [f"Beams:eCM = {ECM_GEV:.0f}", "Random:setSeed = on", f"Random:seed = {seed}", "Print:quiet = on",
             "Next:numberCount = 0", "Next:numberShowEvent = 0"]
    if process == "tth":
        lines += ["HiggsSM:gg2Httbar = on", "HiggsSM:qqbar2Httbar = on", "25:m0 = 125.0", "25:onMode = off",
                  "25:onIfAny = 5"]
    else:
        lines += ["Top:gg2ttbar = on", "Top:qqbar2ttbar = on", "HadronLevel:all = off"]
    leptonic, hadronic = ("onPosIfAny", "onNegIfAny") if lepton_charge > 0 else ("onNegIfAny", "onPosIfAny")
    lines += ["24:onMode = off", f"24:{leptonic} = 11 13", f"24:{hadronic} = 1 2 3 4 5"]
    return lines


def _flavour_digit(pid: int, q: int) -> bool:
    """A hadron whose id carries quark q (5 = b, 4 = c) as its heaviest quark."""
    a = abs(pid)
    return (a // 100) % 10 == q or (a // 1000) % 10 == q


class PythiaSource:
    """A seeded Pythia instance yielding :class:`Particles` per accepted event; counts tries."""

    def __init__(self, process: str, seed: int, lepton_charge: int) -> None:
        import pythia8mc

        self.process = process
        self.pythia = pythia8mc.Pythia("", False)
        for line in settings(process, seed, lepton_charge):
            if not self.pythia.readString(line):
                raise RuntimeError(f"Pythia rejected setting {line!r}")
        if not self.pythia.init():
            raise RuntimeError(f"Pythia failed to initialise for {process}")
        self.n_tried = 0

    def _parton_filter(self) -> bool:
        ev = self.pythia.event
        n_b = 0
        for i in range(ev.size()):
            p = ev[i]
            if p.idAbs() == 5 and p.isFinal():
                n_b += 1
        return n_b >= MIN_B_QUARKS_TTBB

    def next(self) -> Particles | None:
        """One generated event (None when Pythia failed or the ttbb filter rejected it)."""
        self.n_tried += 1
        if not self.pythia.next():
            return None
        if self.process == "ttbb":
            if not self._parton_filter() or not self.pythia.forceHadronLevel():
                return None
        return self._extract()

    def _extract(self) -> Particles:
        ev = self.pythia.event
        vis, bh, ch = [], [], []
        nux = nuy = 0.0
        for i in range(ev.size()):
            p = ev[i]
            pid = p.id()
            if p.isFinal():
                if p.isVisible():
                    vis.append((p.px(), p.py(), p.pz(), p.e(), pid))
                else:
                    nux += p.px()
                    nuy += p.py()
            elif p.isHadron():
                if _flavour_digit(pid, 5):
                    if not any(_flavour_digit(ev[d].id(), 5) for d in p.daughterList()):
                        bh.append((p.px(), p.py(), p.pz(), p.e()))
                elif _flavour_digit(pid, 4):
                    if not any(_flavour_digit(ev[d].id(), 4) for d in p.daughterList()):
                        ch.append((p.px(), p.py(), p.pz(), p.e()))
        return Particles(np.array(vis, dtype=np.float64).reshape(-1, 5), np.array([nux, nuy]),
                         np.array(bh, dtype=np.float64).reshape(-1, 4), np.array(ch, dtype=np.float64).reshape(-1, 4))
