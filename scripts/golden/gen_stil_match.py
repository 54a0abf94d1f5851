"""Golden fixtures of siyi-wind/STiL's multimodal Match ports (models/MatchModel/): one training step
of the original ``FreeMatch``, ``SimMatch`` and ``CoMatch`` on the concat ``MultimodalBackbone``
(fixtures ``stil_multimodal_freematch``, ``stil_multimodal_simmatch``, ``stil_multimodal_comatch``).

Imports the checkout named by STIL_ORIGINAL_SRC with the stand-ins of gen_tip / benchmark_original
(lightly head, recording pl_bolts scheduler, pl_bolts' ``torchvision_ssl_encoder``); nothing of the
original is copied. The module is built from the checkout's config_dvm_MultiFreeMatch.yaml (+ models /
dataset files) with the tiny widths of gen_stil (ResNet-18 at 32 px, d = 8, one tabular layer, 3
classes), the epoch pinned past ``start_epoch`` so every term is in the loss, float64. Student
weights ``seeded_state`` (seed 1), the EMAN teacher ``perturbed`` (seed 2), the classifier biases
centred on the batch; the SAT state (``time_p``, ``p_model``, ``label_hist``, plain attributes in the
original) is seeded non-uniform and ``time_p`` is chosen so that the mask keeps some rows but not all.
Randomness inside the step: none (no dropout in this network, no draw in FreeMatch's step).
"""

from __future__ import annotations

import copy
import os

from gen_stil import (FIELD_LENGTHS, IMG, N_L, N_U, NUM_CLASSES, SEED_INPUT, SEED_STUDENT, SEED_TEACHER,
                      _git_commit, disable_dropout, make_inputs, run_original_step, use_checkout)

ENV = "STIL_ORIGINAL_SRC"
NEEDS = ("pytorch_lightning", "torchmetrics", "omegaconf", "einops", "timm")

SEED_STRONG, SEED_SAT, SEED_BANK, SEED_STRONG_1, SEED_QUEUES = 6, 7, 8, 9, 10
MATCH_DATA = ("models/resnet50.yaml", "dataset/dvm_all_server_reordered_SemiPseudo_0.01.yaml")
MATCH_TINY = dict(model="resnet18", embedding_dim=512, img_size=IMG, num_classes=NUM_CLASSES, num_cat=2, num_con=3,
                  tabular_embedding_dim=8, multimodal_embedding_dim=8, projection_dim=8, tabular_transformer_num_layers=1,
                  ema_momentum=0.7, lr_eval=1e-3, weight_decay_eval=1e-2, checkpoint=None, batch_size=N_L + N_U)
MATCH_SCALE = {"classifier_multimodal.weight": 2.0}


def load_original(src: str, config: str, import_path: str, class_name: str, tiny: dict):
    """(module, hparams): the original LightningModule of ``import_path``, its epoch pinned past start_epoch."""
    import importlib


    from gen_tip import _install_stand_ins, compose_original

    use_checkout(src)
    _install_stand_ins()
    original_cls = getattr(importlib.import_module(import_path), class_name)

    module, hp = compose_original(src, original_cls, (config, *MATCH_DATA), tiny, pin_start_epoch=True)
    disable_dropout(module)
    module.double()
    return module, hp


def seed_networks(main, ema, inputs) -> dict:
    """Student ``seeded_state``, teacher ``perturbed``; the classifier bias minus its mean logit over
    the whole batch (student train-mode copy, teacher eval); returns the bias overrides."""
    import torch

    from tests._golden_seeded import float_shapes, perturbed, seeded_state

    student = seeded_state(float_shapes(main.state_dict()), SEED_STUDENT, MATCH_SCALE)
    teacher = perturbed(student, SEED_TEACHER)
    x = (torch.cat((inputs["image_l"], inputs["image_u"])), torch.cat((inputs["table_l"], inputs["table_u"])))
    overrides = {}
    with torch.no_grad():
        main.load_state_dict(student, strict=False)
        ema.load_state_dict(teacher, strict=False)
        for prefix, net, train in (("main.", main, True), ("ema.", ema, False)):
            logits = copy.deepcopy(net).train(train)(x)[0]
            net.classifier_multimodal.bias -= logits.mean(0)
            overrides[prefix + "classifier_multimodal.bias"] = net.classifier_multimodal.bias.detach().clone()
    return overrides


def strong_view(inputs):
    """The unlabelled rows' strong view: other images (seed SEED_STRONG), continuous values moved."""
    import torch

    from tests._golden_seeded import seeded_images

    g = torch.Generator().manual_seed(SEED_STRONG)
    table = inputs["table_u"].clone()
    n_cat = sum(k > 1 for k in FIELD_LENGTHS)
    table[:, n_cat:] += 0.5 * torch.randn(table[:, n_cat:].shape, generator=g, dtype=torch.float64)
    return seeded_images(N_U, IMG, SEED_STRONG), table


def generate() -> list[str]:
    return [generate_freematch(), generate_simmatch(), generate_comatch()]


# ------------------------------------------------------------------------------------------ FreeMatch
def generate_freematch() -> str:
    import torch

    from golden_io import save_golden
    from tests._golden_seeded import record

    src = os.environ[ENV]
    torch.set_num_threads(2)
    module, hp = load_original(src, "config_dvm_MultiFreeMatch.yaml", "models.MatchModel.FreeMatchFolder.FreeMatch",
                               "FreeMatch", MATCH_TINY)
    net = module.model
    net.use_ddp = False
    inputs = make_inputs()
    overrides = seed_networks(net.main, net.ema, inputs)
    image_s, table_s = strong_view(inputs)
    x = inputs
    batch = {"l": ((x["image_l"], x["table_l"]), x["y_l"], None),
             "u": (((x["image_u"], x["table_u"]), (image_s, table_s)), torch.zeros(N_U, dtype=torch.long))}
    module.log = lambda *a, **k: None

    # SAT state: p_model and label_hist non-uniform; time_p such that half the rows pass the mask
    g = torch.Generator().manual_seed(SEED_SAT)
    net.p_model = torch.softmax(0.3 * torch.randn(NUM_CLASSES, generator=g, dtype=torch.float64), 0)
    net.label_hist = torch.softmax(torch.randn(NUM_CLASSES, generator=g, dtype=torch.float64), 0)
    trial = copy.deepcopy(module)
    seen = {}
    trial.model.update = lambda probs: seen.setdefault("probs", probs)  # record the teacher's q, no update
    trial.model.time_p = torch.tensor(0.0, dtype=torch.float64)
    with torch.no_grad():
        trial.train().training_step(batch, 0)
    q, m = seen["probs"], net.m
    p_model = m * net.p_model + (1 - m) * q.mean(0)
    ratios = (q.max(1).values / (p_model / p_model.max())[q.argmax(1)]).sort().values
    target = 0.5 * (ratios[N_U // 2 - 1] + ratios[N_U // 2])
    net.time_p = (target - (1 - m) * q.max(1).values.mean()) / m
    initial = {"time_p": net.time_p.clone(), "p_model": net.p_model.clone(), "label_hist": net.label_hist.clone()}

    loss, loc, grads = run_step(module, batch, "ent_loss")
    state = module.state_dict()
    # the teacher's image encoder: only its BN statistics (the part set by the step's forward; its
    # weights are m * teacher + (1 - m) * student, checked through every other teacher tensor), to keep
    # the fixture small
    post = {k[len("model."):]: v for k, v in state.items() if v.is_floating_point()
            and not (k.startswith("model.ema.encoder_imaging.") and not k.endswith(("running_mean", "running_var")))}
    tensors = {f"input.{k}": v for k, v in inputs.items() if not k.startswith("image")}
    tensors["input.table_s"] = table_s
    tensors.update(record("input.", {k: v for k, v in inputs.items() if k.startswith("image")}))
    tensors.update(record("input.", {"image_s": image_s}))
    tensors.update({f"init.override.{k}": v for k, v in overrides.items()})
    tensors.update({f"init.sat.{k}": v for k, v in initial.items()})
    terms = {"sup_loss": loc["sup_loss"], "unsup_loss": loc["unsup_loss"], "fairness_loss": loc["ent_loss"], "loss": loss}
    tensors.update({f"term.{k}": v.detach() for k, v in terms.items()})
    tensors.update({"step.pseudo_label": loc["pseudo_label"], "step.mask": loc["mask"].double()})
    tensors.update(record("grad.", grads))
    tensors.update(record("post.", post))
    tensors.update({f"post.sat.{k}": getattr(net, k).detach().clone() for k in initial})
    meta = {
        "original": {"repository": "siyi-wind/STiL", "commit": _git_commit(src),
                     "file": "models/MatchModel/FreeMatchFolder/FreeMatch.py + freematch_model.py + freematch_utils.py",
                     "class": "FreeMatch (FreeMatchModel, MultimodalBackbone)",
                     "config": " + ".join(("config_dvm_MultiFreeMatch.yaml",) + MATCH_DATA)},
        "overrides": {k: v for k, v in MATCH_TINY.items() if k != "checkpoint"}, "field_lengths": FIELD_LENGTHS,
        "batch": {"labelled": N_L, "unlabelled": N_U}, "scale": MATCH_SCALE,
        "seeds": {"student": SEED_STUDENT, "teacher": SEED_TEACHER, "inputs": SEED_INPUT, "strong": SEED_STRONG, "sat": SEED_SAT},
        "weights": "seeded_state over model.main.* (student); model.ema.* = perturbed(student, seeds.teacher); classifier "
                   "biases as init.override.*; SAT state as init.sat.* (time_p chosen so half the rows pass)",
        "lambda_u": float(hp.lambda_u), "lambda_e": float(hp.lambda_e), "sat_momentum": float(net.m),
        "epoch": int(module.current_epoch), "start_epoch": int(hp.start_epoch), "dtype": "float64",
        "randomness": {"dropout": "none in this network (drop rates 0)", "step": "no random draw inside the step"},
        "teacher_update": "the original updates the EMAN teacher inside forward, after the student forward and before the "
                          "teacher forward; ours after the optimizer step: the test applies the original's update first",
        "mask_rows": int(loc["mask"].sum()),
    }
    save_golden("stil_multimodal_freematch", tensors, meta)
    return "stil_multimodal_freematch"


def split_batch(inputs, image_s, table_s, index=None):
    """The originals' batch: ``l`` = ((image, table), labels, bank positions), ``u`` = ((weak, strong), labels)."""
    import torch

    x = inputs
    return {"l": ((x["image_l"], x["table_l"]), x["y_l"], index),
            "u": (((x["image_u"], x["table_u"]), (image_s, table_s)), torch.zeros(N_U, dtype=torch.long))}


def record_post(module, teacher: str = "ema") -> dict:
    """Floating state after the step without ``model.``; the teacher's image encoder: BN statistics
    only (its weights are m * teacher + (1 - m) * student, checked through the teacher's other
    tensors), to keep the fixture small."""
    return {k[len("model."):]: v for k, v in module.state_dict().items() if v.is_floating_point()
            and not (k.startswith(f"model.{teacher}.encoder_imaging.") and not k.endswith(("running_mean", "running_var")))}


def run_step(module, batch, marker: str, student: str = "main"):
    """`gen_stil.run_original_step` with the gradients of the student network ``model.<student>`` only."""
    return run_original_step(module, batch, marker, prefix=f"model.{student}.")


# ------------------------------------------------------------------------------------------ SimMatch
SIM_K, SIM_POSITIONS, SIM_DA_PTR = 16, (3, 7, 11, 14), 5


def generate_simmatch() -> str:
    """One step of the original SimMatch (config_dvm_MultiSimMatch: EMAN teacher, DA, c_smooth 0.9,
    bank overwritten): bank (P x K, K = 16) and its labels seeded, the labelled rows written at
    positions 3, 7, 11, 14; the DA queue full of seeded batch means, pointer 5; sim_threshold set
    between two rows' max p_hat so the mask keeps half the rows. The default dtype is float64 during
    the step (the original allocates its aggregation buffer with ``torch.zeros`` in the default dtype)."""
    import torch
    import torch.nn.functional as F

    from golden_io import save_golden
    from tests._golden_seeded import float64_default, record

    src = os.environ[ENV]
    torch.set_num_threads(2)
    module, hp = load_original(src, "config_dvm_MultiSimMatch.yaml", "models.MatchModel.SimMatch", "SimMatch",
                               dict(MATCH_TINY, K=SIM_K))
    net = module.model
    net.use_ddp = False
    inputs = make_inputs()
    overrides = seed_networks(net.main, net.ema, inputs)
    image_s, table_s = strong_view(inputs)
    index = torch.tensor(SIM_POSITIONS)
    batch = split_batch(inputs, image_s, table_s, index)
    module.log = lambda *a, **k: None
    g = torch.Generator().manual_seed(SEED_BANK)
    with torch.no_grad():
        net.bank.copy_(F.normalize(torch.randn(net.bank.shape, generator=g, dtype=torch.float64), dim=0))
        net.labels.copy_(torch.randint(0, NUM_CLASSES, net.labels.shape, generator=g))
        net.DA_queue.copy_(torch.rand(net.DA_queue.shape, generator=g, dtype=torch.float64).softmax(dim=1))
        net.DA_ptr.fill_(SIM_DA_PTR)
    initial = {k: v.detach().clone() for k, v in net.named_buffers() if k in ("bank", "labels", "DA_queue", "DA_ptr")}

    with float64_default():
        trial = copy.deepcopy(module)
        seen = {}
        forward = trial.model.forward
        trial.model.forward = lambda *a, **k: seen.setdefault("out", forward(*a, **k))
        with torch.no_grad():
            trial.train().training_step(batch, 0)
        top = seen["out"][1].max(1).values.sort().values
        module.threshold = float(0.5 * (top[N_U // 2 - 1] + top[N_U // 2]))
        loss, loc, grads = run_step(module, batch, "loss_in")
    tensors = {f"input.{k}": v for k, v in inputs.items() if not k.startswith("image")}
    tensors["input.table_s"] = table_s
    tensors["input.positions"] = index
    tensors.update(record("input.", {k: v for k, v in inputs.items() if k.startswith("image")}))
    tensors.update(record("input.", {"image_s": image_s}))
    tensors.update({f"init.override.{k}": v for k, v in overrides.items()})
    tensors.update({f"init.state.{k}": v for k, v in initial.items()})
    terms = {"sup_loss": loc["loss_x"], "unsup_loss": loc["loss_u"], "in_loss": loc["loss_in"], "loss": loss}
    tensors.update({f"term.{k}": v.detach() for k, v in terms.items()})
    tensors.update({"step.p_hat": loc["pseudo_label"], "step.mask": loc["mask"].double()})
    tensors.update(record("grad.", grads))
    tensors.update(record("post.", record_post(module)))
    tensors.update({"post.labels": net.labels.clone(), "post.DA_ptr": net.DA_ptr.clone()})
    meta = {
        "original": {"repository": "siyi-wind/STiL", "commit": _git_commit(src),
                     "file": "models/MatchModel/SimMatch.py + simmatch_model.py",
                     "class": "SimMatch (SimMatchModel, MultimodalBackbone)",
                     "config": " + ".join(("config_dvm_MultiSimMatch.yaml",) + MATCH_DATA)},
        "overrides": {k: v for k, v in dict(MATCH_TINY, K=SIM_K).items() if k != "checkpoint"},
        "field_lengths": FIELD_LENGTHS, "batch": {"labelled": N_L, "unlabelled": N_U}, "scale": MATCH_SCALE,
        "seeds": {"student": SEED_STUDENT, "teacher": SEED_TEACHER, "inputs": SEED_INPUT, "strong": SEED_STRONG, "bank": SEED_BANK},
        "weights": "seeded_state over model.main.* (student); model.ema.* = perturbed(student, seeds.teacher); classifier "
                   "biases as init.override.*; bank (P x K), bank labels, DA queue and pointer as init.state.*",
        "args": {"threshold": module.threshold, "lambda_u": float(hp.lambda_u), "lambda_in": float(hp.lambda_in),
                 "temperature_teacher": float(hp.tt), "temperature_student": float(hp.st),
                 "smoothing_alpha": float(hp.c_smooth), "da_len": int(net.DA_len)},
        "epoch": int(module.current_epoch), "start_epoch": int(hp.start_epoch), "dtype": "float64",
        "randomness": {"dropout": "none in this network (drop rates 0)", "step": "no random draw inside the step"},
        "teacher_update": "the original updates the EMAN teacher inside forward, after the student forward and before the "
                          "teacher forward; ours after the optimizer step: the test applies the original's update first",
        "mask_rows": int(loc["mask"].sum()),
    }
    save_golden("stil_multimodal_simmatch", tensors, meta)
    return "stil_multimodal_simmatch"


# ------------------------------------------------------------------------------------------ CoMatch
CO_K, CO_PTR_W, CO_PTR_S, CO_HIST = 24, 16, 4, 5


def generate_comatch() -> str:
    """One step of the original CoMatch (config_dvm_MultiCoMatch: parameter-EMA momentum encoder in
    train mode, DA over the batch-mean history, memory smoothing and the memory graph on): K = 24,
    queue_w / probs_xu / queue_s / probs_u seeded, the weak write (12 rows) from pointer 16 truncated
    at the end, the strong write (8 rows) from pointer 4; the DA history holds 5 seeded batch means;
    co_threshold set between two rows' max p so the mask keeps half the rows. Float64 is the default
    dtype during the step (the original builds its one-hot rows with ``torch.zeros``)."""
    import torch
    import torch.nn.functional as F

    from golden_io import save_golden
    from tests._golden_seeded import float64_default, record, seeded_images

    src = os.environ[ENV]
    torch.set_num_threads(2)
    module, hp = load_original(src, "config_dvm_MultiCoMatch.yaml", "models.MatchModel.CoMatch", "CoMatch",
                               dict(MATCH_TINY, K=CO_K))
    net = module.model
    net.use_ddp = False
    inputs = make_inputs()
    overrides = seed_networks(net.encoder, net.m_encoder, inputs)
    image_s, table_s = strong_view(inputs)
    g = torch.Generator().manual_seed(SEED_STRONG_1)
    table_s1 = inputs["table_u"].clone()
    n_cat = sum(k > 1 for k in FIELD_LENGTHS)
    table_s1[:, n_cat:] -= 0.5 * torch.randn(table_s1[:, n_cat:].shape, generator=g, dtype=torch.float64)
    image_s1 = seeded_images(N_U, IMG, SEED_STRONG_1)
    x = inputs
    batch = {"l": ((x["image_l"], x["table_l"]), x["y_l"], None),
             "u": (((x["image_u"], x["table_u"]), (image_s, table_s), (image_s1, table_s1)), torch.zeros(N_U, dtype=torch.long))}
    module.log = lambda *a, **k: None
    g = torch.Generator().manual_seed(SEED_QUEUES)
    with torch.no_grad():
        net.queue_w.copy_(torch.randn(net.queue_w.shape, generator=g, dtype=torch.float64))
        net.probs_xu.copy_(torch.rand(net.probs_xu.shape, generator=g, dtype=torch.float64).mul(4).softmax(dim=0))
        net.queue_s.copy_(F.normalize(torch.randn(net.queue_s.shape, generator=g, dtype=torch.float64), dim=0))
        net.probs_u.copy_(torch.rand(net.probs_u.shape, generator=g, dtype=torch.float64).mul(4).softmax(dim=0))
        net.queue_ptr_w.fill_(CO_PTR_W)
        net.queue_ptr_s.fill_(CO_PTR_S)
    hist = torch.rand(CO_HIST, NUM_CLASSES, generator=g, dtype=torch.float64).softmax(dim=1)
    net.hist_prob = list(hist.clone())
    initial = {k: v.detach().clone() for k, v in net.named_buffers() if k in ("queue_w", "probs_xu", "queue_s", "probs_u",
                                                                               "queue_ptr_w", "queue_ptr_s")}
    initial["hist_prob"] = hist

    with float64_default():
        trial = copy.deepcopy(module)
        seen = {}
        forward = trial.model.forward
        trial.model.forward = lambda *a, **k: seen.setdefault("out", forward(*a, **k))
        with torch.no_grad():
            trial.train().training_step(batch, 0)
        top = seen["out"][3].max(1).values.sort().values
        module.thr = float(0.5 * (top[N_U // 2 - 1] + top[N_U // 2]))
        loss, loc, grads = run_step(module, batch, "loss_contrast", student="encoder")
    tensors = {f"input.{k}": v for k, v in inputs.items() if not k.startswith("image")}
    tensors.update({"input.table_s": table_s, "input.table_s1": table_s1})
    tensors.update(record("input.", {k: v for k, v in inputs.items() if k.startswith("image")}))
    tensors.update(record("input.", {"image_s": image_s, "image_s1": image_s1}))
    tensors.update({f"init.override.{k.replace('main.', 'encoder.').replace('ema.', 'm_encoder.')}": v for k, v in overrides.items()})
    tensors.update({f"init.state.{k}": v for k, v in initial.items()})
    terms = {"sup_loss": loc["loss_x"], "unsup_loss": loc["loss_u"], "contrast_loss": loc["loss_contrast"], "loss": loss}
    tensors.update({f"term.{k}": v.detach() for k, v in terms.items()})
    tensors.update({"step.probs": loc["probs"], "step.mask": loc["mask"].double(), "step.Q": loc["Q"]})
    tensors.update(record("grad.", grads))
    tensors.update(record("post.", record_post(module, teacher="m_encoder")))
    tensors.update({"post.queue_ptr_w": net.queue_ptr_w.clone(), "post.queue_ptr_s": net.queue_ptr_s.clone()})
    meta = {
        "original": {"repository": "siyi-wind/STiL", "commit": _git_commit(src),
                     "file": "models/MatchModel/CoMatch.py + comatch_model.py",
                     "class": "CoMatch (CoMatchModel, MultimodalBackbone)",
                     "config": " + ".join(("config_dvm_MultiCoMatch.yaml",) + MATCH_DATA)},
        "overrides": {k: v for k, v in dict(MATCH_TINY, K=CO_K).items() if k != "checkpoint"},
        "field_lengths": FIELD_LENGTHS, "batch": {"labelled": N_L, "unlabelled": N_U}, "scale": MATCH_SCALE,
        "seeds": {"student": SEED_STUDENT, "teacher": SEED_TEACHER, "inputs": SEED_INPUT, "strong": SEED_STRONG,
                  "strong_1": SEED_STRONG_1, "queues": SEED_QUEUES},
        "weights": "seeded_state over model.encoder.* (student); model.m_encoder.* = perturbed(student, seeds.teacher); "
                   "classifier biases as init.override.*; queues, pointers and the DA history as init.state.*",
        "args": {"threshold": module.thr, "contrast_threshold": float(hp.contrast_th), "temperature": float(hp.co_temperature),
                 "alpha": float(hp.alpha), "lambda_u": float(hp.lam_u), "lambda_c": float(hp.lam_c), "queue_size": CO_K},
        "epoch": int(module.current_epoch), "start_epoch": int(hp.start_epoch), "dtype": "float64",
        "randomness": {"dropout": "none in this network (drop rates 0)", "step": "no random draw inside the step"},
        "teacher_update": "the original moves the momentum encoder's parameters (not its buffers) inside forward, after the "
                          "student forward and before the teacher forward; ours after the optimizer step: the test applies "
                          "the original's parameter update first",
        "mask_rows": int(loc["mask"].sum()),
    }
    save_golden("stil_multimodal_comatch", tensors, meta)
    return "stil_multimodal_comatch"
