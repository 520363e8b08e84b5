"""Torch heads (linear, MLP, early fusion) and late fusion, trained on CPU in seconds.

Every torch head is ``standardise each input -> fuser -> one linear output per task``:

==========  ==========================================================================
linear      one column, a linear layer
mlp         one column, Linear -> GELU -> Dropout, then the output layer
concat      columns concatenated, then a linear layer (``hidden > 0``: an MLP)
sum         y = sum_i a_i P_i x_i: learned modality weights a_i (softmax), per-modality
            projections P_i into one shared space
sum_mlp     the non-linear version f(sum_i a_i P_i x_i), f an MLP
product     element-wise product of the projections prod_i P_i x_i
gated       per-sample modality weights g(x) = softmax(W [x_1..x_m]) over GELU(P_i x_i)
==========  ==========================================================================

Fusions that add or multiply (sum, sum_mlp, product, gated) only combine comparable
coordinates: each input is first mapped by its own learned projection P_i into a shared
``hidden``-wide space: coordinate i of one encoder and coordinate i of another mean
unrelated things even when the widths agree.  ``shared_space=True`` says the inputs
already live in one space (CLIP image and text of one model) and uses the identity
instead (the widths must agree); ``head.info["shared_space"]`` records which was used.
Measured (make bench-heads): with 16-d inputs in unrelated bases the identity ``sum``
lost 6 points to the projected one (tests); with wide inputs it can still score higher
(openclipart MiniLM + LSA, 384-d each: 0.958 identity vs 0.938 projected), because a sum
of two unrelated wide embeddings acts like a random projection of their concatenation,
which keeps a low-dimensional class signal.  It is kept opt-in: whether it works
depends on the data, and identity maps were never asked for.

Training: AdamW on mini-batches (``threads``: None uses torch's default, every core;
measured at 50k x 1024, ``product`` took 6.9 s with two threads and 10.0 s with one on
a quiet 2-core machine; set 1 on a shared one, see ``torch_threads``), early stopping on the
validation loss (best epoch kept), balanced class weights, seeded init and shuffling so a
rerun gives identical weights.
Late fusion lives in :mod:`.late`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .base import Head, Task, torch_state, torch_threads
from .logistic import balanced_weights


class Projections(nn.Module):
    """Per-modality linear maps into one shared space (identity if the inputs share one)."""

    def __init__(self, dims: Sequence[int], width: int, shared: bool) -> None:
        super().__init__()
        self.maps = nn.ModuleList(nn.Identity() if shared else nn.Linear(d, width) for d in dims)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [m(x) for m, x in zip(self.maps, xs, strict=True)]


def mlp(width: int, hidden: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout))


class Fuser(nn.Module):
    """Maps a list of standardised inputs to one representation of width ``out``."""

    def __init__(self, kind: str, dims: Sequence[int], hidden: int, dropout: float,
                 shared_space: bool) -> None:
        super().__init__()
        self.kind = kind
        if kind in ("linear", "mlp", "concat"):
            d = sum(dims)
            self.body = mlp(d, hidden, dropout) if hidden and kind != "linear" else nn.Identity()
            self.out = hidden if hidden and kind != "linear" else d
            return
        if kind not in ("sum", "sum_mlp", "product", "gated"):
            raise ValueError(f"unknown fuser {kind!r}")
        if shared_space and len(set(dims)) > 1:
            raise InputError(f"{kind}: shared_space=True needs inputs of one width, got "
                             f"{list(dims)} (inputs of different widths cannot share a space)")
        width = dims[0] if shared_space else hidden
        self.proj = Projections(dims, width, shared_space)
        if kind in ("sum", "sum_mlp"):
            self.alpha = nn.Parameter(torch.zeros(len(dims)))
            self.body = mlp(width, hidden, dropout) if kind == "sum_mlp" else nn.Identity()
            self.out = hidden if kind == "sum_mlp" else width
        elif kind == "product":
            # Products of several projections vary wildly in scale: normalise them.
            self.body, self.out = nn.Sequential(nn.LayerNorm(width), nn.Dropout(dropout)), width
        else:
            self.gate = nn.Linear(sum(dims), len(dims))
            self.body, self.out = nn.Dropout(dropout), width

    def weights(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """Modality weights, ``(m,)`` for sum fusions or ``(n, m)`` per sample for gated."""
        if self.kind == "gated":
            return torch.softmax(self.gate(torch.cat(xs, dim=1)), dim=1)
        return torch.softmax(self.alpha, dim=0) * len(xs)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        if self.kind in ("linear", "mlp", "concat"):
            return self.body(torch.cat(xs, dim=1))
        zs = self.proj(xs)
        if self.kind == "product":
            return self.body(math.prod(zs))
        if self.kind == "gated":
            g = self.weights(xs)
            return self.body(sum(g[:, i : i + 1] * F.gelu(z) for i, z in enumerate(zs)))
        a = self.weights(xs)
        return self.body(sum(a[i] * z for i, z in enumerate(zs)))


class Net(nn.Module):
    def __init__(self, fuser: Fuser, dims: Sequence[int], tasks: Sequence[Task]) -> None:
        super().__init__()
        for i, d in enumerate(dims):  # standardisation, saved with the weights
            self.register_buffer(f"mean{i}", torch.zeros(d))
            self.register_buffer(f"scale{i}", torch.ones(d))
        self.n = len(dims)
        self.fuser = fuser
        self.outs = nn.ModuleList(nn.Linear(fuser.out, len(t.classes)) for t in tasks)

    def standardised(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [(x - getattr(self, f"mean{i}")) / getattr(self, f"scale{i}")
                for i, x in enumerate(xs)]

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        h = self.fuser(self.standardised(xs))
        return [o(h) for o in self.outs]


class TorchHead(Head):
    """A :class:`Net` trained with AdamW and early stopping on the validation loss."""

    def __init__(self, tasks: Sequence[Task], dims: Sequence[int], **params: Any) -> None:
        super().__init__(tasks, dims, **params)
        p = self.params
        if "project" in p:  # heads saved before shared_space: identity sum on equal widths
            p["shared_space"] = (not p.pop("project") and p["fuser"] in ("sum", "sum_mlp")
                                 and len(set(self.dims)) == 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p["seed"])
            fuser = Fuser(p["fuser"], self.dims, p["hidden"], p["dropout"], p["shared_space"])
            self.net = Net(fuser, self.dims, self.tasks)

    def _fit(self, xs: list[np.ndarray], ys: list[np.ndarray], val_xs: list[np.ndarray],
             val_ys: list[np.ndarray]) -> None:
        p = self.params
        for i, x in enumerate(xs):
            if p["standardise"]:
                getattr(self.net, f"mean{i}").copy_(torch.from_numpy(x.mean(axis=0)))
                getattr(self.net, f"scale{i}").copy_(
                    torch.from_numpy(np.maximum(x.std(axis=0), 1e-6)))
        weights = [torch.from_numpy(balanced_weights(y, len(t.classes)))
                   if p["class_weights"] and not t.multilabel else None
                   for t, y in zip(self.tasks, ys, strict=True)]
        tx, ty = _tensors(xs), _tensors(ys)
        vx, vy = _tensors(val_xs), _tensors(val_ys)
        opt = torch.optim.AdamW(self.net.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
        gen = torch.Generator().manual_seed(p["seed"])
        best, best_state, bad, epochs = math.inf, torch_state(self.net), 0, 0
        with torch.random.fork_rng(devices=[]), torch_threads(p["threads"]):
            torch.manual_seed(p["seed"])  # dropout masks
            for epoch in range(1, p["max_epochs"] + 1):
                self.net.train()
                epochs = epoch
                for idx in torch.randperm(len(tx[0]), generator=gen).split(p["batch_size"]):
                    loss = self._loss([x[idx] for x in tx], [y[idx] for y in ty], weights)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                self.net.eval()
                with torch.no_grad():
                    val = float(self._loss(vx, vy, weights))
                if val < best - 1e-4:
                    best, best_state, bad = val, torch_state(self.net), 0
                else:
                    bad += 1
                    if bad >= p["patience"]:
                        break
        self.net.load_state_dict(best_state)
        self.info = {"epochs": epochs, "best_val_loss": best}
        if p["fuser"] in ("sum", "sum_mlp", "product", "gated"):
            self.info["shared_space"] = bool(p["shared_space"])  # identity maps if true
        if p["fuser"] in ("sum", "sum_mlp", "gated"):
            with torch.no_grad():
                w = self.net.fuser.weights(self.net.standardised(vx))
            self.info["modality_weights"] = [round(float(v), 4) for v in
                                             (w.mean(0) if w.ndim == 2 else w / len(xs))]

    def _loss(self, xs: list[torch.Tensor], ys: list[torch.Tensor],
              weights: list[torch.Tensor | None]) -> torch.Tensor:
        total = torch.zeros(())
        for task, out, y, w in zip(self.tasks, self.net(xs), ys, weights, strict=True):
            # Multi-label: summed over labels (per sample), on the scale of a softmax loss.
            total = total + (F.binary_cross_entropy_with_logits(out, y, reduction="sum") / len(y)
                             if task.multilabel else F.cross_entropy(out, y, weight=w))
        return total

    def _scores(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        self.net.eval()
        with torch.no_grad():
            outs = self.net(_tensors(xs))
        return [(torch.sigmoid(o) if t.multilabel else torch.softmax(o, dim=1)).numpy()
                for t, o in zip(self.tasks, outs, strict=True)]

    def tensors(self) -> dict[str, torch.Tensor]:
        return torch_state(self.net)

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.net.load_state_dict(dict(tensors))


def _tensors(arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


TORCH = dict(hidden=256, dropout=0.1, shared_space=False, lr=3e-3, weight_decay=1e-4,
             batch_size=512, max_epochs=200, patience=3, standardise=True, class_weights=True,
             threads=None, seed=0)
# name -> (inputs, doc); registered in the package __init__ with TORCH defaults.
KINDS: dict[str, tuple[str, str]] = {
    "linear": ("one", "a linear layer (torch)"),
    "mlp": ("one", "Linear-GELU-Dropout then a linear output (torch)"),
    "concat": ("many", "early fusion: concatenation then a linear layer"),
    "sum": ("many", "early fusion: learned weighted sum of modalities projected to one space"),
    "sum_mlp": ("many", "early fusion: MLP on the learned weighted sum"),
    "product": ("many", "early fusion: element-wise product of projections"),
    "gated": ("many", "early fusion: per-sample modality gates over projections"),
}


def defaults(kind: str) -> dict[str, Any]:
    linear = kind in ("linear", "concat")  # no hidden layer: a larger step is safe
    return {**TORCH, "fuser": kind, "hidden": 0 if linear else TORCH["hidden"],
            "lr": 1e-2 if linear else TORCH["lr"]}
