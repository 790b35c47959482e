"""Classifier two-sample test: can an MLP tell candidate showers from reference showers?

Inputs are either *low-level* (every cell divided by the incident energy, scaled by one global factor, plus
standardised log10 E_inc) or *high-level* (the standardised observables plus log10 E_inc). The rows are split
60/20/20 (train/validation/test) with a seeded permutation; training stops early when the validation loss has not
improved for ``patience`` epochs and the best-validation epoch is kept. On the test split we report the ROC AUC
(0.5 = indistinguishable) and JSD = (ln 2 - BCE) / ln 2 after isotonic calibration of the classifier output on
the test split itself (the CaloChallenge convention; this makes the JSD slightly optimistic, O(1/n_test)).

Sizes: ``small`` (2 x 256, lr 1e-3, <= 12 epochs, patience 3; minutes on 2 CPU cores for 5000 vs 5000 showers of
27000 cells) and ``challenge`` (2 x 2048, LeakyReLU, Adam lr 2e-4, batch 1000, 50 epochs as in the CaloChallenge).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

LN2 = float(np.log(2.0))


@dataclass(frozen=True)
class ClassifierConfig:
    """MLP and training settings."""

    hidden: tuple[int, ...] = (256, 256)
    epochs: int = 12
    lr: float = 1e-3
    batch_size: int = 1000
    patience: int = 3
    max_per_sample: int = 10000


SIZES: dict[str, ClassifierConfig] = {
    "small": ClassifierConfig(),
    "challenge": ClassifierConfig(hidden=(2048, 2048), epochs=50, lr=2e-4, patience=50),
}


@dataclass
class ClassifierResult:
    """Test-split scores of one two-sample test; ``auc_null_std`` is the AUC spread expected for equal samples."""

    auc: float
    jsd: float
    auc_null_std: float
    n_train: int
    n_val: int
    n_test: int
    epochs_run: int
    best_epoch: int
    seed: int
    inputs: str
    config: dict = field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        """AUC above 0.5 by more than 3 times its spread under the null hypothesis."""
        return bool(self.auc - 0.5 > 3 * self.auc_null_std)

    def to_dict(self) -> dict:
        return {**asdict(self), "flagged": self.flagged}


def auc_null_std(n_pos: int, n_neg: int) -> float:
    """Standard deviation of the AUC of a fixed scorer on two equal distributions (Mann-Whitney)."""
    return float(np.sqrt((n_pos + n_neg + 1) / (12.0 * n_pos * n_neg)))


def split_indices(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded 60/20/20 split of ``n`` rows into (train, validation, test) index arrays."""
    perm = np.random.default_rng(seed).permutation(n)
    a, b = int(0.6 * n), int(0.8 * n)
    return perm[:a], perm[a:b], perm[b:]


def _mlp(n_in: int, hidden: tuple[int, ...]):
    import torch

    layers: list = []
    for h in hidden:
        layers += [torch.nn.Linear(n_in, h), torch.nn.LeakyReLU()]
        n_in = h
    layers.append(torch.nn.Linear(n_in, 1))
    return torch.nn.Sequential(*layers)


def _predict(model, x: np.ndarray, idx: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits for rows ``idx`` of ``x``, in that order."""
    import torch

    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[idx[i:i + batch_size]])).squeeze(1).numpy()
                               for i in range(0, len(idx), batch_size)]).astype(np.float64)


def _bce(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0, logits) - y * logits))


def calibrated_jsd(prob: np.ndarray, y: np.ndarray) -> float:
    """JSD = (ln 2 - BCE) / ln 2 of ``prob`` after isotonic calibration on the same rows."""
    from sklearn.isotonic import IsotonicRegression

    p = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit_transform(prob, y)
    p = np.clip(p, 1e-7, 1 - 1e-7)
    bce = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float((LN2 - bce) / LN2)


def two_sample_test(x: np.ndarray, y: np.ndarray, config: ClassifierConfig = SIZES["small"], seed: int = 0,
                    inputs: str = "") -> ClassifierResult:
    """Train the MLP on rows ``x`` (float32, not copied) with labels ``y`` (0 reference, 1 candidate)."""
    import torch
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(seed)
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    train, val, test = split_indices(len(x), seed)
    model = _mlp(x.shape[1], config.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(seed + 1)
    best = (np.inf, 0, None)
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = rng.permutation(train)
        for i in range(0, len(order), config.batch_size):
            rows = order[i:i + config.batch_size]
            opt.zero_grad()
            loss = loss_fn(model(torch.from_numpy(x[rows])).squeeze(1), torch.from_numpy(y[rows]))
            loss.backward()
            opt.step()
        model.eval()
        val_loss = _bce(_predict(model, x, val, config.batch_size), y[val])
        if val_loss < best[0]:
            best = (val_loss, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
        elif epoch - best[1] >= config.patience:
            break
    model.load_state_dict(best[2])
    model.eval()
    logits = _predict(model, x, test, config.batch_size)
    y_test = y[test]
    prob = 1.0 / (1.0 + np.exp(-logits))
    n_pos = int(y_test.sum())
    return ClassifierResult(
        auc=float(roc_auc_score(y_test, logits)), jsd=calibrated_jsd(prob, y_test),
        auc_null_std=auc_null_std(n_pos, len(y_test) - n_pos), n_train=len(train), n_val=len(val),
        n_test=len(test), epochs_run=epoch, best_epoch=best[1], seed=seed, inputs=inputs,
        config={**asdict(config), "hidden": list(config.hidden)},
    )


# ---- inputs -----------------------------------------------------------------------------------------------
def _log_energy_column(energies: np.ndarray) -> np.ndarray:
    le = np.log10(np.asarray(energies, float))
    sd = le.std()
    return ((le - le.mean()) / (sd if sd > 0 else 1.0)).astype(np.float32)


def low_level_inputs(ref_file, cand_file, n_max: int = 10000, seed: int = 0, batch_size: int = 500,
                     ref_rows: np.ndarray | None = None,
                     cand_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Low-level rows (cells / E_inc, scaled, plus standardised log10 E_inc) of two ShowerFiles.

    Takes the same number n = min(n_max, pool sizes) of random showers from each file (from ``ref_rows`` /
    ``cand_rows`` when given, else from all rows) and streams them into one preallocated float32 array of shape
    (2n, n_cells + 1): the only copy of the cells held in memory.
    """
    if ref_file.n_cells != cand_file.n_cells:
        raise ValueError(f"low-level classifier: reference has {ref_file.n_cells} cells per shower, "
                         f"candidate {cand_file.n_cells}")
    rng = np.random.default_rng(seed)
    pairs = ((ref_file, ref_rows), (cand_file, cand_rows))
    pools = [np.arange(len(f)) if r is None else np.asarray(r) for f, r in pairs]
    n = min(n_max, len(pools[0]), len(pools[1]))
    x = np.empty((2 * n, ref_file.n_cells + 1), dtype=np.float32)
    energies = np.empty(2 * n)
    for k, (f, pool) in enumerate(zip((ref_file, cand_file), pools)):
        rows = np.sort(rng.choice(pool, n, replace=False))
        for i in range(0, n, batch_size):
            b = f.read(index=rows[i:i + batch_size])
            sl = slice(k * n + i, k * n + i + len(b))
            np.divide(b.showers, b.energies[:, None].astype(np.float32), out=x[sl, :-1])
            energies[sl] = b.energies
    scale = float(np.std(x[::max(1, len(x) // 200), :-1])) or 1.0
    x[:, :-1] *= np.float32(1.0 / scale)
    x[:, -1] = _log_energy_column(energies)
    return x, np.repeat(np.array([0.0, 1.0], np.float32), n)


def high_level_inputs(ref_features: np.ndarray, cand_features: np.ndarray, ref_energies: np.ndarray,
                      cand_energies: np.ndarray, n_max: int | None = None,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """High-level rows: standardised features (see observables.feature_matrices) plus log10 E_inc, balanced."""
    rng = np.random.default_rng(seed)
    n = min(len(ref_features), len(cand_features), n_max or len(ref_features))
    ir, ic = rng.choice(len(ref_features), n, replace=False), rng.choice(len(cand_features), n, replace=False)
    e = np.concatenate([np.asarray(ref_energies)[ir], np.asarray(cand_energies)[ic]])
    x = np.column_stack([np.concatenate([ref_features[ir], cand_features[ic]]), _log_energy_column(e)])
    return x.astype(np.float32), np.repeat(np.array([0.0, 1.0], np.float32), n)


def config_for(size: str, **overrides) -> ClassifierConfig:
    """A named configuration (``small`` or ``challenge``) with optional field overrides."""
    if size not in SIZES:
        raise ValueError(f"unknown classifier size {size!r}; expected one of {sorted(SIZES)}")
    return replace(SIZES[size], **overrides)
