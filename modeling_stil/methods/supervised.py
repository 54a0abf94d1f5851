"""`supervised`: the labelled-data-only baseline (no unlabelled loader is built).

loss = task loss of the model's main output (cross-entropy for classification, MSE for
regression / landmarks) [+ ``unimodal_loss_weight`` * (task loss of ``image_logits`` + task loss of
``tabular_logits``) for multimodal models with unimodal heads].

The original SemiMultimodal supervised recipe (co-training / MMatch backbone trained with only the
labelled term) is ``alpha * (CE_m + CE_i + CE_t)``; ``unimodal_loss_weight=1`` reproduces it up to
the global factor ``alpha`` (an LR rescale for SGD, nothing for Adam). Default 0: the plain
supervised baseline of the paper tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import TASK_CLASSIFICATION, TASK_LANDMARKS, TASK_REGRESSION, MethodArguments, SSLMethod, TrainState, register_method
from .common import model_inputs, task_loss, view_targets


@dataclass
class SupervisedArguments(MethodArguments):
    # view recipe of the labelled batch: "weak" (flip/crop + light tabular corruption) or "eval"
    # (no augmentation); any recipe of data_utils.views is accepted
    labeled_view: str = "weak"
    # weight of the unimodal heads' losses (multimodal models exposing image_logits/tabular_logits)
    unimodal_loss_weight: float = 0.0

    def __post_init__(self):
        if self.unimodal_loss_weight < 0:
            raise ValueError("unimodal_loss_weight must be >= 0")


@register_method
class Supervised(SSLMethod):
    name = "supervised"
    arguments_class = SupervisedArguments
    labeled_views = {"weak": "weak"}
    unlabeled_views = None
    supported_tasks = (TASK_CLASSIFICATION, TASK_REGRESSION, TASK_LANDMARKS)

    def __init__(self, model, args: SupervisedArguments | None = None):
        super().__init__(model, args)
        # instance attribute: the trainer reads `method.labeled_views`
        self.view_key = self.args.labeled_view
        self.labeled_views = {self.view_key: self.args.labeled_view}

    def training_step(self, labeled: dict, unlabeled: dict | None, state: TrainState):
        view = labeled[self.view_key]
        targets = view_targets(view, labeled["labels"])
        output = self.model(**model_inputs(view))
        sup_loss = task_loss(output.logits, targets, state.task)
        loss = sup_loss
        logs = {"sup_loss": sup_loss.detach()}
        if self.args.unimodal_loss_weight > 0:
            for head in ("image_logits", "tabular_logits"):
                head_logits = getattr(output, head, None)
                if head_logits is None:
                    raise ValueError(
                        f"unimodal_loss_weight > 0 needs a model output with `{head}` (a multimodal model with unimodal heads)"
                    )
                head_loss = task_loss(head_logits, targets, state.task)
                loss = loss + self.args.unimodal_loss_weight * head_loss
                logs[head.replace("_logits", "_loss")] = head_loss.detach()
        if state.task == TASK_CLASSIFICATION and targets.dtype == torch.long:
            logs["train_accuracy"] = (output.logits.detach().argmax(dim=-1) == targets).float().mean()
        logs["loss"] = loss.detach()
        return loss, logs
