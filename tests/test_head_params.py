"""Typed head parameters: every mistake is one ``error:`` line, seeds reach every part
and reproduce every head bit for bit, and the options the issue asked for (MLP depth,
SGD, regression, augmentation) do what they say."""

from __future__ import annotations

import typing
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from embeddings.errors import InputError
from embeddings.heads import HEADS, ParamError, Task, load_head, make_head, save_head
from embeddings.heads.params import record
from embeddings.heads.torch_heads import Net
from pipeline.cli import main
from pipeline.config import HeadsConfig
from pipeline.heads import head_params

from .test_heads import CLASSES, columns_of, separable, split3

pytestmark = pytest.mark.usefixtures("one_thread")
TRAINED = [h for h in HEADS if h != "zeroshot"]


def mistakes(name: str) -> dict[str, tuple[str, object]]:
    """One misspelled key, one value of the wrong type and one unsupported value, made
    from the head's own declaration (so a new head is covered without editing this)."""
    defaults = HEADS[name].defaults
    hints = typing.get_type_hints(type(defaults))
    fs = fields(defaults)
    first = fs[0].name
    typed = next(f.name for f in fs if set(typing.get_args(hints[f.name]) or [hints[f.name]])
                 & {int, float, bool} or typing.get_origin(hints[f.name]) is dict)
    out: dict[str, tuple[str, object]] = {"misspelled": (first[:-1] + "x", 1),
                                          "wrong type": (typed, "abc")}
    for f in fs:
        meta = f.metadata
        if meta.get("choices"):
            out["unsupported"] = (f.name, "nope")
        elif f.name == "base":
            out["unsupported"] = (f.name, "concat")  # a fusion cannot be a part
        elif meta.get("low") is not None or meta.get("above") is not None:
            bound = meta["low"] if meta.get("low") is not None else meta["above"]
            out.setdefault("unsupported", (f.name, bound - 1))
    assert len(out) == 3, (name, out)
    return out


def toml_value(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


@pytest.mark.parametrize("name", list(HEADS))
def test_every_parameter_mistake_is_one_error_line(name: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    for kind, (key, value) in mistakes(name).items():
        config = tmp_path / f"{kind.replace(' ', '_')}.toml"
        config.write_text(f'run = "{tmp_path / "no-run"}"\n[heads]\nheads = ["{name}"]\n'
                          f'[heads.params.{name}]\n{key} = {toml_value(value)}\n')
        for argv in (["heads", "--config", str(config)],
                     ["heads", "--run", str(tmp_path / "no-run"), "--heads", name,
                      "--param", f"{name}.{key}={value}"]):
            assert main(argv) == 2, (kind, argv)
            err = capsys.readouterr().err
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (kind, err)
            assert key in lines[0] and "Traceback" not in err
            if kind == "misspelled":
                assert "allowed:" in lines[0] and fields(HEADS[name].defaults)[0].name in lines[0]
    assert not (tmp_path / "no-run").exists()


def test_errors_name_the_key_and_suggest_the_spelling() -> None:
    with pytest.raises(ParamError, match=r"\['hiden'\] \(did you mean 'hidden'\?\)"):
        make_head("mlp", [Task("label", CLASSES)], [16], hiden=[128])
    with pytest.raises(ParamError, match="optimizer must be one of"):
        make_head("linear", [Task("label", CLASSES)], [16], optimizer="rmsprop")
    with pytest.raises(ParamError, match="width 96 must be a multiple of heads 5"):
        make_head("attention", [Task("label", CLASSES)], [16, 12], heads=5)
    with pytest.raises(ParamError, match=r"late\] base_params: unknown parameter"):
        make_head("late", [Task("label", CLASSES)], [16, 12], base_params={"hiden": 3})
    with pytest.raises(ParamError, match="hidden must be >= 1"):
        make_head("mlp", [Task("label", CLASSES)], [16], hidden=[128, 0])
    with pytest.raises(ParamError, match="an integer"):
        make_head("mlp", [Task("label", CLASSES)], [16], batch_size=1.5)


def test_cli_lists_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["heads", "--list-params", "mlp"]) == 0
    out = capsys.readouterr().out
    assert "[heads.params.mlp]" in out and "hidden = [256]" in out and "optimizer" in out
    assert main(["heads", "--list-params", "nope"]) == 2


def test_seed_reaches_every_part_and_the_config_seed_is_overridable() -> None:
    cfg = HeadsConfig(seed=5, params={"late": {"seed": 3}})
    assert head_params(cfg, "late") == {"seed": 3} and head_params(cfg, "mlp") == {"seed": 5}
    assert "seed" not in head_params(cfg, "zeroshot")
    tasks = [Task("label", CLASSES)]
    late = make_head("late", tasks, [16, 12], seed=7)
    assert [p.params.seed for p in late.parts] == [7, 7]
    stack = make_head("stack", tasks, [16, 12], seed=7, base_params={"seed": 2})
    assert {p.params.seed for parts in stack.parts for p in parts} == {2}
    xs, y, _ = separable(seed=5)
    (tr, va, te), (ytr, yva, _) = split3(xs), split3([y])
    probs = [make_head("late", tasks, [16, 12], seed=s).fit(tr, ytr, va, yva)
             .predict_proba(te)[0] for s in (0, 1)]
    assert not np.array_equal(*probs)  # the seed changed the parts


@pytest.mark.parametrize("name", TRAINED)
def test_seed_reproduces_every_head_bit_for_bit(name: str, tmp_path: Path) -> None:
    xs, y, _ = separable(seed=3)
    xs = xs[:1] if HEADS[name].inputs == "one" else xs
    (tr, va, te), (ytr, yva, _) = split3(xs), split3([y])
    dims = [x.shape[1] for x in xs]
    small = {"width": 32} if name == "attention" else {}  # the same code, quicker
    heads = [make_head(name, [Task("label", CLASSES)], dims, seed=11, **small).fit(
        tr, ytr, va, yva) for _ in range(2)]
    np.testing.assert_array_equal(heads[0].predict_proba(te)[0], heads[1].predict_proba(te)[0])
    save_head(heads[0], tmp_path / name, columns_of(xs))
    loaded, meta = load_head(tmp_path / f"{name}.json")
    assert meta["params"] == record(heads[0].params) and loaded.params == heads[0].params


def test_mlp_depth_sgd_and_augmentation() -> None:
    xs, y, _ = separable(seed=6)
    (tr, va, te), (ytr, yva, yte) = split3(xs), split3([y])
    tasks = [Task("label", CLASSES)]
    deep = make_head("mlp", tasks, [16], hidden=[128, 64])
    widths = [m.out_features for m in deep.net.fuser.body if isinstance(m, torch.nn.Linear)]
    assert widths == [128, 64]
    for head, x in [(deep, 1), (make_head("linear", tasks, [16], optimizer="sgd"), 1),
                    (make_head("concat", tasks, [16, 12], noise=0.3, modality_dropout=0.3), 2)]:
        head.fit(tr[:x], ytr, va[:x], yva)
        assert (head.predict(te[:x])[0] == yte[0]).mean() >= 0.9, head.name
    # auto: the probe's solver for a linear single-label head on one batch (full-batch
    # L-BFGS for other tasks), SGD on more rows, AdamW otherwise
    chosen = {name: make_head(name, tasks, [16]).fit(tr[:1], ytr, va[:1], yva).info
              for name in ("linear", "mlp")}
    assert chosen["linear"]["optimizer"] == "probe" and chosen["mlp"]["optimizer"] == "adamw"
    multi = [Task("tags", CLASSES, multilabel=True)]
    onehot = [np.eye(len(CLASSES), dtype=np.float32)[y] for y in (ytr[0], yva[0])]
    info = make_head("linear", multi, [16]).fit(tr[:1], onehot[:1], va[:1], onehot[1:]).info
    assert info["optimizer"] == "lbfgs"
    with pytest.raises(InputError, match="optimizer 'probe' takes a linear head"):
        make_head("mlp", tasks, [16], optimizer="probe").fit(tr[:1], ytr, va[:1], yva)
    sgd = make_head("linear", tasks, [16], batch_size=32).fit(tr[:1], ytr, va[:1], yva).info
    assert sgd["optimizer"] == "sgd" and sgd["batch_size"] == 32 and 0 < sgd["lr"] < 1


def test_modality_dropout_keeps_one_modality() -> None:
    net = Net(torch.nn.Identity(), [3, 3], [], modality_dropout=0.9)  # type: ignore[arg-type]
    torch.manual_seed(0)
    zs = net.augmented([torch.ones(2000, 3), torch.ones(2000, 3)])
    kept = torch.stack([z.any(1) for z in zs], 1)
    assert kept.any(1).all() and 0.05 < kept.float().mean() < 0.7


@pytest.mark.parametrize("name", ["linear", "mlp", "concat", "attention", "bilinear", "late",
                                  "stack"])
def test_regression_learns_a_numeric_target(name: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    latent = rng.standard_normal(600)  # seen by both modalities, each with its own noise
    xs = [rng.standard_normal((600, d)).astype(np.float32) for d in (8, 6)]
    for j, x in enumerate(xs):
        x[:, j] = latent + 0.1 * rng.standard_normal(600)
    xs = xs[:1] if HEADS[name].inputs == "one" else xs
    target = 3 * latent + 0.1 * rng.standard_normal(600) + 30
    (tr, va, te), (ytr, yva, yte) = split3(xs), split3([target.astype(np.float32)])
    task = Task("price", (), regression=True)
    small = {"width": 32} if name == "attention" else {}  # the same code, quicker
    head = make_head(name, [task], [x.shape[1] for x in xs], **small).fit(tr, ytr, va, yva)
    pred = head.predict(te)[0]
    r2 = 1 - ((pred - yte[0]) ** 2).sum() / ((yte[0] - yte[0].mean()) ** 2).sum()
    assert pred.shape == yte[0].shape and r2 > 0.9, (name, r2)
    save_head(head, tmp_path / "r", columns_of(xs))
    np.testing.assert_array_equal(load_head(tmp_path / "r.json")[0].predict(te)[0], pred)
    with pytest.raises(ValueError, match="does not do regression"):
        make_head("logistic", [task], [8])
