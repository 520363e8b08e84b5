"""Adapters between embedding spaces: one column's vectors mapped into another's.

A multilingual text encoder's space mapped into CLIP's (a Chinese query finds images),
a sentence model's into CLIP's image space (captions find images), any column into any
other over the rows of a run, learned from pairs the run already holds.

==========  ==========================================================================
ridge       closed-form ridge regression, streaming sums (:mod:`.ridge`): the baseline,
            exact, one pass over the pairs
two_layer   ridge plus a two-layer GELU branch trained with MSE and a batch-similarity
            term, early stopping on validation (:mod:`.two_layer`)
==========  ==========================================================================

Use::

    from embeddings.align import load_adapter, check_adapter_columns
    adapter = load_adapter("RUN/align/use_text-to-minilm_text.json")
    check_adapter_columns(adapter, manifest.columns, sides=("target",))
    q = adapter.apply(source_encoder.encode_texts(["一辆红色自行车"]))  # unit rows

Training from a run is the ``align`` stage (``python -m pipeline align``).
"""

from .adapter import KINDS, Adapter, baselines, scores, unit
from .io import (
    adapter_summary,
    check_adapter_columns,
    load_adapter,
    load_run_adapter,
    save_adapter,
)
from .ridge import ALPHAS, RidgeFit, RidgeStats, fit_ridge, solve_ridge
from .two_layer import TwoLayerParams, fit_two_layer

__all__ = ["ALPHAS", "KINDS", "Adapter", "RidgeFit", "RidgeStats", "TwoLayerParams",
           "adapter_summary", "baselines", "check_adapter_columns", "fit_ridge",
           "fit_two_layer", "load_adapter", "load_run_adapter", "save_adapter", "scores",
           "solve_ridge", "unit"]
