"""One config mechanism: default < TOML < command line for every stage; clear errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from embeddings.errors import InputError
from pipeline import config as C
from pipeline import options as opts
from pipeline.cli import build_parser, main

TOML = """
run = "runs/from-toml"
[data]
path = "data/demo/manifest.csv"
[embed]
batch_size = 7
dtype = "float32"
[[encoders]]
name = "clip"
type = "open_clip"
model = "local-dir:models/tiny-clip"
[index]
memory_budget_gb = 2
target_recall = 0.8
[search]
k = 3
modality = "text"
[eval]
split = "val"
[heads]
heads = ["logistic", "concat"]
seed = 5
[serve]
port = 8123
"""


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@pytest.fixture
def toml(tmp_path: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(TOML)
    return path


def test_defaults_without_toml() -> None:
    cfg = C.stage_config(C.IndexConfig, "index", {})
    assert cfg.run == C.DEFAULT_RUN and cfg.memory_budget_gb == 4.0 and cfg.verify is True
    assert C.stage_config(C.SearchConfig, "search", {}).k == 10
    assert C.stage_config(C.HeadsConfig, "heads", {}).seed == 0
    assert C.stage_config(C.EvalConfig, "eval", {}).split is None


@pytest.mark.parametrize(("argv", "cls", "section", "field", "toml_value", "cli_value"), [
    (["index", "--target-recall", "0.5"], C.IndexConfig, "index", "target_recall", 0.8, 0.5),
    (["index", "--memory-budget", "1"], C.IndexConfig, "index", "memory_budget_gb", 2.0, 1.0),
    (["search", "q", "--k", "9"], C.SearchConfig, "search", "k", 3, 9),
    (["search", "q", "--modality", "image"], C.SearchConfig, "search", "modality", "text",
     "image"),
    (["eval-retrieval", "--split", "test"], C.EvalConfig, "eval", "split", "val", "test"),
    (["heads", "--seed", "9"], C.HeadsConfig, "heads", "seed", 5, 9),
    (["heads", "--heads", "mlp,late"], C.HeadsConfig, "heads", "heads",
     ("logistic", "concat"), ("mlp", "late")),
    (["serve", "--port", "9001"], C.ServerConfig, "serve", "port", 8123, 9001),
])
def test_precedence_per_stage(toml: Path, argv: list[str], cls: type, section: str, field: str,
                              toml_value: object, cli_value: object) -> None:
    raw = C.load_toml(toml)
    assert getattr(C.stage_config(cls, section, raw), field) == toml_value
    args = _parse([*argv, "--config", str(toml), "--run", "runs/cli"])
    cfg = C.stage_config(cls, section, raw, args.run, **opts.overrides(args, cls))
    assert getattr(cfg, field) == cli_value
    assert cfg.run == "runs/cli"
    assert C.stage_config(cls, section, raw).run == "runs/from-toml"


def test_precedence_embed(toml: Path) -> None:
    raw = C.load_toml(toml)
    cfg = C.embed_config(raw)
    assert (cfg.batch_size, cfg.dtype, cfg.shard_size) == (7, "float32", 1000)
    args = _parse(["embed", "--config", str(toml), "--batch-size", "3", "--dtype", "float16",
                   "--data", "x.csv", "--no-progress", "--model", "local-dir:/m"])
    cfg = C.embed_config(raw, run=args.run, data=opts.overrides(args, C.DataConfig),
                         model=args.model, **opts.overrides(args, C.EmbedConfig))
    assert (cfg.batch_size, cfg.dtype, cfg.progress) == (3, "float16", False)
    assert cfg.data.path == "x.csv" and cfg.encoders[0].model == "local-dir:/m"
    assert cfg.run == "runs/from-toml"


@pytest.mark.parametrize(("text", "message"), [
    ('[embed]\nout = "runs/x"\n', "unknown key 'out' in [embed]"),
    ('[index]\nrun = "runs/x"\n', "unknown key 'run' in [index] (the run directory is"),
    ('[heads]\nbatch_size = 3\n', "it belongs in [embed]"),
    ('out = "runs/x"\n', "top-level key 'out' is now 'run'"),
    ('[serch]\nk = 3\n', "unknown top-level key 'serch'"),
    ('[search]\nk = "ten"\n', "[search] k must be int"),
    ('[embed]\ndtype = "float64"\n', "[embed] dtype must be one of"),
    ('[[encoders]]\nname = "../../x"\ntype = "open_clip"\nmodel = "m"\n', "not a valid name"),
    ('[[encoders]]\nname = "c"\ntype = "open_clip"\n', "missing ['model']"),
    ('[embed]\nworkers = -1\n[[encoders]]\nname = "c"\ntype = "t"\nmodel = "m"\n',
     "workers must be >= 0"),
    ("[embed\n", "not valid TOML"),
])
def test_misplaced_or_bad_keys_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["embed", "--config", str(path), "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_missing_config_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["search", "q", "--config", str(tmp_path / "missing.toml"),
                 "--run", str(tmp_path)]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_every_knob_has_one_declaration() -> None:
    """CLI options come from the dataclasses: a knob's help text appears in --help."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    index_help = sub.choices["index"].format_help()
    for f in C.fields(C.IndexConfig):
        if f.metadata.get("cli"):
            assert f.metadata["help"].split(",")[0][:30] in " ".join(index_help.split())


def test_bad_values_raise_input_error() -> None:
    with pytest.raises(InputError, match="must be a list of strings"):
        C.stage_config(C.HeadsConfig, "heads", {"heads": {"inputs": 3}})
