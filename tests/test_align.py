"""Adapters between embedding spaces: exact ridge, the two-layer map on the real demo
captions, saving, provenance refusal, and the ``align`` command end to end."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from embeddings.align import (
    Adapter,
    RidgeStats,
    check_adapter_columns,
    fit_ridge,
    load_adapter,
    save_adapter,
    solve_ridge,
)
from embeddings.errors import FormatError, InputError, RunMismatch
from embeddings.store import Run, Tampered
from pipeline.align import run_align
from pipeline.cli import main
from pipeline.config import AlignConfig
from tests._tamper import edit


def test_ridge_recovers_a_linear_map_exactly() -> None:
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((24, 10)), rng.standard_normal(10)
    x = rng.standard_normal((600, 24))
    y = x @ w + b
    fit = fit_ridge(x[:500], y[:500], x[500:], y[500:])
    assert fit.alpha == 0.0  # validation picks no regularisation: there is no noise
    np.testing.assert_allclose(fit.w, w, atol=1e-4)
    np.testing.assert_allclose(fit.b, b, atol=1e-4)
    assert fit.val_mse is not None and fit.val_mse < 1e-8


def test_ridge_sums_streamed_in_chunks_equal_one_pass() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((1000, 16)), rng.standard_normal((1000, 8))
    whole, parts = RidgeStats(16, 8), RidgeStats(16, 8)
    whole.add(x, y)
    for s in range(0, 1000, 137):
        parts.add(x[s:s + 137], y[s:s + 137])
    a, b = solve_ridge(whole, alphas=(0.1,)), solve_ridge(parts, alphas=(0.1,))
    np.testing.assert_allclose(a.w, b.w, atol=1e-5)
    # the closed-form MSE from the sums is the MSE of the predictions
    pred = x @ a.w + a.b
    assert whole.mse(a.w.astype(np.float64), a.b.astype(np.float64)) == pytest.approx(
        float(np.mean((pred - y) ** 2)), rel=1e-4)


def _cfg(run: Path, **kw: object) -> AlignConfig:
    base = dict(run=str(run), progress=False, threads=1)
    base.update(kw)
    return AlignConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(align_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    run = tmp_path_factory.mktemp("align") / "run"
    shutil.copytree(align_run, run)
    return run, run_align(_cfg(run, source="use_text", target="minilm_text"))


def test_two_layer_beats_zero_and_mean_on_the_demo_captions(trained: tuple) -> None:
    _, r = trained
    s = r.scores
    assert s["two_layer"]["mse"] < s["zero"]["mse"]
    assert s["two_layer"]["mse"] < s["mean"]["mse"]
    assert s["two_layer"]["cosine"] > s["mean"]["cosine"]
    assert r.train_pairs > 150 and r.val_pairs > 10


def test_two_layer_beats_identity_between_towers_of_one_width(align_run: Path,
                                                              tmp_path: Path) -> None:
    """clip_text -> clip_image (caption to its image, 64-d both): identity is a baseline."""
    run = tmp_path / "run"
    shutil.copytree(align_run, run)
    r = run_align(_cfg(run, source="clip_text", target="clip_image"))
    assert {"identity", "zero", "mean"} <= set(r.scores)
    assert r.scores["two_layer"]["mse"] < r.scores["identity"]["mse"]
    assert r.scores["two_layer"]["mse"] < r.scores["zero"]["mse"]


def test_saved_adapter_loads_identical_and_is_bound_to_both_columns(trained: tuple) -> None:
    run, r = trained
    a = load_adapter(r.path)
    assert a.kind == "two_layer" and a.source.name == "use_text"
    m = Run(run).embed.manifest()
    assert a.source == m.column("use_text") and a.target == m.column("minilm_text")
    x = Run(run).embed.read_vectors("use_text")[:20]
    b = Adapter(a.kind, a.tensors, a.params, a.source, a.target, a.info)
    again = load_adapter(save_adapter(b, Path(r.path).with_name("copy.json")))
    for k in a.tensors:
        np.testing.assert_array_equal(a.tensors[k], again.tensors[k])
    np.testing.assert_array_equal(a.apply(x), again.apply(x))
    out = a.apply(x)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    check_adapter_columns(a, m.columns)  # its own run passes


def test_adapter_refused_on_columns_of_another_model(trained: tuple) -> None:
    run, r = trained
    a = load_adapter(r.path)
    cols = dict(Run(run).embed.manifest().columns)
    other = replace(cols["minilm_text"].provenance, weights_sha256="0" * 64)
    cols["minilm_text"] = replace(cols["minilm_text"], provenance=other)
    with pytest.raises(RunMismatch, match="column 'minilm_text' of this run comes from a "
                       "different model .*weights_sha256.*retrain it with"):
        check_adapter_columns(a, cols)
    check_adapter_columns(a, cols, sides=("source",))  # the source side is still right
    with pytest.raises(InputError, match="adapter's target is embedding column"):
        check_adapter_columns(a, {"use_text": cols["use_text"]})


def test_corrupt_adapter_weights_are_named(trained: tuple, tmp_path: Path) -> None:
    _, r = trained
    copy = tmp_path / "align"
    shutil.copytree(Path(r.path).parent, copy)
    desc = copy / Path(r.path).name
    weights = copy / json.loads(desc.read_text())["weights"]["file"]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="adapter weights .* is corrupt.*pipeline align"):
        load_adapter(desc)


def test_align_command_prints_scores_and_saves(align_run: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(align_run, run)
    assert main(["align", "--run", str(run), "--source", "minilm_text", "--target",
                 "clip_image", "--adapter", "ridge", "--no-progress", "--name", "cap2img"]) == 0
    out = capsys.readouterr().out
    assert "align minilm_text -> clip_image (ridge)" in out and "zero" in out
    assert Run(run).align.names() == ["cap2img"]
    assert Run(run).verify() == []
    assert main(["align", "--run", str(run), "--source", "minilm_text", "--target",
                 "nope_text", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no embedding column 'nope_text'") and err.count("\n") == 1


def test_held_out_split_is_never_paired(align_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(align_run, run)
    a = run_align(_cfg(run, adapter="ridge", exclude_splits=()))
    b = run_align(_cfg(run, adapter="ridge"))  # test rows left out (the default)
    assert a.train_pairs + a.val_pairs == 300
    assert b.train_pairs + b.val_pairs == 300 - 48


def test_saved_adapters_are_sealed_like_heads(trained: tuple, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """An edited description is refused (one line), a link is never followed, and the
    weights of a killed save are a leftover the next align run removes."""
    src, r = trained
    run = tmp_path / "run"
    shutil.copytree(src, run)
    desc = run / "align" / Path(r.path).name
    meta = json.loads(desc.read_text())
    assert meta["integrity"]["digest"]
    meta["target"]["column"] = "clip_image"  # edited by hand: the digest no longer matches
    desc.write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="adapter description .* was edited"):
        load_adapter(desc)
    assert any("was edited" in p for p in Run(run).verify())
    edit(desc, lambda d: d["target"].update(column="clip_image"))  # re-digested, unsealed
    assert any("is not sealed like the rest" in p for p in Run(run).verify())
    desc.unlink()
    desc.symlink_to(Path(r.path))
    with pytest.raises(Tampered):
        load_adapter(desc)
    desc.unlink()
    stray = run / "align" / "gone.0123abcd.safetensors"
    stray.write_bytes(b"x")
    assert stray in Run(run).report().leftovers
    run_align(_cfg(run, adapter="ridge", name=desc.stem))
    assert not stray.exists() and Run(run).verify() == []
