"""Cheap CPU building blocks of the torch heads.

:class:`Dropout` is ``nn.Dropout`` with its mask drawn from random bytes, eight to one
64-bit draw: torch's CPU ``bernoulli_`` draws one random number per element, which made
dropout on a 512 x 1,089 batch (``bilinear``'s outer product) cost 4.4 ms forward and
backward, more than the output layer's matmul; the byte mask costs 2.1 ms.  The keep
probability is rounded to 1/256 (p = 0.1 drops 26/256 = 10.2 %).  Like every draw of
the heads it comes from torch's seeded generator, so a fixed seed gives the same masks.
"""

from __future__ import annotations

import torch
from torch import nn


class Dropout(nn.Module):
    """Zero each element with chance ``p`` (in 1/256 steps) while training; scale the
    rest up so the expected value is unchanged."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.drop = round(p * 256)  # bytes below this are dropped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.drop:
            return x
        n = x.numel()
        draws = torch.randint(-2**63, 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64)
        keep = draws.view(torch.uint8)[:n].view(x.shape) >= self.drop
        return x * (keep.to(x.dtype) * (256 / (256 - self.drop)))

    def extra_repr(self) -> str:
        return f"p={self.p}"
