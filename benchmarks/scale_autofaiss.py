"""autofaiss ``build_index`` on our shards, run by ``bench_scale`` inside autofaiss's own
virtualenv (it pins its own faiss).  Prints one JSON line: index key, search parameters,
seconds, or the error it stopped with.

    python scale_autofaiss.py SHARDS_DIR OUT_DIR BUDGET_GB CORES
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path


def main() -> None:
    shards, out, budget, cores = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), \
        int(sys.argv[4])
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    result: dict = {}
    try:
        from autofaiss import build_index

        # autofaiss bounds the index (max_index_memory_usage) and, separately, the machine
        # (current_memory_available, which must exceed the index by 10%): the whole build
        # gets our budget, the index three quarters of it.
        _, infos = build_index(
            embeddings=shards, index_path=str(out / "knn.index"),
            index_infos_path=str(out / "infos.json"), file_format="parquet",
            embedding_column_name="clip_image", metric_type="ip", nb_cores=cores,
            max_index_memory_usage=f"{int(budget * 0.75 * 1024)}M",
            current_memory_available=f"{int(budget * 1024)}M",
            should_be_memory_mappable=True)
        result = {"ok": infos is not None, "infos": infos}
    except BaseException as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {e}",
                  "trace": traceback.format_exc()[-2000:]}
    result["seconds"] = round(time.perf_counter() - t, 1)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
