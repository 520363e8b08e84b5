"""The meta-space models: an autoencoder and a VAE over real columns of the demo run."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from embeddings.errors import RunMismatch
from embeddings.latent import (
    LatentParams,
    check_latent_inputs,
    fit_latent,
    latent_provenance,
    load_latent,
    pca_error,
    save_latent,
)
from embeddings.store import Run

INPUTS = ("minilm_text", "use_text")  # two real text encoders of the same captions


@pytest.fixture(scope="module")
def columns(align_run: Path) -> tuple[dict[str, list[np.ndarray]], Run]:
    run = Run(align_run)
    splits = np.array(run.embed.read_table("captions", ["split"]).column(0).to_pylist())
    arrays = [run.embed.read_vectors(c) for c in INPUTS]
    by_split = {s: [a[splits == s] for a in arrays] for s in ("train", "val", "test")}
    return by_split, run


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_latent_reconstructs_held_out_rows(columns: tuple, kind: str) -> None:
    d, _ = columns
    k = 16
    model = fit_latent(d["train"], None, d["val"],
                       params=LatentParams(kind=kind, dim=k, threads=1))
    z = model.encode(d["test"])
    assert z.shape == (len(d["test"][0]), k) and np.isfinite(z).all()
    s_train, _, _ = model.standardise(d["train"])
    s_test, _, _ = model.standardise(d["test"])
    pca = pca_error(s_train, s_test, k)
    err = model.reconstruction_error(d["test"])
    if kind == "ae":
        assert err < pca, (err, pca)  # the non-linear model beats the linear baseline
    else:
        assert err < 1.0  # a VAE trades reconstruction for its prior; still far from nothing
    assert model.info["best_round"] >= 0


def test_a_row_missing_one_input_still_gets_a_latent(columns: tuple) -> None:
    d, _ = columns
    model = fit_latent(d["train"], None, d["val"],
                       params=LatentParams(dim=16, threads=1, max_rounds=10))
    n = len(d["test"][0])
    only_first = [np.ones(n, bool), np.zeros(n, bool)]
    z_full = model.encode(d["test"])
    z_part = model.encode([d["test"][0], np.zeros_like(d["test"][1])], only_first)
    assert np.isfinite(z_part).all()
    # the latent of half a row stays closer to its own full latent than to other rows'
    dist = ((z_part[:, None, :] - z_full[None, :, :]) ** 2).sum(-1)
    assert (dist.argmin(axis=1) == np.arange(n)).mean() > 0.5


def test_saved_latent_model_loads_identical_and_checks_inputs(columns: tuple,
                                                              tmp_path: Path) -> None:
    d, run = columns
    model = fit_latent(d["train"], None, d["val"],
                       params=LatentParams(kind="vae", dim=8, threads=1, max_rounds=3))
    cols = run.embed.manifest().columns
    model.inputs = [cols[c] for c in INPUTS]
    path = save_latent(model, tmp_path / "latent" / "meta.json")
    again = load_latent(path)
    np.testing.assert_array_equal(model.encode(d["test"]), again.encode(d["test"]))
    check_latent_inputs(again, cols)
    other = dict(cols)
    other["use_text"] = replace(cols["use_text"], provenance=replace(
        cols["use_text"].provenance, weights_sha256="f" * 64))
    with pytest.raises(RunMismatch, match="column 'use_text' of this run comes from a "
                       "different model"):
        check_latent_inputs(again, other)
    prov = latent_provenance(path, "meta")
    assert prov.dim == 8 and prov.type == "latent" and prov.weights_sha256
    assert set(prov.preprocess["inputs"]) == set(INPUTS)


def test_run_verify_covers_saved_latent_models(columns: tuple, align_run: Path,
                                               tmp_path: Path) -> None:
    d, _ = columns
    run = Run(tmp_path / "run")
    shutil.copytree(align_run, run.path)
    model = fit_latent(d["train"], None, d["val"],
                       params=LatentParams(dim=4, threads=1, max_rounds=1))
    cols = run.embed.manifest().columns
    model.inputs = [cols[c] for c in INPUTS]
    path = save_latent(model, run.latent.path("meta"))
    assert run.latent.names() == ["meta"] and run.verify() == []
    weights = next(path.parent.glob("meta.*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8])
    assert any("latent model weights" in p for p in run.verify())


def test_folded_encode_matches_the_formula(columns: tuple) -> None:
    """``encode`` folds the standardisation into the weights; the result is the formula's
    (``encode_standardised`` of the standardised rows), a missing input included."""
    d, _ = columns
    model = fit_latent(d["train"], None, d["val"],
                       params=LatentParams(dim=8, threads=1, max_rounds=1))
    n = len(d["test"][0])
    present = [np.ones(n, bool), np.arange(n) % 3 > 0]
    s, flags, _ = model.standardise(d["test"], present)
    np.testing.assert_allclose(model.encode(d["test"], present, chunk=7),
                               model.encode_standardised(s, flags), rtol=1e-4, atol=1e-4)
