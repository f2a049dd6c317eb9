"""Feature adaptation (Iscen, Zhang, Lazebnik, Schmid, ECCV 2020) and feature rehearsal. PyCIL-free.

After a phase, the features of the phase's training images under the old model (``f_old``) and
under the new one (``f_new``) are known. A small MLP ``A`` is trained to map the one to the other:

    loss = mean(1 − cos(A(f_old), f_new)) + cls_coef · CE(classifier(A(f_old)), y)

(``classifier``: the new model's classifier, read-only), and every stored feature vector is then
carried through ``A``, so the memory follows the new model's feature space without its images.
``A`` is residual, x + W₂ ReLU(W₁ x + b₁) + b₂, with W₂ and b₂ zero at the start: before any step it
is the identity, so adaptation starts from "no adaptation". Its random draws (initial W₁, batch
order) come from a generator seeded by the caller.

``train_classifier`` then aligns the classifier with the new space on the adapted stored vectors and
the phase's new features (the classifier training of Iscen et al.). ``mean_cosine`` measures drift (cosine of stored vectors to the new model's features of the same
images). ``RehearsalOptimizer`` wraps a learner's optimiser so that every ``step()`` first adds the
gradient of an extra loss (the stored features' classification loss) to what the learner's own loss
left in ``.grad``: the two losses are summed without touching the learner's training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


class FeatureAdapter(nn.Module):
    """x + W₂ ReLU(W₁ x + b₁) + b₂, the identity at initialisation."""

    def __init__(self, dim: int, hidden: int, generator: torch.Generator | None = None):
        super().__init__()
        self.dim, self.hidden = int(dim), int(hidden)
        self.inner = nn.Linear(self.dim, self.hidden)
        self.outer = nn.Linear(self.hidden, self.dim)
        bound = 1.0 / self.dim ** 0.5
        with torch.no_grad():
            self.inner.weight.uniform_(-bound, bound, generator=generator)
            self.inner.bias.uniform_(-bound, bound, generator=generator)
            self.outer.weight.zero_()
            self.outer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(F.relu(self.inner(x)))

    def state(self) -> dict:
        """Explicit state (dims and weights) for checkpoints."""
        return {"dim": self.dim, "hidden": self.hidden, "state_dict": self.state_dict()}

    @classmethod
    def from_state(cls, state: dict) -> "FeatureAdapter":
        adapter = cls(state["dim"], state["hidden"])
        adapter.load_state_dict(state["state_dict"], strict=True)
        return adapter


@dataclass(frozen=True)
class AdapterSettings:
    epochs: int = 20
    hidden: int = 1024
    lr: float = 1e-3
    batch_size: int = 128
    cls_coef: float = 0.1


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Mean cosine similarity of the rows of ``a`` and ``b`` (None when empty)."""
    if len(a) == 0:
        return None
    return float(F.cosine_similarity(a.float(), b.float(), dim=1).mean())


def train_adapter(old: torch.Tensor, new: torch.Tensor, labels: torch.Tensor, settings: AdapterSettings,
                  classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  generator: torch.Generator | None = None) -> tuple[FeatureAdapter, dict]:
    """Train the MLP that maps ``old`` ``[N, D]`` features to ``new`` ``[N, D]`` ones (same images),
    ``labels`` ``[N]`` their classes for the classification term (skipped without ``classifier``
    or at ``cls_coef`` 0). Returns the adapter (eval mode) and figures: the mean cosine of the
    pairs before and after, the last epoch's mean losses."""
    old, new = old.detach().float(), new.detach().float()
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if old.shape != new.shape or old.ndim != 2 or labels.shape != (len(old),):
        raise ValueError(f"old and new must be [N, D] with labels [N], got {tuple(old.shape)}, {tuple(new.shape)}, "
                         f"{tuple(labels.shape)}")
    adapter = FeatureAdapter(old.shape[1], settings.hidden, generator)
    opt = torch.optim.Adam(adapter.parameters(), lr=settings.lr)
    use_cls = classifier is not None and settings.cls_coef > 0
    sums = {"cosine_loss": 0.0, "cls_loss": 0.0}
    for _ in range(settings.epochs):
        order = torch.randperm(len(old), generator=generator)
        sums, batches = {"cosine_loss": 0.0, "cls_loss": 0.0}, 0
        for start in range(0, len(old), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            mapped = adapter(old[idx])
            cos_loss = (1 - F.cosine_similarity(mapped, new[idx], dim=1)).mean()
            loss = cos_loss
            if use_cls:
                cls_loss = F.cross_entropy(classifier(mapped), labels[idx])
                loss = loss + settings.cls_coef * cls_loss
                sums["cls_loss"] += float(cls_loss.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sums["cosine_loss"] += float(cos_loss.detach())
            batches += 1
        sums = {k: v / max(batches, 1) for k, v in sums.items()}
    adapter.eval()
    with torch.no_grad():
        after = mean_cosine(adapter(old), new)
    figures = {"pairs": len(old), "epochs": settings.epochs, "cosine_before": mean_cosine(old, new), "cosine_after": after,
               "last_cosine_loss": round(sums["cosine_loss"], 6) if settings.epochs else None,
               "last_cls_loss": round(sums["cls_loss"], 6) if settings.epochs and use_cls else None}
    return adapter, figures


def train_classifier(classifier: nn.Module, logits: Callable[[torch.Tensor], torch.Tensor], feats: torch.Tensor,
                     labels: torch.Tensor, epochs: int, lr: float, batch_size: int,
                     generator: torch.Generator | None = None) -> dict:
    """Align a classifier with a feature space (Iscen et al.'s last step): ``epochs`` of Adam on
    CE(``logits(feats)``, ``labels``) over the trainable (``requires_grad``) parameters of
    ``classifier`` only; frozen ones stay as they are. Returns the mean loss and top-1 (%) on
    ``feats`` before and after."""
    params = [p for p in classifier.parameters() if p.requires_grad]
    labels = torch.as_tensor(labels, dtype=torch.int64)

    def scored() -> tuple[float, float]:
        with torch.no_grad():
            out = torch.cat([logits(feats[s : s + 1024]) for s in range(0, len(feats), 1024)])
            return float(F.cross_entropy(out, labels)), float((out.argmax(1) == labels).float().mean() * 100)

    loss_before, top1_before = scored()
    if params and epochs > 0:
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(epochs):
            order = torch.randperm(len(feats), generator=generator)
            for start in range(0, len(feats), batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(logits(feats[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        for p in params:
            p.grad = None
    loss_after, top1_after = scored()
    return {"vectors": len(feats), "epochs": epochs, "loss_before": round(loss_before, 6), "loss_after": round(loss_after, 6),
            "top1_before": round(top1_before, 2), "top1_after": round(top1_after, 2)}


class RehearsalOptimizer:
    """A learner's optimiser whose ``step()`` first backpropagates ``extra_loss()`` (a tensor, or
    None to add nothing): its gradient adds to what the learner's own ``loss.backward()`` left, so
    the step follows the sum of both losses. Everything else is the wrapped optimiser's."""

    def __init__(self, optimizer: Any, extra_loss: Callable[[], torch.Tensor | None]):
        self._optimizer = optimizer
        self._extra_loss = extra_loss
        self.steps = 0
        self.loss_sum = 0.0

    def step(self, *args, **kwargs):
        loss = self._extra_loss()
        if loss is not None:
            loss.backward()
            self.steps += 1
            self.loss_sum += float(loss.detach())
        return self._optimizer.step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)
