"""Text side of the embed engine: length-sorted batches, tokenised ahead, padding trimmed.

open_clip's CLIP tokeniser is pure Python (about 5,000 captions/s on one loaded core),
slower than a GPU text tower, so it runs off the critical path: in a thread that stays
a few batches ahead of the model, or in DataLoader worker processes when there is a GPU
and enough batches to pay for starting them.  Batches are cut from captions sorted by
length, and each batch's trailing padding is cut off before the model: with CLIP's
causal mask and end-of-text pooling, the padding never influences the pooled token, so
the vectors are the same (to float rounding) while a 20-token batch costs 20, not 77.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .decode_base import prefetch

MIN_BATCHES_FOR_WORKERS = 8


def length_sorted_batches(texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Positions of ``texts`` cut into batches of similar length, longest first."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class _Tokenised(Dataset):
    def __init__(self, tokenizer: Any, texts: Sequence[str], batches: list[list[int]]) -> None:
        self.tokenizer, self.texts, self.batches = tokenizer, texts, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[list[int], torch.Tensor]:
        idx = self.batches[k]
        return idx, self.tokenizer([self.texts[i] for i in idx])


def tokenised_batches(tokenizer: Any, texts: Sequence[str], batch_size: int,
                      device: torch.device) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``(positions, tokens)`` per length-sorted batch, tokenised ahead of the caller."""
    batches = length_sorted_batches(texts, batch_size)
    workers = 0
    if device.type == "cuda" and len(batches) >= MIN_BATCHES_FOR_WORKERS:
        workers = min(os.cpu_count() or 1, 8)
    loader = DataLoader(_Tokenised(tokenizer, texts, batches), batch_size=None,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    return prefetch(iter(loader), torch.device("cpu"))


def trim_padding(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Drop the columns after the last non-padding token of any row."""
    used = (tokens != pad_id).any(dim=0).nonzero()
    return tokens[:, : int(used.max()) + 1] if len(used) else tokens[:, :1]


def can_trim(model: Any, tokenizer: Any) -> bool:
    """True for open_clip's own CLIP text tower (causal mask, pooled at end-of-text) with
    its zero-padding tokenizer: the case where :func:`encode_trimmed` is exact."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    return (type(model) is open_clip.CLIP and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", "") in ("argmax", "eos", "first")
            and isinstance(tokenizer, SimpleTokenizer))


def encode_trimmed(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` for tokens shorter than the context: open_clip's
    ``CLIP.encode_text`` with the positional embedding and mask cut to the length."""
    from open_clip.transformer import text_global_pool

    n = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:n].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type,
                         eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        if isinstance(model.text_projection, torch.nn.Linear):
            return model.text_projection(x)
        return x @ model.text_projection
    return x
