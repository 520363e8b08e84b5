"""Saving and loading heads: safetensors weights + a JSON description, no pickle.

The description records the head type, parameters, tasks, input dimensions, what
fitting found, and for each input column the provenance of the model that made it;
the store (:func:`embeddings.store.save_head_files`) keeps weights and description one
unit (the description names the weights file and its digest).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..errors import FormatError, InputError
from ..store import Column, Provenance, check_same_model, load_head_files, save_head_files
from .base import Head, Task, make_head
from .params import record

REMEDY = "retrain it with `python -m pipeline heads`"


def save_head(head: Head, path: str | os.PathLike, inputs: Sequence[tuple[str, Column]],
              extra: Mapping[str, Any] | None = None) -> Path:
    """Write the weights, then ``path`` (``.json``, last): the saved head.

    ``inputs``: ``(column name, Column)`` per input, in order; predicting checks them.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.tensors().items()}
    for t, thr in head.thresholds.items():
        tensors[f"thresholds.{t}"] = torch.from_numpy(np.asarray(thr, dtype=np.float32))
    description = {
        "head": head.name, "params": record(head.params),
        "tasks": [asdict(t) for t in head.tasks],
        "dims": list(head.dims),
        "inputs": [{"column": name, "provenance": col.provenance.to_dict()}
                   for name, col in inputs],
        "info": head.info, **(extra or {})}
    return save_head_files(Path(path).with_suffix(".json"), save_safetensors(tensors),
                           description)


def load_head(path: str | os.PathLike) -> tuple[Head, dict[str, Any]]:
    """Rebuild a saved head from its description and verified weights."""
    json_path = Path(path).with_suffix(".json")
    meta, weights = load_head_files(json_path)
    try:
        tasks = [Task(t["column"], tuple(t["classes"]), t["multilabel"],
                      t.get("regression", False)) for t in meta["tasks"]]
        head = make_head(meta["head"], tasks, meta["dims"], **meta["params"])
        tensors = load_safetensors(weights)
        head.thresholds = {int(k.split(".")[1]): v.numpy() for k, v in tensors.items()
                           if k.startswith("thresholds.")}
        head.load_tensors({k: v for k, v in tensors.items() if not k.startswith("thresholds.")})
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, SafetensorError,
            InputError) as e:
        raise FormatError(f"saved head {json_path} is corrupt ({type(e).__name__}: {e}): "
                          f"{REMEDY}") from None
    head.info = meta.get("info", {})
    return head, meta


def check_inputs_match(meta: Mapping[str, Any], columns: Mapping[str, Column],
                       where: str = "this run") -> None:
    """Refuse (RunMismatch) shards whose columns were not made by the models the head saw."""
    for inp in meta["inputs"]:
        name = inp["column"]
        if name not in columns:
            raise InputError(f"the head needs embedding column {name!r}; {where} has "
                             f"{sorted(columns)}")
        check_same_model(Provenance.from_dict(inp["provenance"]), columns[name].provenance,
                         f"column {name!r} of {where}",
                         "embed with the model the head was trained on, or retrain the head")
