"""A shared latent space over one or several columns: autoencoder or VAE, in numpy at use.

Inputs are standardised per coordinate (training means and deviations), concatenated,
and each input's presence is a 0/1 flag; an absent input is all zeros (its mean), so a
row missing one modality still gets a latent.  With ``k`` the latent width::

    encode   z  = P^T s + E2 gelu(E1 [s, flags] + e1) + e2          (VAE: the mean mu)
    VAE      log sigma^2 = V2 gelu(E1 [s, flags] + e1) + v2
    decode   s' = P z + D2 gelu(D1 z + d1) + d2

``P`` (``D x k``) holds the top principal directions of the standardised training rows,
so with the branches at zero (how training starts) encode/decode *is* PCA of size
``k``; the branches learn what PCA cannot and early stopping on the validation
reconstruction keeps the better one.  Training (:mod:`.train`) minimises, per row,

    AE    sum_j m_j (s_j - s'_j)^2 / sum_j m_j                  (MSE over present inputs)
    VAE   the same at z = mu + sigma * eps, plus beta * KL / D,
          KL = -1/2 sum_k (1 + log sigma_k^2 - mu_k^2 - sigma_k^2)  (to a standard normal)

with modality dropout: an input of a row is hidden from the encoder with probability
``modality_dropout`` (never every input) but is still reconstructed, so the latent of a
row missing it learns to stand in for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..align.adapter import gelu
from ..store import Column

KINDS = ("ae", "vae")


@dataclass
class LatentModel:
    """Weights of a trained latent model and the columns it reads (when bound to a run)."""

    kind: str
    dims: list[int]  # width of each input, in order
    tensors: dict[str, np.ndarray]
    params: dict[str, Any] = field(default_factory=dict)
    inputs: list[Column] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown latent kind {self.kind!r}; known: {list(KINDS)}")
        self.tensors = {k: np.asarray(v, dtype=np.float32) for k, v in self.tensors.items()}
        need = ["mu", "sd", "p", "e1", "be1", "e2", "be2", "d1", "bd1", "d2", "bd2"]
        missing = [k for k in need + (["v2", "bv2"] if self.kind == "vae" else [])
                   if k not in self.tensors]
        if missing or self.tensors["p"].shape[0] != sum(self.dims):
            raise ValueError(f"{self.kind} latent model with missing or mis-shaped tensors "
                             f"{missing or ['p']}")

    @property
    def dim(self) -> int:
        """Width of the latent."""
        return int(self.tensors["p"].shape[1])

    def standardise(self, xs: Sequence[np.ndarray],
                    present: Sequence[np.ndarray] | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(s, flags, mask)``: standardised concatenation with absent inputs zeroed, the
        presence flags ``(n, m)`` and the per-coordinate mask ``(n, D)``."""
        if len(xs) != len(self.dims):
            raise ValueError(f"latent model takes {len(self.dims)} inputs, got {len(xs)}")
        n = len(xs[0])
        flags = np.ones((n, len(xs)), np.float32)
        if present is not None:
            flags = np.stack([np.asarray(p, bool) for p in present], axis=1).astype(np.float32)
        for x, d in zip(xs, self.dims, strict=True):
            if x.shape != (n, d):
                raise ValueError(f"latent input of shape {x.shape}, expected ({n}, {d})")
        mask = np.repeat(flags, self.dims, axis=1)
        s = (np.concatenate([np.asarray(x, np.float32) for x in xs], axis=1)
             - self.tensors["mu"]) / self.tensors["sd"]
        return np.where(mask > 0, s, 0.0).astype(np.float32), flags, mask

    def _hidden(self, s: np.ndarray, flags: np.ndarray) -> np.ndarray:
        t = self.tensors
        return gelu(np.concatenate([s, flags], axis=1) @ t["e1"] + t["be1"])

    def encode_standardised(self, s: np.ndarray, flags: np.ndarray) -> np.ndarray:
        t = self.tensors
        return s @ t["p"] + self._hidden(s, flags) @ t["e2"] + t["be2"]

    def decode_standardised(self, z: np.ndarray) -> np.ndarray:
        t = self.tensors
        return z @ t["p"].T + gelu(z @ t["d1"] + t["bd1"]) @ t["d2"] + t["bd2"]

    def encode(self, xs: Sequence[np.ndarray], present: Sequence[np.ndarray] | None = None,
               chunk: int = 16384) -> np.ndarray:
        """The latent of each row (VAE: the posterior mean), float32 ``(n, dim)``.
        ``present[i]``: which rows have input ``i`` (default: all).

        The standardisation is folded into the first layer and the PCA projection (one
        ``x_i @ W_i`` per input, chunk by chunk): no standardised copy of the rows is made
        (3x faster than standardising first; 500,000 rows are one pass of the stage)."""
        n = len(xs[0])
        if len(xs) != len(self.dims):
            raise ValueError(f"latent model takes {len(self.dims)} inputs, got {len(xs)}")
        for x, d in zip(xs, self.dims, strict=True):
            if x.shape != (n, d):
                raise ValueError(f"latent input of shape {x.shape}, expected ({n}, {d})")
        flags = np.ones((n, len(xs)), np.float32) if present is None else np.stack(
            [np.asarray(p, bool) for p in present], axis=1).astype(np.float32)
        t, (ws, cs) = self.tensors, self._folded()
        h = t["be1"].shape[0]
        out = np.empty((n, self.dim), np.float32)
        for a in range(0, n, chunk):
            f = flags[a:a + chunk]
            acc = f @ t["e1"][-len(xs):]
            acc = np.concatenate([acc + t["be1"], np.zeros((len(f), self.dim), np.float32)], 1)
            for i, (x, w, c) in enumerate(zip(xs, ws, cs)):
                part = np.asarray(x[a:a + chunk], np.float32) @ w
                part -= c
                acc += part * f[:, i:i + 1]
            out[a:a + chunk] = acc[:, h:] + gelu(acc[:, :h]) @ t["e2"] + t["be2"]
        return out

    def _folded(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per input ``i``: ``[E1_i | P_i] / sd_i`` and ``(mu_i / sd_i) @ [E1_i | P_i]``."""
        if getattr(self, "_fold", None) is None:
            t, ws, cs, lo = self.tensors, [], [], 0
            for d in self.dims:
                w = np.concatenate([t["e1"][lo:lo + d], t["p"][lo:lo + d]], axis=1)
                sd, mu = t["sd"][lo:lo + d, None], t["mu"][lo:lo + d]
                ws.append(np.ascontiguousarray(w / sd, np.float32))
                cs.append(((mu / sd[:, 0]) @ w).astype(np.float32))
                lo += d
            self._fold = (ws, cs)
        return self._fold

    def reconstruction_error(self, xs: Sequence[np.ndarray],
                             present: Sequence[np.ndarray] | None = None) -> float:
        """Mean squared error per present standardised coordinate, through the latent."""
        s, flags, mask = self.standardise(xs, present)
        recon = self.decode_standardised(self.encode_standardised(s, flags))
        return float(((recon - s) ** 2 * mask).sum() / max(1.0, mask.sum()))


def pca_error(train: np.ndarray, held_out: np.ndarray, k: int) -> float:
    """Held-out MSE per coordinate of a PCA of size ``k`` fitted on ``train`` (rows already
    standardised the way the latent model sees them): the linear baseline."""
    mean = train.mean(axis=0)
    p = principal_directions(np.asarray(train - mean, np.float32), k)
    c = held_out - mean
    return float(np.mean((c @ p @ p.T - c) ** 2))


def principal_directions(s: np.ndarray, k: int) -> np.ndarray:
    """The top ``k`` principal directions (``D x k``, float32) of rows ``s`` (standardised:
    zero mean), from their covariance: ``s^T s`` in float32, its eigenvectors in float64."""
    cov = (s.T @ s).astype(np.float64)
    _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues
    return np.ascontiguousarray(vecs[:, ::-1][:, :k], np.float32)
