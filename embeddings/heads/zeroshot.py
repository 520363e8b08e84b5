"""CLIP zero-shot classifier: class-name prompts through the text tower, no training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .base import Head
from .logistic import softmax
from .params import param

TEMPLATES: Sequence[str] = ("a drawing of {}.", "a picture of {}.", "an illustration of {}.",
                            "a photo of {}.", "{}")


@dataclass(frozen=True)
class ZeroShotParams:
    templates: tuple[str, ...] = param(TEMPLATES, "prompt templates, '{}' is the class name",
                                       min_len=1)
    logit_scale: float = param(100.0, "softmax temperature on the cosine similarities",
                               above=0)


class ZeroShotHead(Head):
    """CLIP zero-shot classifier: class-name prompts through the text tower, no training.

    Set ``text_encoder`` (anything with ``encode_texts(list[str]) -> normalised array``,
    the encoder of the image column's CLIP model) before ``fit``; the saved head keeps the
    class embeddings, so loading needs no model.
    """

    text_encoder: Any = None

    def _fit(self, xs: list[np.ndarray], ys: list[np.ndarray], val_xs: list[np.ndarray],
             val_ys: list[np.ndarray]) -> None:
        if self.text_encoder is None:
            raise InputError("zero-shot needs the CLIP text tower: set head.text_encoder")
        rows = []
        for name in self.tasks[0].classes:
            prompts = [t.replace("{}", class_prompt(name)) for t in self.params.templates]
            v = np.asarray(self.text_encoder.encode_texts(prompts), dtype=np.float64).mean(0)
            rows.append(v / max(np.linalg.norm(v), 1e-12))
        self.w = np.asarray(rows, dtype=np.float32)
        if self.w.shape[1] != self.dims[0]:
            raise InputError(f"text tower gives {self.w.shape[1]}-d vectors, the image column "
                             f"is {self.dims[0]}-d: not the same CLIP model")

    def _scores(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        x = xs[0] / np.maximum(np.linalg.norm(xs[0], axis=1, keepdims=True), 1e-12)
        return [softmax(self.params.logit_scale * x @ self.w.T)]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"class_embeddings": torch.from_numpy(self.w)}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.w = tensors["class_embeddings"].numpy()


def class_prompt(label: str) -> str:
    """``signs_and_symbols`` -> ``signs and symbols``."""
    return label.replace("_", " ").replace("-", " ").strip()
