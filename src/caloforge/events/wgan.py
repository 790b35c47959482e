"""The event WGAN of the RWTH talk: conditional WGAN-GP on Gaussianised high-level variables.

Generator and critic are feed-forward with 6 hidden layers of 288 ReLU units. The generator maps noise and the
process label (ttbb = 0, ttH = 1, fed as -1 / +1) to the 26 Gaussianised variables; the critic sees the variables
and the label. Losses: critic -C(x) + C(G(z)) + lambda GP (two-sided gradient penalty on interpolates, lambda = 10),
generator -C(G(z)); 5 critic steps per generator step, Adam (lr 1e-4, betas 0.5, 0.9). Generated values go back
through the inverse Gaussianisation. A run directory holds ``model.safetensors`` (weights and the Gaussianiser's
quantile tables as tensors), ``model.json`` (configuration, variable names), ``checkpoint.safetensors`` +
``checkpoint.json`` (optimiser and RNG states, for ``--resume``) and ``history.jsonl``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from caloforge.events import PROCESSES
from caloforge.events.eventfile import Events, read_events, write_events
from caloforge.events.gauss import Gaussianiser

MODEL_FILE, MODEL_JSON = "model.safetensors", "model.json"
CKPT_FILE, CKPT_JSON, HISTORY = "checkpoint.safetensors", "checkpoint.json", "history.jsonl"
#: Most events per process one command generates (about 0.4 GB of variables per million events and process).
MAX_EVENTS = 5_000_000


class EventModelError(ValueError):
    """A run directory that cannot be loaded or resumed."""


@dataclass
class WGANConfig:
    hidden: int = 288
    layers: int = 6
    noise_dim: int = 32
    n_critic: int = 5
    gp_lambda: float = 10.0
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.9
    batch_size: int = 256
    steps: int = 20000
    checkpoint_every: int = 1000
    log_every: int = 200
    seed: int = 0
    #: Exponential moving average of the generator's weights (0 = off, the talk's recipe): decay
    #: min(ema, (1 + step) / (10 + step)); the saved and sampled generator is the average (a departure from the talk).
    ema: float = 0.0
    #: Learning-rate decay (0 = off, the talk's recipe): over the last ``lr_decay_steps`` generator steps both
    #: learning rates follow a half cosine from ``lr`` down to ``lr_final * lr``. The rate is a function of the step
    #: alone, so a resumed run continues it exactly; these two options may be set on ``--resume`` (schedule only).
    lr_decay_steps: int = 0
    lr_final: float = 0.1

    #: Sane bounds of every option (checked before any allocation: a damaged model.json cannot ask for 10^9 units).
    BOUNDS = {"hidden": (1, 4096), "layers": (1, 64), "noise_dim": (1, 4096), "n_critic": (1, 100),
              "gp_lambda": (0.0, 1e4), "lr": (1e-12, 1.0), "beta1": (0.0, 0.9999), "beta2": (0.0, 0.9999),
              "batch_size": (1, 65536), "steps": (1, 10**8), "checkpoint_every": (1, 10**8),
              "log_every": (1, 10**8), "seed": (0, 2**63 - 1), "ema": (0.0, 0.99999),
              "lr_decay_steps": (0, 10**8), "lr_final": (0.0, 1.0)}
    #: Options ``--set`` may change when a run is resumed (they change no weight or state, only the rate ahead).
    RESUMABLE = ("lr_decay_steps", "lr_final")

    @classmethod
    def from_dict(cls, d, source: str) -> WGANConfig:
        """Options read from a file or the command line, each checked against its type and bounds."""
        from dataclasses import fields

        from caloforge.validate import coerce_option

        if not isinstance(d, dict):
            raise EventModelError(f"{source}: expected a table of options, got {d!r:.60}")
        defaults = cls()
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise EventModelError(f"{source}: unknown option {unknown[0]!r}; expected some of {sorted(names)}")
        return cls(**{k: coerce_option(k, v, getattr(defaults, k), source, cls.BOUNDS[k], EventModelError)
                      for k, v in d.items()})


def mlp(n_in: int, n_out: int, hidden: int = 288, layers: int = 6):
    """Feed-forward net: ``layers`` hidden layers of ``hidden`` ReLU units, linear output."""
    import torch.nn as nn

    mods, width = [], n_in
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    mods.append(nn.Linear(width, n_out))
    return nn.Sequential(*mods)


def lr_at(cfg: WGANConfig, step: int) -> float:
    """Learning rate of generator step ``step`` (0-based): ``lr``, then a half cosine to ``lr_final * lr`` over the
    last ``lr_decay_steps`` steps of ``cfg.steps``."""
    import math

    start = cfg.steps - cfg.lr_decay_steps
    if cfg.lr_decay_steps <= 0 or step < start:
        return cfg.lr
    frac = min(1.0, (step - start + 1) / cfg.lr_decay_steps)
    return cfg.lr * (cfg.lr_final + (1.0 - cfg.lr_final) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def _label(process):
    """Process labels (0 ttbb, 1 ttH) as a (N, 1) float tensor of -1 / +1."""
    import torch

    return (2.0 * torch.as_tensor(process, dtype=torch.float32) - 1.0).reshape(-1, 1)


class EventWGAN:
    """Generator, critic and the Gaussianiser of one run."""

    def __init__(self, cfg: WGANConfig, gauss: Gaussianiser, names: list[str]) -> None:
        self.cfg, self.gauss, self.names = cfg, gauss, names
        d = gauss.dim
        self.generator = mlp(cfg.noise_dim + 1, d, cfg.hidden, cfg.layers)
        self.critic = mlp(d + 1, 1, cfg.hidden, cfg.layers)

    # ---- persistence -------------------------------------------------------------------------------------
    def save(self, run_dir: Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"generator.{k}": v.detach().cpu().contiguous() for k, v in self.generator.state_dict().items()}
        tensors |= {f"critic.{k}": v.detach().cpu().contiguous() for k, v in self.critic.state_dict().items()}
        tensors |= self.gauss.tensors()
        _atomic(run_dir / MODEL_FILE, lambda p: save_file(tensors, str(p)))
        meta = {"family": "eventwgan", "config": asdict(self.cfg), "names": self.names,
                "processes": PROCESSES, "condition": "process label: ttbb -> -1, ttH -> +1"}
        _atomic(run_dir / MODEL_JSON, lambda p: Path(p).write_text(json.dumps(meta, indent=1)))

    @classmethod
    def load(cls, run_dir: str | Path) -> EventWGAN:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        run_dir = Path(run_dir)
        meta_path, w_path = run_dir / MODEL_JSON, run_dir / MODEL_FILE
        if not meta_path.exists() or not w_path.exists():
            raise EventModelError(f"{run_dir}: expected {MODEL_JSON} and {MODEL_FILE} (a caloforge events train run)")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EventModelError(f"{meta_path}: not valid JSON ({err})") from None
        if not isinstance(meta, dict) or meta.get("family") != "eventwgan":
            got = meta.get("family") if isinstance(meta, dict) else meta
            raise EventModelError(f"{meta_path}: field 'family' is {got!r:.60}; expected 'eventwgan' (a caloforge "
                                  f"events train run)")
        cfg = WGANConfig.from_dict(meta.get("config"), f"{meta_path} field 'config'")
        try:
            tensors = load_file(str(w_path))
        except (SafetensorError, OSError) as err:
            raise EventModelError(f"{w_path}: unreadable weights ({err})") from None
        gauss = _gaussianiser(tensors, w_path)
        names = meta.get("names")
        if not isinstance(names, list) or len(names) != gauss.dim or not all(isinstance(n, str) for n in names):
            raise EventModelError(f"{meta_path}: field 'names' is {names!r:.60}; expected a list of {gauss.dim} "
                                  f"variable names")
        if not all(bool(t.isfinite().all()) for t in tensors.values() if t.is_floating_point()):
            raise EventModelError(f"{w_path}: weights hold NaN or inf; expected finite weights")
        model = cls(cfg, gauss, names)
        for name, net in (("generator", model.generator), ("critic", model.critic)):
            sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            try:
                net.load_state_dict(sd)
            except RuntimeError as err:
                raise EventModelError(f"{w_path}: {name} weights do not fit the configuration ({err})") from None
        return model

    # ---- generation --------------------------------------------------------------------------------------
    def sample(self, process: np.ndarray, seed: int = 0, batch_size: int = 100000) -> np.ndarray:
        """High-level variables (N, D) for the given process labels."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        out = []
        dev = next(self.generator.parameters()).device
        self.generator.eval()
        with torch.no_grad():
            for i in range(0, len(process), batch_size):
                lab = _label(process[i:i + batch_size])
                z = torch.randn(len(lab), self.cfg.noise_dim, generator=gen)
                out.append(self.generator(torch.cat([z, lab], 1).to(dev)).double().cpu().numpy())
        g = np.concatenate(out) if out else np.zeros((0, self.gauss.dim))
        return self.gauss.inverse(g)


def _gaussianiser(tensors: dict, source) -> Gaussianiser:
    """The Gaussianiser stored with the weights, checked: quantiles (D, K) and probabilities (K,), finite."""
    q, p = tensors.get("gauss.quantiles"), tensors.get("gauss.probs")
    if q is None or p is None or q.ndim != 2 or p.ndim != 1 or q.shape[1] != p.shape[0] or p.shape[0] < 2 \
            or q.shape[0] < 1:
        raise EventModelError(f"{source}: tensors 'gauss.quantiles' (D, K) and 'gauss.probs' (K,) missing or of "
                              f"inconsistent shapes; expected the Gaussianiser of a caloforge events train run")
    g = Gaussianiser.from_tensors(tensors)
    if not (np.isfinite(g.quantiles).all() and np.isfinite(g.probs).all() and (np.diff(g.probs) > 0).all()
            and (np.diff(g.quantiles, axis=1) >= 0).all()):
        raise EventModelError(f"{source}: the Gaussianiser's tables are not finite and increasing")
    return g


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def gradient_penalty(critic, real, fake, lab):
    import torch

    eps = torch.rand(len(real), 1, device=real.device)
    x = (eps * real + (1 - eps) * fake).requires_grad_(True)
    out = critic(torch.cat([x, lab], 1))
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return ((grad.norm(dim=1) - 1.0) ** 2).mean()


def _nets(model: EventWGAN, ema_gen) -> list:
    """The networks a checkpoint holds: generator, critic and the generator's moving average when there is one."""
    return [("generator", model.generator), ("critic", model.critic)] + ([("ema", ema_gen)] if ema_gen is not None
                                                                         else [])


def _save_checkpoint(run_dir: Path, model: EventWGAN, opt_g, opt_c, step: int, ema_gen=None,
                     best: dict | None = None) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {"rng": torch.get_rng_state()}
    for name, net in _nets(model, ema_gen):
        tensors |= {f"{name}.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    for name, opt in (("opt_g", opt_g), ("opt_c", opt_c)):
        for idx, st in opt.state_dict()["state"].items():
            for key, val in st.items():
                tensors[f"{name}.{idx}.{key}"] = val.detach().cpu().reshape(-1) if key == "step" else val.detach().cpu()
    _atomic(run_dir / CKPT_FILE, lambda p: save_file(tensors, str(p)))
    info = {"step": step} | ({"best": best} if best is not None else {})
    _atomic(run_dir / CKPT_JSON, lambda p: Path(p).write_text(json.dumps(info)))


def _load_checkpoint(run_dir: Path, model: EventWGAN, opt_g, opt_c, ema_gen=None) -> int:
    import torch
    from safetensors.torch import load_file

    t = load_file(str(run_dir / CKPT_FILE), device=str(next(model.generator.parameters()).device))
    for name, net in _nets(model, ema_gen):
        net.load_state_dict({k[len(name) + 1:]: v for k, v in t.items() if k.startswith(name + ".")})
    for name, opt in (("opt_g", opt_g), ("opt_c", opt_c)):
        sd = opt.state_dict()
        n_params = len(sd["param_groups"][0]["params"])
        sd["state"] = {i: {key: (t[f"{name}.{i}.{key}"].reshape(()) if key == "step" else t[f"{name}.{i}.{key}"])
                           for key in ("step", "exp_avg", "exp_avg_sq")} for i in range(n_params)}
        opt.load_state_dict(sd)
    torch.set_rng_state(t["rng"].cpu())
    return int(json.loads((run_dir / CKPT_JSON).read_text())["step"])


def train(data: str, output: str, steps: int = 20000, batch_size: int = 256, seed: int = 0, threads: int = 1,
          resume: bool = False, quiet: bool = False, cfg: WGANConfig | None = None, device: str = "cpu",
          checkpoint_every: int | None = None, options: dict | None = None,
          val_data: str | None = None) -> EventWGAN:
    """Train (or resume) an event WGAN on the high-level variables of an event file.

    ``options`` override ``WGANConfig`` fields (checked against its bounds; ``--set KEY=VALUE``; on ``resume`` only
    the schedule, ``WGANConfig.RESUMABLE``). With ``val_data``
    (held-out events of the same variables, never the test file) every checkpoint scores the generator on it
    (``validation_scores``), logs the scores in ``history.jsonl`` and keeps the generator with the lowest Fisher-z
    chi2/ndf in ``RUN/best/`` (a run directory of its own). On ``device="cuda"`` the run is seeded but not bit-for-bit
    resumable (the CUDA RNG state is not checkpointed).
    """
    import copy

    import torch

    from caloforge.progress import progress
    from caloforge.validate import check_int, check_output_dir

    run_dir = check_output_dir(output)
    check_int(threads, "--threads", 1, 256)
    for flag, key, value in (("--steps", "steps", steps), ("--batch-size", "batch_size", batch_size),
                             ("--seed", "seed", seed), ("--checkpoint-every", "checkpoint_every", checkpoint_every)):
        check_int(value, flag, *WGANConfig.BOUNDS[key])  # absurd values refused before reading anything
    if options:
        WGANConfig.from_dict(options, "--set")
        fixed = sorted(set(options) - set(WGANConfig.RESUMABLE))
        if resume and fixed:
            raise ValueError(f"--set {fixed[0]}: fixed when a run starts; with --resume expected only "
                             f"{', '.join(WGANConfig.RESUMABLE)}")
    from caloforge.train import pick_device

    device = pick_device(device)
    ev = read_events(data)
    if len(ev) < 100:
        raise ValueError(f"{data}: {len(ev)} events; the event WGAN needs at least 100")
    val = read_events(val_data) if val_data else None
    if val is not None and val.names != ev.names:
        raise ValueError(f"--val-data {val_data}: variables {val.names[:3]}... differ from {data}'s; expected the same")
    if val is not None and min(int((val.process == v).sum()) for v in PROCESSES.values()) < 20:
        counts = {k: int((val.process == v).sum()) for k, v in PROCESSES.items()}
        raise ValueError(f"--val-data {val_data}: {counts} events per process; expected at least 20 of each")
    cfg = cfg or WGANConfig(steps=steps, batch_size=batch_size, seed=seed)
    if options and not resume:
        cfg = WGANConfig.from_dict({**asdict(cfg), **options}, "--set")
    best = {"step": 0, "score": float("inf")}
    if resume:
        if not (run_dir / CKPT_JSON).exists():
            raise EventModelError(f"{run_dir}: no checkpoint to resume ({CKPT_JSON} missing)")
        meta_path = run_dir / MODEL_JSON
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EventModelError(f"{meta_path}: unreadable ({err}); expected the run's model.json") from None
        old = WGANConfig.from_dict(meta.get("config") if isinstance(meta, dict) else meta,
                                   f"{meta_path} field 'config'")
        cfg = WGANConfig(**{**asdict(old), "steps": steps, **(options or {})})
        saved = json.loads((run_dir / CKPT_JSON).read_text()).get("best")
        if isinstance(saved, dict):
            best = {"step": int(saved["step"]), "score": float(saved["score"])}
    if checkpoint_every:
        cfg = WGANConfig(**{**asdict(cfg), "checkpoint_every": checkpoint_every})
    torch.set_num_threads(max(threads, 1))
    torch.manual_seed(cfg.seed)
    gauss = Gaussianiser.fit(ev.high_level)
    dev = torch.device(device)
    x = torch.from_numpy(gauss.forward(ev.high_level).astype(np.float32)).to(dev)
    lab_all = _label(ev.process).to(dev)
    model = EventWGAN(cfg, gauss, ev.names)
    model.generator.to(dev)
    model.critic.to(dev)
    ema_gen = copy.deepcopy(model.generator).requires_grad_(False) if cfg.ema > 0 else None
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_c = torch.optim.Adam(model.critic.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    run_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    if resume:
        start = _load_checkpoint(run_dir, model, opt_g, opt_c, ema_gen)
    else:
        (run_dir / HISTORY).unlink(missing_ok=True)
        _save_model(run_dir, model, ema_gen)
    hist = open(run_dir / HISTORY, "a")
    n = len(x)
    t0 = time.time()
    bar = progress(total=cfg.steps, desc="eventwgan", unit="step", quiet=quiet, initial=start)
    gen_params = list(model.generator.parameters())
    ema_params = list(ema_gen.parameters()) if ema_gen is not None else []
    for step in range(start, cfg.steps):
        for opt in (opt_g, opt_c):
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step)
        for _ in range(cfg.n_critic):
            idx = torch.randint(n, (cfg.batch_size,), device=dev)
            real, lab = x[idx], lab_all[idx]
            with torch.no_grad():
                fake = model.generator(torch.cat([torch.randn(cfg.batch_size, cfg.noise_dim, device=dev), lab], 1))
            c_real = model.critic(torch.cat([real, lab], 1)).mean()
            c_fake = model.critic(torch.cat([fake, lab], 1)).mean()
            gp = gradient_penalty(model.critic, real, fake, lab)
            loss_c = c_fake - c_real + cfg.gp_lambda * gp
            opt_c.zero_grad(set_to_none=True)
            loss_c.backward()
            opt_c.step()
            w_t = (c_real - c_fake).detach()  # stays on the device: no host sync inside the step (GPU)
        lab = lab_all[torch.randint(n, (cfg.batch_size,), device=dev)]
        fake = model.generator(torch.cat([torch.randn(cfg.batch_size, cfg.noise_dim, device=dev), lab], 1))
        loss_g = -model.critic(torch.cat([fake, lab], 1)).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if ema_gen is not None:  # warm-up: the average forgets the initial weights within the first steps
            decay = min(cfg.ema, (1.0 + step) / (10.0 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, gen_params, 1.0 - decay)
        bar.update(1)
        log_now = (step + 1) % cfg.log_every == 0
        save_now = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps
        if log_now or save_now:  # the only host syncs: a diverged run is caught before anything is written
            w_est = float(w_t)
            if not np.isfinite(w_est):
                raise ValueError(f"{run_dir}: training diverged by step {step + 1} (critic loss not finite)")
        if log_now:
            hist.write(json.dumps({"step": step + 1, "w_estimate": w_est, "gp": float(gp.detach()),
                                   "loss_g": float(loss_g.detach()),
                                   "lr": lr_at(cfg, step), "time_s": round(time.time() - t0, 1)}) + "\n")
            hist.flush()
            bar.set_postfix(w=f"{w_est:.3f}")
        if save_now:
            if val is not None:
                scores = validation_scores(_sampling_model(model, ema_gen), val)
                if scores["fisher_z"] < best["score"]:
                    best = {"step": step + 1, "score": scores["fisher_z"]}
                    (run_dir / "best").mkdir(exist_ok=True)
                    _save_model(run_dir / "best", model, ema_gen)
                hist.write(json.dumps({"step": step + 1, "val": scores, "best_step": best["step"]}) + "\n")
                hist.flush()
            _save_checkpoint(run_dir, model, opt_g, opt_c, step + 1, ema_gen, best if val is not None else None)
            _save_model(run_dir, model, ema_gen)
    bar.close()
    hist.close()
    _save_model(run_dir, model, ema_gen)
    return _sampling_model(model, ema_gen)


def _sampling_model(model: EventWGAN, ema_gen) -> EventWGAN:
    """The model whose generator is the moving average when there is one (what is saved and sampled)."""
    if ema_gen is None:
        return model
    copy_model = EventWGAN.__new__(EventWGAN)
    copy_model.cfg, copy_model.gauss, copy_model.names = model.cfg, model.gauss, model.names
    copy_model.generator, copy_model.critic = ema_gen, model.critic
    return copy_model


def _save_model(run_dir: Path, model: EventWGAN, ema_gen) -> None:
    _sampling_model(model, ema_gen).save(run_dir)


def validation_scores(model: EventWGAN, val: Events, per_process: int = 5000, seed: int = 12345) -> dict:
    """How close the generator is to held-out events: Fisher-z chi2/ndf of the correlations (per_process
    generated events per process, fixed noise) and the mean over variables and processes of the 1-D Wasserstein
    distance in the Gaussianised space (0 for identical marginals; about 0.05 for two samples of 600 events)."""
    from scipy.stats import wasserstein_distance

    from caloforge.events.quality import fisher_z

    was_training = model.generator.training
    labels = np.repeat(np.array(sorted(PROCESSES.values()), dtype=np.int8), per_process)
    gen = Events(model.sample(labels, seed=seed), labels, model.names)
    model.generator.train(was_training)
    fz = fisher_z(val, gen)["all"]["chi2_ndf"]
    w1 = []
    for lab in PROCESSES.values():
        a = model.gauss.forward(val.high_level[val.process == lab])
        b = model.gauss.forward(gen.high_level[gen.process == lab])
        if len(a):
            w1 += [wasserstein_distance(a[:, d], b[:, d]) for d in range(a.shape[1])]
    return {"fisher_z": float(fz), "marginal_w1": float(np.mean(w1)) if w1 else float("nan")}


def generate_file(model_dir: str, output: str, n: int | None = None, conditions_from: str | None = None,
                  processes: list[str] | None = None, seed: int = 0, threads: int = 1) -> int:
    """Write generated events: the process labels of ``conditions_from``, or ``n`` per process interleaved."""
    import torch

    from caloforge.validate import check_int, check_seed

    check_int(n, "-n", 1, MAX_EVENTS)
    check_seed(seed)
    check_int(threads, "--threads", 1, 256)
    torch.set_num_threads(max(threads, 1))
    model = EventWGAN.load(model_dir)
    if conditions_from is not None:
        proc = read_events(conditions_from).process
        if n is not None:
            proc = proc[: n * 2]
    else:
        if n is None:
            raise ValueError("-n: give the number of events per process (>= 1), or --conditions-from FILE")
        for p in processes or []:
            if p not in PROCESSES:
                raise ValueError(f"--process {p!r}: expected tth or ttbb")
        if processes is not None and (not processes or len(set(processes)) != len(processes)):
            raise ValueError(f"--process {','.join(processes)!r}: expected tth, ttbb or both, each once")
        labels = [PROCESSES[p] for p in (processes or list(PROCESSES))]
        proc = np.tile(np.array(labels, dtype=np.int8), n)
    hl = model.sample(proc, seed=seed)
    write_events(output, Events(hl, proc.astype(np.int8), model.names),
                 {"source": "model:eventwgan", "model": str(model_dir), "seed": seed})
    return len(proc)
