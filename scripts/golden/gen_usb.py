"""Golden fixtures from microsoft/Semi-supervised-learning (USB): FixMatch, FreeMatch, SimMatch, CoMatch,
PseudoLabel (the original of our classification ``pseudo_label``).

    USB_ORIGINAL_SRC=<checkout of microsoft/Semi-supervised-learning> python scripts/golden/generate.py --only gen_usb

For each algorithm, two ``train_step`` calls of USB's own class (``semilearn/algorithms/<name>/<name>.py``)
followed by USB's own ``ParamUpdateHook`` (backward, SGD step from USB's ``get_optimizer``) and
``EMAHook`` (its ``EMA`` update) after each, on one fixed batch, in float64, recorded into
``tests/golden/usb_<name>.*`` for ``tests/test_golden_usb.py``; and USB's CIFAR-10 config values into
``tests/golden/usb_cifar10_configs.json`` for ``tests/test_usb_recipes.py`` (scripts/golden/usb_recipes.py).

How the original is run (nothing of it is copied here; the checkout is imported):

* The algorithm object is built with ``object.__new__`` and only the attributes ``train_step`` and
  its hooks read (listed in ``_algorithm``), instead of USB's ``__init__``, which builds datasets,
  loaders and a CUDA model. The algorithm's own hooks are registered by its ``set_hooks``; of
  ``AlgorithmBase.set_hooks`` only ``ParamUpdateHook`` and ``EMAHook`` are kept (evaluation,
  checkpoint, logging, timer and sampler hooks do not touch the step). ``Tensor.cuda`` is the
  identity while the original runs (this machine has no GPU; USB moves ``idx_lb`` with it).
* Package ``__init__`` files that import USB's datasets, trainers and every network (and with them
  scikit-image, aim, wandb, ruamel) are not run: ``semilearn``, ``semilearn.datasets`` and
  ``semilearn.nets`` are empty package shells. (``semilearn.core``'s ``__init__`` still imports every
  algorithm module for its registry; the imbalanced-learning ones fail against the shells, print
  "import failed" and are skipped: none is used.)
* The backbone is OUR tiny WRN (``wrn``, depth 10, width 1, 2 base channels, 8x8 px, 5 classes)
  behind USB's backbone interface (``net(x) -> {"logits", "feat"}``, ``only_feat``, ``only_fc``,
  ``num_features``): the step, not the network, is under test, and both sides then load identical
  weights. SimMatch and CoMatch wrap it in USB's own ``SimMatch_Net`` / ``CoMatch_Net``
  (projection head ``mlp_proj``, ``use_epass=False``: our single projector; EPASS is a recipe-level
  decision, docs/methods.md).
* ``torch.set_default_dtype(torch.float64)``: USB allocates some step tensors with the default dtype
  (SimMatch's aggregated probabilities); every state tensor is set explicitly in float64.
* Randomness: none inside any of these steps (the WRN has no dropout, the algorithms draw nothing);
  the weights, batch, banks, queues and thresholds are drawn here from ``SEED`` and recorded.
* The fully connected layer is scaled (``logit_scale``, per algorithm) so some unlabelled rows pass the 0.95
  thresholds and some do not; the generator stops unless some step's mask has rows in and rows out.

What the original does not log (FreeMatch's entropy term, SimMatch's ``in_loss``, masks,
distribution-aligned probabilities) is recorded by wrapping the function or hook method that returns
it (the wrapper calls the original and keeps its result).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import types
from pathlib import Path

ENV = "USB_ORIGINAL_SRC"
NEEDS = ("scikit-learn", "tensorboard (torch.utils.tensorboard)", "pyyaml")

SEED = 2205
B_L, B_U, NUM_CLASSES, IMAGE_SIZE = 4, 8, 5, 8
PROJ = 8  # projection width (SimMatch / CoMatch)
K_BANK = 12  # SimMatch: labelled rows in the bank
QUEUE_BATCH = 3  # CoMatch: the queue holds 3 global batches of B_L + B_U rows
SGD = dict(lr=0.03, momentum=0.9, weight_decay=5e-4, nesterov=True)  # USB classic-CV
EMA_M = 0.999
MODEL_CONFIG = dict(depth=10, widen_factor=1, base_channels=2, num_labels=NUM_CLASSES, image_size=IMAGE_SIZE)


# ------------------------------------------------------------------------------------------ importing USB
def _import_usb(src: str):
    """Load the modules the steps need from the checkout at ``src`` (see the module docstring)."""
    root = Path(src).resolve()
    if not (root / "semilearn" / "algorithms" / "fixmatch" / "fixmatch.py").is_file():
        raise SystemExit(f"{ENV}={src} is not a checkout of microsoft/Semi-supervised-learning (no semilearn/algorithms)")
    for name, folder in (("semilearn", ""), ("semilearn.nets", "nets"), ("semilearn.datasets", "datasets")):
        shell = types.ModuleType(name)
        shell.__path__ = [str(root / "semilearn" / folder)]
        sys.modules[name] = shell
    datasets = sys.modules["semilearn.datasets"]
    datasets.get_collactor, datasets.name2sampler, datasets.DistributedSampler = None, {}, object
    stubs = [name for name in ("aim", "wandb", "ruamel", "ruamel.yaml") if name not in sys.modules]
    for name in stubs:  # logging back-ends the step never calls; removed again after the import
        sys.modules[name] = types.ModuleType(name)
    if "ruamel" in stubs:
        sys.modules["ruamel"].yaml = sys.modules["ruamel.yaml"]
    sys.path.insert(0, str(root))
    import importlib

    modules = {
        name: importlib.import_module(f"semilearn.algorithms.{name}.{name}")
        for name in ("fixmatch", "freematch", "simmatch", "comatch", "pseudolabel")
    }
    modules["base"] = importlib.import_module("semilearn.core.algorithmbase")
    modules["hooks"] = importlib.import_module("semilearn.core.hooks")
    modules["utils"] = importlib.import_module("semilearn.core.utils")
    modules["criterions"] = importlib.import_module("semilearn.core.criterions")
    for name in stubs:  # other libraries (accelerate) probe for these packages by spec
        del sys.modules[name]
    version = next((line.split("'")[1] for line in (root / "setup.py").read_text().splitlines() if "version=" in line), "?")
    return modules, version


@contextlib.contextmanager
def _cpu_only():
    import torch

    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


# ------------------------------------------------------------------------------------------ the network
def _our_model(generator, logit_scale: float):
    import torch

    from modeling_stil.configuration_wide_resnet import WideResNetConfig
    from modeling_stil.modeling_wide_resnet import WideResNetForImageClassification

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    model = WideResNetForImageClassification(WideResNetConfig(**MODEL_CONFIG)).double()
    with torch.no_grad():
        for name, buffer in model.named_buffers():  # non-trivial BN statistics (running mean/var)
            if name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1, generator=generator)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5, generator=generator)
        model.fc.weight.mul_(logit_scale)
    return model


def _backbone_class():
    from torch import nn

    class USBBackbone(nn.Module):
        """Our WRN behind USB's backbone interface."""

        def __init__(self, model):
            super().__init__()
            self.model = model
            self.num_features = model.config.channels[-1]

        def forward(self, x, only_fc=False, only_feat=False, **kwargs):
            if only_fc:
                return self.model.fc(x)
            feat = self.model.forward_features(x)
            if only_feat:
                return feat
            return {"logits": self.model.fc(feat), "feat": feat}

    return USBBackbone


def _perturbed(state: dict, generator, scale: float = 0.05) -> dict:
    """The EMA teacher's starting parameters: the student's plus noise (teacher != student)."""
    import torch

    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in state.items()}


# ------------------------------------------------------------------------------------------ the algorithm
def _algorithm(usb, cls, model, teacher_params: dict, args: dict, **attrs):
    """A USB algorithm object with just what ``train_step``, its hooks, ``ParamUpdateHook`` and
    ``EMAHook`` read: args (a namespace of the config keys they use), num_classes, lambda_u,
    use_cat (True, the classic-CV configs), amp off, clip off, no scheduler, the CE / consistency
    losses, the model, the EMA (USB's ``EMA`` resumed from ``ema_model`` = the teacher), USB's SGD
    from ``get_optimizer``, epoch/it, single process; plus the algorithm's own ``attrs``."""
    import argparse

    alg = object.__new__(cls)
    alg.args = argparse.Namespace(**args)
    alg.num_classes = NUM_CLASSES
    alg.lambda_u = args["ulb_loss_ratio"]
    alg.use_cat, alg.use_amp, alg.clip_grad, alg.scheduler = True, False, 0.0, None
    alg.amp_cm = contextlib.nullcontext
    alg.ce_loss, alg.consistency_loss = usb["criterions"].CELoss(), usb["criterions"].ConsistencyLoss()
    alg.distributed, alg.world_size, alg.gpu = False, 1, None
    alg.ema_m, alg.resume = EMA_M, True
    alg.model = model
    alg.ema_model = copy.deepcopy(model)
    alg.ema_model.load_state_dict(teacher_params, strict=False)
    for key, value in attrs.items():
        setattr(alg, key, value)
    alg._hooks, alg.hooks_dict = [], {}
    base = usb["base"].AlgorithmBase
    hooks = usb["hooks"]
    kept = base.set_hooks
    base.set_hooks = lambda self: (self.register_hook(hooks.ParamUpdateHook(), None, "HIGHEST"),
                                   self.register_hook(hooks.EMAHook(), None, "HIGH"))
    try:
        alg.set_hooks()
    finally:
        base.set_hooks = kept
    alg.optimizer = usb["utils"].get_optimizer(model, "SGD", SGD["lr"], SGD["momentum"], SGD["weight_decay"], 1.0,
                                               nesterov=SGD["nesterov"], bn_wd_skip=True)
    alg.call_hook("before_run")  # EMAHook: EMA(model, ema_m), shadow <- ema_model (resume)
    return alg


def _record_calls(obj, attribute: str, store: list):
    """Wrap ``obj.attribute`` so each call's result is appended to ``store``."""
    original = getattr(obj, attribute)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        store.append(result)
        return result

    setattr(obj, attribute, wrapper)
    return original


def _step(alg, name_map, batch: dict) -> dict:
    """One ``train_step`` + ``after_train_step`` hooks; -> tensors (logged terms, grads, state after)."""
    import torch

    grads = {}

    def keep_grads(optimizer, args, kwargs):
        for name, param in alg.model.named_parameters():
            if param.grad is not None:  # None: the WRN's discarded pre-activation BN (no path to the loss)
                grads[name_map(name)] = param.grad.detach().clone()

    handle = alg.optimizer.register_step_pre_hook(keep_grads)
    with _cpu_only():
        alg.out_dict, alg.log_dict = alg.train_step(**batch)
        alg.call_hook("after_train_step")  # ParamUpdateHook (backward, SGD step), EMAHook (EMA update)
    handle.remove()
    tensors = {f"term.{k.split('/')[-1]}": torch.tensor(float(v)) for k, v in alg.log_dict.items()}
    tensors.update({f"grad.{k}": v for k, v in grads.items()})
    tensors.update({f"after.{name_map(k)}": v for k, v in alg.model.state_dict().items()})
    tensors.update({f"teacher_after.{name_map(k)}": v for k, v in alg.ema_model.state_dict().items()})
    return tensors


def _steps(alg, name_map, batch: dict, schedule: list[dict], record_state=lambda: {}) -> dict:
    """``len(schedule)`` steps on the same batch, each with its ``epoch``/``it`` set first; every
    step's tensors under ``step<i>.`` (``record_state()`` adds the algorithm's own state after it)."""
    tensors = {}
    for i, position in enumerate(schedule):
        alg.epoch, alg.it = position["epoch"], position["it"]
        step = _step(alg, name_map, batch)
        step.update(record_state())
        tensors.update({f"step{i}.{k}": v.detach().clone() for k, v in step.items()})
    return tensors


def _our_states(schedule: list[dict]) -> list[dict]:
    """Our TrainState of each step: USB's iteration counter is our ``step`` (steps done before it)."""
    return [{"step": position["it"], "epoch": position["epoch"]} for position in schedule]


def _initial(model, teacher_params, name_map) -> dict:
    tensors = {f"init.{name_map(k)}": v.clone() for k, v in model.state_dict().items()}
    tensors.update({f"teacher_init.{name_map(k)}": v.clone() for k, v in teacher_params.items()})
    return tensors


def _images(generator, n):
    import torch

    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def _meta(version, algorithm, file, ours_args, schedule, notes):
    return {
        "original": "microsoft/Semi-supervised-learning",
        "original_version": f"semilearn {version} (setup.py; the checkout has no git metadata)",
        "original_file": file,
        "original_class": algorithm,
        "run": f"{len(schedule)} x (train_step + ParamUpdateHook.after_train_step (SGD) + EMAHook.after_train_step) on one batch",
        "usb_epoch_it": schedule,
        "seed": SEED,
        "dtype": "float64",
        "randomness": "none inside the step (no dropout in the WRN, no draws in the algorithm); inputs and state drawn by the generator and recorded",
        "model_config": MODEL_CONFIG,
        "model_note": "our WideResNet (wrn) behind USB's backbone interface; USB's own SimMatch_Net/CoMatch_Net around it",
        "optimizer": dict(SGD, name="SGD", bn_wd_skip=True, source="semilearn.core.utils.get_optimizer"),
        "ema_m": EMA_M,
        "ours_args": ours_args,
        "train_states": _our_states(schedule),
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------ FixMatch
def _fixmatch(usb, version, generator):
    from golden_io import save_golden

    model = _our_model(generator, logit_scale=12.0)
    Backbone = _backbone_class()
    net = Backbone(model)
    name_map = lambda n: n.removeprefix("model.")
    teacher = _perturbed({k: v for k, v in net.named_parameters()}, generator)
    x_lb, x_w, x_s = _images(generator, B_L), _images(generator, B_U), _images(generator, B_U)
    import torch

    y_lb = torch.randint(0, NUM_CLASSES, (B_L,), generator=generator)
    tensors = _initial(net, teacher, name_map)
    alg = _algorithm(usb, usb["fixmatch"].FixMatch, net, teacher, dict(ulb_loss_ratio=1.0),
                     T=0.5, p_cutoff=0.95, use_hard_label=True)
    masks = []
    _record_calls(alg.hooks_dict["MaskingHook"], "masking", masks)
    schedule = [{"epoch": 0, "it": 0}, {"epoch": 0, "it": 1}]
    tensors.update(_steps(alg, name_map, dict(x_lb=x_lb, y_lb=y_lb, x_ulb_w=x_w, x_ulb_s=x_s), schedule,
                          lambda: {"mask": masks[-1]}))
    _check_masks("fixmatch", masks)
    tensors.update({"input.x_lb": x_lb, "input.y_lb": y_lb, "input.x_ulb_w": x_w, "input.x_ulb_s": x_s})
    ours = dict(threshold=0.95, lambda_u=1.0, use_hard_labels=True, concat_forward=True, ema_momentum=EMA_M,
                ema_warmup=False, ema_mode="parameters")
    meta = _meta(version, "FixMatch", "semilearn/algorithms/fixmatch/fixmatch.py", ours, schedule,
                 "config: fixmatch_cifar10 values (p_cutoff 0.95, hard_label, ulb_loss_ratio 1, use_cat, ema_m 0.999); "
                 "ours: ema_warmup False (USB's EMA momentum is constant; our default warms it up, docs/methods.md §4)")
    save_golden("usb_fixmatch", tensors, meta)
    return "usb_fixmatch"


def _check_masks(name, masks):
    """At least one step has some rows in and some out (else the fixture would not test the mask)."""
    fractions = [float(mask.float().mean()) for mask in masks]
    print(f"{name}: mask fractions per step {fractions}")
    if not any(0.0 < fraction < 1.0 for fraction in fractions):
        raise SystemExit(f"{name}: mask fractions {fractions}: the fixture would not test the mask; change logit_scale or SEED")


# ------------------------------------------------------------------------------------------ FreeMatch
def _freematch(usb, version, generator):
    import torch
    from golden_io import save_golden

    model = _our_model(generator, logit_scale=4.0)
    net = _backbone_class()(model)
    name_map = lambda n: n.removeprefix("model.")
    teacher = _perturbed({k: v for k, v in net.named_parameters()}, generator)
    x_lb, x_w, x_s = _images(generator, B_L), _images(generator, B_U), _images(generator, B_U)
    y_lb = torch.randint(0, NUM_CLASSES, (B_L,), generator=generator)
    # SAT state part-way through training: threshold, class model and histogram away from 1/C
    p_model = torch.rand(NUM_CLASSES, generator=generator) + 0.5
    p_model = p_model / p_model.sum()
    label_hist = torch.rand(NUM_CLASSES, generator=generator) + 0.5
    label_hist = label_hist / label_hist.sum()
    time_p = torch.tensor(0.95)
    tensors = _initial(net, teacher, name_map)
    tensors.update({"state_init.time_p": time_p.clone(), "state_init.p_model": p_model.clone(),
                    "state_init.label_hist": label_hist.clone()})
    args = dict(ulb_loss_ratio=1.0, ema_p=0.999)
    alg = _algorithm(usb, usb["freematch"].FreeMatch, net, teacher, args, T=0.5, use_hard_label=True, ema_p=0.999,
                     use_quantile=False, clip_thresh=False, lambda_e=0.001)
    hook = alg.hooks_dict["MaskingHook"]
    hook.time_p, hook.p_model, hook.label_hist = time_p.clone(), p_model.clone(), label_hist.clone()
    masks, entropy = [], []
    _record_calls(hook, "masking", masks)
    module = usb["freematch"]
    kept = module.entropy_loss
    _record_calls(module, "entropy_loss", entropy)
    schedule = [{"epoch": 0, "it": 0}, {"epoch": 0, "it": 1}]
    try:
        tensors.update(_steps(alg, name_map, dict(x_lb=x_lb, y_lb=y_lb, x_ulb_w=x_w, x_ulb_s=x_s), schedule,
                              lambda: {"term.ent_loss": entropy[-1][0], "mask": masks[-1],
                                       "state_after.time_p": hook.time_p, "state_after.p_model": hook.p_model,
                                       "state_after.label_hist": hook.label_hist}))
    finally:
        module.entropy_loss = kept
    _check_masks("freematch", masks)
    tensors.update({"input.x_lb": x_lb, "input.y_lb": y_lb, "input.x_ulb_w": x_w, "input.x_ulb_s": x_s})
    ours = dict(lambda_u=1.0, lambda_e=0.001, sat_momentum=0.999, mask_unsup=True, pseudo_labels_from="student",
                concat_forward=True, labeled_view="weak", ema_momentum=EMA_M, ema_mode="parameters", ema_warmup=False,
                start_epoch=-1)
    meta = _meta(version, "FreeMatch", "semilearn/algorithms/freematch/freematch.py (+ utils.py FreeMatchThresholingHook)",
                 ours, schedule,
                 "config: freematch_cifar10 values (ema_p 0.999, ent_loss_ratio 0.001, use_quantile False, clip_thresh False, "
                 "hard_label, use_cat); SAT state set part-way (time_p 0.9, p_model and label_hist non-uniform); "
                 "term.ent_loss recorded by wrapping freematch.entropy_loss")
    save_golden("usb_freematch", tensors, meta)
    return "usb_freematch"


# ------------------------------------------------------------------------------------------ SimMatch
def _projected(usb, net_class, model, generator):
    net = net_class(_backbone_class()(model), proj_size=PROJ, epass=False)
    net.double()

    def name_map(n):
        if n.startswith("backbone."):
            return n[len("backbone."):]  # -> model.*
        return "projector." + n[len("mlp_proj."):]

    return net, name_map


def _da_queue(generator, filled: int, length: int):
    """A DA queue of batch means: ``filled`` rows of random class distributions, the rest zeros."""
    import torch

    queue = torch.zeros(length, NUM_CLASSES)
    rows = torch.rand(filled, NUM_CLASSES, generator=generator) + 0.2
    queue[:filled] = rows / rows.sum(dim=1, keepdim=True)
    return queue


def _simmatch(usb, version, generator):
    import torch
    import torch.nn.functional as F
    from golden_io import save_golden

    model = _our_model(generator, logit_scale=14.0)
    net, name_map = _projected(usb, usb["simmatch"].SimMatch_Net, model, generator)
    teacher = _perturbed({k: v for k, v in net.named_parameters()}, generator)
    x_lb, x_w, x_s = _images(generator, B_L), _images(generator, B_U), _images(generator, B_U)
    y_lb = torch.randint(0, NUM_CLASSES, (B_L,), generator=generator)
    idx_lb = torch.randperm(K_BANK, generator=generator)[:B_L]
    bank = F.normalize(torch.randn(K_BANK, PROJ, generator=generator), dim=1)  # rows = bank entries (ours)
    bank_labels = torch.randint(0, NUM_CLASSES, (K_BANK,), generator=generator)
    da_len = 32
    da_queue, da_ptr = _da_queue(generator, 20, da_len), 20
    tensors = _initial(net, teacher, name_map)
    tensors.update({"state_init.bank": bank.clone(), "state_init.bank_labels": bank_labels.clone(),
                    "state_init.da_queue": da_queue.clone(), "state_init.da_ptr": torch.tensor(da_ptr)})
    args = dict(ulb_loss_ratio=1.0, da_len=da_len, proj_size=PROJ, use_epass=False)
    # what SimMatch.__init__ sets for CIFAR-10 (dataset in its list): online teacher, bank EMA 0.7, K = labelled rows
    alg = _algorithm(usb, usb["simmatch"].SimMatch, net, teacher, args, use_ema_teacher=False, ema_bank=0.7,
                     lambda_in=1.0, T=0.1, p_cutoff=0.95, proj_size=PROJ, K=K_BANK, smoothing_alpha=0.9, da_len=da_len,
                     mem_bank=bank.T.contiguous().clone(), labels_bank=bank_labels.clone())
    da = alg.hooks_dict["DistAlignHook"]
    da.p_model, da.p_model_ptr = da_queue.clone(), torch.tensor([da_ptr])
    da.p_target = torch.full(da.p_target.shape, 1.0 / NUM_CLASSES)  # USB builds it in float32 (0.2 + 3e-9)
    masks, aligned = [], []
    _record_calls(alg.hooks_dict["MaskingHook"], "masking", masks)
    _record_calls(da, "dist_align", aligned)
    feats = []
    kept_update = alg.update_bank
    alg.update_bank = lambda k, labels, index: (feats.append(k.detach().clone()), kept_update(k, labels, index))[1]
    # step 0 in USB's epoch 0 (instance loss zeroed, no smoothing), step 1 in epoch 1 (both on)
    schedule = [{"epoch": 0, "it": 1023}, {"epoch": 1, "it": 1024}]
    tensors.update(_steps(alg, name_map, dict(idx_lb=idx_lb, x_lb=x_lb, y_lb=y_lb, x_ulb_w=x_w, x_ulb_s=x_s),
                          schedule, lambda: {
                              "state_after.bank": alg.mem_bank.T.contiguous(), "state_after.bank_labels": alg.labels_bank,
                              "state_after.da_queue": da.p_model, "state_after.da_ptr": da.p_model_ptr[0],
                              "mask": masks[-1], "da_probs": aligned[-1], "feats_x_lb": feats[-1]}))
    _check_masks("simmatch", masks)
    for i in range(len(schedule)):  # in_loss is not logged: total = sup + unsup + in (lambda_u = lambda_in = 1)
        p = f"step{i}.term."
        tensors[p + "in_loss"] = tensors[p + "total_loss"] - tensors[p + "sup_loss"] - tensors[p + "unsup_loss"]
    tensors.update({"input.x_lb": x_lb, "input.y_lb": y_lb, "input.idx_lb": idx_lb, "input.x_ulb_w": x_w,
                    "input.x_ulb_s": x_s})
    ours = dict(threshold=0.95, lambda_u=1.0, lambda_in=1.0, temperature_teacher=0.1, temperature_student=0.1,
                smoothing_alpha=0.9, distribution_alignment=True, da_len=da_len, teacher="online",
                ema_momentum=EMA_M, ema_warmup=False, bank_momentum=0.7, start_epoch=-1, instance_start_epoch=1,
                labeled_view="weak", projection_dim=PROJ)
    meta = _meta(version, "SimMatch", "semilearn/algorithms/simmatch/simmatch.py", ours, schedule,
                 "config: simmatch_cifar10 values (T 0.1, p_cutoff 0.95, in_loss_ratio 1, smoothing_alpha 0.9, da_len 32) "
                 "except proj_size 8 and use_epass False (one projector, as ours); CIFAR branch of __init__: online teacher, "
                 "ema_bank 0.7; step 0 in epoch 0 (instance loss zeroed, no smoothing), step 1 in epoch 1 (both on); bank and labels random, DA queue 20 of 32 rows "
                 "filled, pointer 20; bank stored here as rows (USB holds its transpose); term.in_loss = total - sup - unsup")
    save_golden("usb_simmatch", tensors, meta)
    return "usb_simmatch"


# ------------------------------------------------------------------------------------------ CoMatch
def _comatch(usb, version, generator):
    import torch
    import torch.nn.functional as F
    from golden_io import save_golden

    model = _our_model(generator, logit_scale=14.0)
    net, name_map = _projected(usb, usb["comatch"].CoMatch_Net, model, generator)
    teacher = _perturbed({k: v for k, v in net.named_parameters()}, generator)
    x_lb = _images(generator, B_L)
    x_w, x_s0, x_s1 = _images(generator, B_U), _images(generator, B_U), _images(generator, B_U)
    y_lb = torch.randint(0, NUM_CLASSES, (B_L,), generator=generator)
    queue_size = QUEUE_BATCH * (B_L + B_U)
    queue_feats = F.normalize(torch.randn(queue_size, PROJ, generator=generator), dim=1)
    queue_probs = torch.rand(queue_size, NUM_CLASSES, generator=generator) ** 3
    queue_probs = queue_probs / queue_probs.sum(dim=1, keepdim=True)
    queue_ptr = B_L + B_U  # the second batch slot is written
    da_len = 32
    da_queue, da_ptr = _da_queue(generator, 32, da_len), 7  # full queue, pointer mid-way
    tensors = _initial(net, teacher, name_map)
    tensors.update({"state_init.queue_feats": queue_feats.clone(), "state_init.queue_probs": queue_probs.clone(),
                    "state_init.queue_ptr": torch.tensor(queue_ptr), "state_init.da_queue": da_queue.clone(),
                    "state_init.da_ptr": torch.tensor(da_ptr)})
    args = dict(ulb_loss_ratio=1.0, da_len=da_len, proj_size=PROJ, use_epass=False, uratio=B_U // B_L,
                batch_size=B_L, dataset="cifar10", num_classes=NUM_CLASSES)
    alg = _algorithm(usb, usb["comatch"].CoMatch, net, teacher, args, T=0.2, p_cutoff=0.95, contrast_p_cutoff=0.8,
                     use_hard_label=False, queue_batch=QUEUE_BATCH, smoothing_alpha=0.9, da_len=da_len, lambda_c=1.0,
                     queue_size=queue_size, queue_feats=queue_feats.clone(), queue_probs=queue_probs.clone(),
                     queue_ptr=queue_ptr)
    da = alg.hooks_dict["DistAlignHook"]
    da.p_model, da.p_model_ptr = da_queue.clone(), torch.tensor([da_ptr])
    da.p_target = torch.full(da.p_target.shape, 1.0 / NUM_CLASSES)  # USB builds it in float32 (0.2 + 3e-9)
    masks, aligned = [], []
    _record_calls(alg.hooks_dict["MaskingHook"], "masking", masks)
    _record_calls(da, "dist_align", aligned)
    # memory smoothing from it > queue_batch: off in step 0, on in step 1
    schedule = [{"epoch": 1, "it": QUEUE_BATCH}, {"epoch": 1, "it": QUEUE_BATCH + 1}]
    tensors.update(_steps(alg, name_map, dict(x_lb=x_lb, y_lb=y_lb, x_ulb_w=x_w, x_ulb_s_0=x_s0, x_ulb_s_1=x_s1),
                          schedule, lambda: {
                              "state_after.queue_feats": alg.queue_feats, "state_after.queue_probs": alg.queue_probs,
                              "state_after.queue_ptr": torch.tensor(alg.queue_ptr), "state_after.da_queue": da.p_model,
                              "state_after.da_ptr": da.p_model_ptr[0], "mask": masks[-1], "da_probs": aligned[-1]}))
    _check_masks("comatch", masks)
    tensors.update({"input.x_lb": x_lb, "input.y_lb": y_lb, "input.x_ulb_w": x_w, "input.x_ulb_s_0": x_s0,
                    "input.x_ulb_s_1": x_s1})
    ours = dict(threshold=0.95, contrast_threshold=0.8, temperature=0.2, alpha=0.9, lambda_u=1.0, lambda_c=1.0,
                lambda_c_ramp=False, queue_size=None, queue_batch=QUEUE_BATCH, queue_overflow="truncate",
                memory_graph=False, distribution_alignment=True, da_len=da_len, teacher="online", ema_momentum=EMA_M,
                ema_warmup=False, start_epoch=-1, smoothing_start_epoch=1, smoothing_start_step=QUEUE_BATCH + 1,
                labeled_view="weak", projection_dim=PROJ)
    meta = _meta(version, "CoMatch", "semilearn/algorithms/comatch/comatch.py", ours, schedule,
                 "config: comatch_cifar10 values (T 0.2, p_cutoff 0.95, contrast_p_cutoff 0.8, contrast_loss_ratio 1, "
                 "smoothing_alpha 0.9, da_len 32, hard_label False) except proj_size 8, use_epass False and queue_batch 3; "
                 "epoch 1, it 3 then 4 (memory smoothing off, then on: it > queue_batch); queue random unit feats and random distributions, pointer at the "
                 "second batch slot; DA queue full, pointer 7")
    save_golden("usb_comatch", tensors, meta)
    return "usb_comatch"


# ------------------------------------------------------------------------------------------ PseudoLabel
PL_TRAIN_ITER = 10  # num_train_iter: the unsupervised warm-up clip(it / (0.4 x 10)) is 0.5, then 0.75


def _pseudolabel(usb, version, generator):
    import torch
    from golden_io import save_golden

    model = _our_model(generator, logit_scale=12.0)
    net = _backbone_class()(model)
    name_map = lambda n: n.removeprefix("model.")
    teacher = _perturbed({k: v for k, v in net.named_parameters()}, generator)
    x_lb, x_w = _images(generator, B_L), _images(generator, B_U)
    y_lb = torch.randint(0, NUM_CLASSES, (B_L,), generator=generator)
    tensors = _initial(net, teacher, name_map)
    # what PseudoLabel.__init__ and AlgorithmBase.__init__ set: p_cutoff, unsup_warm_up, the BN controller
    # (running statistics frozen around the unlabelled forward), num_train_iter
    alg = _algorithm(usb, usb["pseudolabel"].PseudoLabel, net, teacher, dict(ulb_loss_ratio=1.0),
                     p_cutoff=0.95, unsup_warm_up=0.4, num_train_iter=PL_TRAIN_ITER,
                     bn_controller=usb["utils"].Bn_Controller())
    masks, labels = [], []
    _record_calls(alg.hooks_dict["MaskingHook"], "masking", masks)
    _record_calls(alg.hooks_dict["PseudoLabelingHook"], "gen_ulb_targets", labels)
    schedule = [{"epoch": 0, "it": 2}, {"epoch": 0, "it": 3}]
    tensors.update(_steps(alg, name_map, dict(x_lb=x_lb, y_lb=y_lb, x_ulb_w=x_w), schedule,
                          lambda: {"mask": masks[-1], "pseudo_label": labels[-1]}))
    _check_masks("pseudolabel", masks)
    tensors.update({"input.x_lb": x_lb, "input.y_lb": y_lb, "input.x_ulb_w": x_w})
    ours = dict(threshold=0.95, lambda_u=1.0, rampup="linear", rampup_fraction=0.4, eval_ema_decay=EMA_M,
                eval_ema_warmup=False, student_weight_decay=0.0, view="weak")
    meta = _meta(version, "PseudoLabel", "semilearn/algorithms/pseudolabel/pseudolabel.py", ours, schedule,
                 "config: pseudolabel_cifar10 values (p_cutoff 0.95, unsup_warm_up 0.4, ulb_loss_ratio 1, ema_m 0.999) "
                 f"except num_train_iter {PL_TRAIN_ITER} (warm-up weight 0.5 and 0.75 at it 2 and 3); "
                 "ours: student_weight_decay 0 (USB has only SGD's weight decay), the labeller view = the student view = "
                 "x_ulb_w (USB labels from the student's own forward); term.util_ratio = mask mean; "
                 "pseudo_label recorded by wrapping PseudoLabelingHook.gen_ulb_targets")
    meta["train_states"] = [dict(state, max_steps=PL_TRAIN_ITER) for state in meta["train_states"]]
    save_golden("usb_pseudolabel", tensors, meta)
    return "usb_pseudolabel"


def generate() -> list[str]:
    import os

    import torch

    import modeling_stil.modeling_wide_resnet

    usb, version = _import_usb(os.environ[ENV])
    written = []
    from tests._golden_seeded import float64_default

    with float64_default():
        for build in (_fixmatch, _freematch, _simmatch, _comatch, _pseudolabel):
            generator = torch.Generator().manual_seed(SEED)
            written.append(build(usb, version, generator))
    # USB's CIFAR-10 config values for tests/test_usb_recipes.py (scripts/golden/usb_recipes.py prints them)
    import json

    import usb_recipes

    usb_recipes.ORIGINALS_JSON.write_text(
        json.dumps(usb_recipes.read_originals(Path(os.environ[ENV])), indent=1, sort_keys=True) + "\n"
    )
    return [*written, usb_recipes.ORIGINALS_JSON.name]
