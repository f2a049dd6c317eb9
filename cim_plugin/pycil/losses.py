"""Each learner's own CIL loss, for the inner step of the bilevel mask update.

The inner step needs L_CIL of the learner on a batch, evaluated on outputs that came from fast
weights (``torch.func.functional_call``), so it cannot reuse the learners' epoch loops. These are
the per-batch losses those loops compute, restated from PyCIL's models (same terms, same
hyper-parameters read from the learner): a function of (learner, outputs, x, y). A learner that
defines ``cil_loss(inputs, targets, outputs)`` itself (the plugin's LUCIR) is used as it is.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .nets import unwrap


def kd_loss(pred: torch.Tensor, soft: torch.Tensor, T: float) -> torch.Tensor:
    """PyCIL's _KD_loss: cross-entropy between temperature-softened distributions."""
    pred = torch.log_softmax(pred / T, dim=1)
    soft = torch.softmax(soft / T, dim=1)
    return -(soft * pred).sum() / pred.shape[0]


def _module_T(learner: Any, module: str) -> float:
    return float(learner.args.get("T", getattr(importlib.import_module(module), "T", 2)))


def icarl_loss(learner, outputs, x, y):
    logits = outputs["logits"]
    loss = F.cross_entropy(logits, y)
    if learner._cur_task > 0 and learner._old_network is not None:
        with torch.no_grad():
            old = unwrap(learner._old_network)(x)["logits"]
        loss = loss + kd_loss(logits[:, : learner._known_classes], old, _module_T(learner, "models.icarl"))
    return loss


def der_loss(learner, outputs, x, y):
    loss = F.cross_entropy(outputs["logits"], y)
    if learner._cur_task > 0:
        aux_y = torch.where(y - learner._known_classes + 1 > 0, y - learner._known_classes + 1, 0)
        loss = loss + F.cross_entropy(outputs["aux_logits"], aux_y)
    return loss


def foster_loss(learner, outputs, x, y):
    logits = outputs["logits"]
    if learner._cur_task == 0 or learner.per_cls_weights is None:
        return F.cross_entropy(logits, y)
    loss = F.cross_entropy(logits / learner.per_cls_weights, y) + F.cross_entropy(outputs["fe_logits"], y)
    old = outputs["old_logits"].detach()
    return loss + learner.lambda_okd * kd_loss(logits[:, : learner._known_classes], old, learner.args["T"])


CIL_LOSSES: dict[str, Callable] = {"icarl": icarl_loss, "der": der_loss, "foster": foster_loss}


def cil_loss_for(learner: Any) -> Callable:
    """``(outputs, x, y) -> loss`` for this learner."""
    own = getattr(learner, "cil_loss", None)
    if callable(own):
        return lambda outputs, x, y: own(x, y, outputs)
    name = str(learner.args.get("model_name", "")).lower()
    if name not in CIL_LOSSES:
        raise ValueError(f"no CIL loss known for model_name {name!r}; the bilevel step supports {', '.join(CIL_LOSSES)}")
    fn = CIL_LOSSES[name]
    return lambda outputs, x, y: fn(learner, outputs, x, y)
