"""The CPU hot paths of sampling, compiled with numba: the uniform noise, and ``layerflow``'s hit selection.

**Uniform noise** (:func:`uniform`): torch's CPU generator makes about 0.2 uniforms per ns, and ``layerflow`` needs
one per cell (27000 per shower on the house detector), so drawing them cost more than the model. Here uniform
number ``j`` of row ``r`` is a counter-based hash of (seed, r, j) (two rounds of the PCG output permutation on 32-bit
words), ``h / 2^32`` truncated to 24 bits like ``torch.rand``: about 1 ns per number and thread, rows independent,
the same numbers on any number of threads, and a prefix of the rows of a longer draw is the shorter draw. The seed
is one 63-bit integer drawn from the caller's torch generator, so seeding works as before. A pure-torch version of
the same hash (:func:`uniform_reference`) gives bit-identical numbers where numba is missing.

**Bins of a histogram's quantile function** (:func:`first_bins`): ``torch.searchsorted`` over the layers' CDFs
laid end to end took about 35 ns per hit; a table of where each of T buckets of [0, 1] starts, then a step or two
forward, gives the same bins (the comparisons are the same float32 ones) in a few ns.

**Hit selection** (:func:`select_hits`).
``layerflow`` (with ``hit_count``) hits exactly ``k`` cells in each layer of each shower: the ``k`` cells with the
smallest keys ``logit(u) - logit(p)`` (Pareto order sampling), and it needs the next key as well (the selection
threshold). The torch reference (:meth:`LayerFlow._hits_exactly`) computes every key with several full-size tensor
passes and a per-layer ``topk`` and keeps them all, although a layer holds about 20 hits among 900 cells. The kernel
here does the same per (layer, shower) row in one pass that stays in the core's cache:

* the keys with a vectorised single-precision logarithm (the Cephes ``logf`` polynomial, within a few ulp of torch's),
  the uniforms hashed in the same vectorised loop (compiled without numba's division-by-zero check, which kept that
  loop scalar, and without approximate reciprocals, so that the keys are the same bits either way);
* a max-heap of the ``k + 1`` smallest keys, fed in order of decreasing mean hit probability, so that after the
  first few dozen cells almost every other cell is rejected by one comparison;
* the hits written straight into the output in (shower, layer, cell) order (the sparse output's order, so it needs
  no sort), with their logit, their uniform and the threshold, which is all the energy stage needs.

The hit logits the selection reads are a (layers, showers, cells) tensor of 28-37 MB per chunk of 256 showers.
Sampling makes them two layers at a time (:func:`select_hits_by_layers`) into one small buffer from a
:class:`ScratchPool`, and the kernel selects each block's hits while it is still in the core's cache: made whole, the
tensor went through memory twice (and, made afresh for every chunk, its pages were faulted in and zeroed each time).
The small per-hit and per-core-cell contractions (:func:`gathered_dots`, :func:`basis_dot`), the soft-hit bins
(:func:`first_bins`) and the placement of the hits in the readout window (:func:`window_hits`) are compiled too.

Same noise, same hits: the selections agree with the torch reference except where two keys of one row tie to
within a few ulp (tested). Rows are independent, so the result does not depend on the number of threads. Without
numba (or with ``CALOFORGE_NUMBA=0``) :func:`select_hits` returns None and the caller uses the torch reference.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

_HAVE_NUMBA = importlib.util.find_spec("numba") is not None
_compiled: SimpleNamespace | None = None


def enabled() -> bool:
    """Whether the compiled kernels are used: numba installed and not switched off by ``CALOFORGE_NUMBA=0``.
    Loading them costs about 1.2 s once per process (importing numba and its cached machine code)."""
    return _HAVE_NUMBA and os.environ.get("CALOFORGE_NUMBA", "1") != "0"


def _kernels() -> SimpleNamespace:
    """The compiled kernels (numba imported and the functions compiled on first use, cached on disk)."""
    global _compiled
    if _compiled is None:
        from caloforge.models import _numba_kernels
        _compiled = SimpleNamespace(**{name: getattr(_numba_kernels, name) for name in (
            "fill_uniform", "uniform_at", "select", "select_hashed", "gathered_dots", "first_bins", "basis_dot",
            "window_hits")})
    return _compiled


def applies(tensors: list[torch.Tensor]) -> bool:
    """Whether the kernels serve these tensors: CPU float32 ones, outside autograd, ONNX export and tracing."""
    return (enabled() and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_grad_enabled() and not torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing())


_pool: ThreadPoolExecutor | None = None


def _run_split(fn: Callable[..., None], total: int, *args: Any) -> None:
    """``fn(*args, start, stop)`` over 0..total in as many parts as torch uses threads (the kernels release the GIL;
    plain threads rather than numba's parallel layers, whose OpenMP workers spin between calls)."""
    global _pool
    parts = max(1, min(torch.get_num_threads(), total // 64))
    if parts == 1:
        fn(*args, 0, total)
        return
    if _pool is None or _pool._max_workers < parts:
        _pool = ThreadPoolExecutor(max_workers=parts, thread_name_prefix="caloforge-kernels")
    bounds = np.linspace(0, total, parts + 1).astype(int)
    for f in [_pool.submit(fn, *args, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]:
        f.result()


def _pcg_torch(x: torch.Tensor) -> torch.Tensor:
    state = (x * 747796405 + 2891336453) & 0xFFFFFFFF
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & 0xFFFFFFFF
    return (word >> 22) ^ word


def _draw_seed(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator, dtype=torch.int64))


def _unit_torch(seed: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Uniform number ``cols`` of draw row ``rows`` (int64, broadcast together): the definition of the noise."""
    lo, hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    s1 = _pcg_torch(_pcg_torch(rows ^ lo) ^ hi)
    h = _pcg_torch(_pcg_torch(cols ^ s1) ^ _pcg_torch(s1 ^ hi))
    return (h >> 8).to(torch.float32) * 2.0 ** -24


def uniform_reference(n: int, m: int, seed: int, row0: int = 0) -> torch.Tensor:
    """Rows ``row0 .. row0 + n`` of the uniforms (n, m) of ``seed``, computed with torch integer ops (the
    definition; :func:`uniform` computes the same numbers faster)."""
    return _unit_torch(seed, torch.arange(row0, row0 + n, dtype=torch.int64)[:, None],
                       torch.arange(m, dtype=torch.int64)[None])


def _seed_words(seed: int) -> tuple[np.uint64, np.uint64]:
    return np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)


class UniformBlock:
    """Rows ``row0 .. row0 + n`` of a uniform draw (each row ``shape`` numbers), not made yet: :meth:`tensor` makes
    them all, :meth:`at` only those at given places (``layerflow`` needs the energy uniforms at its hits only, and
    its selection kernel makes the selection uniforms row by row in cache)."""

    def __init__(self, seed: int, row0: int, n: int, shape: tuple[int, ...]):
        self.seed, self.row0, self.n, self.row_shape = seed, row0, n, tuple(shape)
        self.shape = (n, *self.row_shape)

    def __len__(self) -> int:
        return self.n

    def tensor(self) -> torch.Tensor:
        """All the numbers (n, *shape), float32."""
        out = torch.empty(self.shape, dtype=torch.float32)
        flat = out.view(self.n, -1)
        if enabled():
            _run_split(_kernels().fill_uniform, self.n, flat.numpy(), *_seed_words(self.seed), self.row0)
        else:
            for i in range(0, self.n, 64):  # bounded int64 temporaries
                flat[i:i + 64] = uniform_reference(min(64, self.n - i), flat.shape[1], self.seed, self.row0 + i)
        return out

    def at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The numbers at (row within the block, flat index within the row), as ``tensor().view(n, -1)[rows, cols]``
        gives them."""
        rows = rows.to(torch.int64) + self.row0
        cols = cols.to(torch.int64)
        if enabled():
            out = np.empty(rows.shape[0], dtype=np.float32)
            if rows.shape[0]:
                _run_split(_kernels().uniform_at, rows.shape[0], *_seed_words(self.seed), rows.numpy(), cols.numpy(),
                           out)
            return torch.from_numpy(out)
        return _unit_torch(self.seed, rows, cols)


class UniformRows:
    """The uniforms of one draw (``shape``, rows along the first axis) as a seed: blocks of rows are made when a
    sampling loop reaches them, so that it never holds more than one chunk's noise."""

    def __init__(self, shape: tuple[int, ...], generator: torch.Generator | None = None):
        self.shape, self.seed = tuple(shape), _draw_seed(generator)

    def __len__(self) -> int:
        return self.shape[0]

    def block(self, start: int, stop: int) -> UniformBlock:
        """Rows start..stop, not made yet (the same numbers as those rows of the whole draw)."""
        stop = min(stop, self.shape[0])
        return UniformBlock(self.seed, start, stop - start, self.shape[1:])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop, made."""
        return self.block(start, stop).tensor()


def uniform(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniforms in [0, 1) of ``shape`` (rows along the first axis) on the CPU, seeded from ``generator``."""
    return UniformRows(shape, generator).rows(0, shape[0])




def likely_first(logit: torch.Tensor) -> np.ndarray | None:
    """Cells in order of decreasing mean logit over the first showers of ``logit`` (L, n, M), per layer (L, M): the
    scan order of :func:`select_hits`, where the likely hits fill the heap first. The order changes the speed only,
    never the hits, so a model may compute it once and reuse it. None where the kernel does not apply."""
    if not applies([logit]):
        return None
    sums = logit[:, :32].sum(dim=1).numpy()
    return np.ascontiguousarray(np.argsort(-sums, axis=1, kind="stable"))


def select_hits(logit: torch.Tensor, u_cells: torch.Tensor | UniformBlock, count: torch.Tensor,
                order: np.ndarray | None = None) -> tuple[torch.Tensor, ...] | None:
    """The hits of :meth:`LayerFlow._hits_exactly` as lists, or None where the kernel does not apply.

    ``logit`` (L, n, M) hit logits, ``u_cells`` (n, L * M) the selection uniforms (a tensor, or a block of a draw
    not made yet: then each row's uniforms are made in cache), ``count`` (n, L) hits per layer. Returns ``lay, row,
    col`` (H,) int64 in (shower, layer, cell) order and, per hit, its logit, its uniform (clamped as in the reference)
    and the threshold (the row's next key; +inf when the row is all hits). Applies on CPU float32 tensors outside
    autograd and export. ``order``: the scan order (:func:`likely_first`; made from ``logit`` when None)."""
    if not applies([logit]):
        return None
    n_l = logit.shape[0]
    hits, _ = select_hits_by_layers(lambda l0, l1: logit[l0:l1], tuple(logit.shape), u_cells, count, order, n_l)
    return hits


def select_hits_by_layers(logits_of: Callable[[int, int], torch.Tensor], shape: tuple[int, int, int],
                          u_cells: torch.Tensor | UniformBlock, count: torch.Tensor, order: np.ndarray | None = None,
                          block: int = 2) -> tuple[tuple[torch.Tensor, ...], np.ndarray]:
    """:func:`select_hits` with the logits (L, n, M) = ``shape`` asked for ``block`` layers at a time:
    ``logits_of(l0, l1)`` gives layers l0..l1 as a (l1 - l0, n, M) CPU float32 tensor, which may live in one reused
    buffer (each block is read before the next is asked for). A block of a chunk's logits stays in the core's cache
    between the product that makes it and the selection that reads it; the whole (L, n, M) tensor (28-37 MB per
    chunk) went through memory twice. The same hits as :func:`select_hits` on the whole tensor. Returns the hits
    and the scan order used (made block by block from the logits when ``order`` is None). The caller checks that
    the kernels apply (:func:`applies`)."""
    n_l, n, m_cells = shape
    k = count.to(torch.int64).clamp(0, m_cells).numpy()  # (n, L)
    offsets = np.zeros(n_l * n + 1, dtype=np.int64)
    np.cumsum(k.reshape(-1), out=offsets[1:])  # shower-major: the hits come out in (shower, layer, cell) order
    own_order = order is None or order.shape != (n_l, m_cells)
    if own_order:
        order = np.empty((n_l, m_cells), dtype=np.int64)
    assert order is not None
    h = int(offsets[-1])
    lay, row, col = (np.empty(h, dtype=np.int64) for _ in range(3))
    logit_hit, u_hit, thr_hit = (np.empty(h, dtype=np.float32) for _ in range(3))
    out = (lay, row, col, logit_hit, u_hit, thr_hit)
    hashed = isinstance(u_cells, UniformBlock)
    u_np = None if hashed else u_cells.to(torch.float32).contiguous().numpy().reshape(n, n_l, m_cells)
    for l0 in range(0, n_l, max(block, 1)):
        l1 = min(l0 + max(block, 1), n_l)
        logit = logits_of(l0, l1)
        if tuple(logit.shape) != (l1 - l0, n, m_cells) or not applies([logit]):
            raise ValueError(f"select_hits_by_layers: layers {l0}..{l1} came as {tuple(logit.shape)} {logit.dtype} on "
                             f"{logit.device}; expected {(l1 - l0, n, m_cells)} float32 on the CPU, outside autograd")
        if own_order:
            order[l0:l1] = likely_first(logit)
        logit_np = logit.contiguous().numpy()
        if hashed:
            _run_split(_kernels().select_hashed, (l1 - l0) * n, logit_np, l0, *_seed_words(u_cells.seed),
                       u_cells.row0, k, order, offsets, *out)
        else:
            _run_split(_kernels().select, (l1 - l0) * n, logit_np, l0, u_np, k, order, offsets, *out)
    return tuple(torch.from_numpy(a) for a in out), order


_interleaved: list[tuple[tuple[torch.Tensor, ...], tuple[int, ...], np.ndarray]] = []
_interleaved_lock = threading.Lock()


def _interleave(tables: list[torch.Tensor]) -> np.ndarray:
    """The tables (N, C) each stacked per cell (N, Q, C), cached while the tables are the same tensors, unchanged: an
    entry holds the tensors themselves (so that no other tensor can take their place) and their version counters,
    which every in-place update such as an optimiser step or a weight load bumps."""
    versions = tuple(t._version for t in tables)
    with _interleaved_lock:
        for held, held_versions, stacked in _interleaved:
            if held_versions == versions and len(held) == len(tables) and all(a is b for a, b in zip(held, tables)):
                return stacked
    stacked = torch.stack([t.detach() for t in tables], dim=1).contiguous().numpy()
    with _interleaved_lock:
        _interleaved.insert(0, (tuple(tables), versions, stacked))
        del _interleaved[4:]  # the shipped models and a trainer's: a few sets of tables at a time
    return stacked


def gathered_dots(cov: torch.Tensor, lay: torch.Tensor, row: torch.Tensor, flat: torch.Tensor,
                  tables: list[torch.Tensor]) -> torch.Tensor | None:
    """(len(tables), H): for each hit h, the dot product of its covariates ``cov[lay[h], row[h]]`` (L, n, C) with
    row ``flat[h]`` of each per-cell coefficient table (N, C); what ``(cov[lay, row] * table[flat]).sum(1)`` gives,
    without the (H, C) gathers. None where the kernel does not apply (then the caller computes it with torch)."""
    if not applies([cov, *tables]):
        return None
    h = lay.shape[0]
    out = np.empty((len(tables), h), dtype=np.float32)
    if h:
        _run_split(_kernels().gathered_dots, h, cov.contiguous().numpy(), lay.numpy(), row.numpy(), flat.numpy(),
                   _interleave(tables), out)
    return torch.from_numpy(out)


BUCKETS = 1024  # buckets of [0, 1] in first_bins' start table (a power of 2: q * T and t / T are exact)


def first_bins(cdf: torch.Tensor, q: torch.Tensor, lay: torch.Tensor) -> torch.Tensor | None:
    """For each hit, the number of entries of its layer's CDF row ``cdf[lay]`` (L, K), increasing, that lie below
    ``q`` (H,): ``torch.searchsorted(cdf[lay], q)`` row by row (side left), including K when q is above the whole
    row. None where the kernels do not apply."""
    if not applies([cdf, q]):
        return None
    cdf_np = cdf.detach().contiguous().numpy()
    grid = np.arange(BUCKETS, dtype=np.float32) / np.float32(BUCKETS)
    start = np.stack([np.searchsorted(row, grid, side="left") for row in cdf_np]).astype(np.int64)
    h = q.shape[0]
    out = np.empty(h, dtype=np.int64)
    if h:
        _run_split(_kernels().first_bins, h, cdf_np, start, q.contiguous().numpy(), lay.contiguous().numpy(), out)
    return torch.from_numpy(out)


def basis_dot(basis: list[torch.Tensor], coef: torch.Tensor) -> torch.Tensor | None:
    """``torch.einsum("...bk,...jk->...bj", torch.stack(basis, -1), coef)``: K basis functions, each (..., B) at B
    places, times J coefficient rows (..., J, K), for each of many showers and layers, with a zero row appended
    after the B places: (..., B + 1, J). torch runs this as thousands of tiny matrix products, each with the
    overhead of a call, after an interleaving copy of the basis; the loop here reads the K functions where they
    lie. None where the kernels do not apply."""
    if not applies([*basis, coef]):
        return None
    lead, n_b, n_j = basis[0].shape[:-1], basis[0].shape[-1], coef.shape[-2]
    funcs = tuple(b.contiguous().reshape(-1, n_b).numpy() for b in basis)
    c = coef.to(torch.float32).contiguous().reshape(-1, n_j, len(basis)).numpy()
    out = np.empty((c.shape[0], n_b + 1, n_j), dtype=np.float32)
    if c.shape[0]:
        _run_split(_kernels().basis_dot, c.shape[0], funcs, c, out)
    return torch.from_numpy(out).reshape(*lead, n_b + 1, n_j)


def window_hits(row: torch.Tensor, lay: torch.Tensor, col: torch.Tensor, e: torch.Tensor, sx: torch.Tensor,
                sy: torch.Tensor, ny: int, window: tuple[int, int, int]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool] | None:
    """Hits in a model's own cells (shower ``row``, layer ``lay``, cell ``col`` = i * ny + j within the layer, energy
    ``e``; (H,) each) placed in the readout window ``window`` = (layers, nx, ny) at the showers' integer axis shifts
    ``sx`` (n,) and ``sy`` (n, L): the hits inside the window with energy > 0 as (row, flat window index, energy),
    and whether they are in (row, index) order. What ``window_index`` and a boolean selection give, in one pass
    instead of some twenty passes over the hits. None where the kernels do not apply."""
    if not applies([e]):
        return None
    h = row.shape[0]
    row_out, idx_out = np.empty(h, dtype=np.int64), np.empty(h, dtype=np.int64)
    e_out = np.empty(h, dtype=np.float32)
    lw, nxw, nyw = window
    kept, ordered = _kernels().window_hits(row.contiguous().numpy(), lay.contiguous().numpy(),
                                           col.contiguous().numpy(), e.contiguous().numpy(),
                                           sx.to(torch.int64).numpy(), sy.to(torch.int64).contiguous().numpy(), ny,
                                           nxw, nyw, lw * nxw * nyw, row_out, idx_out, e_out)
    return (torch.from_numpy(row_out[:kept]), torch.from_numpy(idx_out[:kept]), torch.from_numpy(e_out[:kept]),
            bool(ordered))


class ScratchPool:
    """Reusable float32 CPU buffers for the large temporaries of one sampling chunk (``layerflow``'s hit logits:
    28-37 MB per chunk of 256 showers). glibc serves allocations above 32 MB (and, until its threshold adapts,
    smaller ones) with a fresh mmap and unmaps them on free, so such a tensor made anew for every chunk is
    page-faulted in again each time: a fifth of `multi`'s sampling time was the kernel zeroing pages. A buffer
    taken here goes back with :meth:`give` when the chunk is done; a few are kept (one per concurrent chunk)."""

    def __init__(self, keep: int = 4):
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.keep = keep

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        """An uninitialised float32 tensor of ``shape``, or None where buffers are not used (a ``like`` tensor
        that is not CPU float32, autograd on, ONNX export or tracing: the caller then allocates as usual)."""
        if (like.device.type != "cpu" or like.dtype != torch.float32 or torch.is_grad_enabled()
                or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()):
            return None
        n = int(np.prod(shape))
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= n]
            buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel())) if fits else None
        if buf is None:
            buf = torch.empty(n, dtype=torch.float32)
        return buf[:n].view(shape)

    def give(self, t: torch.Tensor | None) -> None:
        """Return a buffer from :meth:`take` (None is ignored); the caller must hold no view of it any more."""
        if t is None:
            return
        base = t._base if t._base is not None else t
        with self._lock:
            self._free.append(base)
            self._free.sort(key=torch.Tensor.numel, reverse=True)
            del self._free[self.keep:]


SCRATCH = ScratchPool()
