"""Energy response of each candidate against the reference, per energy point, from a ``caloforge evaluate``
``metrics.json``: mu90 offset (%) and sigma90 ratio, with the statistical errors.

    python scripts/response_table.py reports/wgan-hgcal-16k-points/metrics.json
"""

from __future__ import annotations

import json
import math
import sys


def main(argv: list[str] | None = None) -> int:
    for path in argv if argv is not None else sys.argv[1:]:
        m = json.load(open(path))
        for label, c in m["candidates"].items():
            r = (c.get("response") or {}).get("e_ratio")
            if not r:
                continue
            cells = []
            for ref, cand in zip(r["reference"], r["candidate"]):
                off = 100 * (cand["mu90"] / ref["mu90"] - 1)
                q = cand["mu90"] / ref["mu90"]
                off_err = 100 * q * math.hypot(cand["mu90_err"] / cand["mu90"], ref["mu90_err"] / ref["mu90"])
                ratio = cand["sigma90"] / ref["sigma90"]
                ratio_err = ratio * math.hypot(cand["sigma90_err"] / cand["sigma90"],
                                               ref["sigma90_err"] / ref["sigma90"])
                cells.append(f"{ref['energy'] / 1e3:g} GeV: mu90 {off:+.1f} +- {off_err:.1f} %, "
                             f"sigma90 x{ratio:.2f} +- {ratio_err:.2f}")
            print(f"{label}: " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
