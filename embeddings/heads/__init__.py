"""Classification heads on cached embeddings: one registry, one interface, safe save/load.

Every head takes a list of aligned feature arrays (one ``(n, dim)`` float32 array per
embedding column) and one target per :class:`Task`::

    head = make_head("gated", tasks, dims=[512, 384], seed=0)
    head.fit(train_xs, train_ys, val_xs, val_ys)    # val: early stopping, sweeps, thresholds
    probs = head.predict_proba(xs)                   # one (n, n_classes) array per task

Modules: :mod:`.base` (Head, Task, registry), :mod:`.logistic` (linear probe),
:mod:`.zeroshot` (CLIP zero-shot), :mod:`.torch_heads` (linear / MLP / early fusion),
:mod:`.late` (late fusion), :mod:`.io` (safetensors + JSON save/load).  The concrete heads
are registered here, so importing any submodule never imports the others back.
"""

from __future__ import annotations

from . import late, logistic, torch_heads, zeroshot
from .base import HEADS, Head, HeadType, Task, make_head, register_head
from .io import check_inputs_match, load_head, save_head

register_head("logistic", logistic.LogisticHead, inputs="one", multilabel=False,
              doc="softmax regression, L2 swept on validation (CLIP linear-probe protocol)",
              **logistic.DEFAULTS)
register_head("zeroshot", zeroshot.ZeroShotHead, inputs="one", multilabel=False,
              doc="CLIP zero-shot: class-name prompts through the text tower, no training",
              needs_text_tower=True, **zeroshot.DEFAULTS)
for _kind, (_inputs, _doc) in torch_heads.KINDS.items():
    register_head(_kind, torch_heads.TorchHead, inputs=_inputs, multilabel=True, doc=_doc,
                  **torch_heads.defaults(_kind))
register_head("late", late.LateFusionHead, inputs="many", multilabel=True,
              doc="late fusion: a head per modality, mixing weights tuned on validation",
              **late.DEFAULTS)
register_head("late_avg", late.LateFusionHead, inputs="many", multilabel=True,
              doc="late fusion baseline: a head per modality, equal weights (0.5/0.5)",
              **{**late.DEFAULTS, "tune": False})

__all__ = ["HEADS", "Head", "HeadType", "Task", "check_inputs_match",
           "load_head", "make_head", "register_head", "save_head"]
