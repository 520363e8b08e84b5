"""Run configuration: a TOML file (plus command-line overrides) -> frozen dataclasses.

One file configures every stage of a run; each stage reads its own section::

    out = "runs/demo"            # run directory shared by all stages
    [data]                       # what to embed (see embeddings.records)
    path = "data/demo/manifest.csv"
    [embed]                      # device, batch_size, workers, shard_size, dtype, max_pixels
    [[encoders]]                 # one table per encoder: name, type, model, pretrained
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import tomllib

from embeddings.encoders import EncoderSpec
from embeddings.images import DEFAULT_MAX_PIXELS

DEFAULT_CONFIG = Path("configs/default.toml")


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/demo/manifest.csv"
    root: str | None = None  # default: the manifest's folder
    format: str = "auto"  # csv | jsonl | parquet | imagefolder | coco | karpathy


@dataclass(frozen=True)
class EmbedConfig:
    data: DataConfig
    encoders: tuple[EncoderSpec, ...]
    out: str = "runs/demo"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 64
    workers: int | None = None  # image decoding processes; None: picked per device
    shard_size: int = 1000  # input records per Parquet shard
    dtype: str = "float16"  # float16 | float32
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, "rb") as f:
        return tomllib.load(f)


def checked_section(cls: type, section: dict[str, Any], where: str) -> dict[str, Any]:
    """``section`` unchanged, or ValueError naming keys that ``cls`` does not have."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in [{where}]; allowed: {sorted(known)}")
    return section


def embed_config(raw: dict[str, Any], **overrides: Any) -> EmbedConfig:
    """Build the embed stage config from a parsed TOML dict and CLI overrides.

    Overrides with value ``None`` are ignored.  ``model``/``pretrained`` replace those of
    the first open_clip encoder; ``data``/``root``/``format`` those of ``[data]``.
    """
    ov = {k: v for k, v in overrides.items() if v is not None}
    data = DataConfig(**checked_section(DataConfig, dict(raw.get("data", {})), "data"))
    data = replace(data, **{k: ov.pop(k2) for k, k2 in
                            (("path", "data"), ("root", "root"), ("format", "format")) if k2 in ov})
    encoders = [EncoderSpec(**checked_section(EncoderSpec, e, "encoders"))
                for e in raw.get("encoders", [])]
    if "model" in ov or "pretrained" in ov:
        clip = [i for i, e in enumerate(encoders) if e.type == "open_clip"]
        if not clip:
            raise ValueError("--model/--pretrained given, but the config has no open_clip encoder")
        model = ov.pop("model", encoders[clip[0]].model)
        pretrained = ov.pop("pretrained", None if model.startswith("local-dir:")
                            else encoders[clip[0]].pretrained)
        encoders[clip[0]] = replace(encoders[clip[0]], model=model, pretrained=pretrained)
    if not encoders:
        raise ValueError("no [[encoders]] in the config: nothing to embed with")
    names = [e.name for e in encoders]
    if len(set(names)) != len(names):
        raise ValueError(f"encoder names must be unique, got {names}")
    section = checked_section(EmbedConfig, dict(raw.get("embed", {})), "embed")
    out = ov.pop("out", raw.get("out", "runs/demo"))
    cfg = EmbedConfig(data=data, encoders=tuple(encoders), out=out, **section)
    cfg = replace(cfg, **ov)
    if cfg.dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, not {cfg.dtype!r}")
    if cfg.batch_size < 1 or cfg.shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1")
    return cfg
