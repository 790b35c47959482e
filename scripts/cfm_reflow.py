"""Few-step ``cfm`` by reflow (rectified-flow distillation): a student that samples in 1-2 steps what its teacher
samples in many.

    python scripts/cfm_reflow.py runs/cfm-gpu --conditions-from data/ild-multi-train.h5 --pairs 4000 \
        --teacher-steps 8 --steps 600 -o runs/cfm-reflow

Reflow (Liu et al., arXiv:2209.03003, section 2.3): the teacher's ODE maps noise x0 to a shower x1 = ODE(x0); the
pairs (x0, x1) are coupled, so the straight line between them is a path the student can follow in one step. The
student starts from the teacher's weights and is trained with the flow-matching loss on those pairs instead of
independent (noise, Geant4 shower) pairs: x_t = (1 - t) x0 + t x1, target x1 - x0. No Geant4 shower is used: the
student learns the teacher's map, so it can at best reach the teacher's fidelity (in fewer steps).

* The conditions of the pairs are the first ``--pairs`` rows of ``--conditions-from`` (the teacher's training file:
  conditions inside its range); the noise of pair chunk k is drawn from seed (``--seed``, k), so it is never stored.
* The teacher's endpoints are computed chunk by chunk into ``OUTPUT/pairs/`` (each chunk written to a temporary file
  and renamed): a killed run recomputes only the missing chunks.
* The student is checkpointed every ``--checkpoint-every`` steps (``OUTPUT/student.safetensors`` + ``state.pt``,
  loaded with ``weights_only=True``); a rerun of the same command resumes from there and ends with the same weights.
* The output is a model directory whose default sampling is ``--student-steps`` Euler steps; ``model.json`` records
  the teacher and the reflow options under ``reflow``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from caloforge.dataset import DatasetError
from caloforge.models import ModelError


def _chunk_noise(teacher, n: int, seed: int, k: int) -> torch.Tensor:
    """The noise x0 (n, L, C + 1) of pair chunk k: from (seed, k), so it is remade rather than stored."""
    (shape, _), = teacher.noise_shapes(n)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + k))


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    from caloforge.dataset import open_showers
    from caloforge.models import load_model, read_meta, save_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teacher", help="a saved cfm model directory")
    p.add_argument("--conditions-from", required=True, help="shower file whose first rows give the conditions")
    p.add_argument("--pairs", type=int, default=4000, help="teacher (noise, shower) pairs (default 4000)")
    p.add_argument("--teacher-steps", type=int, default=8, help="the teacher's ODE steps (default 8)")
    p.add_argument("--teacher-solver", default="midpoint", choices=["euler", "midpoint", "heun"])
    p.add_argument("--steps", type=int, default=600, help="student optimisation steps (default 600)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--student-steps", type=int, default=1, help="the student's default Euler steps (default 1)")
    p.add_argument("--chunk", type=int, default=200, help="pairs per teacher chunk (default 200)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-o", "--output", required=True, help="new model directory")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if read_meta(args.teacher)["family"] != "cfm":
        raise ModelError(f"{args.teacher}: reflow needs a cfm model")
    teacher = load_model(args.teacher)
    out = Path(args.output)
    (out / "pairs").mkdir(parents=True, exist_ok=True)

    with open_showers(args.conditions_from, expected_detector=teacher.detector) as f:
        if len(f) < args.pairs:
            raise ModelError(f"{args.conditions_from}: {len(f)} rows; --pairs asks for {args.pairs}")
        cond_all = torch.as_tensor(f.read(0, args.pairs).conditions.as_array(), dtype=torch.float32)

    # 1. the teacher's endpoints, chunk by chunk (resumable)
    chunks = list(range(0, args.pairs, args.chunk))
    t0 = time.time()
    for k, i in enumerate(tqdm(chunks, desc="teacher", unit="chunk", disable=args.quiet)):
        path = out / "pairs" / f"chunk-{k:05d}.safetensors"
        if path.exists():
            continue
        cond = cond_all[i:i + args.chunk]
        with torch.no_grad():
            x1 = teacher.integrate(_chunk_noise(teacher, len(cond), args.seed, k), teacher.condition_features(cond),
                                   steps=args.teacher_steps, solver=args.teacher_solver)
        tmp = path.with_suffix(".tmp")
        save_file({"x1": x1.contiguous()}, str(tmp))
        tmp.replace(path)
    teacher_s = time.time() - t0
    x0_all = torch.cat([_chunk_noise(teacher, len(cond_all[i:i + args.chunk]), args.seed, k)
                        for k, i in enumerate(chunks)])
    x1_all = torch.cat([load_file(str(out / "pairs" / f"chunk-{k:05d}.safetensors"))["x1"] for k in range(len(chunks))])

    # 2. the student: the teacher's weights, trained on the coupled pairs (resumable)
    student = load_model(args.teacher)
    student.train()
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    state_path, weights_path = out / "state.pt", out / "student.safetensors"
    step, history = 0, []
    if state_path.exists() and weights_path.exists():
        student.load_state_dict(load_file(str(weights_path)))
        state = torch.load(state_path, weights_only=True)
        opt.load_state_dict(state["optimizer"])
        step, history = int(state["step"]), json.loads(state["history"])
    bar = tqdm(total=args.steps, initial=step, desc="student", unit="step", disable=args.quiet)
    while step < args.steps:
        g = torch.Generator().manual_seed(args.seed * 7919 + step)  # per-step stream: a resume draws the same rows
        rows = torch.randint(len(x0_all), (args.batch_size,), generator=g)
        t = torch.rand(args.batch_size, generator=g)
        loss = student.pair_loss(x0_all[rows], x1_all[rows], t, student.condition_features(cond_all[rows]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % 10 == 0:
            history.append({"step": step, "loss": float(loss.detach())})
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if step % args.checkpoint_every == 0 or step == args.steps:
            tmp = weights_path.with_suffix(".tmp")
            save_file({k: v.detach().contiguous() for k, v in student.state_dict().items()}, str(tmp))
            tmp_state = state_path.with_suffix(".tmp")
            torch.save({"optimizer": opt.state_dict(), "step": step, "history": json.dumps(history)}, tmp_state)
            tmp.replace(weights_path)
            tmp_state.replace(state_path)
    bar.close()

    # 3. the model directory: default sampling = the student's Euler steps
    student.eval()
    student.config.sample_steps, student.config.solver = args.student_steps, "euler"
    meta = read_meta(args.teacher)
    save_model(student, out, extra={"training": meta.get("training", {}), "reflow": {
        "teacher": str(args.teacher), "teacher_steps": args.teacher_steps, "teacher_solver": args.teacher_solver,
        "pairs": args.pairs, "conditions_from": str(args.conditions_from), "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "teacher_seconds": round(teacher_s, 1),
        "final_loss": history[-1]["loss"] if history else None}})
    model = load_model(out)
    print(f"{out}: cfm student after {step} reflow steps, sampled with {model.sample_steps} Euler step(s) "
          f"({model.evaluations_per_shower} network evaluations per shower)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ModelError, DatasetError) as err:
        sys.exit(f"cfm_reflow: error: {err}")
