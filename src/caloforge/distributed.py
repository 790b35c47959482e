"""Data-parallel training under ``torchrun``: the process group, and gradient averaging over the ranks.

``torchrun --nproc-per-node N -m caloforge train ...`` starts N processes (ranks) with ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK`` set; :func:`init_from_env` joins them into a process group (gloo on CPU, NCCL on CUDA, one GPU per
rank). Every rank holds the same model; each takes a disjoint contiguous shard of every global batch (the
configured batch size), and after each backward pass :func:`reduce_gradients` sums the gradients weighted by
each shard's share of the batch, which is the gradient of the whole batch: one optimisation step is the same step
as one process takes, up to rounding. Noise drawn during training (dequantisation, latent vectors) is drawn for the
whole batch on every rank and sliced (:class:`caloforge.models.base.TrainBatch`), so the random streams of the
ranks stay identical too, and a checkpoint written by rank 0 resumes every rank.

Why not ``torch.nn.parallel.DistributedDataParallel``: DDP hooks the wrapped module's ``forward``, while our models
compute losses through ``loss`` and ``training_step`` with several optimisers, and the WGAN gradient penalty takes
``torch.autograd.grad`` with ``create_graph``, which DDP does not support. Averaging the gradients explicitly after
``backward`` and before clipping is what DDP does under the hood (without overlapping communication with the
backward pass: our models are small, so one flat all-reduce per step costs little).

Without torchrun (``WORLD_SIZE`` unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Context:
    """This process's place in the group."""

    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


#: Most processes of one torchrun job (a sanity bound on the environment).
MAX_WORLD = 65536


def _env_int(name: str, default: str | None, lo: int, hi: int) -> int:
    """An integer variable of torchrun's environment within [lo, hi], or a clear error naming it."""
    raw = os.environ.get(name, default)
    if raw is None:
        raise ValueError(f"{name} is not set; expected an integer in [{lo}, {hi}] (set by torchrun)")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer in [{lo}, {hi}] (set by torchrun)") from None
    if not lo <= value <= hi:
        raise ValueError(f"{name}={raw!r}: expected an integer in [{lo}, {hi}] (set by torchrun)")
    return value


def world_size_from_env() -> int:
    return _env_int("WORLD_SIZE", "1", 1, MAX_WORLD)


def init_from_env(device: str) -> tuple[Context | None, str]:
    """Join the torchrun process group if there is one; returns (context or None, this rank's device)."""
    world = world_size_from_env()
    if world <= 1:
        return None, device
    import torch.distributed as dist

    rank, local_rank = _env_int("RANK", None, 0, world - 1), _env_int("LOCAL_RANK", "0", 0, world - 1)
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"torchrun: local rank {local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                             f"start at most one process per GPU (--nproc-per-node)")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Context(rank, world, local_rank, backend), device


def context() -> Context | None:
    """The process group this process belongs to (None when not under torchrun or with one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                   dist.get_backend())


def is_main() -> bool:
    ctx = context()
    return ctx is None or ctx.is_main


def shard(n: int) -> slice:
    """This rank's contiguous rows of a global batch of ``n`` (sizes differ by at most one)."""
    ctx = context()
    if ctx is None:
        return slice(0, n)
    base, extra = divmod(n, ctx.world)
    start = ctx.rank * base + min(ctx.rank, extra)
    return slice(start, start + base + (ctx.rank < extra))


def weighted_sum(values: torch.Tensor, share: float) -> torch.Tensor:
    """Sum over the ranks of ``share * values`` (a float64 copy; ``values`` itself without torchrun)."""
    if context() is None:
        return values
    import torch.distributed as dist

    out = values.detach().to(torch.float64) * share
    dist.all_reduce(out)
    return out


def mean_losses(losses: dict[str, float], share: float) -> dict[str, float]:
    """The losses of the whole batch: the shards' per-shower means weighted by their shares."""
    if context() is None or not losses:
        return losses
    keys = sorted(losses)
    dev = _device()
    total = weighted_sum(torch.tensor([float(losses[k]) for k in keys], dtype=torch.float64, device=dev), share)
    return {k: float(v) for k, v in zip(keys, total.tolist())}


def reduce_gradients(params: Iterable[torch.nn.Parameter], share: float) -> None:
    """Replace each gradient by the sum over ranks of ``share * gradient`` (the whole batch's gradient when the
    loss is a mean over the shard's rows). Parameters with no gradient on every rank keep none."""
    if context() is None:
        return
    import torch.distributed as dist

    params = [p for p in params if p.requires_grad]
    if not params:
        return
    ref = params[0]
    flat = torch.cat([(p.grad.reshape(-1).to(torch.float32) * share if p.grad is not None
                       else torch.zeros(p.numel(), dtype=torch.float32, device=ref.device)) for p in params]
                     + [torch.tensor([float(p.grad is not None) for p in params], device=ref.device)])
    dist.all_reduce(flat)
    has_grad = flat[-len(params):].tolist()  # one device-to-host copy, not one per parameter
    offset = 0
    for i, p in enumerate(params):
        g = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        if has_grad[i] > 0:
            p.grad = g.to(p.dtype).clone()
        else:
            p.grad = None


def broadcast_state(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical starting point and preprocessing)."""
    if context() is None:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers to every rank (what DDP does each step: batch-norm running statistics stay in step)."""
    if context() is None:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in module.buffers():
            dist.broadcast(t.data, 0)


def sync_rng() -> None:
    """Rank 0's torch random state to every rank (after work only rank 0 did, such as validation)."""
    ctx = context()
    if ctx is None:
        return
    import torch.distributed as dist

    state = torch.get_rng_state()
    if ctx.backend == "nccl":
        buf = state.to(_device())
        dist.broadcast(buf, 0)
        torch.set_rng_state(buf.cpu())
        cuda = torch.cuda.get_rng_state().to(_device())
        dist.broadcast(cuda, 0)
        torch.cuda.set_rng_state(cuda.cpu())
    else:
        dist.broadcast(state, 0)
        torch.set_rng_state(state)


def barrier() -> None:
    if context() is not None:
        import torch.distributed as dist

        dist.barrier()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    ctx = context()
    if ctx is not None and ctx.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (decisions that read files rank 0 writes)."""
    if context() is None:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=_device())
    dist.broadcast(t, 0)
    return bool(t.item())
