"""Toy methods that exercise each extension point of the method contract (tests/test_contract.py).

They are loaded by train.py as ``--method tests.toy_methods:ClassName`` (a user's own method works the
same way). None of them is an algorithm: each does the least that shows one hook works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modeling_stil.methods.base import DataInfo, MethodArguments, SSLMethod, TrainState
from modeling_stil.methods.common import cross_entropy, model_inputs


def _row_value(view: dict) -> torch.Tensor:
    """A per-row number that depends only on the data (never on weights): mean continuous value."""
    return view["continuous_values"].float().mean(dim=1)


class BankMethod(SSLMethod):
    """Supervised loss + two pieces of method state kept consistent across processes by the method:
    a bank over every unlabelled row (sized in ``setup``, written through ``state.gather``) and
    per-class sums of the labelled rows (``state.reduce_sum``)."""

    name = "toy_bank"
    labeled_views = {"weak": "eval"}
    unlabeled_views = {"weak": "eval"}

    def setup(self, info: DataInfo) -> None:
        self.info = info
        self.register_buffer("bank", torch.zeros(info.num_train))
        self.register_buffer("class_sums", torch.zeros(info.num_labels))
        self.register_buffer("writes", torch.zeros((), dtype=torch.long))

    def training_step(self, labeled, unlabeled, state: TrainState):
        logits = self.model(**model_inputs(labeled["weak"])).logits
        loss = cross_entropy(logits, labeled["labels"], reduction="mean")
        with torch.no_grad():
            index = state.gather(unlabeled["index"])
            values = state.gather(_row_value(unlabeled["weak"]))
            self.bank[index] = values + state.step
            sums = torch.zeros_like(self.class_sums).index_add_(0, labeled["labels"], _row_value(labeled["weak"]))
            self.class_sums += state.reduce_sum(sums)
            self.writes += 1
        return loss, {"sup_loss": loss.detach()}


class TwoHeadEvalMethod(SSLMethod):
    """Method-owned evaluation: two heads scored and a per-sample loss, selection by lowest loss."""

    name = "toy_two_head_eval"
    selection = ("loss", False)

    def training_step(self, labeled, unlabeled, state):
        logits = self.model(**model_inputs(labeled["weak"])).logits
        loss = cross_entropy(logits, labeled["labels"], reduction="mean")
        return loss, {"sup_loss": loss.detach()}

    @torch.no_grad()
    def evaluation_step(self, model, batch):
        logits = model(**self.eval_inputs(batch)).logits
        return {"logits": logits, "image_logits": -logits, "loss": cross_entropy(logits.float(), batch["labels"])}


class LastStepMethod(TwoHeadEvalMethod):
    name = "toy_last_step"
    selection = "last"


@dataclass
class PhaseArguments(MethodArguments):
    head_lr: float = 0.5  # the classifier's own learning rate (a parameter group)


class TwoPhaseMethod(SSLMethod):
    """``num_phases = 2``: phase 1 must see the weights phase 0's optimizer step wrote."""

    name = "toy_two_phase"
    arguments_class = PhaseArguments
    num_phases = 2

    def setup(self, info):
        self.register_buffer("seen", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("phase_calls", torch.zeros(2, dtype=torch.long))

    def parameter_groups(self):
        head = [p for n, p in self.model.named_parameters() if "classifier" in n and p.requires_grad]
        rest = [p for n, p in self.model.named_parameters() if "classifier" not in n and p.requires_grad]
        return [{"params": rest}, {"params": head, "lr": self.args.head_lr}]

    def training_step(self, labeled, unlabeled, state):
        with torch.no_grad():
            self.seen[state.phase] = sum(p.double().sum() for p in self.model.parameters())
            self.phase_calls[state.phase] += 1
        logits = self.model(**model_inputs(labeled["weak"])).logits
        loss = cross_entropy(logits, labeled["labels"], reduction="mean")
        return loss, {"sup_loss": loss.detach()}


class MetaStreamMethod(SSLMethod):
    """An extra, independently shuffled labelled stream (``labeled["meta"]``)."""

    name = "toy_meta_stream"
    meta_views = {"weak": "eval"}

    def setup(self, info):
        self.register_buffer("meta_rows_seen", torch.zeros(info.num_train, dtype=torch.long))

    def training_step(self, labeled, unlabeled, state):
        meta = labeled["meta"]
        with torch.no_grad():
            self.meta_rows_seen[meta["index"]] += 1
        inputs = model_inputs(meta["weak"])
        loss = cross_entropy(self.model(**inputs).logits, meta["labels"], reduction="mean")
        return loss, {"sup_loss": loss.detach()}


class EpochHookMethod(SSLMethod):
    """Records (optimizer steps seen, epoch) at each ``on_epoch_end``."""

    name = "toy_epoch_hook"

    def setup(self, info):
        self.register_buffer("after_steps", torch.zeros((), dtype=torch.long))
        self.calls: list[tuple[int, int, int]] = []

    def training_step(self, labeled, unlabeled, state):
        logits = self.model(**model_inputs(labeled["weak"])).logits
        loss = cross_entropy(logits, labeled["labels"], reduction="mean")
        return loss, {"sup_loss": loss.detach()}

    def after_optimizer_step(self, state):
        self.after_steps += 1

    def on_epoch_end(self, state):
        self.calls.append((int(self.after_steps), state.epoch, state.step))
        return {}
