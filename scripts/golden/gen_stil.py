"""Golden fixtures of siyi-wind/STiL: one training step of the original ``STiLModel`` (fixture ``stil``).

Imports the checkout named by STIL_ORIGINAL_SRC with the stand-ins of scripts/benchmark_original.py
(lightly's SimCLRProjectionHead as in lightly 1.2.22, a recording pl_bolts scheduler, the epoch
pinned past ``start_epoch`` so every term is in the loss). Nothing of the original is copied.

The module is built in the DVM configuration of the checkout's own config files with tiny widths
(ResNet-18 at 32 px, d = 8, P = 8, one tabular layer, 3 classes, CLUB hidden width left at the
original's 512), then every weight is overwritten with ``tests._golden_seeded.seeded_state``
(student seed 1, teacher seed 2, projectors / CLUB / prototypes seed 3), so teacher != student and
the prototypes and running prototype sums are non-trivial; th1 = 0.95 so that the confidence mask
selects some rows but not all, EMA momentum 0.7 so the teacher visibly moves. Float64 throughout.
Randomness inside the step: dropout / drop-path are set to 0 on both sides (the codes draw their
masks differently); the case-3 coin flips (``torch.rand_like``) are recorded and replayed by the test.
One step: ``training_step`` -> backward -> the module's own ``configure_optimizers`` Adam step
(lr 1e-3, weight decay 1e-2 on every parameter: the original decays all of them).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

ENV = "STIL_ORIGINAL_SRC"
NEEDS = ("pytorch_lightning", "torchmetrics", "omegaconf", "einops", "timm")

ROOT = Path(__file__).resolve().parents[2]
FIELD_LENGTHS = [3, 4, 1, 1, 1]  # 2 categorical fields (3 and 4 values), 3 continuous
N_L, N_U, NUM_CLASSES, IMG = 4, 8, 3, 32
# classifier weights x2, biases then set to minus each class's mean logit on the step's batch
# (``centre_classifiers``, recorded as init overrides): seeded logits otherwise share one argmax on
# every row and the CGPL cases and the confidence mask would be all-or-nothing
SCALE = {f"classifier_{head}.weight": 2.0 for head in ("multimodal", "imaging", "tabular")}
HEADS = ("classifier_multimodal", "classifier_imaging", "classifier_tabular")
SEED_STUDENT, SEED_TEACHER, SEED_METHOD, SEED_INPUT, SEED_COINS = 1, 2, 3, 4, 5
TINY = dict(model="resnet18", embedding_dim=512, img_size=IMG, num_classes=NUM_CLASSES, num_cat=2, num_con=3,
            tabular_embedding_dim=8, multimodal_embedding_dim=8, projection_dim=8,
            tabular_transformer_num_layers=1, multimodal_transformer_num_layers=1,
            th1=0.95, ema_momentum=0.7, lr_eval=1e-3, weight_decay_eval=1e-2, repeat_ratio=3)


def _git_commit(src: str) -> str:
    head = Path(src, ".git")
    try:
        import subprocess

        return subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown (no git metadata)" if not head.exists() else "unknown"


def use_checkout(src: str) -> None:
    """Import the original's top-level packages (``models``, ``utils``, ``datasets``...) from ``src``:
    the STiL and TIP checkouts use the same package names, and generate.py runs both in one process."""
    for name in [m for m in sys.modules if m.split(".")[0] in ("models", "utils", "datasets", "trainers")]:
        del sys.modules[name]
    sys.dont_write_bytecode = True  # keep the checkout untouched (no __pycache__)
    while src in sys.path:
        sys.path.remove(src)
    sys.path.insert(0, src)


def disable_dropout(module) -> None:
    """Dropout and drop-path off (p = 0), the rest of train mode (BatchNorm statistics) kept."""
    from torch import nn

    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0


def build_original(src: str):
    """The original STiLModel (epoch pinned past start_epoch), tiny, float64, seeded weights."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark_original import dvm_hparams, import_original

    from tests._golden_seeded import float_shapes, perturbed, seeded_state

    use_checkout(src)
    model_cls = import_original(src)
    with tempfile.TemporaryDirectory() as tmp:
        lengths = os.path.join(tmp, "tabular_lengths.pt")
        torch.save(FIELD_LENGTHS, lengths)
        hp = dvm_hparams(src, lengths, N_L, N_U)
        hp.merge_with(TINY)
        with contextlib.redirect_stdout(io.StringIO()):
            module = model_cls(hp)
    module.use_ddp = False
    module.bench_epoch = module.start_epoch + 1
    disable_dropout(module)
    module.double()
    student = seeded_state(float_shapes(module.model.state_dict()), SEED_STUDENT, SCALE)
    teacher = perturbed(student, SEED_TEACHER)
    method_keys = {k: v for k, v in module.state_dict().items() if not k.startswith(("model.", "ema."))}
    method = seeded_state(float_shapes(method_keys), SEED_METHOD)
    method["prototypes"] = F.normalize(method["prototypes"], dim=1)
    method["prototypes_count_sum"] = method["prototypes_count_sum"].abs() + 1.0
    with torch.no_grad():
        module.model.load_state_dict(student, strict=False)
        module.ema.load_state_dict(teacher, strict=False)
        module.load_state_dict(method, strict=False)
    return module, hp


def make_inputs():
    """Labelled and unlabelled rows: normalised images (``seeded_images``, regenerated by the test),
    tables as the original's float rows (categorical codes first), labels of the labelled rows."""
    import torch

    from tests._golden_seeded import seeded_images

    g = torch.Generator().manual_seed(SEED_INPUT)

    def table(n):
        cat = torch.stack([torch.randint(0, k, (n,), generator=g) for k in FIELD_LENGTHS if k > 1], 1)
        con = torch.randn(n, sum(k == 1 for k in FIELD_LENGTHS), generator=g, dtype=torch.float64)
        return torch.cat([cat.double(), con], 1)

    table_l, table_u = table(N_L), table(N_U)
    y_l = torch.randint(0, NUM_CLASSES, (N_L,), generator=g)
    image_l, image_u = seeded_images(N_L + N_U, IMG, SEED_INPUT).split([N_L, N_U])
    return dict(image_l=image_l, table_l=table_l, image_u=image_u, table_u=table_u, y_l=y_l)


def centre_classifiers(module, inputs) -> dict:
    """Subtract each head's mean logit over the batch from its bias, for the student (train-mode
    forward of a copy, so no running statistic moves) and the teacher (eval); returns the new biases."""
    import copy

    import torch

    x = [torch.cat((inputs["image_l"], inputs["image_u"])), torch.cat((inputs["table_l"], inputs["table_u"]))]
    overrides = {}
    for prefix, net, train in (("model.", module.model, True), ("ema.", module.ema, False)):
        probe = copy.deepcopy(net).train(train)
        with torch.no_grad():
            logits = probe.forward_all(x)[:3]
            for head, z in zip(HEADS, logits):
                bias = getattr(net, head).bias
                bias -= z.mean(0)
                overrides[f"{prefix}{head}.bias"] = bias.detach().clone()
    return overrides


class _Recorder:
    """Calls of a loss module, in order (the original logs sums or mislabels some terms)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.calls.append(out)
        return out


def run_original_step(module, batch, marker: str, prefix: str = ""):
    """One training step of the original, as Lightning's automatic optimisation runs it: the locals of
    ``training_step`` captured at its return (the frame holding ``marker``), backward, then the step of
    the optimizer its ``configure_optimizers`` returns. (loss, locals, gradients by name without ``prefix``)."""
    captured = {}

    def profiler(frame, event, arg):
        if event == "return" and frame.f_code.co_name == "training_step" and marker in frame.f_locals:
            captured.update(frame.f_locals)

    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    sys.setprofile(profiler)
    try:
        loss = module.training_step(batch, 0)
    finally:
        sys.setprofile(None)
    loss.backward()
    grads = {n[len(prefix):]: p.grad for n, p in module.named_parameters() if p.grad is not None and n.startswith(prefix)}
    optimizer.step()
    return loss, captured, grads


def generate() -> list[str]:
    import torch

    from golden_io import save_golden
    from tests._golden_seeded import record

    src = os.environ[ENV]
    torch.set_num_threads(2)
    module, hp = build_original(src)
    inputs = make_inputs()
    overrides = centre_classifiers(module, inputs)
    x = inputs
    ones, zeros = torch.ones(N_L, dtype=torch.bool), torch.zeros(N_U, dtype=torch.bool)
    batch = {"l": ([None, x["image_l"]], [None, x["table_l"]], x["y_l"], None, ones),
             "u": ([None, x["image_u"]], [None, x["table_u"]], torch.zeros(N_U, dtype=torch.long), None, zeros)}

    # the per-term values: cross entropies (3 heads, in order m, i, t), CLIP, CLUB, prototype loss
    ce = _Recorder(module.criterion_ce.forward)
    module.criterion_ce.forward = ce
    itc = _Recorder(module.criterion_itc.forward)
    module.criterion_itc.forward = itc
    pt = _Recorder(module.criterion_pt.forward)
    module.criterion_pt.forward = pt
    club = {}
    for name in ("CLUB_imaging", "CLUB_tabular"):
        est = getattr(module, name)
        club[name] = (_Recorder(est.forward), _Recorder(est.learning_loss))
        est.forward, est.learning_loss = club[name]
    logged = {}
    module.log = lambda name, value, *a, **k: logged.__setitem__(name, value.detach().clone() if torch.is_tensor(value) else value)

    torch.manual_seed(SEED_COINS)  # the only draw inside the step: the case-3 coin flips
    loss, loc, grads = run_original_step(module, batch, "mask1")  # loc: pseudo-labels, masks, cases
    if os.environ.get("GOLDEN_DEBUG"):
        for k in ("y_hat_m_ue", "y_hat_i_ue", "y_hat_t_ue", "prediction", "teacher_probs"):
            print(k, loc[k])
    terms = {
        "sup_loss_multimodal": ce.calls[0], "sup_loss_image": ce.calls[1], "sup_loss_tabular": ce.calls[2],
        "loss_cc": itc.calls[0][0],
        "club_bound_image": club["CLUB_imaging"][0].calls[0], "club_estimator_image": club["CLUB_imaging"][1].calls[0],
        "club_bound_tabular": club["CLUB_tabular"][0].calls[0], "club_estimator_tabular": club["CLUB_tabular"][1].calls[0],
        "unsup_loss_multimodal": loc["loss_m_u"], "unsup_loss_image": loc["loss_i_u"], "unsup_loss_tabular": loc["loss_t_u"],
        "loss_pt": pt.calls[0], "loss": loss,
    }
    step = {
        "p_bar": loc["pseudo_label"], "p_hat": loc["prediction"], "q": loc["teacher_probs"],
        "mask": loc["mask1"].double(), "case1": loc["case1"].double(), "case2_image": loc["case2_i"].double(),
        "case2_tabular": loc["case2_t"].double(), "case3": loc["case3"].double(),
    }
    coins = loc["mask_random"]
    tensors = {f"input.{k}": v for k, v in inputs.items() if not k.startswith("image")}
    tensors.update(record("input.", {k: v for k, v in inputs.items() if k.startswith("image")}))
    tensors["input.coins"] = coins
    tensors.update({f"init.override.{k}": v for k, v in overrides.items()})
    tensors.update({f"term.{k}": v.detach() for k, v in terms.items()})
    tensors.update({f"step.{k}": v for k, v in step.items()})
    tensors.update(record("grad.", grads))
    state = module.state_dict()
    tensors.update(record("post.", {k: v for k, v in state.items() if v.is_floating_point()}))
    mask = step["mask"]
    meta = {
        "original": {"repository": "siyi-wind/STiL", "commit": _git_commit(src),
                     "file": "models/Disentangle/STiLModel.py", "class": "STiLModel",
                     "config": "configs/config_dvm_STiL.yaml + models/resnet50.yaml + dataset/dvm_all_server_reordered_SemiPseudo_0.01.yaml"},
        "overrides": TINY, "field_lengths": FIELD_LENGTHS, "batch": {"labelled": N_L, "unlabelled": N_U},
        "scale": SCALE,
        "seeds": {"student": SEED_STUDENT, "teacher": SEED_TEACHER, "method": SEED_METHOD, "inputs": SEED_INPUT, "coins": SEED_COINS},
        "weights": "tests/_golden_seeded.seeded_state over the sorted float tensors of model.* (student) and of the "
                   "method's own tensors; teacher = perturbed(student, seeds.teacher); classifier biases as init.override.*; "
                   "prototypes row-normalised, prototypes_count_sum = |.| + 1",
        "epoch": int(module.current_epoch), "start_epoch": int(module.start_epoch),
        "dtype": "float64",
        "randomness": {"dropout": "disabled on both sides (p = 0, drop_prob = 0)",
                       "case3_coin_flips": "aligned: recorded as input.coins and replayed by the test"},
        "optimizer": "the module's configure_optimizers: Adam(lr_eval, weight_decay_eval) over model, projectors, CLUB",
        "mask_rows": int(mask.sum()), "case_counts": {k: int(step[k].sum()) for k in ("case1", "case2_image", "case2_tabular", "case3")},
        "logged": {k: float(v) for k, v in logged.items() if torch.is_tensor(v) and v.numel() == 1},
    }
    save_golden("stil", tensors, meta)
    return ["stil", generate_co_training(), generate_mmatch()]


# ------------------------------------------------------------------------------------------ co-training
CO_FILES = ("config_dvm_CoTrain.yaml", "models/resnet50.yaml", "dataset/dvm_all_server_reordered_SemiPseudo_0.01.yaml")
CO_TINY = dict(model="resnet18", embedding_dim=512, img_size=IMG, num_classes=NUM_CLASSES, num_cat=2, num_con=3,
               tabular_embedding_dim=8, multimodal_embedding_dim=8, projection_dim=8, tabular_transformer_num_layers=1,
               co_threshold=0.9, ema_momentum=0.7, lr_eval=1e-3, weight_decay_eval=1e-2, checkpoint=None, batch_size=N_L + N_U)
CO_SCALE = {f"classifier_{head}.weight": 2.0 for head in ("multimodal", "imaging", "tabular")}


def build_original_co_training(src: str):
    """The original CoTraining (epoch pinned past start_epoch), tiny, float64, seeded weights."""
    import torch

    from gen_tip import _install_stand_ins, compose_original
    from tests._golden_seeded import float_shapes, perturbed, seeded_state

    use_checkout(src)
    _install_stand_ins()  # lightly, pl_bolts scheduler and torchvision_ssl_encoder
    from models.SemiMultimodal.CoTraining import CoTraining

    module, hp = compose_original(src, CoTraining, CO_FILES, CO_TINY, pin_start_epoch=True)
    disable_dropout(module)
    module.double()
    student = seeded_state(float_shapes(module.model.state_dict()), SEED_STUDENT, CO_SCALE)
    teacher = perturbed(student, SEED_TEACHER)
    with torch.no_grad():
        module.model.load_state_dict(student, strict=False)
        module.ema.load_state_dict(teacher, strict=False)
    return module, hp


def centre_classifiers_co_training(module, inputs) -> dict:
    """As ``centre_classifiers``, for the MultimodalBackbone (``forward`` -> z_m, z_i, z_t, x_m)."""
    import copy

    import torch

    x = [torch.cat((inputs["image_l"], inputs["image_u"])), torch.cat((inputs["table_l"], inputs["table_u"]))]
    overrides = {}
    for prefix, net, train in (("model.", module.model, True), ("ema.", module.ema, False)):
        probe = copy.deepcopy(net).train(train)
        with torch.no_grad():
            for head, z in zip(HEADS, probe(x)[:3]):
                bias = getattr(net, head).bias
                bias -= z.mean(0)
                overrides[f"{prefix}{head}.bias"] = bias.detach().clone()
    return overrides


def generate_co_training() -> str:
    import torch

    from golden_io import save_golden
    from tests._golden_seeded import record

    src = os.environ[ENV]
    module, hp = build_original_co_training(src)
    inputs = make_inputs()
    overrides = centre_classifiers_co_training(module, inputs)
    x = inputs
    ones, zeros = torch.ones(N_L, dtype=torch.bool), torch.zeros(N_U, dtype=torch.bool)
    batch = {"l": ([None, x["image_l"]], [None, x["table_l"]], x["y_l"], None, ones),
             "u": ([None, x["image_u"]], [None, x["table_u"]], torch.zeros(N_U, dtype=torch.long), None, zeros)}
    ce = _Recorder(module.criterion_ce.forward)
    module.criterion_ce.forward = ce
    module.log = lambda *a, **k: None
    loss, loc, grads = run_original_step(module, batch, "mask_i")
    terms = {"sup_loss_multimodal": ce.calls[0], "sup_loss_image": ce.calls[1], "sup_loss_tabular": ce.calls[2],
             "unsup_loss_image": loc["loss_i_u"], "unsup_loss_tabular": loc["loss_t_u"], "loss": loss}
    tensors = {f"input.{k}": v for k, v in inputs.items() if not k.startswith("image")}
    tensors.update(record("input.", {k: v for k, v in inputs.items() if k.startswith("image")}))
    tensors.update({f"init.override.{k}": v for k, v in overrides.items()})
    tensors.update({f"term.{k}": v.detach() for k, v in terms.items()})
    tensors.update({"step.q_image": loc["pseudo_label_i"], "step.q_tabular": loc["pseudo_label_t"],
                    "step.mask_image": loc["mask_i"].double(), "step.mask_tabular": loc["mask_t"].double()})
    tensors.update(record("grad.", grads))
    tensors.update(record("post.", {k: v for k, v in module.state_dict().items() if v.is_floating_point()}))
    meta = {
        "original": {"repository": "siyi-wind/STiL", "commit": _git_commit(src), "file": "models/SemiMultimodal/CoTraining.py",
                     "class": "CoTraining (MultimodalBackbone)", "config": " + ".join(CO_FILES)},
        "overrides": {k: v for k, v in CO_TINY.items() if k != "checkpoint"}, "field_lengths": FIELD_LENGTHS,
        "batch": {"labelled": N_L, "unlabelled": N_U}, "scale": CO_SCALE,
        "seeds": {"student": SEED_STUDENT, "teacher": SEED_TEACHER, "inputs": SEED_INPUT},
        "weights": "seeded_state over model.* (student); teacher = perturbed(student, seeds.teacher); classifier biases as init.override.*",
        "epoch": int(module.current_epoch), "start_epoch": int(hp.start_epoch), "dtype": "float64",
        "randomness": {"dropout": "none in this network (drop rates 0)"},
        "teacher_update": "the original updates the EMAN teacher inside the step, after the student forward and before the "
                          "teacher forward; ours after the optimizer step (docs/methods.md co_training): the test applies "
                          "the original's update to our teacher before the step",
        "mask_rows": {"image": int(loc["mask_i"].sum()), "tabular": int(loc["mask_t"].sum())},
    }
    save_golden("co_training", tensors, meta)
    return "co_training"


# ------------------------------------------------------------------------------------------ MMatch
MM_FILES = ("config_dvm_MMatch.yaml", "models/resnet50.yaml", "dataset/dvm_all_server_reordered_SemiPseudo_0.01.yaml")
MM_TINY = dict(CO_TINY, th1=0.9)
MM_QUEUE_PTR, MM_DA_PTR = 630, 5  # near the end of the 640-column queue: the write is truncated


def generate_mmatch() -> str:
    """One step of the original MMatch (DA on, memory smoothing and both unimodal terms active): the
    embedding and label queues, the DA queue and their pointers are seeded (non-zero, the embedding
    write truncated at the end of the queue)."""
    import torch
    import torch.nn.functional as F

    from gen_tip import _install_stand_ins, compose_original
    from golden_io import save_golden
    from tests._golden_seeded import float_shapes, record, seeded_state

    src = os.environ[ENV]
    use_checkout(src)
    _install_stand_ins()
    from models.SemiMultimodal.MMatch import MMatch

    module, hp = compose_original(src, MMatch, MM_FILES, MM_TINY, pin_start_epoch=True)
    disable_dropout(module)
    module.double()
    student = seeded_state(float_shapes(module.model.state_dict()), SEED_STUDENT, CO_SCALE)
    g = torch.Generator().manual_seed(SEED_METHOD)
    with torch.no_grad():
        module.model.load_state_dict(student, strict=False)
        module.embed_queue.copy_(F.normalize(torch.randn(module.embed_queue.shape, generator=g, dtype=torch.float64), dim=0))
        module.probs_queue.copy_(torch.rand(module.probs_queue.shape, generator=g, dtype=torch.float64).softmax(dim=0))
        module.DA_queue.copy_(torch.rand(module.DA_queue.shape, generator=g, dtype=torch.float64).softmax(dim=1))
        module.embed_queue_ptr.fill_(MM_QUEUE_PTR)
        module.DA_ptr.fill_(MM_DA_PTR)
    inputs = make_inputs()
    x = inputs
    probe_x = [torch.cat((x["image_l"], x["image_u"])), torch.cat((x["table_l"], x["table_u"]))]
    import copy

    overrides = {}
    probe = copy.deepcopy(module.model).train()
    with torch.no_grad():
        for head, z in zip(HEADS, probe(probe_x)[:3]):
            bias = getattr(module.model, head).bias
            bias -= z.mean(0)
            overrides[f"model.{head}.bias"] = bias.detach().clone()
    initial = {k: v.detach().clone() for k, v in module.state_dict().items() if not k.startswith("model.")}
    ones, zeros = torch.ones(N_L, dtype=torch.bool), torch.zeros(N_U, dtype=torch.bool)
    batch = {"l": ([None, x["image_l"]], [None, x["table_l"]], x["y_l"], None, ones),
             "u": ([None, x["image_u"]], [None, x["table_u"]], torch.zeros(N_U, dtype=torch.long), None, zeros)}
    ce = _Recorder(module.criterion_ce.forward)
    module.criterion_ce.forward = ce
    module.log = lambda *a, **k: None
    loss, loc, grads = run_original_step(module, batch, "mask1")
    terms = {"sup_loss_multimodal": ce.calls[0], "sup_loss_image": ce.calls[1], "sup_loss_tabular": ce.calls[2],
             "unsup_loss_image": loc["loss_i_u"], "unsup_loss_tabular": loc["loss_t_u"], "loss": loss}
    tensors = {f"input.{k}": v for k, v in inputs.items() if not k.startswith("image")}
    tensors.update(record("input.", {k: v for k, v in inputs.items() if k.startswith("image")}))
    tensors.update({f"init.override.{k}": v for k, v in overrides.items()})
    tensors.update({f"init.state.{k}": v for k, v in initial.items()})
    tensors.update({f"term.{k}": v.detach() for k, v in terms.items()})
    tensors.update({"step.pseudo_label": loc["pseudo_label"], "step.mask": loc["mask1"].double()})
    tensors.update(record("grad.", grads))
    state = module.state_dict()
    tensors.update(record("post.", {k: v for k, v in state.items() if v.is_floating_point()}))
    tensors.update({f"post.{k}": state[k].clone() for k in ("embed_queue_ptr", "DA_ptr")})
    meta = {
        "original": {"repository": "siyi-wind/STiL", "commit": _git_commit(src), "file": "models/SemiMultimodal/MMatch.py",
                     "class": "MMatch (MultimodalBackbone)", "config": " + ".join(MM_FILES)},
        "overrides": {k: v for k, v in MM_TINY.items() if k != "checkpoint"}, "field_lengths": FIELD_LENGTHS,
        "batch": {"labelled": N_L, "unlabelled": N_U}, "scale": CO_SCALE,
        "seeds": {"student": SEED_STUDENT, "queues": SEED_METHOD, "inputs": SEED_INPUT},
        "weights": "seeded_state over model.*; classifier biases as init.override.*; queues, DA queue and pointers as init.state.*",
        "epoch": int(module.current_epoch), "start_epoch": int(hp.start_epoch), "dtype": "float64",
        "randomness": {"dropout": "none in this network (drop rates 0)"},
        "mask_rows": int(loc["mask1"].sum()), "queue_ptr": [MM_QUEUE_PTR, int(state["embed_queue_ptr"])],
    }
    save_golden("mmatch", tensors, meta)
    return "mmatch"
