"""LUCIR (Hou et al., CVPR 2019, "Learning a Unified Classifier Incrementally via Rebalancing").

PyCIL has no LUCIR; the plugin provides it as a PyCIL learner (``"model_name": "lucir"``, built
through ``utils/plugin_hook.get_model``) that follows PyCIL's learner template exactly, so the
plugin's mixins compose with it like with iCaRL: ``incremental_train`` builds the training set with
``get_dataset(..., appendent=self._get_memory())``, ``_train`` builds an SGD optimizer and a
MultiStepLR scheduler and hands both to ``_init_train`` (task 0) / ``_update_representation``
(later tasks), which step the scheduler once per epoch; ``build_rehearsal_memory`` is BaseLearner's
herding, which also builds the class means for NME evaluation.

The network is PyCIL's ``CosineIncrementalNet`` (CosineLinear in the first task, SplitCosineLinear
after; logits = learned sigma x cosine) on a ``cosine_resnet*`` backbone (last block without the
final ReLU). The loss of a batch (``cil_loss``; ``loss_terms`` gives the parts; the pieces are the
pure functions of core/lucir_losses.py):

- task 0: CE on the cosine logits;
- later: CE + lambda * (1 - cos(f_new, f_old)) (less-forget constraint on the normalised features,
  lambda = lambda_base * sqrt(old classes / new classes)) + lambda_mr * margin ranking loss (for
  every old-class sample: its ground-truth cosine vs the K largest new-class cosines, margin m).

As in the authors' code, the old classes' embeddings (``fc.fc1``) stay fixed after the first task
and the new classes' embeddings are imprinted (mean normalised feature of the class, scaled to the
mean norm of the old embeddings) before training. Class-balanced finetuning is not included.

Hyper-parameters are flat JSON keys (validated in ``config.py``: MODULE_HPARAM_KEYS for the
schedule, which are the names PyCIL's iCaRL/MEMO use, and LUCIR_KEYS). Defaults are the paper's
CIFAR-100 settings (ResNet-32, 160 epochs); its ImageNet settings (ResNet-18) are
``init_epoch``/``epochs`` 90, milestones [30, 60], weight decay 1e-4, ``lambda_base`` 10 (see
exps/lucir.json).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from models.base import BaseLearner
from torch import nn, optim
from torch.utils.data import DataLoader
from tqdm import tqdm
from utils.inc_net import CosineIncrementalNet

from ..core.lucir_losses import less_forget_loss, less_forget_weight, margin_ranking_loss
from .nets import unwrap

log = logging.getLogger(__name__)

#: Backbones LUCIR is defined on (PyCIL's ucir_* ResNets: last block without the final ReLU).
LUCIR_CONVNETS = ("cosine_resnet18", "cosine_resnet32", "cosine_resnet34", "cosine_resnet50")

#: The paper's defaults (CIFAR-100: 160 epochs, lr 0.1 divided by 10 at 80 and 120, batch 128,
#: weight decay 5e-4, momentum 0.9; lambda_base 5, K 2, m 0.5, margin-ranking weight 1).
LUCIR_DEFAULTS: dict[str, Any] = {
    "init_epoch": 160,
    "init_lr": 0.1,
    "init_milestones": [80, 120],
    "init_lr_decay": 0.1,
    "init_weight_decay": 5e-4,
    "epochs": 160,
    "lrate": 0.1,
    "milestones": [80, 120],
    "lrate_decay": 0.1,
    "weight_decay": 5e-4,
    "batch_size": 128,
    "num_workers": 8,
    "lambda_base": 5.0,
    "K": 2,
    "margin": 0.5,
    "lambda_mr": 1.0,
    "imprint_weights": True,
}
MOMENTUM = 0.9

#: Keys other PyCIL learners (FOSTER) use for what LUCIR reads under the iCaRL/MEMO name.
_OTHER_NAMES = {"init_epochs": "init_epoch", "lr": "lrate"}


class LUCIR(BaseLearner):
    def __init__(self, args):
        super().__init__(args)
        convnet = str(args.get("convnet_type", "")).lower()
        if convnet not in LUCIR_CONVNETS:
            raise ValueError(f"lucir needs a cosine backbone: 'convnet_type' must be one of {', '.join(LUCIR_CONVNETS)}, got {convnet!r}")
        wrong = [f"'{k}' (lucir reads '{v}')" for k, v in _OTHER_NAMES.items() if k in args and v not in args]
        if wrong:
            raise ValueError("lucir does not read " + ", ".join(wrong))
        self.hp = {k: args.get(k, v) for k, v in LUCIR_DEFAULTS.items()}
        self._network = CosineIncrementalNet(args, pretrained=False, nb_proxy=1)
        self._lambda = 0.0
        self._last_loss_terms: dict[str, float] = {}

    def after_task(self):
        self._old_network = self._network.copy().freeze()
        self._known_classes = self._total_classes
        logging.info("Exemplar size: {}".format(self.exemplar_size))

    def incremental_train(self, data_manager):
        self._cur_task += 1
        self._total_classes = self._known_classes + data_manager.get_task_size(self._cur_task)
        self._network.update_fc(self._total_classes, self._cur_task)
        logging.info("Learning on {}-{}".format(self._known_classes, self._total_classes))

        batch_size, num_workers = self.hp["batch_size"], self.hp["num_workers"]
        train_dataset = data_manager.get_dataset(
            np.arange(self._known_classes, self._total_classes),
            source="train",
            mode="train",
            appendent=self._get_memory(),
        )
        self.train_loader = DataLoader(train_dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers)
        test_dataset = data_manager.get_dataset(np.arange(0, self._total_classes), source="test", mode="test")
        self.test_loader = DataLoader(test_dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)

        if self._cur_task > 0:
            n_new = self._total_classes - self._known_classes
            self._lambda = less_forget_weight(self.hp["lambda_base"], self._known_classes, n_new)
            logging.info("LUCIR: less-forget weight {:.3f} ({} old, {} new classes)".format(self._lambda, self._known_classes, n_new))
            if self.hp["imprint_weights"]:
                self._imprint_weights(data_manager)

        if len(self._multiple_gpus) > 1:
            self._network = nn.DataParallel(self._network, self._multiple_gpus)
        self._train(self.train_loader, self.test_loader)
        self.build_rehearsal_memory(data_manager, self.samples_per_class)
        if len(self._multiple_gpus) > 1:
            self._network = self._network.module

    def _train(self, train_loader, test_loader):
        self._network.to(self._device)
        if self._old_network is not None:
            self._old_network.to(self._device)
        hp = self.hp
        if self._cur_task == 0:
            optimizer = optim.SGD(
                self._network.parameters(), lr=hp["init_lr"], momentum=MOMENTUM, weight_decay=hp["init_weight_decay"]
            )
            scheduler = optim.lr_scheduler.MultiStepLR(optimizer, milestones=hp["init_milestones"], gamma=hp["init_lr_decay"])
            self._init_train(train_loader, test_loader, optimizer, scheduler)
        else:
            # the old classes' embeddings stay fixed (authors' code: lr 0 for fc.fc1)
            for p in unwrap(self._network).fc.fc1.parameters():
                p.requires_grad_(False)
            params = [p for p in self._network.parameters() if p.requires_grad]
            optimizer = optim.SGD(params, lr=hp["lrate"], momentum=MOMENTUM, weight_decay=hp["weight_decay"])
            scheduler = optim.lr_scheduler.MultiStepLR(optimizer, milestones=hp["milestones"], gamma=hp["lrate_decay"])
            self._update_representation(train_loader, test_loader, optimizer, scheduler)

    def _init_train(self, train_loader, test_loader, optimizer, scheduler):
        self._run_epochs(train_loader, test_loader, optimizer, scheduler, self.hp["init_epoch"])

    def _update_representation(self, train_loader, test_loader, optimizer, scheduler):
        self._run_epochs(train_loader, test_loader, optimizer, scheduler, self.hp["epochs"])

    def _run_epochs(self, train_loader, test_loader, optimizer, scheduler, epochs):
        prog_bar = tqdm(range(epochs))
        info = "Task {}, no epochs".format(self._cur_task)
        for _, epoch in enumerate(prog_bar):
            self._network.train()
            losses, correct, total = 0.0, 0, 0
            sums: dict[str, float] = {}
            for _, inputs, targets in train_loader:
                inputs, targets = inputs.to(self._device), targets.to(self._device)
                outputs = self._network(inputs)
                loss = self.cil_loss(inputs, targets, outputs)
                for key, value in self._last_loss_terms.items():
                    sums[key] = sums.get(key, 0.0) + value
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses += loss.item()
                preds = outputs["logits"].argmax(dim=1)
                correct += preds.eq(targets).sum().item()
                total += len(targets)
            scheduler.step()
            train_acc = np.around(correct * 100 / max(total, 1), decimals=2)
            parts = ", ".join("{} {:.3f}".format(k, v / len(train_loader)) for k, v in sums.items())
            info = "Task {}, Epoch {}/{} => Loss {:.3f} ({}), Train_accy {:.2f}".format(
                self._cur_task, epoch + 1, epochs, losses / len(train_loader), parts, train_acc
            )
            if epoch % 5 == 0:
                info += ", Test_accy {:.2f}".format(self._compute_accuracy(self._network, test_loader))
            prog_bar.set_description(info)
        logging.info(info)

    # -- the loss ------------------------------------------------------------------------------
    def cil_loss(self, inputs: torch.Tensor, targets: torch.Tensor, outputs: dict | None = None) -> torch.Tensor:
        """LUCIR's training loss for a batch (``outputs``: the network's output dict for ``inputs``)."""
        terms = self.loss_terms(inputs, targets, outputs)
        self._last_loss_terms = {key: float(value.detach()) for key, value in terms.items()}
        return sum(terms.values())

    def loss_terms(self, inputs: torch.Tensor, targets: torch.Tensor, outputs: dict | None = None) -> dict[str, torch.Tensor]:
        """{"ce"} in task 0; {"ce", "lf", "mr"} later (each already weighted)."""
        if outputs is None:
            outputs = self._network(inputs)
        terms = {"ce": F.cross_entropy(outputs["logits"], targets)}
        if self._old_network is None or self._known_classes == 0:
            return terms
        with torch.no_grad():
            old_features = unwrap(self._old_network).extract_vector(inputs)
        terms["lf"] = self._lambda * less_forget_loss(outputs["features"], old_features)
        cosines = torch.cat([outputs["old_scores"], outputs["new_scores"]], dim=1)
        mr = margin_ranking_loss(cosines, targets, self._known_classes, self.hp["K"], self.hp["margin"])
        terms["mr"] = self.hp["lambda_mr"] * mr
        return terms

    # -- new-class embeddings ------------------------------------------------------------------
    def _imprint_weights(self, data_manager) -> None:
        """New-class rows = normalised mean of the class's normalised features x mean old-row norm."""
        net = unwrap(self._network).to(self._device)
        fc = net.fc
        old_norm = fc.fc1.weight.data.norm(dim=1).mean()
        new_rows = torch.zeros_like(fc.fc2.weight.data)
        net.eval()
        for row, label in enumerate(range(self._known_classes, self._total_classes)):
            dataset = data_manager.get_dataset(np.arange(label, label + 1), source="train", mode="test")
            loader = DataLoader(dataset, batch_size=self.hp["batch_size"], shuffle=False, num_workers=self.hp["num_workers"])
            vectors, _ = self._extract_vectors(loader)
            feats = F.normalize(torch.from_numpy(vectors).float(), p=2, dim=1)
            new_rows[row] = F.normalize(feats.mean(dim=0), p=2, dim=0).to(new_rows) * old_norm
        fc.fc2.weight.data.copy_(new_rows)
        logging.info("LUCIR: imprinted {} new-class embeddings".format(len(new_rows)))

    # -- memory --------------------------------------------------------------------------------
    def build_rehearsal_memory(self, data_manager, per_class):
        if per_class <= 0:  # BaseLearner's herding needs at least one exemplar per class
            self._data_memory, self._targets_memory = np.array([]), np.array([])
            if hasattr(self, "_class_means"):
                del self._class_means
            logging.info("LUCIR: no exemplar memory (0 per class); NME evaluation off")
            return
        super().build_rehearsal_memory(data_manager, per_class)
