"""Helpers for tests that edit run files: rewrite a JSON file with a matching digest
(as a forger who knows the format would, or, ``sealed``, as this machine's store would),
and fingerprint a decoy folder to prove nothing outside a run was touched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def forge(path: Path, data: dict[str, Any], sealed: bool = False) -> None:
    """Write ``data`` to ``path`` with a digest that matches; sealed with this machine's key
    only when ``sealed`` (a test standing in for a stage that rewrote the file)."""
    try:
        from embeddings.store import seal
    except ImportError:  # a version without digests (to show these tests failing on it)
        path.write_text(json.dumps(data))
        return
    obj = seal.seal(data)
    if not sealed:
        obj[seal.FIELD].pop("seal", None)
    path.write_text(json.dumps(obj))


def edit(path: Path, change: Any, sealed: bool = False) -> dict[str, Any]:
    """Load ``path``, apply ``change(data)``, :func:`forge` it back; the new data."""
    data = json.loads(path.read_text())
    change(data)
    forge(path, data, sealed)
    return data


def fingerprint(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (links not followed) with the digest of its content."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "link->" + str(p.readlink())
        elif p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(folder))] = "dir"
    return out


def cli_fails(capsys: Any, *argv: str, match: str = "") -> str:
    """Run the CLI in-process: exit status 2 and exactly one ``error:`` line on stderr
    (containing ``match``), no traceback; that line."""
    from pipeline.cli import main

    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    return lines[0]
