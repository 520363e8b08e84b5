"""Engines: what runs the embed stage's blocks, in this process or on a Ray cluster.

:func:`pipeline.embed.run_embed` keeps everything around the blocks (the lock, the identity
checks, the resume rule, the manifest written last); an engine only takes the blocks still
to do and returns the shard records of those it finished.  Every engine runs the same unit
of work, :func:`pipeline.unit.embed_block` then :func:`pipeline.unit.write_block`, so
a run can be started with one engine and finished with another.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable

from embeddings.errors import InputError
from embeddings.ingest import Block
from embeddings.ingest.readers import prefetch

from . import unit
from .unit import Done, EngineJob

RAY_INSTALL = 'pip install "ray[data]"  (or, from a checkout: pip install -e ".[ray]")'


def run_local(job: EngineJob, blocks: Iterable[Block]) -> Done:
    """One block after another in this process (images decoded by DataLoader workers).

    A block that must be read first (a tar shard) is read in a thread one block ahead,
    while the one before it is embedded."""
    done: Done = {}
    for block in prefetch(map(unit.load_block, blocks), depth=1):
        # looked up on the module per block: tests patch them
        result = unit.embed_block(block, job.source, job.models, job.cfg)
        done[block.index] = records = unit.write_block(job.run, block, result, job.cfg.dtype)
        job.progress.block_done(records)
    return done


def run_ray(job: EngineJob, blocks: Iterable[Block]) -> Done:
    """Ray Data: decoding in CPU tasks, the models in an actor pool (:mod:`.engine_ray`)."""
    from .engine_ray import run_blocks

    return run_blocks(job, blocks)


def check_engine(name: str, ray_address: str | None = None) -> None:
    """Fail at once, before any work, if ``name``'s engine cannot run here."""
    if name not in ENGINES:
        raise InputError(f"unknown engine {name!r}; known: {sorted(ENGINES)}")
    if name == "ray":
        try:
            import ray.data  # noqa: F401
        except ImportError:
            raise InputError(f"--engine ray needs Ray Data, which is not installed: "
                             f"{RAY_INSTALL}") from None
        if ray_address:
            probe_ray_address(ray_address)


def probe_ray_address(address: str, timeout: float = 5.0) -> None:
    """InputError within ``timeout`` seconds unless ``address`` (``HOST:PORT`` or
    ``ray://HOST:PORT``; ``auto`` is Ray's own lookup) accepts a connection: Ray itself
    retries an unreachable address for minutes."""
    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT or "
                         "auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise InputError(f"cannot reach the Ray cluster at {address!r} ({why} within "
                         f"{timeout:.0f} s): start one with `ray start --head`, check the "
                         "address, or leave out --ray-address for a local cluster") from None


ENGINES: dict[str, Callable[[EngineJob, Iterable[Block]], Done]] = {
    "local": run_local, "ray": run_ray}
