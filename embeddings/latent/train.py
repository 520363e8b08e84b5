"""Training a latent model (formulas in :mod:`.model`): PCA first, then the branches.

Speed (``make bench-latent``: 500,000 rows under a minute on two cores): the principal
directions come from the covariance of at most ``pca_rows`` rows (one float32 product and
a ``D x D`` eigendecomposition: an SVD of the rows took 50 s at 20,000 x 1024), training
is bounded in rows (``max_rounds x round_rows``, whatever the number of rows), with large
batches at a higher peak rate decayed on a cosine over that budget, and early stopping
ends it once ``patience`` rounds bring nothing better.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..trainloop import (
    MIN_STEPS,
    WARMUP,
    EarlyStop,
    rounds,
    sample_rows,
    torch_state,
    torch_threads,
)
from .model import KINDS, LatentModel, principal_directions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatentParams:
    kind: str = "ae"
    dim: int = 64  # latent width
    hidden: int = 256
    lr: float = 3e-3  # peak: warm-up, then a cosine decay over max_rounds x round_rows
    weight_decay: float = 1e-4
    batch_size: int = 1024
    modality_dropout: float = 0.2  # an input hidden from the encoder, still reconstructed
    beta: float = 1.0  # VAE: weight of the KL term (per input coordinate)
    pca_rows: int = 50_000  # rows the principal directions are computed on
    round_rows: int = 50_000
    max_rounds: int = 8
    patience: int = 2
    val_rows: int = 20_000  # validation rows scored each round (a seeded sample)
    seed: int = 0
    threads: int | None = 1  # torch threads (None: torch default): 1 is faster on a busy machine

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"latent kind must be one of {list(KINDS)}, not {self.kind!r}")
        for name in ("dim", "hidden", "batch_size", "pca_rows", "round_rows", "max_rounds",
                     "val_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"latent {name} must be >= 1, not {getattr(self, name)}")
        if not 0 <= self.modality_dropout < 1 or self.beta < 0 or self.lr <= 0:
            raise ValueError("latent modality_dropout must be in [0, 1), beta >= 0, lr > 0")


def _stats(xs: Sequence[np.ndarray], present: Sequence[np.ndarray],
           rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-coordinate mean and deviation of each input over its present sampled rows."""
    mus, sds = [], []
    for x, p in zip(xs, present, strict=True):
        keep = rows[np.asarray(p, bool)[rows]]
        v = np.asarray(x[keep], np.float32) if len(keep) else np.zeros((1, x.shape[1]), np.float32)
        mus.append(v.mean(axis=0))
        sds.append(v.std(axis=0) + 1e-6)
    return np.concatenate(mus), np.concatenate(sds)


def fit_latent(xs: Sequence[np.ndarray], present: Sequence[np.ndarray] | None,
               val: Sequence[np.ndarray], val_present: Sequence[np.ndarray] | None = None,
               params: LatentParams | None = None, progress: bool = False) -> LatentModel:
    """Train on rows of ``xs`` (one array per input, float16 or float32), stop on ``val``.

    ``present[i]``: which rows have input ``i`` (None: all); a row must have at least one.
    """
    import torch
    from torch import nn

    p = params or LatentParams()
    n, dims = len(xs[0]), [int(x.shape[1]) for x in xs]
    present = [np.ones(n, bool) for _ in xs] if present is None else list(present)
    if not len(val[0]):
        raise ValueError("a latent model needs validation rows to stop on")
    if p.dim > sum(dims):
        raise ValueError(f"latent width {p.dim} is wider than its inputs ({sum(dims)})")
    t0 = time.perf_counter()
    rng = np.random.default_rng(p.seed)
    some = sample_rows(n, p.pca_rows, rng)
    mu, sd = _stats(xs, present, some)
    shell = LatentModel(p.kind, dims, _zero_tensors(dims, p, mu, sd))
    s_pca, _, _ = shell.standardise([x[some] for x in xs], [q[some] for q in present])
    shell.tensors["p"] = principal_directions(s_pca, p.dim)
    del s_pca
    vrows = sample_rows(len(val[0]), p.val_rows, rng)
    vs, vflags, vmask = shell.standardise(
        [v[vrows] for v in val], None if val_present is None else [q[vrows] for q in val_present])
    m, d_all = len(dims), sum(dims)
    with torch_threads(p.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        proj = torch.from_numpy(shell.tensors["p"])
        enc = nn.Sequential(nn.Linear(d_all + m, p.hidden), nn.GELU(approximate="tanh"))
        to_z = nn.Linear(p.hidden, p.dim)
        to_logvar = nn.Linear(p.hidden, p.dim) if p.kind == "vae" else None
        dec = nn.Sequential(nn.Linear(p.dim, p.hidden), nn.GELU(approximate="tanh"),
                            nn.Linear(p.hidden, d_all))
        for layer in (to_z, dec[2]):  # the branches start at zero: PCA exactly
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if to_logvar is not None:  # start at sigma = 0.1: a small, trainable noise
            nn.init.zeros_(to_logvar.weight)
            nn.init.constant_(to_logvar.bias, float(np.log(0.01)))
        parts = nn.ModuleDict({"enc": enc, "to_z": to_z, "dec": dec,
                               **({"to_logvar": to_logvar} if to_logvar else {})})
        # A small set gets smaller batches (at least 4 per epoch) and a rate scaled by the
        # square root of the batch (the demo's 204 rows in batches of 1024 at 3e-3 left
        # the latent of a half row nearer other rows' than at 64 and 7.5e-4).
        batch = min(p.batch_size, max(64, n // 4))
        lr = p.lr * math.sqrt(batch / p.batch_size)
        opt = torch.optim.AdamW(parts.parameters(), lr=lr, weight_decay=p.weight_decay)
        total = p.max_rounds * max(MIN_STEPS, min(n, p.round_rows) // batch)
        warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / WARMUP)
                                                 * (0.55 + 0.45 * math.cos(math.pi * min(
                                                     1.0, step / total))))

        def forward(s: torch.Tensor, flags: torch.Tensor, sample: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
            h = enc(torch.cat([s, flags], dim=1))
            z = s @ proj + to_z(h)
            kl = None
            if to_logvar is not None:
                logvar = to_logvar(h)
                kl = -0.5 * (1 + logvar - z ** 2 - logvar.exp()).sum(dim=1).mean()
                if sample:
                    z = z + torch.randn_like(z) * (0.5 * logvar).exp()
            return z @ proj.T + dec(z), kl

        def val_error() -> float:
            parts.eval()
            total = 0.0
            with torch.no_grad():
                for a in range(0, len(vs), 8192):
                    s = torch.from_numpy(vs[a:a + 8192])
                    recon, _ = forward(s, torch.from_numpy(vflags[a:a + 8192]), False)
                    total += float((((recon - s) ** 2) * torch.from_numpy(vmask[a:a + 8192])).sum())
            parts.train()
            return total / max(1.0, float(vmask.sum()))

        stop = EarlyStop(p.patience, val_error(), torch_state(parts))  # round 0: PCA
        rep = torch.tensor(dims)
        for r, batches in enumerate(rounds(n, batch, p.round_rows, p.max_rounds, rng),
                                    start=1):
            for idx in batches:
                s_np, f_np, _ = shell.standardise([x[idx] for x in xs], [q[idx] for q in present])
                s, flags = torch.from_numpy(s_np), torch.from_numpy(f_np)
                target_mask = torch.repeat_interleave(flags, rep, dim=1)
                seen = _dropout(flags, p.modality_dropout, rng)
                recon, kl = forward(s * torch.repeat_interleave(seen, rep, dim=1), seen, True)
                loss = (((recon - s) ** 2) * target_mask).sum() / target_mask.sum().clamp_min(1)
                if kl is not None:
                    loss = loss + p.beta * kl / d_all
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                warm.step()
            done = stop.update(val_error(), lambda: torch_state(parts))
            if progress:
                log.info("latent %s round %d: validation mse %.5f", p.kind, r, stop.history[-1])
            if done:
                break
        parts.load_state_dict(stop.state)
        t = {k: v.detach().numpy() for k, v in parts.state_dict().items()}
    tensors = {**shell.tensors,
               "e1": t["enc.0.weight"].T, "be1": t["enc.0.bias"],
               "e2": t["to_z.weight"].T, "be2": t["to_z.bias"],
               "d1": t["dec.0.weight"].T, "bd1": t["dec.0.bias"],
               "d2": t["dec.2.weight"].T, "bd2": t["dec.2.bias"]}
    if p.kind == "vae":
        tensors |= {"v2": t["to_logvar.weight"].T, "bv2": t["to_logvar.bias"]}
    info = {**stop.summary(), "train_s": round(time.perf_counter() - t0, 3), "rows": n}
    return LatentModel(p.kind, dims, {k: np.ascontiguousarray(v) for k, v in tensors.items()},
                       asdict(p), info=info)


def _dropout(flags: Any, rate: float, rng: np.random.Generator) -> Any:
    """Hide each present input with probability ``rate``, keeping at least one per row."""
    import torch

    if rate == 0 or flags.shape[1] < 2:
        return flags
    keep = torch.from_numpy((rng.random(tuple(flags.shape)) >= rate).astype(np.float32))
    seen = flags * keep
    empty = seen.sum(dim=1) == 0
    seen[empty] = flags[empty]  # every input was hidden: show them all
    return seen


def _zero_tensors(dims: Sequence[int], p: LatentParams, mu: np.ndarray,
                  sd: np.ndarray) -> dict[str, np.ndarray]:
    d, m, h, k = sum(dims), len(dims), p.hidden, p.dim
    z = np.zeros
    t = {"mu": mu, "sd": sd, "p": z((d, k)), "e1": z((d + m, h)), "be1": z(h),
         "e2": z((h, k)), "be2": z(k), "d1": z((k, h)), "bd1": z(h), "d2": z((h, d)),
         "bd2": z(d)}
    if p.kind == "vae":
        t |= {"v2": z((h, k)), "bv2": z(k)}
    return t
