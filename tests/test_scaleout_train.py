"""Data-parallel training under torchrun (2 gloo processes on CPU) gives the single-process training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest_models import toy_detector, write_toy_file

# batch 15 splits 8 + 7 over two ranks: unequal shards, weighted by their share of the batch
ARGS = ["--model", "layerflow", "--set", "model.flow_blocks=2", "--set", "model.flow_hidden=16", "--set",
        "train.batch_size=15", "--set", "train.val_every=3", "--set", "train.val_fraction=0.2", "--set",
        "train.val_max_showers=16", "--set", "train.checkpoint_every=2", "--set", "train.log_every=1", "--set",
        "train.lr_schedule='constant'", "-q"]


def _train(out, data, *extra: str, procs: int = 1) -> None:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
              if procs > 1 else [sys.executable])
    cmd = launch + ["-m", "caloforge", "train", "--data", str(data), *ARGS, "-o", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _history(run) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def _assert_same_training(a, b, tol: float = 1e-4, kinds: tuple[str, ...] = ("train", "val")) -> None:
    wa, wb = load_file(str(a / "last" / "model.safetensors")), load_file(str(b / "last" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].double(), wb[k].double(), rtol=tol, atol=tol), k
    ha, hb = ([r for r in _history(run) if r["kind"] in kinds] for run in (a, b))
    assert [(r["step"], r["kind"]) for r in ha] == [(r["step"], r["kind"]) for r in hb], "one record per step"
    for ra, rb in zip(ha, hb):
        for key in ("loss", "flow", "cells", "score"):
            if key in ra:
                assert abs(ra[key] - rb[key]) <= tol * max(1.0, abs(ra[key])), (ra, rb)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = root / "toy.h5"
    write_toy_file(data, toy_detector(), 80, seed=5)
    _train(root / "one", data, "--max-steps", "6")
    return root, data


def test_two_processes_train_as_one(runs):
    """Gradient averaging over two shards of each global batch is the whole batch's gradient (up to rounding)."""
    root, data = runs
    _train(root / "two", data, "--max-steps", "6", procs=2)
    _assert_same_training(root / "one", root / "two")
    meta = json.loads((root / "two" / "model.json").read_text())
    assert meta["training"]["processes"] == 2
    assert not list((root / "two").glob("*.tmp")), "rank 0 alone writes, atomically"


@pytest.mark.slow
def test_resume_under_torchrun(runs):
    """A torchrun run stopped at step 4 and resumed under torchrun to step 6 is the 6-step single-process run."""
    root, data = runs
    _train(root / "resumed", data, "--max-steps", "4", procs=2)
    _train(root / "resumed", data, "--resume", "--max-steps", "6", procs=2)
    # the same weights and training losses (the first run also validated at its last step, 4)
    _assert_same_training(root / "one", root / "resumed", kinds=("train",))


@pytest.mark.slow
def test_a_torchrun_run_resumes_in_one_process(runs):
    """The ranks' random streams stay in step and the global batch is fixed: a run started under torchrun resumes
    with another number of processes (here one) and continues as the single-process run."""
    import shutil

    root, data = runs
    _train(root / "half", data, "--max-steps", "4", procs=2)
    shutil.copytree(root / "half", root / "half-one")
    _train(root / "half-one", data, "--resume", "--max-steps", "6")
    _assert_same_training(root / "one", root / "half-one", kinds=("train",))


@pytest.mark.slow
def test_wgan_under_torchrun(tmp_path):
    """The adversarial family (several optimisers, gradient penalty) trains under torchrun too. Its batch-norm
    statistics are per shard, as with DDP, so it is close to, not equal to, one process."""
    data = tmp_path / "toy.h5"
    write_toy_file(data, toy_detector(), 80, seed=5)
    out = tmp_path / "wgan"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "caloforge",
           "train", "--data", str(data), "--model", "wgan", "--set", "model.latent_dim=8", "--set",
           "model.gen_channels=4", "--set", "model.critic_channels=4", "--set", "model.critic_hidden=16", "--set",
           "model.aux_channels=4", "--set", "model.n_critic=2", "--set", "train.batch_size=16", "--max-steps", "4",
           "--set", "train.val_every=2", "--set", "train.val_fraction=0.2", "-q", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hist = _history(out)
    assert [r["step"] for r in hist if r["kind"] == "val"] == [2, 4]
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "model.safetensors")).values())
