"""Joining a Ray cluster (or starting a local one), shared by the embed engine and the
index builder, with one error for an unreachable address."""

from __future__ import annotations

import logging
from typing import Any

from .errors import InputError


def connect(address: str | None) -> bool:
    """Join the cluster (or start a local one); True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address is None:
        kw["include_dashboard"] = False
    try:
        ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise InputError(f"cannot reach the Ray cluster at {address!r}: {e} (start one with "
                         "`ray start --head`, or leave out --ray-address for a local one)"
                         ) from None
    return True
