"""Index builds on a real local Ray cluster (started once for the module): the trained empty
index goes to tasks, each adds a range of shards and writes its lists, the driver merges
them; the same ids in the same lists as the local build."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from embeddings import index as ix
from embeddings.index.core import list_codes
from embeddings.store import Run
from pipeline.config import IndexConfig
from pipeline.index import open_index, run_index
from tests._scale_fixtures import COLUMN, synthetic_run

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local 2-CPU Ray cluster shared by the module's tests; its address."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _contents(index: object) -> list[tuple[list[int], bytes]]:
    """Every list's ids and codes, in stored order."""
    return [(ix.list_ids(index, j).tolist(), list_codes(index, j).tobytes())
            for j in range(ix.ivf_of(index).nlist)]


def test_ray_build_equals_the_local_build(cluster: str, tmp_path: Path) -> None:
    run, _, _ = synthetic_run(tmp_path / "run", 30_000, 32, [4_000, 6_000, 1_000, 9_000,
                                                             5_000, 5_000])
    src = run.embed.source(COLUMN)
    nlist, cs = ix.describe("IVF64,SQ8", 32)
    plan = ix.plan_build("IVF64,SQ8", 30_000, 32, 2**30, 30_000 * (cs + 8), nlist, cs, True)
    plan = replace(plan, chunk_rows=1_500, part_bytes=300_000)
    job = ix.BuildJob(src, plan, tmp_path / "scratch", n_queries=40)
    local = ix.BUILDERS["out_of_core"](job)
    trained = ix.serialize(local.trained)
    on_ray = ix.BUILDERS["ray"](replace(job, trained=trained, workers=2))
    assert len(on_ray.parts) > 3  # several tasks, several parts each
    np.testing.assert_array_equal(on_ray.truth.ids, local.truth.ids)
    for name, built in (("local", local), ("ray", on_ray)):
        ix.write_built(built, tmp_path / f"{name}.faiss", tmp_path / f"{name}.ivfdata", "x")
    a = ix.load_index(tmp_path / "local.faiss", lists=tmp_path / "local.ivfdata")
    b = ix.load_index(tmp_path / "ray.faiss", lists=tmp_path / "ray.ivfdata")
    assert _contents(a) == _contents(b)
    assert (tmp_path / "local.ivfdata").read_bytes() == (tmp_path / "ray.ivfdata").read_bytes()
    small = ix.BUILDERS["ray"](replace(job, trained=trained, plan=replace(plan, on_disk=False)))
    assert small.index is not None and _contents(small.index) == _contents(a)


def test_index_stage_on_ray(cluster: str, tmp_path: Path) -> None:
    """`index --engine ray` gives the local stage's index (same seeded training)."""
    for name in ("local", "ray"):
        synthetic_run(tmp_path / name, 20_000, 32, 2_500)
    kw = dict(factory="IVF64,Flat", recall_queries=40, progress=False)
    run_index(IndexConfig(run=str(tmp_path / "local"), **kw))
    run_index(IndexConfig(run=str(tmp_path / "ray"), engine="ray", ray_address=cluster,
                          workers=2, **kw))
    entry = Run(tmp_path / "ray").index.entries()[COLUMN]
    assert entry.stats["builder"] == "ray" and entry.recall_at_10 >= 0.9
    a, _ = open_index(tmp_path / "local", COLUMN)
    b, _ = open_index(tmp_path / "ray", COLUMN)
    assert _contents(a) == _contents(b)
