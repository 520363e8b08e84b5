"""Start-up time of the command line: ``--help``, and one search on the demo run.

Each command runs in a fresh interpreter (``python -m pipeline ...``), ``--repeat`` times,
interleaved with the baseline when one is given; the best time of each counts, so a burst
of load from other processes hurts both alike.  ``--baseline DIR`` names a checkout of
another version (its ``embeddings`` and ``pipeline`` come first on the path; configs,
models and runs come from this checkout), e.g. ``git worktree add /tmp/old <commit>``.
Needs the demo run (``make demo``) and its index.

    python benchmarks/bench_startup.py                      # this version only
    python benchmarks/bench_startup.py --baseline /tmp/old  # and an older one, same run
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "--help": ["--help"],
    "index --help": ["index", "--help"],
    "search, text->text (MiniLM)": ["search", "--config", "configs/offline.toml", "a penguin",
                                    "--modality", "text", "--k", "5"],
    "search, text->image (tiny CLIP)": ["search", "--config", "configs/offline.toml",
                                        "a penguin", "--k", "5"],
}


def timed(argv: list[str], code_dir: Path) -> float:
    """Seconds of ``python -m pipeline ARGV`` with the code of ``code_dir`` (first on the
    path), run from this checkout (its configs, models and runs)."""
    launch = (f"import runpy, sys; sys.path.insert(0, {str(code_dir)!r}); sys.argv = "
              f"['pipeline', *{argv!r}]; runpy.run_module('pipeline', run_name='__main__')")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", launch], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", type=Path, help="checkout of another version to compare")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    versions = {"this version": REPO}
    if args.baseline:
        versions = {"baseline": args.baseline.resolve(), **versions}
    load = os.getloadavg()
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.repeat):
        for name, argv in COMMANDS.items():
            for version, code in versions.items():
                t = timed(argv, code)
                best[name, version] = min(best.get((name, version), t), t)
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
          f"best of {args.repeat}")
    print("| command | " + " | ".join(versions) + " |")
    print("|---|" + "---:|" * len(versions))
    for name in COMMANDS:
        print(f"| `{name}` | " + " | ".join(f"{best[name, v]:.2f} s" for v in versions) + " |")


if __name__ == "__main__":
    main()
