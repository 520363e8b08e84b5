"""The ``open_clip`` encoder (image and text towers), and the tiny random test model.

Imported only when an open_clip model is loaded (:mod:`embeddings.encoders` registers it
by module name), so commands that need no CLIP model never import open_clip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .encoder_base import (
    OFFLINE_HINT,
    EncoderSpec,
    file_digest,
    hub_cached,
    hub_file,
    hub_reachable,
    normalised,
)
from .errors import WeightsUnavailable
from .store import Provenance

HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


class OpenClipEncoder:
    """Image and text towers of an open_clip model (hub tag or ``local-dir:``)."""

    modalities = ("image", "text")

    def __init__(self, spec: EncoderSpec, device: torch.device) -> None:
        import open_clip

        self.spec, self.device = spec, device
        self.weights: dict[str, Any] = _check_open_clip_weights(spec)
        self.model, _, self.image_transform = open_clip.create_model_and_transforms(
            spec.model, pretrained=None if _is_local(spec.model) else spec.pretrained,
            device=device)
        self.model.eval()
        if device.type == "cuda":  # float16 weights: the fast path hands float16 pixels
            self.model.half()
        if "weights_sha256" not in self.weights:  # hub weights: hash the cached file loaded
            repo = self.weights.get("weights_source", "")
            cached = hub_file(repo, HUB_WEIGHTS) if repo else None
            if cached is not None:
                self.weights["weights_sha256"] = file_digest(cached)
        self._tokenizer: Any = None
        self.dim = int(open_clip.get_model_config(spec.model)["embed_dim"])
        # The model's context length is the one its tokenizer is made with (open_clip
        # passes text_cfg's to both): an image query never loads the tokenizer.
        length = getattr(self.model, "context_length", None)
        self.context_length = int(length if isinstance(length, int) else
                                  getattr(self.tokenizer, "context_length", 77))

    @property
    def tokenizer(self) -> Any:
        """Loaded on first use (a quarter of a second, and only text needs it)."""
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.spec.model)
        return self._tokenizer

    def provenance(self) -> Provenance:
        pp = dict(getattr(self.model.visual, "preprocess_cfg", {}))
        return Provenance(
            type=self.spec.type, model=self.spec.model, dim=self.dim,
            pretrained=self.spec.pretrained, **self.weights,
            preprocess={k: list(v) if isinstance(v, tuple) else v for k, v in pp.items()},
            text_context_length=self.context_length, transform=repr(self.image_transform))

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        with _autocast(self.device):
            return normalised(self.model.encode_image(pixels.to(self.device, non_blocking=True)))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        # Length-sorted batches, tokenised ahead of the model off the critical path, padding
        # trimmed where that is exact (embeddings.decode_text); rows back in input order.
        # The tokenizer truncates to the context length (77 for CLIP); the full text is kept
        # in the shard.
        from .decode_text import can_trim, encode_trimmed, tokenised_batches, trim_padding

        out = np.zeros((len(texts), self.dim), np.float32)
        trim = can_trim(self.model, self.tokenizer)
        for idx, tokens in tokenised_batches(self.tokenizer, texts, batch_size, self.device):
            tokens = tokens.to(self.device, non_blocking=True)
            with _autocast(self.device):
                x = (encode_trimmed(self.model, trim_padding(tokens)) if trim
                     else self.model.encode_text(tokens))
            out[idx] = normalised(x)
        return out


def _is_local(model: str) -> bool:
    return model.startswith("local-dir:")


def _check_open_clip_weights(spec: EncoderSpec) -> dict[str, Any]:
    """Fail fast, before any download attempt, when the weights cannot be had."""
    import open_clip

    if _is_local(spec.model):
        path = Path(spec.model[len("local-dir:"):])
        weights = sorted(path.glob("open_clip_model.safetensors")) or sorted(path.glob("*.bin"))
        if not (path / "open_clip_config.json").is_file() or not weights:
            raise WeightsUnavailable(
                f"{spec.model}: expected open_clip_config.json and open_clip_model.safetensors "
                f"in {path}. {OFFLINE_HINT}")
        return {"weights_source": str(weights[0]), "weights_sha256": file_digest(weights[0])}
    if spec.model not in open_clip.list_models():
        raise WeightsUnavailable(f"unknown open_clip model {spec.model!r}. {OFFLINE_HINT}")
    if not spec.pretrained:
        raise WeightsUnavailable(
            f"open_clip model {spec.model!r} needs a pretrained tag (random weights are only "
            f"used through an explicit local-dir: model). Tags: "
            f"{open_clip.list_pretrained_tags_by_model(spec.model)}")
    cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained)
    if not cfg:
        raise WeightsUnavailable(
            f"unknown pretrained tag {spec.pretrained!r} for {spec.model}; known tags: "
            f"{open_clip.list_pretrained_tags_by_model(spec.model)}")
    repo = cfg.get("hf_hub", "").strip("/")
    cached = bool(repo) and hub_cached(repo, HUB_WEIGHTS)
    if not cached and not hub_reachable():
        raise WeightsUnavailable(
            f"cannot get pretrained weights {spec.model}/{spec.pretrained}: the model hub is "
            f"unreachable and they are not in the local cache. {OFFLINE_HINT}")
    return {"weights_source": repo or cfg.get("url", "")}


def make(spec: EncoderSpec, device: torch.device) -> OpenClipEncoder:
    return OpenClipEncoder(spec, device)


# ------------------------------------------------------------------ tiny test model

TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                   "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 2},
}


def write_tiny_open_clip(out_dir: str | os.PathLike, seed: int = 0,
                         model_cfg: dict[str, Any] | None = None) -> Path:
    """Write a *random* open_clip model in ``local-dir:`` format (tiny by default).

    Deterministic for a given seed.  Its embeddings carry no meaning: use it to test the
    pipeline offline (or, with a full-size ``model_cfg``, to benchmark), never as a model.
    """
    import open_clip
    import safetensors.torch
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = model_cfg or TINY_CONFIG
    out = Path(out_dir)
    with _rng(seed):
        model = open_clip.CLIP(**cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        tmp.chmod(0o755)
        (tmp / "open_clip_model.safetensors").write_bytes(safetensors.torch.save(  # OSError
            {k: v.contiguous() for k, v in model.state_dict().items()}))  # on a full disk
        preprocess = {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
        (tmp / "open_clip_config.json").write_text(
            json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2))
        (tmp / "README.md").write_text(
            "open_clip model with RANDOM weights, written by `python -m pipeline tiny-model`"
            f" (seed {seed}).\nFor offline smoke tests only: its embeddings mean nothing.\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextlib.contextmanager
def _rng(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
