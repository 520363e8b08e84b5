"""The ``[align]`` section: training an adapter from one embedding column into another
(:mod:`.align`).  Registered in :data:`pipeline.config.SECTIONS` like every section."""

from __future__ import annotations

from dataclasses import dataclass

from .knobs import DEFAULT_RUN, knob


@dataclass(frozen=True)
class AlignConfig:
    run: str = DEFAULT_RUN
    source: str = knob("use_text", "embedding column the adapter maps from")
    target: str = knob("minilm_text", "embedding column it maps into (a caption column "
                       "and an image column pair each caption with its image)")
    adapter: str = knob("two_layer", "ridge (closed form) or two_layer (ridge plus a "
                        "trained GELU branch)", choices=("ridge", "two_layer"))
    name: str = knob("", "saved as RUN/align/NAME.json (default: SOURCE-to-TARGET)")
    val_fraction: float = knob(0.1, "share of the images whose pairs validate (pick alpha, "
                               "stop training, score)")
    exclude_splits: tuple[str, ...] = knob(("test",), "rows of these splits are never "
                                           "used (kept for evaluation)")
    hidden: int = knob(512, "two_layer: width of the branch")
    structure: float = knob(0.1, "two_layer: weight of the batch-similarity term")
    lr: float = knob(6e-3, "two_layer: AdamW peak learning rate (warm-up, then cosine "
                     "decay to zero over the budget)")
    batch_size: int = knob(2048, "two_layer: pairs per step")
    max_rounds: int = knob(6, "two_layer: the training budget, in rounds of 50,000 pairs (or "
                           "an epoch) between validations")
    patience: int = knob(2, "two_layer: rounds without a better validation loss to stop")
    precision: str = knob("auto", "two_layer: matrix products in bfloat16 (auto: where the "
                          "CPU multiplies bfloat16 natively) or float32",
                          choices=("auto", "float32", "bfloat16"))
    max_pairs: int = knob(2_000_000, "two_layer: pairs held in memory (float16), sampled; "
                          "ridge always reads every pair")
    seed: int = knob(0, "seed of the validation split, sample and training")
    threads: int | None = knob(None, "torch threads (default: one per core)")
    progress: bool = knob(True, "progress bar while reading pairs")
    verify: bool = knob(True, "check shard checksums before use")
