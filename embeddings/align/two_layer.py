"""The two-layer adapter: ridge, then a GELU branch trained with MSE plus batch structure.

Loss per mini-batch (M2M-style; targets are unit length)::

    mean (f(x) - y)^2  +  structure * mean (cos(f(x_i), f(x_j)) - cos(y_i, y_j))^2

the second term over the first ``structure_rows`` pairs of the batch (an ``m x m``
similarity matrix; a batch is a random sample, so are its first rows), so the map
keeps which targets are near each other, not only where each one lies.  The linear part
is the ridge solution, frozen; the branch starts at zero, so round 0 *is* ridge, and
early stopping on the validation objective (the same sum, every ``round_rows`` training
rows, :mod:`embeddings.trainloop`) never returns something worse on it than ridge.
AdamW, seeded initialisation and shuffling: a rerun with the same seed and threads gives
the same weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..trainloop import WARMUP, EarlyStop, rounds, sample_rows, torch_state, torch_threads
from .ridge import RidgeFit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TwoLayerParams:
    hidden: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 512
    structure: float = 0.1
    structure_rows: int = 256
    round_rows: int = 100_000  # validation after this many training rows (or an epoch)
    max_rounds: int = 10
    patience: int = 3  # rounds without a better validation MSE before stopping
    seed: int = 0
    threads: int | None = None  # torch intra-op threads (None: torch's default)

    def __post_init__(self) -> None:
        for name in ("hidden", "max_rounds", "batch_size", "structure_rows", "round_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"two_layer {name} must be >= 1, not {getattr(self, name)}")
        if self.patience < 0 or self.lr <= 0 or self.structure < 0:
            raise ValueError("two_layer patience and structure must be >= 0, lr > 0")


def fit_two_layer(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                  ridge: RidgeFit, params: TwoLayerParams | None = None,
                  progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train the branch on top of ``ridge``; the tensors of a ``two_layer`` adapter and
    what training found (epochs, best epoch, validation MSE by epoch).

    ``x``/``y`` may be float16 (they are read a batch at a time, as float32); targets are
    normalised here.  ``x_val`` must not be empty: it decides when to stop.
    """
    import torch
    from torch import nn

    p = params or TwoLayerParams()
    if not len(x_val):
        raise ValueError("two_layer needs validation pairs to stop on")
    t0 = time.perf_counter()
    with torch_threads(p.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        rng = np.random.default_rng(p.seed)
        some = np.asarray(x[sample_rows(len(x), 100_000, rng)], np.float32)
        mu, sd = some.mean(axis=0), some.std(axis=0) + 1e-6
        del some
        w = torch.from_numpy(ridge.w)
        b = torch.from_numpy(ridge.b)
        mu_t, sd_t = torch.from_numpy(mu), torch.from_numpy(sd)
        d_in, d_out = x.shape[1], y.shape[1]
        branch = nn.Sequential(nn.Linear(d_in, p.hidden), nn.GELU(approximate="tanh"),
                               nn.Linear(p.hidden, d_out))
        nn.init.zeros_(branch[2].weight)
        nn.init.zeros_(branch[2].bias)
        opt = torch.optim.AdamW(branch.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / WARMUP))
        # The branch predicts the ridge residual in units of its RMS, so its weights (and
        # Adam's steps on them) are O(1) whatever the targets' scale (unit vectors of a
        # 384-d space have coordinates near 0.05: unscaled, the first steps overshot).
        scale = float(np.sqrt(max(ridge.val_mse or ridge.train_mse, 1e-12)))

        def batch(xa: np.ndarray, ya: np.ndarray, idx: np.ndarray | slice
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            xb = torch.from_numpy(np.asarray(xa[idx], np.float32))
            yb = torch.from_numpy(np.asarray(ya[idx], np.float32))
            yb = yb / yb.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return (xb - mu_t) / sd_t, torch.addmm(b, xb, w), yb

        m = p.structure_rows

        def terms(pred: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """MSE, and the similarity-structure error over the first ``m`` rows."""
            mse = nn.functional.mse_loss(pred, yb)
            k = min(m, len(pred))  # a batch is in random order: its first rows are a sample
            if not p.structure or k < 2:
                return mse, torch.zeros(())
            pn = nn.functional.normalize(pred[:k], dim=1)
            return mse, nn.functional.mse_loss(pn @ pn.T, yb[:k] @ yb[:k].T)

        def validate() -> tuple[float, float]:
            """Validation objective (what training minimises) and MSE, in fixed blocks."""
            branch.eval()
            total = mse_sum = 0.0
            blocks = 0
            with torch.no_grad():
                for s in range(0, len(x_val), m):
                    xs, lin, yb = batch(x_val, y_val, slice(s, s + m))
                    mse, struct = terms(lin + scale * branch(xs), yb)
                    mse_sum += float(mse) * len(xs)
                    total += float(mse + p.structure * struct) * len(xs)
                    blocks += len(xs)
            branch.train()
            mse_by_round.append(mse_sum / blocks)
            return total / blocks, mse_sum / blocks

        mse_by_round: list[float] = []
        stop = EarlyStop(p.patience, validate()[0], torch_state(branch))  # round 0: ridge
        for r, batches in enumerate(rounds(len(x), p.batch_size, p.round_rows,
                                           p.max_rounds, rng), start=1):
            for idx in batches:
                xs, lin, yb = batch(x, y, idx)
                mse, struct = terms(lin + scale * branch(xs), yb)
                loss = mse + p.structure * struct
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                warm.step()
            objective, mse_now = validate()
            done = stop.update(objective, lambda: torch_state(branch))
            if progress:
                log.info("two_layer round %d: validation objective %.6f, mse %.6f", r,
                         objective, mse_now)
            if done:
                break
        branch.load_state_dict(stop.state)
    sd_branch = {k: v.detach().cpu().numpy() for k, v in branch.state_dict().items()}
    tensors = {"w": ridge.w, "b": ridge.b, "mu": mu, "sd": sd,
               "w1": sd_branch["0.weight"].T.copy(), "b1": sd_branch["0.bias"],
               "w2": scale * sd_branch["2.weight"].T, "b2": scale * sd_branch["2.bias"]}
    info = {**stop.summary(), "val_mse_by_round": [round(v, 8) for v in mse_by_round],
            "train_s": round(time.perf_counter() - t0, 3),
            "params": asdict(p)}
    return tensors, info
