"""Saving and loading adapters: safetensors weights + a JSON description, no pickle.

The description records the kind, its parameters, what training found, and the source
and target columns with the provenance of the models that made them; the store
(:class:`embeddings.store.TrainedFiles`) keeps weights and description one unit.
Loading one against a run checks both columns with :func:`check_same_model`: an adapter
trained on one model's vectors is refused on another's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from ..errors import FormatError, InputError
from ..store import ADAPTER, Column, Run, check_same_model
from ..store.trained import load_model_files, save_model_files
from .adapter import Adapter


def save_adapter(adapter: Adapter, path: str | Path) -> Path:
    """Write the weights, then ``path`` (``.json``, last)."""
    if adapter.source is None or adapter.target is None:
        raise ValueError("only an adapter bound to its source and target columns is saved")
    description = {"kind": adapter.kind, "params": adapter.params,
                   "source": {"column": adapter.source.name, **adapter.source.to_dict()},
                   "target": {"column": adapter.target.name, **adapter.target.to_dict()},
                   "info": adapter.info}
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in adapter.tensors.items()}
    return save_model_files(Path(path).with_suffix(".json"), save_safetensors(tensors),
                            description, ADAPTER)


def load_adapter(path: str | Path) -> Adapter:
    """An adapter from its description and verified weights (FormatError naming the file)."""
    json_path = Path(path).with_suffix(".json")
    meta, weights = load_model_files(json_path, ADAPTER)
    try:
        where = str(json_path)
        source = Column.from_dict(meta["source"]["column"], meta["source"], where)
        target = Column.from_dict(meta["target"]["column"], meta["target"], where)
        return Adapter(meta["kind"], dict(load_safetensors(weights)), dict(meta["params"]),
                       source, target, dict(meta.get("info", {})), bool(meta["sealed"]))
    except (KeyError, TypeError, ValueError, SafetensorError) as e:
        raise FormatError(f"saved adapter {json_path} is corrupt ({type(e).__name__}: {e}): "
                          f"{ADAPTER.remedy}") from None


def load_run_adapter(run: str | Path, name_or_path: str) -> Adapter:
    """``--via NAME`` (``RUN/align/NAME.json``) or a path to a saved adapter's ``.json``."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".json" or candidate.is_file():
        return load_adapter(candidate)
    return load_adapter(Run(run).align.path(name_or_path))


def check_adapter_columns(adapter: Adapter, columns: Mapping[str, Column],
                          where: str = "this run", sides: tuple[str, ...] = ("source", "target"),
                          ) -> None:
    """Refuse (RunMismatch) a run whose columns were not made by the models the adapter
    was trained on; ``sides``: which of its two columns must be there (a search through
    the adapter needs only the target's vectors)."""
    for side in sides:
        col: Column = getattr(adapter, side)
        if col.name not in columns:
            raise InputError(f"the adapter's {side} is embedding column {col.name!r}; {where} "
                             f"has {sorted(columns)}")
        check_same_model(col.provenance, columns[col.name].provenance,
                         f"column {col.name!r} of {where}",
                         "use an adapter trained on this run's columns, or retrain it with "
                         "`python -m pipeline align`")


def adapter_summary(adapter: Adapter) -> dict[str, Any]:
    """What an adapter maps and how well, for listings (serve, search --via)."""
    src = adapter.source.name if adapter.source else f"{adapter.d_in}-d"
    dst = adapter.target.name if adapter.target else f"{adapter.d_out}-d"
    return {"kind": adapter.kind, "source": src, "target": dst,
            "val": adapter.info.get("val", {})}
