"""The torch heads' bodies ("fusers") and their declared parameters, one class per kind.

Every torch head is ``standardise each input -> augment (training only) -> fuser -> one
linear output per task``; the fuser maps the list of standardised inputs to one vector:

==========  ==========================================================================
linear      one column, nothing (the output layer is the model)
mlp         one column, ``hidden`` Linear -> GELU -> Dropout layers (e.g. [128, 64])
concat      columns concatenated, then ``hidden`` layers (none: a linear model)
sum         y = sum_i a_i P_i x_i: learned modality weights a_i (softmax), per-modality
            projections P_i into one shared ``width``-wide space
sum_mlp     the non-linear version f(sum_i a_i P_i x_i), f the ``hidden`` layers
product     element-wise product of the projections prod_i P_i x_i (then LayerNorm)
gated       per-sample modality weights g(x) = softmax(W [x_1..x_m]) over GELU(P_i x_i)
attention   each modality a token P_i x_i + e_i; ``layers`` pre-norm self-attention
            blocks (``heads`` heads), then a learned query attends over the tokens
bilinear    low-rank outer-product fusion (Hate-CLIPper's cross fusion, with the linear
            terms): vec([U_i x_i; 1] [U_j x_j; 1]^T) for each pair, LayerNorm, beside
            the inputs themselves (``skip``), then ``hidden``
==========  ==========================================================================

Fusions that add or multiply (sum, sum_mlp, product, gated) only combine comparable
coordinates: each input is first mapped by its own learned projection P_i into a shared
space: coordinate i of one encoder and coordinate i of another mean unrelated things
even when the widths agree.  ``shared_space=True`` says the inputs already live in one
space (CLIP image and text of one model) and uses the identity instead (the widths must
agree); ``head.info["shared_space"]`` records which was used.  Measured (make
bench-heads): with 16-d inputs in unrelated bases the identity ``sum`` lost 6 points to
the projected one (tests); with wide inputs it can still score higher, because a sum of
two unrelated wide embeddings acts like a random projection of their concatenation.

Each kind declares its parameters as a dataclass (:mod:`.params`); what a kind does not
declare, it does not take.  Late fusion and stacking live in :mod:`.late` and
:mod:`.stack`; the training loop in :mod:`.torch_heads`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .ops import Dropout
from .params import ParamError, param

# ------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class TrainParams:
    """What every torch head takes: optimiser, schedule, augmentation, threads, seed."""

    optimizer: str = param("auto", "sgd (Nesterov momentum 0.9), adamw, lbfgs (full batch), "
                           "probe (linear single-label heads: the logistic probe's solver "
                           "and L2 sweep), or auto: probe (or lbfgs) for linear heads on "
                           "one batch of rows, sgd for other linear heads, adamw for the "
                           "rest", choices=("auto", "adamw", "sgd", "lbfgs", "probe"))
    lr: float | None = param(None, "learning rate (default: sgd 1 / the largest variance "
                             "of the standardised inputs along one direction; adamw 1e-2 "
                             "for linear heads, 3e-3 for the others)", above=0)
    weight_decay: float = param(1e-4, "decoupled weight decay (L2 with sgd)", low=0)
    batch_size: int = param(512, "rows per step (at most the training rows)", low=1)
    min_steps: int = param(300, "optimiser steps at least, whatever the rows/batch ratio",
                           low=0)
    schedule: str = param("cosine", "cosine: the learning rate falls to zero over a budget of "
                          "epochs (after a 5 % warm-up); constant: it stays, and early "
                          "stopping ends training", choices=("cosine", "constant"))
    epochs: float = param(3.0, "cosine: passes over the training rows (min_steps wins)",
                          above=0)
    max_epochs: int = param(200, "constant: passes over the training rows at most "
                            "(min_steps wins)", low=1)
    patience: int = param(100, "constant: stop after this many steps without a better "
                          "validation loss (the best weights are kept)", low=1)
    standardise: bool = param(True, "standardise each input on the train rows")
    class_weights: bool = param(False, "balanced class weights for single-label tasks (they "
                                "trade accuracy for the rare classes' recall)")
    noise: float = param(0.0, "augmentation: Gaussian noise of this std (standardised units) "
                         "added to the inputs while training", low=0)
    threads: int | None = param(None, "torch threads (default: one for small problems, "
                                "every core for large ones)", low=1)
    seed: int = param(0, "seed of the initial weights, batches, dropout and augmentation")


@dataclass(frozen=True)
class FusionParams(TrainParams):
    modality_dropout: float = param(0.0, "augmentation: chance that a training row loses a "
                                    "modality (set to its mean; one is always kept)",
                                    low=0, high=0.95)


@dataclass(frozen=True)
class LinearParams(TrainParams):
    pass


@dataclass(frozen=True)
class MLPParams(TrainParams):
    hidden: tuple[int, ...] = param((256,), "widths of the hidden layers, e.g. [128, 64]",
                                    low=1, min_len=1)
    dropout: float = param(0.1, "dropout after each hidden layer", low=0, high=0.95)


@dataclass(frozen=True)
class ConcatParams(FusionParams):
    hidden: tuple[int, ...] = param((), "widths of hidden layers after the concatenation "
                                    "([]: a linear model)", low=1)
    dropout: float = param(0.1, "dropout after each hidden layer", low=0, high=0.95)


@dataclass(frozen=True)
class ProjectedParams(FusionParams):
    width: int = param(256, "width of the shared space the inputs are projected into", low=1)
    dropout: float = param(0.1, "dropout on the fused vector", low=0, high=0.95)
    shared_space: bool = param(False, "the inputs already share one space (CLIP image + "
                               "text of one model): identity instead of projections")


@dataclass(frozen=True)
class SumMLPParams(ProjectedParams):
    hidden: tuple[int, ...] = param((256,), "widths of the hidden layers after the sum",
                                    low=1, min_len=1)


@dataclass(frozen=True)
class AttentionParams(FusionParams):
    width: int = param(96, "token width (each modality is projected to one token)", low=1)
    heads: int = param(4, "attention heads (must divide width)", low=1)
    layers: int = param(1, "self-attention blocks before the learned-query pooling",
                        low=1, high=4)
    dropout: float = param(0.0, "dropout in the attention blocks (0.1 slowed training "
                           "without a gain on the benchmark)", low=0, high=0.95)

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ParamError(f"[heads.params.attention] width {self.width} must be a multiple "
                             f"of heads {self.heads}")


@dataclass(frozen=True)
class BilinearParams(FusionParams):
    rank: int = param(16, "width of each modality's projection before the outer product "
                      "((rank + 1)^2 features per pair of modalities)", low=1, high=128)
    skip: bool = param(True, "also hand the standardised inputs themselves to the output "
                       "layer: the interactions add to a linear model")
    hidden: tuple[int, ...] = param((), "widths of hidden layers after the outer product",
                                    low=1)
    dropout: float = param(0.1, "dropout on the outer-product features", low=0, high=0.95)


# --------------------------------------------------------------------------- modules

def layers(width: int, hidden: Sequence[int], dropout: float) -> nn.Module:
    """``Linear -> GELU -> Dropout`` per hidden width (none: the identity)."""
    mods: list[nn.Module] = []
    for h in hidden:
        mods += [nn.Linear(width, h), nn.GELU(), Dropout(dropout)]
        width = h
    return nn.Sequential(*mods)


def out_width(width: int, hidden: Sequence[int]) -> int:
    return hidden[-1] if hidden else width


class Fuser(nn.Module):
    """Maps a list of standardised inputs to one ``out``-wide representation."""

    linear: ClassVar[bool] = False  # no non-linearity: a larger default step is safe
    out: int

    def weights(self, xs: list[torch.Tensor]) -> torch.Tensor | None:
        """Modality weights, ``(m,)`` or ``(n, m)`` per sample; None if the kind has none."""
        return None

    def describe(self) -> dict[str, Any]:
        return {}


class Concat(Fuser):
    """linear / mlp / concat: the inputs side by side, then ``hidden`` layers."""

    def __init__(self, dims: Sequence[int], p: Any) -> None:
        super().__init__()
        hidden = getattr(p, "hidden", ())
        self.body = layers(sum(dims), hidden, getattr(p, "dropout", 0.0))
        self.out = out_width(sum(dims), hidden)
        self.linear = not hidden  # type: ignore[misc]

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.body(torch.cat(xs, dim=1))


class Projections(nn.Module):
    """Per-modality linear maps into one shared space (identity if the inputs share one)."""

    def __init__(self, dims: Sequence[int], width: int, shared: bool) -> None:
        super().__init__()
        self.maps = nn.ModuleList(nn.Identity() if shared else nn.Linear(d, width) for d in dims)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [m(x) for m, x in zip(self.maps, xs, strict=True)]


class Projected(Fuser):
    """Base of the fusions that add or multiply projections into one space."""

    def __init__(self, dims: Sequence[int], p: ProjectedParams) -> None:
        super().__init__()
        if p.shared_space and len(set(dims)) > 1:
            raise InputError(f"shared_space=True needs inputs of one width, got {list(dims)} "
                             f"(inputs of different widths cannot share a space)")
        self.shared = p.shared_space
        self.width = dims[0] if p.shared_space else p.width
        self.proj = Projections(dims, self.width, p.shared_space)

    def describe(self) -> dict[str, Any]:
        return {"shared_space": bool(self.shared)}  # identity maps if true


class Sum(Projected):
    def __init__(self, dims: Sequence[int], p: ProjectedParams) -> None:
        super().__init__(dims, p)
        self.alpha = nn.Parameter(torch.zeros(len(dims)))
        hidden = getattr(p, "hidden", ())  # sum_mlp
        self.body = layers(self.width, hidden, p.dropout)
        self.out = out_width(self.width, hidden)

    def weights(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.softmax(self.alpha, dim=0)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        a = self.weights(xs) * len(xs)
        return self.body(sum(a[i] * z for i, z in enumerate(self.proj(xs))))


class Product(Projected):
    def __init__(self, dims: Sequence[int], p: ProjectedParams) -> None:
        super().__init__(dims, p)
        # Products of several projections vary wildly in scale: normalise them.
        self.body = nn.Sequential(nn.LayerNorm(self.width), Dropout(p.dropout))
        self.out = self.width

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.body(math.prod(self.proj(xs)))


class Gated(Projected):
    def __init__(self, dims: Sequence[int], p: ProjectedParams) -> None:
        super().__init__(dims, p)
        self.gate = nn.Linear(sum(dims), len(dims))
        self.body, self.out = Dropout(p.dropout), self.width

    def weights(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.softmax(self.gate(torch.cat(xs, dim=1)), dim=1)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        g = self.weights(xs)
        return self.body(sum(g[:, i : i + 1] * F.gelu(z)
                             for i, z in enumerate(self.proj(xs))))


def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) over a handful of tokens: ``(n, queries, heads, d)`` and
    ``(n, keys, heads, d)`` in, ``(n, queries, keys, heads)`` out.  By broadcasting, in
    the token-major layout the projections produce (no permuted copies): with two or
    three tokens a product and a sum beat batched matmuls and the fused kernels (which
    copy and tile for long sequences)."""
    return torch.softmax((q[:, :, None] * k[:, None]).sum(-1) / q.shape[-1] ** 0.5, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           drop: nn.Module | None = None) -> torch.Tensor:
    """Attention of queries over a handful of tokens: ``(n, queries, heads, d)`` out."""
    a = scores(q, k)
    return ((drop(a) if drop is not None else a)[..., None] * v[:, None]).sum(2)


class SelfAttention(nn.Module):
    """A small pre-norm multi-head self-attention block over the modality tokens (no
    feed-forward: with a handful of tokens the projections are the work; torch's
    TransformerEncoderLayer took about twice the time per step, 47 vs 24 ms at width 128
    and batch 512 on one thread)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm, self.qkv = nn.LayerNorm(width), nn.Linear(width, 3 * width)
        self.proj, self.drop = nn.Linear(width, width), Dropout(dropout)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        n, m, w = t.shape
        q, k, v = self.qkv(self.norm(t)).view(n, m, 3, self.heads, -1).unbind(2)
        o = attend(q, k, v, self.drop)  # (n, m, heads, d): tokens stay in place
        return t + self.drop(self.proj(o.reshape(n, m, w)))


class Attention(Fuser):
    """Modality vectors as tokens (projection + a learned modality embedding), ``layers``
    self-attention blocks, then a learned query attends over the tokens (multi-head
    attention with queries, keys and values over the modality vectors)."""

    def __init__(self, dims: Sequence[int], p: AttentionParams) -> None:
        super().__init__()
        w, self.heads = p.width, p.heads
        self.proj = Projections(dims, w, shared=False)
        self.modality = nn.Parameter(0.02 * torch.randn(len(dims), w))  # which token is which
        self.blocks = nn.Sequential(*(SelfAttention(w, p.heads, p.dropout)
                                      for _ in range(p.layers)))
        self.query = nn.Parameter(0.02 * torch.randn(p.heads, w // p.heads))
        self.norm, self.kv = nn.LayerNorm(w), nn.Linear(w, 2 * w)
        self.out_proj, self.out_norm = nn.Linear(w, w), nn.LayerNorm(w)
        self.out = w

    def _tokens(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the tokens after the self-attention blocks, (n, m, heads, d)."""
        t = self.blocks(torch.stack(self.proj(xs), dim=1) + self.modality)
        n, m, _ = t.shape
        k, v = self.kv(self.norm(t)).view(n, m, 2, self.heads, -1).unbind(2)
        return k, v

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        k, v = self._tokens(xs)
        o = attend(self.query[None, None], k, v)  # (n, 1, heads, d)
        return self.out_norm(self.out_proj(o.reshape(len(k), self.out)))

    def weights(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """(n, m): the learned query's attention over the modalities, heads averaged."""
        k, _ = self._tokens(xs)
        return scores(self.query[None, None], k).mean(-1)[:, 0]


class Bilinear(Fuser):
    """Low-rank outer-product fusion: every pair of modalities, ``[U_i x_i; 1]`` times
    ``[U_j x_j; 1]^T`` flattened (bilinear, linear and constant terms), then LayerNorm."""

    def __init__(self, dims: Sequence[int], p: BilinearParams) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(d, p.rank) for d in dims)
        self.pairs = list(itertools.combinations(range(len(dims)), 2))
        width = len(self.pairs) * (p.rank + 1) ** 2
        self.norm, self.drop = nn.LayerNorm(width), Dropout(p.dropout)
        self.skip = p.skip
        width += sum(dims) if p.skip else 0
        self.body = layers(width, p.hidden, p.dropout)
        self.out = out_width(width, p.hidden)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        ones = xs[0].new_ones(len(xs[0]), 1)
        ps = [torch.cat([u(x), ones], dim=1) for u, x in zip(self.proj, xs, strict=True)]
        z = torch.cat([(ps[i][:, :, None] * ps[j][:, None, :]).flatten(1)
                       for i, j in self.pairs], dim=1)
        z = self.drop(self.norm(z))
        return self.body(torch.cat([z, *xs], dim=1) if self.skip else z)


@dataclass(frozen=True)
class Kind:
    """A registered torch head: its fuser, parameter defaults, inputs and a one-line doc."""

    fuser: type[Fuser]
    params: Any
    inputs: str
    doc: str


KINDS: dict[str, Kind] = {
    "linear": Kind(Concat, LinearParams(), "one", "a linear layer (torch)"),
    "mlp": Kind(Concat, MLPParams(), "one", "hidden Linear-GELU-Dropout layers, then a linear "
                "output (torch)"),
    "concat": Kind(Concat, ConcatParams(), "many", "early fusion: concatenation then a linear "
                   "layer (or hidden layers)"),
    "sum": Kind(Sum, ProjectedParams(), "many", "early fusion: learned weighted sum of "
                "modalities projected to one space"),
    "sum_mlp": Kind(Sum, SumMLPParams(), "many", "early fusion: MLP on the learned weighted "
                    "sum"),
    "product": Kind(Product, ProjectedParams(), "many", "early fusion: element-wise product "
                    "of projections"),
    "gated": Kind(Gated, ProjectedParams(), "many", "early fusion: per-sample modality gates "
                  "over projections"),
    "attention": Kind(Attention, AttentionParams(), "many", "attention fusion: modality "
                      "tokens, self-attention, a learned query pools them"),
    "bilinear": Kind(Bilinear, BilinearParams(), "many", "low-rank outer-product fusion "
                     "(Hate-CLIPper style)"),
}
