"""Saving and loading heads: safetensors weights + a JSON description, no pickle."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..errors import FormatError, MissingError
from ..shards import atomic_write_bytes, atomic_write_json
from .base import Head, Task, make_head

FORMAT = "embeddings.head"
FORMAT_VERSION = 1
# Provenance keys that must agree between the training shards and the shards predicted on.
BINDING_KEYS = ("type", "model", "pretrained", "weights_sha256", "dim", "normalized",
                "preprocess", "text_context_length", "max_seq_length")

def save_head(head: Head, path: str | os.PathLike, inputs: Sequence[Mapping[str, Any]],
              extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``path.safetensors`` then ``path.json`` (last, atomically).

    ``inputs``: one entry per input column, ``{"column": name, "provenance": {...}}`` with
    the column's entry from the embed manifest; predicting checks it.
    """
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.tensors().items()}
    for t, thr in head.thresholds.items():
        tensors[f"thresholds.{t}"] = torch.from_numpy(np.asarray(thr, dtype=np.float32))
    atomic_write_bytes(path.with_suffix(".safetensors"), save_safetensors(tensors))
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "head": head.name, "params": head.params,
        "tasks": [asdict(t) for t in head.tasks], "dims": list(head.dims),
        "inputs": [{"column": i["column"],
                    "provenance": {k: i["provenance"].get(k) for k in BINDING_KEYS}}
                   for i in inputs],
        "weights": path.with_suffix(".safetensors").name, "info": head.info, **(extra or {}),
    }
    atomic_write_json(path.with_suffix(".json"), meta)
    return path.with_suffix(".json")


def load_head(path: str | os.PathLike) -> tuple[Head, dict[str, Any]]:
    """Rebuild a saved head from its JSON description and safetensors weights."""
    path = Path(path).with_suffix(".json")
    if not path.is_file():
        raise MissingError(f"no saved head at {path}")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise FormatError(f"{path} is not a saved head of format {FORMAT} v{FORMAT_VERSION}")
    tasks = [Task(t["column"], tuple(t["classes"]), t["multilabel"]) for t in meta["tasks"]]
    head = make_head(meta["head"], tasks, meta["dims"], **meta["params"])
    tensors = load_safetensors(path.with_name(meta["weights"]).read_bytes())
    head.thresholds = {int(k.split(".")[1]): v.numpy() for k, v in tensors.items()
                       if k.startswith("thresholds.")}
    head.load_tensors({k: v for k, v in tensors.items() if not k.startswith("thresholds.")})
    head.info = meta.get("info", {})
    return head, meta


def check_inputs_match(meta: Mapping[str, Any], columns: Mapping[str, Mapping[str, Any]],
                       where: str = "this run") -> None:
    """Refuse (FormatError) shards whose columns were not made by the models the head saw."""
    for inp in meta["inputs"]:
        name, want = inp["column"], inp["provenance"]
        if name not in columns:
            raise FormatError(f"the head needs embedding column {name!r}; {where} has "
                              f"{sorted(columns)}")
        have = columns[name]
        diff = [k for k in BINDING_KEYS
                if json.dumps(want.get(k), sort_keys=True) != json.dumps(have.get(k),
                                                                         sort_keys=True)]
        if diff:
            k = diff[0]
            raise FormatError(
                f"refusing to predict: column {name!r} of {where} comes from a different model "
                f"than the head was trained on ({k}: head {want.get(k)!r}, shards "
                f"{have.get(k)!r}). Embed with the same model, or retrain the head.")


