"""Run configuration: each knob declared once, as a field of a frozen dataclass.

One TOML file configures every stage; each stage reads its own section, and the run
directory is the top-level ``run``::

    run = "runs/demo"            # run directory shared by all stages (--run)
    [data]    path, root, format                     [embed]  device, batch_size, ...
    [[encoders]] name, type, model, pretrained       [index]  memory_budget_gb, ...
    [search]  k, modality, ...   [heads] label, inputs, heads, ...   [eval] split, ...
    [serve]   host, port, ...    [dedup] by, threshold, method, keep, ...
    [align]  source, target, adapter, ...   [latent] inputs, name, kind, dim, ...

Precedence: dataclass default < TOML < command line.  A knob's field carries its help
text and CLI flag (:func:`knob`); ``pipeline.options.add_options`` derives the argparse options from
the fields, so a knob is written once.  Unknown or misplaced keys are one-line errors.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib

from embeddings.encoder_base import EncoderSpec
from embeddings.errors import InputError, MissingError
from embeddings.limits import DEFAULT_MAX_PIXELS
from embeddings.names import check_name

from .config_align import AlignConfig
from .config_latent import LatentConfig
from .knobs import DEFAULT_RUN, knob

DEFAULT_CONFIG = Path("configs/default.toml")
@dataclass(frozen=True)
class DataConfig:
    path: str = knob("data/demo/manifest.csv", "manifest (csv/jsonl/parquet/COCO/Karpathy "
                     "json), image folder, or webdataset tar shards (a brace pattern such as "
                     "shards/{00000..00127}.tar; local, s3://, https://, ...)", flag="--data")
    root: str | None = knob(None, "folder image paths are relative to (default: the "
                            "manifest's), or a remote root (s3://bucket/prefix, https://host/"
                            "path) the image column's keys or URLs lie under")
    format: str = knob("auto", "dataset format", choices=(
        "auto", "csv", "jsonl", "parquet", "imagefolder", "coco", "karpathy", "webdataset"))
    caption_field: str | None = knob(None, "webdataset: JSON field holding the caption "
                                     "(unset: the txt member)")
    label_field: str | None = knob(None, "webdataset: JSON field holding the label "
                                   "(unset: the cls member)")
    labels_field: str | None = knob(None, "webdataset: JSON field holding the labels (a list)")
    split_field: str | None = knob(None, "webdataset: JSON field holding the split")
    retries: int = knob(3, "remote reads: retries after a network error (with backoff), "
                        "then the item or shard is rejected")
    timeout: float = knob(60.0, "remote reads: seconds to connect, and between two reads")

    def fields(self) -> Any:
        """Where a tar sample's caption, label, labels and split come from."""
        from embeddings.ingest import Fields

        return Fields(self.caption_field, self.label_field, self.labels_field,
                      self.split_field)

    def network(self) -> Any:
        """How remote reads are tried (not part of the run's identity)."""
        from embeddings.sources import Network

        if self.retries < 0 or self.timeout <= 0:
            raise InputError(f"[data] retries must be >= 0 and timeout > 0, not "
                             f"{self.retries} and {self.timeout}")
        return Network(retries=self.retries, timeout=self.timeout)


@dataclass(frozen=True)
class EmbedConfig:
    data: DataConfig = field(default_factory=DataConfig)
    encoders: tuple[EncoderSpec, ...] = ()
    run: str = DEFAULT_RUN
    device: str = knob("auto", "auto, cpu, cuda or cuda:N")
    batch_size: int = knob(64, "items per model call")
    workers: int | None = knob(None, "image decoding processes (0: in the main process; "
                               "default: 4 on CPU, 8 on GPU)")
    shard_size: int = knob(1000, "input image records per block (one Parquet shard each)")
    dtype: str = knob("float16", "stored vector type", choices=("float16", "float32"))
    max_pixels: int = knob(DEFAULT_MAX_PIXELS, "larger images are skipped before decoding")
    decode: str = knob("auto", "image decode path: exact (PIL + open_clip, bit-for-bit), fast "
                       "(batched JPEG decode + tensor preprocess), auto (fast on CUDA)",
                       choices=("auto", "exact", "fast"))
    progress: bool = knob(True, "progress bars")
    engine: str = knob("local", "what runs the blocks: this process, or a Ray cluster "
                       "(pip install -e \".[ray]\")", choices=("local", "ray"))
    ray_address: str | None = knob(None, "Ray cluster to join, e.g. auto or ray://host:10001 "
                                   "(default: start a local one)")


@dataclass(frozen=True)
class IndexConfig:
    run: str = DEFAULT_RUN
    columns: tuple[str, ...] = knob((), "embedding columns to index (default: all)",
                                    flag="--columns")
    memory_budget_gb: float = knob(4.0, "memory for the whole build of one index in GiB "
                                   "(training sample, codes, buffers; larger indexes keep "
                                   "their lists on disk)", flag="--memory-budget")
    factory: str = knob("", "force a FAISS factory string, e.g. Flat, HNSW32, IVF1024,Flat")
    flat_max: int = knob(100_000, "exact search up to this many vectors")
    target_recall: float = knob(0.95, "recall@10 the search parameters are tuned to")
    recall_threshold: float = knob(0.9, "warn when the measured recall@10 is below this")
    recall_queries: int = knob(500, "held-out queries for tuning, as many for measuring")
    device: str = knob("auto", "auto, cpu or cuda (GPU needs a GPU build of FAISS)")
    rebuild: bool = knob(False, "rebuild from scratch instead of adding new shards")
    dedup: bool | None = knob(None, "searches keep to the dedup keep-list (--no-dedup: all)")
    verify: bool = knob(True, "check shard and index checksums before use")
    engine: str = knob("local", "what adds the vectors: this process, or Ray tasks (each "
                       "adds a range of shards; pip install -e \".[ray]\")",
                       choices=("local", "ray"))
    ray_address: str | None = knob(None, "Ray cluster to join, e.g. auto or ray://host:10001 "
                                   "(default: start a local one)")
    workers: int | None = knob(None, "Ray tasks adding at once, each with its share of the "
                               "budget (default: this machine's CPUs)")
    progress: bool = knob(True, "progress bars")


@dataclass(frozen=True)
class SearchConfig:
    run: str = DEFAULT_RUN
    k: int = knob(10, "number of hits")
    modality: str = knob("image", "what to return: image rows or caption rows",
                         choices=("image", "text"))
    column: str | None = knob(None, "index to search (default: picked from --modality and "
                              "the query)")
    via: str | None = knob(None, "search through this adapter (RUN/align/NAME.json): the "
                           "query is embedded by its source encoder (e.g. multilingual) and "
                           "mapped into its target's space")
    hybrid: bool = knob(False, "a text query through every source of the hybrid weights "
                        "`eval-retrieval --hybrid` tuned (image and caption indexes), fused; "
                        "returns images")
    device: str = knob("auto", "device for the query encoder")
    mmap: bool = knob(True, "memory-map the index instead of reading it into memory")
    verify: bool = knob(True, "check the index checksum before use")


@dataclass(frozen=True)
class EvalConfig:
    run: str = DEFAULT_RUN
    split: str | None = knob(None, "evaluate only this split (default: all rows)")
    encoders: tuple[str, ...] = knob((), "encoders to evaluate (default: every image+text "
                                     "encoder)")
    exact_only: bool = knob(False, "skip the index (no index needed)")
    via: tuple[str, ...] = knob((), "adapters (RUN/align/NAME) to evaluate text->image "
                                "through, beside their target model's own text tower")
    exclude_leaks: bool = knob(False, "also evaluate without images that have a copy in train")
    hybrid: bool = knob(False, "also tune hybrid retrieval (the sources' scores fused by "
                        "weights tuned for recall@10 on --hybrid-split), report it beside each "
                        "source alone and save the weights for search --hybrid")
    hybrid_sources: tuple[str, ...] = knob((), "sources to fuse: image or caption columns "
                                           "(clip_image,minilm_text) or via:ADAPTER (default: "
                                           "the CLIP image column and the first text-only "
                                           "caption column)")
    hybrid_split: str = knob("val", "split the hybrid weights are tuned on")


@dataclass(frozen=True)
class HeadsConfig:
    run: str = DEFAULT_RUN
    label: str = knob("label", "single-label target column of the image rows")
    inputs: tuple[str, ...] = knob(("clip_image", "clip_text", "minilm_text"),
                                   "embedding columns (text: mean of an image's captions)")
    heads: tuple[str, ...] = knob(("zeroshot", "logistic", "linear", "mlp", "concat", "sum",
                                   "sum_mlp", "product", "gated", "attention", "bilinear",
                                   "late", "late_avg", "stack"),
                                  "heads to train, e.g. logistic,concat,late")
    multilabel: str = knob("labels", "list-valued target column ('' = none)")
    multilabel_heads: tuple[str, ...] = knob(("mlp", "concat"), "heads for the multi-label "
                                             "target")
    multitask: tuple[str, ...] = knob(("label", "labels"), "columns sharing one trunk")
    multitask_head: str = knob("gated", "head of the multi-task run")
    labels_file: str = knob("", "CSV, JSONL or Parquet with an id column and label columns, "
                            "joined by id to the run's images: a new task, no re-embedding",
                            flag="--labels")
    task: str = knob("auto", "what `label` is: auto (a floating-point column is a "
                     "regression target), classification or regression",
                     choices=("auto", "classification", "regression"))
    metric: str = knob("macro_f1", "picks the best head, drawn in the chart (regression "
                       "targets: r2)", choices=("accuracy", "macro_f1"))
    seed: int = knob(0, "seed of splits and training")
    exclude_leaks: bool = knob(False, "evaluate without images that have a copy in train too")
    dedup: bool = knob(False, "train and evaluate on the dedup keep-list's images only")
    memory_budget_gb: float | None = knob(
        None, "memory the heads may hold in GiB (default: the memory available); features "
        "beyond it stream from a float16 cache on disk (RUN/heads/cache)",
        flag="--memory-budget")
    val_fraction: float = knob(0.15, "used only when splits must be made here", cli=False)
    test_fraction: float = knob(0.15, "used only when splits must be made here", cli=False)
    params: dict[str, dict[str, Any]] = knob(  # noqa: RUF009 (a default_factory field)
        {}, "per-head parameters, [heads.params.<head>] (--param HEAD.KEY=VALUE)", cli=False)


@dataclass(frozen=True)
class ServerConfig:
    run: str = DEFAULT_RUN
    host: str = knob("127.0.0.1", "address to bind (anything but loopback is reachable from "
                     "other machines)")
    port: int = knob(8000, "port (0: any free port)")
    device: str = knob("auto", "device for the query encoders")
    threads: int | None = knob(None, "torch threads per query encoding (default: one per "
                               "core; 1 is faster on a machine busy with other work)")
    max_upload_mb: float = knob(8.0, "largest image upload in MiB")
    root: str | None = knob(None, "where the dataset's images are: their folder, a remote "
                            "root (s3://bucket/prefix, https://host/path), or the folder or "
                            "URL prefix of the tar shards (default: the place recorded at "
                            "embed time, if the run was sealed on this machine)")


@dataclass(frozen=True)
class DedupConfig:  # README "The dedup stage" says what each knob does
    run: str = DEFAULT_RUN
    by: tuple[str, ...] = knob(("digest", "phash", "vector"), "what joins two images")
    column: str | None = knob(None, "image column compared (default: the first one)")
    threshold: float = knob(0.95, "cosine at or above which two images are near-duplicates")
    hash_distance: int = knob(8, "most differing bits of two perceptual hashes (of 64)")
    method: str = knob("auto", "neighbours: index (k-NN), clusters (per IVF list), exact; auto:"
                       " by the index", choices=("auto", "index", "clusters", "exact"))
    k: int = knob(10, "neighbours per image from the index")
    nprobe: int = knob(8, "index method, IVF index: lists searched per image")
    lists: int = knob(3, "clusters method: nearest IVF lists compared per image")
    keep: tuple[str, ...] = knob(("first",), "keep rules in order: first, resolution, split")
    prefer: tuple[str, ...] = knob(("train", "val", "test"), "split order of the split rule")
    memory_budget_gb: float | None = knob(None, "GiB (default: index's)", flag="--memory-budget")
    sheet_groups: int = knob(12, "groups drawn on the contact sheet (largest first)")
    verify: bool = knob(True, "check shard and index checksums before use")
    progress: bool = knob(True, "progress bars")


SECTIONS: dict[str, type] = {"data": DataConfig, "embed": EmbedConfig, "index": IndexConfig,
                             "search": SearchConfig, "eval": EvalConfig, "heads": HeadsConfig,
                             "serve": ServerConfig, "dedup": DedupConfig,
                             "align": AlignConfig, "latent": LatentConfig}
NOT_IN_TOML = {"run", "data", "encoders"}  # top-level keys / own tables, not section keys


def load_toml(path: str | Path | None) -> dict[str, Any]:
    """The parsed config; ``None``: ``configs/default.toml`` if present, else defaults only."""
    if path is None:
        if not DEFAULT_CONFIG.is_file():
            return {}
        path = DEFAULT_CONFIG
    path = Path(path)
    if not path.is_file():
        raise MissingError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"config file {path} is not valid TOML: {e}") from None
    _check_top(raw, path)
    for name, cls in SECTIONS.items():  # every section, not just the command's: fail early
        if name in raw:
            build(cls, raw, name, {})
    if "encoders" in raw:
        _encoders(raw, None, None)
    return raw


def _check_top(raw: Mapping[str, Any], path: Path) -> None:
    allowed = {"run", "encoders", *SECTIONS}
    for key in raw:
        if key == "out":
            raise InputError(f"{path}: top-level key 'out' is now 'run' (the run directory)")
        if key not in allowed:
            raise InputError(f"{path}: unknown top-level key {key!r}; allowed: {sorted(allowed)}")


def section_values(cls: type, raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The TOML table ``[name]`` checked against ``cls``'s knobs."""
    section = raw.get(name, {})
    if not isinstance(section, dict):
        raise InputError(f"[{name}] must be a table")
    known = {f.name for f in fields(cls) if f.name not in NOT_IN_TOML}
    for key in section:
        if key not in known:
            where = [s for s, c in SECTIONS.items() if key in {f.name for f in fields(c)}
                     and key not in NOT_IN_TOML]
            hint = (f" (it belongs in [{where[0]}])" if where else
                    " (the run directory is the top-level `run`)" if key in ("run", "out")
                    else "")
            raise InputError(f"unknown key {key!r} in [{name}]{hint}; allowed: {sorted(known)}")
    return dict(section)


def build(cls: type, raw: Mapping[str, Any], name: str, overrides: Mapping[str, Any],
          **fixed: Any) -> Any:
    """``cls`` from its defaults, then ``[name]`` of the TOML, then non-None overrides."""
    values = {**section_values(cls, raw, name),
              **{k: v for k, v in overrides.items() if v is not None}}
    hints = typing.get_type_hints(cls)
    for key, value in list(values.items()):
        values[key] = _coerce(value, hints[key], f"[{name}] {key}")
        choices = next(f.metadata.get("choices") for f in fields(cls) if f.name == key)
        if choices and values[key] not in choices:
            raise InputError(f"[{name}] {key} must be one of {list(choices)}, not {value!r}")
    return cls(**values, **fixed)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    args = typing.get_args(hint)
    base = optional_base(hint)
    if value is None and type(None) in args:
        return None
    if typing.get_origin(base) is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise InputError(f"{where} must be a list of strings, not {value!r}")
        return tuple(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    want = typing.get_origin(base) or base
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise InputError(f"{where} must be {getattr(want, '__name__', want)}, not {value!r}")
    return value


def run_dir(raw: Mapping[str, Any], override: str | None) -> str:
    if override:
        return override
    value = raw.get("run", DEFAULT_RUN)
    if not isinstance(value, str) or not value:
        raise InputError(f"top-level `run` must be a directory name, not {value!r}")
    return value


def embed_config(raw: Mapping[str, Any], run: str | None = None,
                 data: str | Mapping[str, Any] | None = None, model: str | None = None,
                 pretrained: str | None = None, **overrides: Any) -> EmbedConfig:
    """The embed stage: ``[data]``, ``[embed]``, ``[[encoders]]``; ``data`` overrides
    ``[data]`` (a path, or a mapping of its keys); ``model``/``pretrained`` replace those
    of the first open_clip encoder."""
    data_ov = {"path": data} if isinstance(data, str) else dict(data or {})
    data_cfg = build(DataConfig, raw, "data", data_ov)
    encoders = _encoders(raw, model, pretrained)
    cfg = build(EmbedConfig, raw, "embed", overrides, data=data_cfg, encoders=encoders,
                run=run_dir(raw, run))
    if cfg.batch_size < 1 or cfg.shard_size < 1:
        raise InputError("[embed] batch_size and shard_size must be >= 1")
    if cfg.max_pixels < 1:
        raise InputError(f"[embed] max_pixels must be >= 1 (pixels per image), not "
                         f"{cfg.max_pixels}")
    if cfg.workers is not None and cfg.workers < 0:
        raise InputError(f"[embed] workers must be >= 0, not {cfg.workers}")
    return cfg


def _encoders(raw: Mapping[str, Any], model: str | None,
              pretrained: str | None) -> tuple[EncoderSpec, ...]:
    tables = raw.get("encoders", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise InputError("[[encoders]] must be a list of tables")
    known = {f.name for f in fields(EncoderSpec)}
    encoders = []
    for t in tables:
        unknown = sorted(set(t) - known)
        missing = sorted(f.name for f in fields(EncoderSpec)
                         if f.default is MISSING and f.name not in t)
        if unknown or missing:
            raise InputError(f"[[encoders]] {t.get('name', '?')!r}: unknown key(s) {unknown}, "
                             f"missing {missing}; allowed: {sorted(known)}")
        check_name(t["name"], "encoder name")
        encoders.append(EncoderSpec(**t))
    if model or pretrained:
        clip = [i for i, e in enumerate(encoders) if e.type == "open_clip"]
        if not clip:
            raise InputError("--model/--pretrained given, but the config has no open_clip "
                             "encoder")
        first = encoders[clip[0]]
        new_model = model or first.model
        tag = pretrained or (None if new_model.startswith("local-dir:") else first.pretrained)
        encoders[clip[0]] = replace(first, model=new_model, pretrained=tag)
    if not encoders:
        raise InputError("no [[encoders]] in the config: nothing to embed with")
    names = [e.name for e in encoders]
    if len(set(names)) != len(names):
        raise InputError(f"encoder names must be unique, got {names}")
    return tuple(encoders)


def config_models(raw: Mapping[str, Any]) -> tuple[str, ...]:
    """The model strings the config's ``[[encoders]]`` name (checked by :func:`load_toml`)."""
    tables = raw.get("encoders", [])
    return tuple(t["model"] for t in tables if isinstance(t, dict)
                 and isinstance(t.get("model"), str))


def stage_config(cls: type, name: str, raw: Mapping[str, Any], run: str | None = None, /,
                 **overrides: Any) -> Any:
    """A non-embed stage's config: its TOML section, the top-level run, CLI overrides
    (positional-only parameters, so a knob may be called ``name`` or ``run``)."""
    return build(cls, raw, name, overrides, run=run_dir(raw, run))


def optional_base(hint: Any) -> Any:
    """``int`` for ``int | None``; the hint itself otherwise."""
    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None))
    return hint
