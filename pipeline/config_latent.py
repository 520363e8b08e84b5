"""The ``[latent]`` section: a meta-space column learned over one or several embedding
columns (:mod:`.latent`).  Registered in :data:`pipeline.config.SECTIONS`."""

from __future__ import annotations

from dataclasses import dataclass

from .knobs import DEFAULT_RUN, knob


@dataclass(frozen=True)
class LatentConfig:
    run: str = DEFAULT_RUN
    inputs: tuple[str, ...] = knob(("clip_image", "minilm_text"), "embedding columns the "
                                   "latent reads (with an image column: one latent per "
                                   "image, its captions averaged per text column)")
    name: str = knob("meta", "saved as RUN/latent/NAME.json; writes column NAME_latent")
    kind: str = knob("ae", "ae (autoencoder) or vae (variational: plus the KL to a "
                     "standard normal)", choices=("ae", "vae"))
    dim: int = knob(64, "width of the latent")
    hidden: int = knob(256, "width of the encoder's and decoder's hidden layers")
    modality_dropout: float = knob(0.2, "chance an input of a row is hidden from the "
                                   "encoder while training (rows missing one still get a "
                                   "latent)")
    beta: float = knob(1.0, "vae: weight of the KL term")
    lr: float = knob(3e-3, "AdamW peak learning rate (cosine decay over the rounds)")
    batch_size: int = knob(1024, "rows per step")
    max_rows: int = knob(200_000, "rows sampled into memory to train on (float16); every "
                         "row is encoded")
    val_fraction: float = knob(0.05, "share of the sampled rows that validate (stop "
                               "training, score against PCA); at least 64 rows (up to "
                               "20%) on small runs")
    round_rows: int = knob(50_000, "training rows between two validations")
    max_rounds: int = knob(8, "at most this many rounds")
    patience: int = knob(2, "rounds without a better validation error to stop")
    seed: int = knob(0, "seed of the sample, the split and training")
    threads: int | None = knob(1, "torch threads (1: best on a shared machine; 0 or unset: "
                               "torch's default)")
    dtype: str = knob("float16", "dtype of the written column", choices=("float16",
                                                                         "float32"))
    rebuild: bool = knob(False, "retrain and rewrite every part, even when the saved model "
                         "fits (otherwise a rerun encodes only the shards the column lacks)")
    progress: bool = knob(True, "progress bars")
    verify: bool = knob(True, "check shard checksums before use")
