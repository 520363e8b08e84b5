"""What every encoder shares: its spec, its protocol, weight digests and the model hub probes.

Imports nothing heavy at module level (no torch, no model library): the command line
reads :class:`EncoderSpec` from the config before it knows which models it will need.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .store import Provenance

OFFLINE_HINT = (
    "To run offline, put the weights on disk and use model='local-dir:/path/to/dir' "
    "(open_clip's format: open_clip_config.json + open_clip_model.safetensors), or for a "
    "smoke test write the tiny random model with `python -m pipeline tiny-model` and use "
    "configs/offline.toml."
)


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder of a run: ``name`` prefixes its embedding columns (``clip_image``)."""

    name: str
    type: str
    model: str
    pretrained: str | None = None


class Encoder(Protocol):
    spec: EncoderSpec
    modalities: tuple[str, ...]  # subset of ("image", "text")
    dim: int
    image_transform: Callable[[Any], torch.Tensor] | None

    def provenance(self) -> Provenance: ...
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray: ...
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray: ...


def is_local_model(model: str) -> bool:
    """Whether ``model`` names code or files on this machine (``pkg:MODULE``,
    ``local-dir:PATH``, a path) rather than a model hub name: such a model is loaded only
    when the user's own config names it (see :func:`embeddings.encoders.encoder_for_column`)."""
    if model.startswith(("pkg:", "local-dir:")):
        return True
    return model.startswith((".", "/", "~")) or (os.sep in model and Path(model).exists())


@functools.lru_cache(maxsize=32)
def _digest_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a weights file (cached per process: search and serve hash once)."""
    st = Path(path).stat()
    return _digest_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def hub_file(repo_id: str, filenames: Sequence[str]) -> Path | None:
    """The cached file of a hub repo that a library loaded weights from, if any."""
    from huggingface_hub import try_to_load_from_cache

    for f in filenames:
        hit = try_to_load_from_cache(repo_id, f)
        if isinstance(hit, str):
            return Path(hit)
    return None


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_cached(repo_id: str, filenames: Sequence[str]) -> bool:
    return hub_file(repo_id, filenames) is not None


def normalised(x: torch.Tensor) -> np.ndarray:
    """L2-normalised float32 numpy rows."""
    import torch.nn.functional as F

    return F.normalize(x.float(), dim=-1).cpu().numpy()
