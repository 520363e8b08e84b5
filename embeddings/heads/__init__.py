"""Classification and regression heads on cached embeddings: one registry, one
interface, typed parameters, safe save/load.

Every head takes a list of aligned feature arrays (one ``(n, dim)`` float32 array per
embedding column) and one target per :class:`Task`::

    head = make_head("gated", tasks, dims=[512, 384], seed=0, width=128)
    head.fit(train_xs, train_ys, val_xs, val_ys)    # val: early stopping, sweeps, thresholds
    probs = head.predict_proba(xs)                   # one (n, n_classes) array per task

Modules: :mod:`.base` (Head, Task, registry), :mod:`.params` (typed parameters),
:mod:`.logistic` + :mod:`.lbfgs` (linear probe), :mod:`.zeroshot` (CLIP zero-shot),
:mod:`.fusers` + :mod:`.torch_heads` (linear / MLP / early and attention fusions),
:mod:`.late` (late fusion), :mod:`.stack` (stacking), :mod:`.io` (safetensors + JSON
save/load).  The concrete heads are registered here, so importing any submodule never
imports the others back.
"""

from __future__ import annotations

from dataclasses import replace

from . import late, logistic, stack, torch_heads, zeroshot
from .base import HEADS, Head, HeadType, Task, head_type, make_head, register_head
from .fusers import KINDS
from .io import check_inputs_match, load_head, save_head
from .params import ParamError, describe

register_head("logistic", logistic.LogisticHead, params=logistic.LogisticParams(),
              inputs="one", multilabel=False,
              doc="softmax regression, L2 swept on validation (CLIP linear-probe protocol)")
register_head("zeroshot", zeroshot.ZeroShotHead, params=zeroshot.ZeroShotParams(),
              inputs="one", multilabel=False, needs_text_tower=True,
              doc="CLIP zero-shot: class-name prompts through the text tower, no training")
for _name, _kind in KINDS.items():
    register_head(_name, torch_heads.head_class(_name, _kind.fuser), params=_kind.params,
                  inputs=_kind.inputs, multilabel=True, regression=True, doc=_kind.doc)
register_head("late", late.LateFusionHead, params=late.LateParams(), inputs="many",
              multilabel=True, regression=True,
              doc="late fusion: a head per modality, mixing weights tuned on validation")
register_head("late_avg", late.LateFusionHead, params=replace(late.LateParams(), tune=False),
              inputs="many", multilabel=True, regression=True,
              doc="late fusion baseline: a head per modality, equal weights (0.5/0.5)")
register_head("stack", stack.StackHead, params=stack.StackParams(), inputs="many",
              multilabel=True, regression=True,
              doc="stacking: out-of-fold heads per modality, a learned combiner f(sum a_i M_i)")

__all__ = ["HEADS", "Head", "HeadType", "ParamError", "Task", "check_inputs_match",
           "describe", "head_type", "load_head", "make_head", "register_head", "save_head"]
