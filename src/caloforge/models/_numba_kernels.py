"""The numba-compiled kernels behind :mod:`caloforge.models.kernels` (imported on first use: numba takes a third of a
second to import, and the compiled code is cached on disk). Read the algorithms' description there."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

_F = np.float32
# fastmath without "arcp" and "afn": the loops vectorise (with error_model="numpy", which drops the division-by-zero
# check that kept the key loop scalar), and a vectorised division stays exact, so the keys are the same bits as the
# scalar code's (no reciprocal approximation).
_FM = {"nnan", "ninf", "nsz", "contract", "reassoc"}
# Cephes logf: ln(x) = ln(m) + e ln 2 with m in [sqrt(1/2), sqrt(2)), a degree-9 polynomial in m - 1
_SQRTHF = _F(0.707106781186547524)
_P0, _P1, _P2, _P3, _P4, _P5, _P6, _P7, _P8 = (_F(c) for c in (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
    2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1))
_LN2_LO, _LN2_HI, _HALF, _ONE = _F(-2.12194440e-4), _F(0.693359375), _F(0.5), _F(1.0)
_U_LO, _U_HI = _F(1e-7), _F(1 - 1e-7)  # the reference's clamp of the uniforms
# the PCG output permutation on 32-bit words (held in 64-bit integers, so that torch can compute it too)
_U = np.uint64
_MASK, _PA, _PC, _PB = _U(0xFFFFFFFF), _U(747796405), _U(2891336453), _U(277803737)
_S4, _S8, _S22, _S28 = _U(4), _U(8), _U(22), _U(28)
_TO_UNIT = _F(2.0 ** -24)


@njit(inline="always")
def _pcg(x: Any) -> Any:
    state = (x * _PA + _PC) & _MASK
    word = (((state >> ((state >> _S28) + _S4)) ^ state) * _PB) & _MASK
    return (word >> _S22) ^ word


@njit(inline="always")
def _row_seeds(seed_lo: Any, seed_hi: Any, r: int) -> tuple[Any, Any]:
    s1 = _pcg(_pcg(_U(r) ^ seed_lo) ^ seed_hi)
    return s1, _pcg(s1 ^ seed_hi)


@njit(inline="always")
def _unit(s1: Any, s2: Any, j: int) -> Any:
    """Uniform number j of the row with seeds (s1, s2)."""
    return _F(_pcg(_pcg(_U(j) ^ s1) ^ s2) >> _S8) * _TO_UNIT


@njit(nogil=True, fastmath=_FM, error_model="numpy", cache=True)
def fill_uniform(out: Any, seed_lo: Any, seed_hi: Any, row0: int, start: int, stop: int) -> None:
    """Rows start..stop of ``out``, which holds the draw's rows from row0 on (the GIL released: callers split the
    rows over threads)."""
    m = out.shape[1]
    for i in range(start, stop):
        s1, s2 = _row_seeds(seed_lo, seed_hi, row0 + i)
        row = out[i]
        for j in range(m):
            row[j] = _unit(s1, s2, j)


@njit(nogil=True, fastmath=_FM, error_model="numpy", cache=True)
def uniform_at(seed_lo: Any, seed_hi: Any, rows: Any, cols: Any, out: Any, start: int, stop: int) -> None:
    """out[h] = uniform number cols[h] of draw row rows[h], for h in start..stop (the noise at the hits only)."""
    for h in range(start, stop):
        s1, s2 = _row_seeds(seed_lo, seed_hi, rows[h])
        out[h] = _unit(s1, s2, cols[h])


@njit(inline="always")
def _clamped(u: Any) -> Any:
    return min(max(u, _U_LO), _U_HI)


@njit(inline="always", fastmath=_FM, error_model="numpy")
def _odds(u: Any, key: Any) -> None:
    """key = u / (1 - u) for one row of given uniforms, u clamped as in the reference."""
    for j in range(key.shape[0]):
        uj = _clamped(u[j])
        key[j] = uj / (_ONE - uj)


@njit(inline="always", fastmath=_FM, error_model="numpy")
def _odds_hashed(s1: Any, s2: Any, c0: int, key: Any) -> None:
    """:func:`_odds` of uniforms c0, c0 + 1, ... of the row with seeds (s1, s2), made in the same loop."""
    for j in range(key.shape[0]):
        uj = _clamped(_unit(s1, s2, c0 + j))
        key[j] = uj / (_ONE - uj)


@njit(inline="always", fastmath=_FM, error_model="numpy")
def _log_keys(key: Any, logit: Any) -> None:
    """key = ln(key) - logit in place (the odds become the keys ln(u / (1 - u)) - logit)."""
    bits = key.view(np.int32)
    for j in range(key.shape[0]):
        b = bits[j]
        e = _F((b >> 23) - 126)
        bits[j] = (b & 0x007FFFFF) | 0x3F000000  # the mantissa as a float in [0.5, 1)
        m = key[j]
        small = m < _SQRTHF
        e = e - _ONE if small else e
        f = (m + m - _ONE) if small else (m - _ONE)
        z = f * f
        y = ((((((((_P0 * f + _P1) * f + _P2) * f + _P3) * f + _P4) * f + _P5) * f + _P6) * f + _P7) * f
             + _P8) * f * z
        key[j] = f + (y + _LN2_LO * e - _HALF * z) + _LN2_HI * e - logit[j]


@njit(inline="always")
def _sift_down(hk: Any, hj: Any, i: int, size: int) -> None:
    while True:
        a = 2 * i + 1
        if a >= size:
            return
        b = a + 1
        c = b if (b < size and hk[b] > hk[a]) else a
        if hk[c] <= hk[i]:
            return
        hk[i], hk[c] = hk[c], hk[i]
        hj[i], hj[c] = hj[c], hj[i]
        i = c


@njit(inline="always")
def _select_row(li: int, r: int, k: int, o: int, lrow: Any, key: Any, orow: Any, hk: Any, hj: Any, lay: Any,
                row: Any, col: Any, logit_hit: Any, thr_hit: Any) -> None:
    """The k hits of one (layer, shower) row from its keys, written from position o on (all but their uniforms).
    ``hk``, ``hj``: scratch of at least k + 1 entries."""
    m_cells = lrow.shape[0]
    if k >= m_cells:  # every cell is hit: no threshold
        for j in range(m_cells):
            lay[o + j], row[o + j], col[o + j] = li, r, j
            logit_hit[o + j] = lrow[j]
            thr_hit[o + j] = np.inf
        return
    s = k + 1
    for q in range(s):
        hk[q] = key[orow[q]]
        hj[q] = orow[q]
    for i in range(s // 2 - 1, -1, -1):
        _sift_down(hk, hj, i, s)
    top = hk[0]
    for q in range(s, m_cells):
        j = orow[q]
        if key[j] < top:
            hk[0] = key[j]
            hj[0] = j
            _sift_down(hk, hj, 0, s)
            top = hk[0]
    for a in range(2, s):  # the k smallest keys (the root is the (k + 1)-th: the threshold) in cell order
        v = hj[a]
        b = a - 1
        while b >= 1 and hj[b] > v:
            hj[b + 1] = hj[b]
            b -= 1
        hj[b + 1] = v
    for q in range(k):
        j = hj[q + 1]
        lay[o + q], row[o + q], col[o + q] = li, r, j
        logit_hit[o + q] = lrow[j]
        thr_hit[o + q] = top


@njit(nogil=True, fastmath=_FM, error_model="numpy", cache=True)
def select(logit: Any, l0: int, u: Any, count: Any, order: Any, offsets: Any, lay: Any, row: Any, col: Any,
           logit_hit: Any, u_hit: Any, thr_hit: Any, start: int, stop: int) -> None:
    """Rows start..stop of the hit selection in a block of layers: ``logit`` (B, n, M) holds layers l0..l0 + B of
    the showers, rows t = shower * B + b (shower-major), uniforms u (n, L, M) given; ``offsets`` index the rows of
    all L layers (shower * L + layer)."""
    n_b, m_cells = logit.shape[0], logit.shape[2]
    n_l = count.shape[1]
    key = np.empty(m_cells, np.float32)
    hk = np.empty(m_cells + 1, np.float32)
    hj = np.empty(m_cells + 1, np.int64)
    for t in range(start, stop):
        r = t // n_b
        b = t - r * n_b
        li = l0 + b
        k = count[r, li]
        if k > 0:
            o = offsets[r * n_l + li]
            urow = u[r, li]
            if k < m_cells:
                _odds(urow, key)
                _log_keys(key, logit[b, r])
            _select_row(li, r, k, o, logit[b, r], key, order[li], hk, hj, lay, row, col, logit_hit, thr_hit)
            for q in range(min(k, m_cells)):
                u_hit[o + q] = _clamped(urow[col[o + q]])


@njit(nogil=True, fastmath=_FM, error_model="numpy", cache=True)
def select_hashed(logit: Any, l0: int, seed_lo: Any, seed_hi: Any, row0: int, count: Any, order: Any, offsets: Any,
                  lay: Any, row: Any, col: Any, logit_hit: Any, u_hit: Any, thr_hit: Any, start: int,
                  stop: int) -> None:
    """:func:`select` with the uniforms made on the fly from the draw's hash (rows row0.., L * M numbers each)."""
    n_b, m_cells = logit.shape[0], logit.shape[2]
    n_l = count.shape[1]
    key = np.empty(m_cells, np.float32)
    hk = np.empty(m_cells + 1, np.float32)
    hj = np.empty(m_cells + 1, np.int64)
    for t in range(start, stop):
        r = t // n_b
        b = t - r * n_b
        li = l0 + b
        k = count[r, li]
        if k > 0:
            o = offsets[r * n_l + li]
            s1, s2 = _row_seeds(seed_lo, seed_hi, row0 + r)
            c0 = li * m_cells
            if k < m_cells:
                _odds_hashed(s1, s2, c0, key)
                _log_keys(key, logit[b, r])
            _select_row(li, r, k, o, logit[b, r], key, order[li], hk, hj, lay, row, col, logit_hit, thr_hit)
            for q in range(min(k, m_cells)):
                u_hit[o + q] = _clamped(_unit(s1, s2, c0 + col[o + q]))


@njit(nogil=True, fastmath=_FM, error_model="numpy", cache=True)
def gathered_dots(cov: Any, lay: Any, row: Any, flat: Any, tables: Any, out: Any, start: int, stop: int) -> None:
    """out[q, h] = sum_c cov[lay[h], row[h], c] * tables[flat[h], q, c] for hits start..stop (the tables
    interleaved per cell, so that one cell's coefficients of every law share cache lines)."""
    n_cov, n_q = cov.shape[2], tables.shape[1]
    for h in range(start, stop):
        g = cov[lay[h], row[h]]
        t = tables[flat[h]]
        for q in range(n_q):
            acc = _F(0.0)
            for c in range(n_cov):
                acc += g[c] * t[q, c]
            out[q, h] = acc


@njit(nogil=True, cache=True)
def first_bins(cdf: Any, start: Any, q: Any, lay: Any, out: Any, first: int, stop: int) -> None:
    """out[h] = the number of bins of layer lay[h] whose CDF lies below q[h] (searchsorted, side left), for hits
    first..stop; ``start[l, t]`` = that number at q = t / T (T = start.shape[1] buckets) begins the count."""
    n_b = cdf.shape[1]
    n_t = start.shape[1]
    for h in range(first, stop):
        c = cdf[lay[h]]
        qh = q[h]
        t = min(max(int(qh * n_t), 0), n_t - 1)
        b = start[lay[h], t]
        while b < n_b and c[b] < qh:
            b += 1
        out[h] = b


@njit(nogil=True, fastmath=_FM, error_model="numpy", cache=True)
def basis_dot(funcs: Any, coef: Any, out: Any, start: int, stop: int) -> None:
    """out[i, b, j] = sum_k funcs[k][i, b] coef[i, j, k] for i in start..stop, and a zero last row out[i, B, :].
    The sums run over k in order for each (b, j), in a contiguous row that vectorises, then go to their strided
    places."""
    n_b, n_k, n_j = funcs[0].shape[1], coef.shape[2], coef.shape[1]
    acc = np.empty(n_b, np.float32)
    for i in range(start, stop):
        for j in range(n_j):
            for b in range(n_b):
                acc[b] = _F(0.0)
            for k in range(n_k):
                c = coef[i, j, k]
                f = funcs[k][i]
                for b in range(n_b):
                    acc[b] += f[b] * c
            for b in range(n_b):
                out[i, b, j] = acc[b]
            out[i, n_b, j] = _F(0.0)


@njit(nogil=True, cache=True)
def window_hits(row: Any, lay: Any, col: Any, e: Any, sx: Any, sy: Any, ny: int, nxw: int, nyw: int, n_win: int,
                row_out: Any, idx_out: Any, e_out: Any) -> tuple[int, bool]:
    """The hits (shower row, layer, cell within the model's layer, energy) placed in the readout window: those
    inside it with energy > 0 go, in order, to the outputs (row, flat window index, energy). Returns how many, and
    whether their keys row * n_win + index increase strictly (else the caller sorts them)."""
    kept = 0
    ordered = True
    last = -1
    for h in range(row.shape[0]):
        r, li, c = row[h], lay[h], col[h]
        wx = c // ny + sx[r]
        wy = c % ny + sy[r, li]
        if wx < 0 or wx >= nxw or wy < 0 or wy >= nyw or not e[h] > 0:
            continue
        idx = (li * nxw + wx) * nyw + wy
        key = r * n_win + idx
        ordered = ordered and key > last
        last = key
        row_out[kept], idx_out[kept], e_out[kept] = r, idx, e[h]
        kept += 1
    return kept, ordered
