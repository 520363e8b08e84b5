"""Fast start: ``--help`` and argument errors import no model library; a command imports
only what it uses (the rule in :mod:`pipeline.cli`'s docstring)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MINILM

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "faiss", "open_clip", "sentence_transformers", "ray", "transformers",
         "pyarrow", "PIL", "uvicorn", "fastapi")
COMMANDS = ("embed", "tiny-model", "index", "search", "eval-retrieval", "verify", "heads",
            "predict", "serve")


def _imported(*argv: str) -> tuple[int, set[str], str]:
    """Run ``python -m pipeline ARGV`` in a fresh interpreter; its exit status, the heavy
    top-level modules it imported, and its stderr."""
    code = ("import runpy, sys, json\n"
            f"sys.argv = ['pipeline', *{list(argv)!r}]\n"
            "try:\n    runpy.run_module('pipeline', run_name='__main__')\n"
            "except SystemExit as e:\n    status = e.code\n"
            "print(json.dumps([status if isinstance(status, int) else 1, "
            "sorted({m.split('.')[0] for m in sys.modules})]))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    status, modules = json.loads(p.stdout.strip().splitlines()[-1])
    return status, set(modules) & set(HEAVY), p.stderr


@pytest.mark.parametrize("argv", [("--help",), *((c, "--help") for c in COMMANDS),
                                  ("index", "--recall-queries", "many"),
                                  ("search", "--k", "x"), ("nonsense",)])
def test_help_and_argument_errors_import_no_model_library(argv: tuple[str, ...]) -> None:
    status, heavy, err = _imported(*argv)
    assert status == (0 if "--help" in argv else 2)
    assert heavy == set(), (argv, heavy)
    if status:
        assert err.strip().splitlines()[-1].startswith("python -m pipeline")  # argparse usage


def test_text_search_imports_only_the_text_model(demo_run: Path, tmp_path: Path) -> None:
    """A MiniLM text->text query loads sentence-transformers and FAISS, never open_clip; a
    CLIP text->image query never sentence-transformers; verify neither model library."""
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    from pipeline.config import IndexConfig
    from pipeline.index import run_index

    run_index(IndexConfig(run=str(run), columns=("minilm_text", "clip_image")))
    status, heavy, err = _imported("search", "a cat", "--run", str(run), "--device", "cpu")
    assert status == 0, err
    assert {"open_clip", "faiss", "torch"} <= heavy and "sentence_transformers" not in heavy
    config = tmp_path / "c.toml"
    config.write_text(f'[[encoders]]\nname = "minilm"\ntype = "sentence_transformers"\n'
                      f'model = "{MINILM}"\n')
    status, heavy, err = _imported("search", "a cat", "--modality", "text", "--run", str(run),
                                   "--config", str(config), "--device", "cpu")
    assert status == 0, err
    assert {"sentence_transformers", "faiss", "torch"} <= heavy
    assert "open_clip" not in heavy and "ray" not in heavy and "uvicorn" not in heavy
    status, heavy, err = _imported("verify", "--run", str(run), "--config", str(config))
    assert status == 0, err
    assert not heavy & {"torch", "faiss", "open_clip", "sentence_transformers"}, heavy
