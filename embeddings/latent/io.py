"""Saving and loading latent models: safetensors weights + a JSON description.

The description names the input columns with their provenance (a latent model is
refused on vectors of other models) and records the weights file's digest, which the
latent column's own provenance names (see :func:`latent_provenance`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from ..errors import FormatError, InputError
from ..store import LATENT, Column, Provenance, check_same_model, read_json
from ..store.trained import load_model_files, save_model_files
from .model import LatentModel


def save_latent(model: LatentModel, path: str | Path) -> Path:
    """Write the weights, then ``path`` (``.json``, last)."""
    if len(model.inputs) != len(model.dims):
        raise ValueError("only a latent model bound to its input columns is saved")
    description = {"kind": model.kind, "dims": model.dims, "params": model.params,
                   "inputs": [{"column": c.name, **c.to_dict()} for c in model.inputs],
                   "info": model.info}
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in model.tensors.items()}
    return save_model_files(Path(path).with_suffix(".json"), save_safetensors(tensors),
                            description, LATENT)


def load_latent(path: str | Path) -> LatentModel:
    """A latent model from its description and verified weights (FormatError naming it)."""
    json_path = Path(path).with_suffix(".json")
    meta, weights = load_model_files(json_path, LATENT)
    try:
        inputs = [Column.from_dict(c["column"], c, str(json_path)) for c in meta["inputs"]]
        return LatentModel(meta["kind"], [int(d) for d in meta["dims"]],
                           dict(load_safetensors(weights)), dict(meta["params"]), inputs,
                           dict(meta.get("info", {})))
    except (KeyError, TypeError, ValueError, SafetensorError) as e:
        raise FormatError(f"saved latent model {json_path} is corrupt ({type(e).__name__}: "
                          f"{e}): {LATENT.remedy}") from None


def check_latent_inputs(model: LatentModel, columns: Mapping[str, Column],
                        where: str = "this run") -> None:
    """Refuse (RunMismatch) columns not made by the models the latent model was trained on."""
    for col in model.inputs:
        if col.name not in columns:
            raise InputError(f"the latent model reads embedding column {col.name!r}; {where} "
                             f"has {sorted(columns)}")
        check_same_model(col.provenance, columns[col.name].provenance,
                         f"column {col.name!r} of {where}",
                         "retrain it on this run's columns (`python -m pipeline latent "
                         "--rebuild`)")


def latent_provenance(path: str | Path, name: str) -> Provenance:
    """The provenance of a latent column made by the saved model at ``path``: its weights'
    digest is the identity, the inputs' own identities ride along in ``preprocess``; the
    column holds unit-length latents (cosine search, like every column)."""
    json_path = Path(path).with_suffix(".json")
    meta = read_json(json_path, "latent model description", LATENT.remedy)
    model = load_latent(json_path)
    return Provenance(
        type="latent", model=name, dim=model.dim, weights_sha256=meta["weights"]["digest"],
        weights_source=str(json_path), normalized=True,
        preprocess={"kind": model.kind,
                    "inputs": {c.name: c.provenance.identity() for c in model.inputs}})
