"""The two-layer adapter: ridge, then a GELU branch trained with MSE plus batch structure.

Loss per mini-batch (M2M-style; targets are unit length)::

    mean (f(x) - y)^2  +  structure * mean (cos(f(x_i), f(x_j)) - cos(y_i, y_j))^2

the second term over the first ``structure_rows`` pairs of the batch (an ``m x m``
similarity matrix; a batch is a random sample, so are its first rows), so the map
keeps which targets are near each other, not only where each one lies.  The linear part
is the ridge solution, frozen; the branch starts at zero, so round 0 *is* ridge, and
early stopping on the validation objective (the same sum, every ``round_rows`` training
rows, :mod:`embeddings.trainloop`) never returns something worse on it than ridge.

Cost is a fixed budget of ``max_rounds x round_rows`` training rows, whatever the
number of pairs: few, large steps (``batch_size`` 2048) with a learning rate that warms
up and then decays to zero over the budget (cosine), so the last rounds refine instead of
jittering; the matrix products run in bfloat16 where the CPU multiplies bfloat16
natively (``precision="auto"``; the loss, the weights and Adam's state stay float32),
and validation uses at most ``val_rows`` pairs.  AdamW, seeded initialisation and
shuffling: a rerun with the same seed, threads and precision gives the same weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..trainloop import EarlyStop, rounds, sample_rows, torch_state, torch_threads
from .ridge import RidgeFit

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class TwoLayerParams:
    hidden: int = 512
    lr: float = 6e-3
    weight_decay: float = 1e-4
    batch_size: int = 2048
    structure: float = 0.1
    structure_rows: int = 256
    round_rows: int = 50_000  # validation after this many training rows (or an epoch)
    max_rounds: int = 6  # the budget: max_rounds x round_rows training rows
    patience: int = 2  # rounds without a better validation objective before stopping
    warmup: float = 0.05  # share of the budget's steps with a rising learning rate
    val_rows: int = 20_000  # validation pairs early stopping looks at (a seeded sample)
    precision: str = "auto"  # matrix products: bfloat16 where the CPU has it natively
    seed: int = 0
    threads: int | None = None  # torch intra-op threads (None: torch's default)

    def __post_init__(self) -> None:
        for name in ("hidden", "max_rounds", "batch_size", "structure_rows", "round_rows",
                     "val_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"two_layer {name} must be >= 1, not {getattr(self, name)}")
        if self.patience < 0 or self.lr <= 0 or self.structure < 0:
            raise ValueError("two_layer patience and structure must be >= 0, lr > 0")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"two_layer warmup must be in [0, 1), not {self.warmup}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"two_layer precision must be one of {PRECISIONS}, "
                             f"not {self.precision!r}")


def use_bfloat16(precision: str) -> bool:
    """Whether the branch's products run in bfloat16: asked for, or ``auto`` on a CPU whose
    oneDNN multiplies bfloat16 natively (AVX512-BF16, AMX: about twice float32's speed
    there; emulated elsewhere, where it would be slower)."""
    if precision != "auto":
        return precision == "bfloat16"
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def schedule(total_steps: int, warmup: float) -> Any:
    """Learning-rate factor by step: linear warm-up over ``warmup`` of the steps, then a
    cosine decay to zero at the end of the budget."""
    warm = max(1, round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        done = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


class AdamW:
    """AdamW (decoupled weight decay, bias-corrected moments, as ``torch.optim.AdamW``)
    with the learning rate ``lr * factor(step)``.  Written out because constructing
    ``torch.optim``'s imports ``torch._dynamo``: 3 s on a quiet 2-core machine, 8 s under
    load, more than a whole round of training here."""

    def __init__(self, params: list[Any], lr: float, weight_decay: float, factor: Any,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        import torch

        self.params, self.lr, self.wd, self.factor = params, lr, weight_decay, factor
        self.b1, self.b2, self.eps, self.t = betas[0], betas[1], eps, 0
        self.m = [torch.zeros_like(q) for q in params]
        self.v = [torch.zeros_like(q) for q in params]

    def step(self) -> None:
        import torch

        lr = self.lr * self.factor(self.t)
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        with torch.no_grad():
            for q, m, v in zip(self.params, self.m, self.v):
                if q.grad is None:
                    continue
                q.mul_(1 - lr * self.wd)
                m.mul_(self.b1).add_(q.grad, alpha=1 - self.b1)
                v.mul_(self.b2).addcmul_(q.grad, q.grad, value=1 - self.b2)
                q.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-lr / c1)


def fit_two_layer(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                  ridge: RidgeFit, params: TwoLayerParams | None = None,
                  progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train the branch on top of ``ridge``; the tensors of a ``two_layer`` adapter and
    what training found (rounds, best round, validation MSE by round).

    ``x``/``y`` may be float16 (they are read a batch at a time, as float32); targets are
    normalised here.  ``x_val`` must not be empty: it decides when to stop.
    """
    import torch
    from torch import nn

    p = params or TwoLayerParams()
    if not len(x_val):
        raise ValueError("two_layer needs validation pairs to stop on")
    t0 = time.perf_counter()
    bf16 = use_bfloat16(p.precision)
    with torch_threads(p.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        rng = np.random.default_rng(p.seed)
        some = np.asarray(x[sample_rows(len(x), 100_000, rng)], np.float32)
        mu, sd = some.mean(axis=0), some.std(axis=0) + 1e-6
        del some
        pick = sample_rows(len(x_val), p.val_rows, rng)
        xv = np.asarray(x_val[pick], np.float32)
        yv = np.asarray(y_val[pick], np.float32)
        w = torch.from_numpy(ridge.w)
        b = torch.from_numpy(ridge.b)
        mu_t, sd_t = torch.from_numpy(mu), torch.from_numpy(sd)
        d_in, d_out = x.shape[1], y.shape[1]
        branch = nn.Sequential(nn.Linear(d_in, p.hidden), nn.GELU(approximate="tanh"),
                               nn.Linear(p.hidden, d_out))
        nn.init.zeros_(branch[2].weight)
        nn.init.zeros_(branch[2].bias)
        plan = list(rounds(len(x), p.batch_size, p.round_rows, p.max_rounds, rng))
        opt = AdamW(list(branch.parameters()), p.lr, p.weight_decay,
                    schedule(sum(len(r) for r in plan), p.warmup))
        # The branch predicts the ridge residual in units of its RMS, so its weights (and
        # Adam's steps on them) are O(1) whatever the targets' scale (unit vectors of a
        # 384-d space have coordinates near 0.05: unscaled, the first steps overshot).
        scale = float(np.sqrt(max(ridge.val_mse or ridge.train_mse, 1e-12)))

        def fast() -> Any:
            return (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
                    else contextlib.nullcontext())

        def batch(xa: np.ndarray, ya: np.ndarray, idx: np.ndarray | slice
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            xb = torch.from_numpy(np.asarray(xa[idx], np.float32))
            yb = torch.from_numpy(np.asarray(ya[idx], np.float32))
            yb = yb / yb.norm(dim=1, keepdim=True).clamp_min(1e-12)
            with fast():  # the frozen ridge part too: its rounding is far below its error
                lin = torch.addmm(b, xb, w)
            return (xb - mu_t) / sd_t, lin.float(), yb

        m = p.structure_rows

        def forward(xs: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:
            with fast():
                out = branch(xs)
            return lin + scale * out.float()

        def structure(pred: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            """Similarity-structure error over the first ``m`` rows (a random sample)."""
            k = min(m, len(pred))
            if not p.structure or k < 2:
                return torch.zeros(())
            pn = nn.functional.normalize(pred[:k], dim=1)
            return nn.functional.mse_loss(pn @ pn.T, yb[:k] @ yb[:k].T)

        def validate() -> tuple[float, float]:
            """Validation objective (what training minimises) and MSE: the MSE over every
            sampled pair, the structure term over its consecutive blocks of ``m``."""
            branch.eval()
            sse = struct = 0.0
            blocks = 0
            with torch.no_grad():
                for s in range(0, len(xv), 16 * m):
                    xs, lin, yb = batch(xv, yv, slice(s, s + 16 * m))
                    pred = forward(xs, lin)
                    sse += float(((pred - yb) ** 2).sum())
                    for j in range(0, len(pred) - 1, m):  # blocks of at least 2 rows
                        struct += float(structure(pred[j:j + m], yb[j:j + m]))
                        blocks += 1
            branch.train()
            mse = sse / (len(xv) * d_out)
            mse_by_round.append(mse)
            return mse + p.structure * struct / max(1, blocks), mse

        mse_by_round: list[float] = []
        stop = EarlyStop(p.patience, validate()[0], torch_state(branch))  # round 0: ridge
        for r, batches in enumerate(plan, start=1):
            for idx in batches:
                xs, lin, yb = batch(x, y, idx)
                pred = forward(xs, lin)
                loss = nn.functional.mse_loss(pred, yb) + p.structure * structure(pred, yb)
                branch.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
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
            "train_s": round(time.perf_counter() - t0, 3), "bfloat16": bf16,
            "params": asdict(p)}
    return tensors, info
