"""Golden fixtures from WeiHongLee/Learning-to-impute: Mean Teacher, MixMatch, pseudo-labelling, L2I-O, L2I-L.

    L2I_ORIGINAL_SRC=<checkout of WeiHongLee/Learning-to-impute> python scripts/golden/generate.py --only gen_l2i

How the original is run (nothing of it is copied into this repository):

* Each training script (``Classification/train-*.py``, ``Regression/train-*.py``) is loaded as a
  module with ``importlib`` from the checkout, with ``sys.argv`` set to the flags below, so its
  module-level ``argparse`` defaults, globals and classes are the original's. Its own ``train(...)``
  function (the whole per-iteration step: labels, interleaved forwards, losses, optimizer steps,
  meta step, EMA updates) is then called for ONE iteration (``--val-iteration 1``) with
  single-batch loaders whose iterators expose the ``.next()`` the scripts call.
* What the scripts cannot run here is replaced around them, never inside the step:
  ``tensorboardX``, ``progress.bar`` (logging) and ``torch._six`` (removed from torch; the AFLW
  sampler imports it) are stubbed in ``sys.modules``; ``nn.Module.cuda`` is the identity and the
  script's ``use_cuda`` is False (CPU); the default dtype is float64, so every tensor the step makes
  (one-hot targets included) is float64.
* Tiny networks: the original ``WideResNet`` / ``TCDCNN`` classes are built by their own
  ``__init__`` (and initialisation), with the script module's ``nn`` swapped for a proxy whose
  ``Conv2d`` / ``BatchNorm2d`` / ``Linear`` shrink the hard-coded widths (WRN-28-2: 16/32/64/128 ->
  1/2/4/8 channels, depth 10; the functional forward of the L2I meta step hard-codes
  ``for l in range(4)`` blocks per group, so the model module gets a ``range`` answering ``range(4)``
  with the one block of a WRN-10; TCDCNN: 20/48/64/80 -> 2/3/3/4 filters, 256 -> 8 hidden, on 44 px
  images). Our `WideResNetConfig(depth=10, widen_factor=2, base_channels=1)` and
  `TCDCNNConfig(conv_channels=(2, 3, 3, 4), hidden_size=8, image_size=44)` are the same networks.
  Weights are then perturbed (BN affine and running statistics, biases) so nothing is trivial, and
  the teacher and evaluation EMA get their own weights (the scripts' EMA constructors copy the
  student; ours are loaded with the same values).
* What the step computes is captured by wrapping, never by editing: the optimizer's ``step``
  records every gradient and the weights after it, ``SemiLoss`` / the criterion records its terms,
  ``torch.autograd.grad`` records the meta step's losses and gradients (inner loss and its weight
  gradient g, meta loss, meta-gradient / label gradient), the model's ``forward(x, params)``
  records the virtual weights theta', and ``np.random.beta`` / ``torch.randperm`` record MixMatch's
  draws.
* Randomness: the only randomness inside these steps is MixMatch's mixup (lambda ~ Beta, one
  permutation): ALIGNED (the original's draws are recorded and our test replays them). Dropout:
  none (WRN dropRate 0; TCDCNN's dropout needs IsUnlabeled=True, never passed). Augmentation is
  outside the step (the views are fixed tensors given to both sides).
"""

from __future__ import annotations

import builtins
import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ENV = "L2I_ORIGINAL_SRC"
NEEDS = ("torch", "torchvision", "numpy", "scipy", "matplotlib", "safetensors")

REPO = "WeiHongLee/Learning-to-impute"
WRN_WIDTHS = {3: 3, 16: 1, 32: 2, 64: 4, 128: 8, 10: 10}  # original width -> tiny width
WRN_DEPTH, WRN_BLOCKS = 10, 1  # blocks per group = (depth - 4) / 6
TCDCNN_WIDTHS = {1: 1, 20: 2, 48: 3, 64: 3, 80: 4, 256: 8, 10: 10}
TCDCNN_IMAGE = 44  # (((44-4)/2-4)/2-2)/2-2 = 1: the flattened 4 x 1 x 1 features
TCDCNN_FLAT = {720: 4}
SEED = 0


# ------------------------------------------------------------------------------------- harness
class _Bar:  # progress.bar.Bar stand-in (logging only)
    def __init__(self, *args, **kwargs):
        self.suffix, self.elapsed_td, self.eta_td = "", 0, 0

    def next(self):
        pass

    def finish(self):
        pass


class _Writer:  # tensorboardX.SummaryWriter stand-in
    def __init__(self, *args, **kwargs):
        pass

    def add_scalar(self, *args, **kwargs):
        pass

    def close(self):
        pass


class _BatchIterator:
    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        return self

    def __next__(self):
        return self.batch

    next = __next__  # the scripts call it.next()


class OneBatch:
    """A loader with one batch whose iterator has the Python-2 ``.next()`` the scripts call."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        return _BatchIterator(self.batch)

    def __len__(self):
        return 1


def _stub_modules():
    import torch

    tbx = types.ModuleType("tensorboardX")
    tbx.SummaryWriter = _Writer
    progress = types.ModuleType("progress")
    bar = types.ModuleType("progress.bar")
    bar.Bar = _Bar
    progress.bar = bar
    six = types.ModuleType("torch._six")
    six.int_classes = int
    six.string_classes = str
    stubs = {"tensorboardX": tbx, "progress": progress, "progress.bar": bar}
    if not hasattr(torch, "_six"):
        stubs["torch._six"] = six
    return stubs


@contextlib.contextmanager
def original_script(folder: str, script: str, argv: list[str]):
    """The original ``<folder>/<script>`` loaded as a module (argparse sees ``argv``), on the CPU,
    float64 default dtype; sys.modules / sys.path / sys.argv restored afterwards."""
    import torch

    root = Path(os.environ[ENV]) / folder
    local = ("models", "dataset", "utils")
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in local}
    stubs = _stub_modules()
    saved_stubs = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    old_argv, old_path, old_dtype = sys.argv, list(sys.path), torch.get_default_dtype()
    old_cuda = torch.nn.Module.cuda
    out = tempfile.mkdtemp(prefix="l2i_original_")
    sys.argv = [script, "--out", out, *argv]
    sys.path.insert(0, str(root))
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.set_default_dtype(torch.float64)
    try:
        spec = importlib.util.spec_from_file_location(f"l2i_original_{Path(script).stem.replace('-', '_')}", root / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.use_cuda = False
        yield module
    finally:
        torch.set_default_dtype(old_dtype)
        torch.nn.Module.cuda = old_cuda
        sys.argv, sys.path[:] = old_argv, old_path
        for k in list(sys.modules):
            if k.split(".")[0] in local:
                del sys.modules[k]
        sys.modules.update(saved)
        shutil.rmtree(out, ignore_errors=True)
        for k, v in saved_stubs.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _shrinking_nn(widths: dict, flat: dict | None = None):
    """A stand-in for the ``nn`` a model file imported: Conv2d / BatchNorm2d / Linear with the
    hard-coded widths mapped through ``widths`` (and ``flat`` for a flattened input); the rest is torch.nn."""
    from torch import nn

    flat = flat or {}

    class Conv2d(nn.Conv2d):
        def __init__(self, in_channels, out_channels, *args, **kwargs):
            super().__init__(widths[in_channels], widths[out_channels], *args, **kwargs)

    class BatchNorm2d(nn.BatchNorm2d):
        def __init__(self, num_features, *args, **kwargs):
            super().__init__(widths[num_features], *args, **kwargs)

    class Linear(nn.Linear):
        def __init__(self, in_features, out_features, *args, **kwargs):
            super().__init__(flat.get(in_features, widths.get(in_features)), widths[out_features], *args, **kwargs)

    proxy = types.SimpleNamespace(**{k: getattr(nn, k) for k in dir(nn) if not k.startswith("__")})
    proxy.Conv2d, proxy.BatchNorm2d, proxy.Linear = Conv2d, BatchNorm2d, Linear
    return proxy


def tiny_original_models(script):
    """Patch the script's model module so that its constructor builds the tiny network (WRN: the
    caller sets ``nChannels`` to the narrow width after construction)."""
    models = script.models
    if hasattr(models, "WideResNet"):
        wrn = sys.modules[models.WideResNet.__module__]
        wrn.nn = _shrinking_nn(WRN_WIDTHS)
        # its functional forward (the L2I meta step) loops `for l in range(4)` blocks per group, i.e.
        # WRN-28 only: a module-level `range` answers range(4) with the tiny WRN-10's 1 block (other
        # calls, range(1, 4) over the groups and range(nb_layers) in _make_layer, are unchanged)
        wrn.range = lambda *args: builtins.range(WRN_BLOCKS) if args == (4,) else builtins.range(*args)
    else:
        sys.modules[models.TCDCNN.__module__].nn = _shrinking_nn(TCDCNN_WIDTHS, TCDCNN_FLAT)



# ------------------------------------------------------------------------------------- recorders
def record_optimizer_steps(optimizer, model, log: list) -> None:
    """Each ``optimizer.step()``: the gradients it used and the weights after it."""
    inner = optimizer.step

    def step(*args, **kwargs):
        entry = {"grad": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}}
        result = inner(*args, **kwargs)
        entry["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        log.append(entry)
        return result

    optimizer.step = step


def record_functional_forwards(model, log: list) -> None:
    """The weights of every ``model(x, params)`` call: the meta step's virtual weights theta'."""
    inner = model.forward

    def forward(x, params=None, *args, **kwargs):
        if params is not None:
            log.append({n: v.detach().clone() for n, v in params.items()})
        return inner(x, params, *args, **kwargs)

    model.forward = forward


@contextlib.contextmanager
def recording(log: dict):
    """Wrap ``torch.autograd.grad``, ``np.random.beta`` and ``torch.randperm`` to record what the
    original step asks and gets (values unchanged)."""
    import numpy as np
    import torch

    real_grad, real_beta, real_randperm = torch.autograd.grad, np.random.beta, torch.randperm

    def grad(outputs, inputs, *args, **kwargs):
        inputs = [inputs] if torch.is_tensor(inputs) else list(inputs)
        before = [t.detach().clone() for t in inputs]
        result = real_grad(outputs, inputs, *args, **kwargs)
        log.setdefault("grad_calls", []).append({"outputs": outputs, "inputs": inputs, "inputs_before": before, "result": result})
        return result

    def beta(*args, **kwargs):
        value = real_beta(*args, **kwargs)
        log.setdefault("beta", []).append(float(value))
        return value

    def randperm(*args, **kwargs):
        value = real_randperm(*args, **kwargs)
        log.setdefault("randperm", []).append(value.clone())
        return value

    torch.autograd.grad, np.random.beta, torch.randperm = grad, beta, randperm
    try:
        yield log
    finally:
        torch.autograd.grad, np.random.beta, torch.randperm = real_grad, real_beta, real_randperm


class RecordingCall:
    """A callable (criterion, ramp) whose results are appended to ``log``."""

    def __init__(self, inner, log: list):
        self.inner, self.log = inner, log

    def __call__(self, *args, **kwargs):
        result = self.inner(*args, **kwargs)
        self.log.append(result)
        return result


# ------------------------------------------------------------------------------------- weights and data
def perturb(model, gen, scale: float = 0.1) -> None:
    """Non-trivial weights: BN affine away from (1, 0), biases non-zero, running stats random."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            if name.endswith("bias") or p.ndim == 1:
                p.add_(scale * noise)
            else:
                p.mul_(1 + scale * noise)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(scale * torch.randn(b.shape, generator=gen, dtype=torch.float32))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen, dtype=torch.float32))
            elif name.endswith("num_batches_tracked"):
                b.fill_(3)
        for value in model.state_dict().values():  # float32-representable: stored as float32, exactly
            if value.is_floating_point():
                value.copy_(value.float())


def set_params(target, source, gen, scale: float = 0.05) -> None:
    """``target``'s parameters = ``source``'s + noise (a teacher / eval EMA that is not the student)."""
    import torch

    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.copy_((s + scale * torch.randn(s.shape, generator=gen, dtype=torch.float32).to(s.dtype)).float())


def state(model, params_only: bool = False) -> dict:
    items = model.named_parameters() if params_only else model.state_dict().items()
    return {n: v.detach().clone() for n, v in items}


def images(gen, b: int, shape):
    """float16-representable values in float64 (stored as float16: exact, a quarter of the size)."""
    import torch

    return torch.randn((b, *shape), generator=gen, dtype=torch.float32).half().to(torch.float64)


def prefixed(prefix: str, tensors: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def commit_of(root: str) -> str:
    try:
        return subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def meta(method: str, file: str, notes: list[str], randomness: str, **extra) -> dict:
    import hashlib

    digest = hashlib.sha256((Path(os.environ[ENV]) / file).read_bytes()).hexdigest()
    return {"original": REPO, "commit": commit_of(os.environ[ENV]), "file": file, "file_sha256": digest, "method": method,
            "seed": SEED, "dtype": "float64", "randomness": randomness, "notes": notes, **extra}


BATCH = 3  # labelled = unlabelled = meta batch (the originals' equal batch sizes)
EPOCHS = 10  # --epochs 10 --val-iteration 1: one step = one epoch, max_steps 10
STEP = 1  # steps completed before the recorded one: ramp 1 / (0.4 x 10) = 0.25, teacher a_t = 0.5
WRN_NOTE = ("tiny WRN-10 (widths 1/2/4/8) built by the original WideResNet.__init__ (nn proxy; its functional forward's "
            "range(4) blocks per group answered with 1); ours: WideResNetConfig(depth=10, widen_factor=2, base_channels=1)")
TCDCNN_NOTE = ("tiny TCDCNN (filters 2/3/3/4, hidden 8, 44 px) built by the original TCDCNN.__init__ (nn proxy); ours: "
               "TCDCNNConfig(conv_channels=(2,3,3,4), kernel_sizes=(5,5,3,3), hidden_size=8, image_size=44); "
               "parameter conv{i} = our convs.{i-1}")


def _ema_copy(build):
    model = build()
    for p in model.parameters():
        p.detach_()
    return model


# ------------------------------------------------------------------------------------- classification
def _classification_data(gen, with_meta: bool):
    import torch

    b = BATCH
    data = {"x": images(gen, b, (3, 32, 32)), "y": torch.randint(0, 10, (b,), generator=gen),
            "u1": images(gen, b, (3, 32, 32)), "u2": images(gen, b, (3, 32, 32))}
    if with_meta:
        data["xv"], data["yv"] = images(gen, b, (3, 32, 32)), torch.randint(0, 10, (b,), generator=gen)
    return data


def _run_classification(script_name: str, method: str, extra_argv=()):
    """MT / L2I-O / L2I-L / MM on CIFAR-shaped data: one iteration of the script's train()."""
    import numpy as np
    import torch

    with original_script("Classification", script_name, ["--epochs", str(EPOCHS), "--val-iteration", "1",
                                                          "--batch-size", str(BATCH), *extra_argv]) as script:
        tiny_original_models(script)
        args = script.args
        gen = torch.Generator().manual_seed(SEED)
        torch.manual_seed(SEED)
        depth = WRN_DEPTH
        # WeightEMA builds its own WideResNet(num_classes=10): the same depth through the default argument
        script.models.WideResNet.__init__.__defaults__ = (depth, 2, 0.0)

        def build():  # the original constructor; its view(-1, nChannels) follows the narrow width
            net = script.models.WideResNet(num_classes=10, depth=depth)
            net.nChannels = WRN_WIDTHS[net.nChannels]
            return net

        model = build()
        perturb(model, gen)
        ema_model = _ema_copy(build)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)  # as main()
        ema_optimizer = script.WeightEMA(model, ema_model, alpha=args.ema_decay)
        set_params(ema_model, model, gen)
        uses_teacher = hasattr(script, "UpdateEma")
        if uses_teacher:
            target_model = _ema_copy(build)
            target_optimizer = script.UpdateEma(model, target_model, alpha=args.ema_decay)
            set_params(target_model, model, gen)
            script.global_step = STEP
        data = _classification_data(gen, with_meta=method.startswith("l2i"))
        tensors = prefixed("input.", data)
        tensors.update(prefixed("init.student.", state(model)))
        tensors.update(prefixed("init.eval_ema.", state(ema_model)))
        if uses_teacher:
            tensors.update(prefixed("init.teacher.", state(target_model, params_only=True)))

        steps, terms, virtual, log = [], [], [], {}
        record_optimizer_steps(optimizer, model, steps)
        record_functional_forwards(model, virtual)
        criterion = RecordingCall(script.SemiLoss(), terms)
        labeled = OneBatch((data["x"], data["y"]))
        unlabeled = OneBatch(((data["u1"], data["u2"]), None))
        # train(..., epoch, use_cuda, rampup_length): t = epoch + 0/1 = STEP; rampup_length as main()
        rampup_length = EPOCHS * 0.4 if method != "mixmatch" else EPOCHS / BATCH
        np.random.seed(SEED)
        torch.manual_seed(SEED)
        with recording(log):
            if method == "mixmatch":
                script.train(labeled, unlabeled, model, optimizer, ema_optimizer, criterion, STEP, False, rampup_length)
            elif method == "mean_teacher":
                script.train(labeled, unlabeled, model, target_model, optimizer, ema_optimizer, target_optimizer,
                             criterion, STEP, False, rampup_length)
            else:
                tmp_model = build()
                meta_loader = OneBatch((data["xv"], data["yv"]))
                script.train(labeled, unlabeled, meta_loader, model, target_model, tmp_model, optimizer, ema_optimizer,
                             target_optimizer, criterion, STEP, False, rampup_length)

        lx, lu, w = terms[0]
        tensors.update({"term.sup_loss": lx, "term.unsup_loss": lu, "term.unsup_weight": torch.tensor(float(w)),
                        "term.loss": lx + float(w) * lu})
        for i, entry in enumerate(steps):
            tensors.update(prefixed(f"grad{i}.", entry["grad"]))
            if not method.startswith("l2i"):  # L2I: the final state and theta' cover it (fixture size)
                tensors.update(prefixed(f"step{i}.", entry["after"]))
        tensors.update(prefixed("final.student.", state(model)))
        tensors.update(prefixed("final.eval_ema.", state(ema_model)))
        if uses_teacher:
            tensors.update(prefixed("final.teacher.", state(target_model, params_only=True)))
        if method == "mixmatch":
            tensors["mixup.beta"] = torch.tensor(log["beta"][0])
            tensors["mixup.permutation"] = log["randperm"][0]
        if method.startswith("l2i"):
            inner_call, meta_call = log["grad_calls"][0], log["grad_calls"][1]
            names = [n for n, _ in model.named_parameters()]
            tensors["meta.inner_loss"] = inner_call["outputs"].detach()
            tensors.update({f"meta.g.{n}": g.detach() for n, g in zip(names, inner_call["result"]) if g is not None})
            tensors.update(prefixed("meta.virtual.", {n: virtual[0][n] for n in names}))
            tensors["meta.loss"] = meta_call["outputs"].detach()
            # L2I-O: the meta-gradient on tmp_model IS theta.grad of the second step (grad1): not stored twice
            if method == "l2i_l":
                tensors["meta.p"] = meta_call["inputs_before"][0]
                tensors["meta.p_grad"] = meta_call["result"][0]
                tensors["meta.p_new"] = meta_call["inputs"][0].detach().clone()
        hyper = {"lr": args.lr, "lambda_u": args.lambda_u, "ema_decay": args.ema_decay, "epochs": EPOCHS,
                 "batch_size": BATCH, "step": STEP, "rampup_length_epochs": rampup_length, "depth": depth, "T": args.T, "alpha": args.alpha}
    return tensors, hyper


# ------------------------------------------------------------------------------------- regression (AFLW)
def _regression_data(gen, with_meta: bool):
    import torch

    b, side = BATCH, TCDCNN_IMAGE
    data = {"x": images(gen, b, (1, side, side)).abs().clamp_min(2.0 ** -8) * 0.25,
            "y": (20 + 12 * torch.rand((b, 10), generator=gen, dtype=torch.float32)).to(torch.float64),
            "u1": images(gen, b, (1, side, side)).abs().clamp_min(2.0 ** -8) * 0.25, "u2": images(gen, b, (1, side, side)).abs().clamp_min(2.0 ** -8) * 0.25,
            "t1": torch.randint(-4, 5, (b, 2), generator=gen), "t2": torch.randint(-4, 5, (b, 2), generator=gen),
            "mean": (26 + 3 * torch.randn(10, generator=gen, dtype=torch.float32)).to(torch.float64),
            "std": (3 + 2 * torch.rand(10, generator=gen, dtype=torch.float32)).to(torch.float64)}
    if with_meta:
        data["xv"] = images(gen, b, (1, side, side)).abs().clamp_min(2.0 ** -8) * 0.25
        data["yv"] = (20 + 12 * torch.rand((b, 10), generator=gen, dtype=torch.float32)).to(torch.float64)
    return data


def _run_regression(script_name: str, method: str):
    """MT / PL / L2I-O / L2I-L on AFLW-shaped data (5 landmarks, translated views): one iteration."""
    import torch

    with original_script("Regression", script_name, ["--epochs", str(EPOCHS), "--val-iteration", "1",
                                                      "--batch-size", str(BATCH)]) as script:
        tiny_original_models(script)
        args = script.args
        gen = torch.Generator().manual_seed(SEED + 1)
        torch.manual_seed(SEED)
        build = lambda: script.models.TCDCNN()
        model = build()
        perturb(model, gen)
        ema_model = _ema_copy(build)
        target_model = _ema_copy(build)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)  # as main()
        ema_optimizer = script.WeightEMA(model, ema_model, alpha=args.ema_decay)
        target_optimizer = script.UpdateEma(model, target_model, alpha=args.ema_decay)
        set_params(ema_model, model, gen)
        set_params(target_model, model, gen)
        script.global_step = STEP
        data = _regression_data(gen, with_meta=method.startswith("l2i"))
        script.mean, script.std = data["mean"], data["std"]
        tensors = prefixed("input.", data)
        tensors.update(prefixed("init.student.", state(model)))
        tensors.update(prefixed("init.eval_ema.", state(ema_model)))
        tensors.update(prefixed("init.teacher.", state(target_model, params_only=True)))

        steps, sup_terms, ramps, virtual, log = [], [], [], [], {}
        record_optimizer_steps(optimizer, model, steps)
        record_functional_forwards(model, virtual)
        script.linear_rampup = RecordingCall(script.linear_rampup, ramps)
        criterion = RecordingCall(torch.nn.MSELoss(), sup_terms)
        labeled = OneBatch((data["x"], data["y"]))
        unlabeled = OneBatch((data["u1"], data["t1"][:, 0], data["t1"][:, 1], data["u2"], data["t2"][:, 0], data["t2"][:, 1]))
        rampup_length = float(EPOCHS) / float(BATCH)  # passed by main(); unused by these train() functions
        with recording(log):
            if method.startswith("l2i"):
                tmp_model = build()
                meta_loader = OneBatch((data["xv"], data["yv"]))
                result = script.train(labeled, unlabeled, meta_loader, model, target_model, tmp_model, optimizer,
                                      ema_optimizer, target_optimizer, criterion, STEP, False, rampup_length)
            else:
                result = script.train(labeled, unlabeled, model, target_model, optimizer, ema_optimizer,
                                      target_optimizer, criterion, STEP, False, rampup_length)
        loss_avg, _, lu_avg = result[:3]
        w = ramps[0] * args.lambda_u
        # one iteration: AverageMeter's avg = value * B / B (float64 rounding only)
        tensors.update({"term.sup_loss": sup_terms[0].detach(), "term.unsup_loss": torch.tensor(lu_avg),
                        "term.unsup_weight": torch.tensor(float(w)), "term.loss": torch.tensor(loss_avg)})
        for i, entry in enumerate(steps):
            tensors.update(prefixed(f"grad{i}.", entry["grad"]))
            if not method.startswith("l2i"):  # L2I: the final state and theta' cover it (fixture size)
                tensors.update(prefixed(f"step{i}.", entry["after"]))
        tensors.update(prefixed("final.student.", state(model)))
        tensors.update(prefixed("final.eval_ema.", state(ema_model)))
        tensors.update(prefixed("final.teacher.", state(target_model, params_only=True)))
        if method.startswith("l2i"):
            calls = log["grad_calls"]  # grad(Lu_tmp, z_u); grad(z_u, theta, l_grad); grad(L_meta, p); [O: grad(p, theta, .)]
            names = [n for n, _ in model.named_parameters()]
            tensors["meta.inner_loss"] = calls[0]["outputs"].detach()
            tensors.update({f"meta.g.{n}": g.detach() for n, g in zip(names, calls[1]["result"]) if g is not None})
            tensors.update(prefixed("meta.virtual.", {n: virtual[0][n] for n in names}))
            tensors["meta.loss"] = calls[2]["outputs"].detach()
            tensors["meta.p"] = calls[2]["inputs_before"][0]
            tensors["meta.p_grad"] = calls[2]["result"][0]
            if method == "l2i_l":  # L2I-O: the meta-gradient grad(p, theta, p_grad) IS grad1
                tensors["meta.p_new"] = calls[2]["inputs"][0].detach().clone()
        hyper = {"lr": args.lr, "lambda_u": args.lambda_u, "ema_decay": args.ema_decay, "epochs": EPOCHS,
                 "batch_size": BATCH, "step": STEP, "sgd": {"momentum": 0.9, "weight_decay": 5e-4}}
    return tensors, hyper


# ------------------------------------------------------------------------------------- entry point
def _shrink(tensors: dict) -> dict:
    """Inputs and initial weights were drawn as float16 / float32 values: stored so (exactly); the
    tests cast them back to float64."""
    import torch

    out = {}
    for key, value in tensors.items():
        if value.is_floating_point() and key.startswith(("input.", "init.")):
            for dtype in (torch.float16, torch.float32):
                if torch.equal(value.to(dtype).double(), value.double()):
                    value = value.to(dtype)
                    break
        out[key] = value
    return out


PACKED = ("init.student.", "init.teacher.", "init.eval_ema.", "grad0.", "grad1.", "step0.", "step1.", "final.student.",
          "final.teacher.", "final.eval_ema.", "meta.g.", "meta.virtual.", "meta.grad.")


def pack(tensors: dict) -> tuple[dict, dict]:
    """Each per-parameter group (``init.student.<name>``, ``grad0.<name>``, ...) as ONE flat tensor
    ``init.student`` (a WRN-28 has ~150 small tensors; one safetensors header entry each would
    outweigh the numbers). The JSON's ``layout``: ``entries`` = every ``"name:shape"`` (float state
    of the student, parameters first in module order) and, per group, the names it holds, as
    ``"state"`` (every entry), ``"params"`` (parameters only) or ``{"params_without": [...]}``
    (gradients: the parameters the original gave none, e.g. the WRN's dead BN). Integer buffers (``num_batches_tracked``) are left out."""
    import torch

    groups: dict[str, list[str]] = {}
    shapes: dict[str, list[int]] = {}
    for key, value in tensors.items():
        prefix = next((p for p in PACKED if key.startswith(p)), None)
        if prefix is not None and value.is_floating_point():
            groups.setdefault(prefix[:-1], []).append(key[len(prefix):])
            shapes[key[len(prefix):]] = list(value.shape)
    state_names = groups["init.student"]
    param_names = [n for n in state_names if not n.endswith(("running_mean", "running_var"))]
    entries = param_names + [n for n in state_names if n not in param_names]
    out = {k: v for k, v in tensors.items() if not any(k.startswith(p) for p in PACKED)}
    layout = {"entries": [f"{n}:{'x'.join(map(str, shapes[n]))}" for n in entries], "groups": {}}
    for group, names in groups.items():
        ordered = [n for n in entries if n in names]
        kind = "state" if ordered == entries else "params" if ordered == param_names else \
            {"params_without": [n for n in param_names if n not in names]}
        layout["groups"][group] = kind
        out[group] = torch.cat([tensors[f"{group}.{name}"].detach().double().flatten() for name in ordered])
    return out, layout


CASES = {
    # name: (folder, script, method, notes)
    "l2i_mean_teacher_cls": ("Classification", "train-MT.py", "mean_teacher",
                             ["one iteration of train(): teacher labels u2 (train mode), interleaved [x; u1], "
                              "Adam step, WeightEMA (eval EMA + student decay 0.02 lr), UpdateEma (a_t = 0.5)"]),
    "l2i_mixmatch_cls": ("Classification", "train-MM.py", "mixmatch",
                         ["one iteration of train(): guess + sharpen, mixup with the recorded Beta draw and "
                          "permutation, 3 interleaved chunks, Adam step, WeightEMA; ramp = epochs / batch_size "
                          "epochs (our rampup_fraction = 1 / batch_size)"]),
    "l2i_l2i_o_cls": ("Classification", "train-L2I-O.py", "l2i_o",
                      ["one iteration: MT step (Adam) then the meta step on tmp_model = copy of theta: "
                       "sum inner loss, virtual step 50 lr, meta CE at theta', meta-gradient on tmp_model set as "
                       "theta.grad, second Adam step; EMAs once after both"]),
    "l2i_l2i_l_cls": ("Classification", "train-L2I-L.py", "l2i_l",
                      ["one iteration: MT step then p = tmp_model(u2) as a leaf, virtual step 100 lr, "
                       "p* = p - dL_meta/dp, L_u* = mean (softmax(z_u) - softmax(p*))^2, second Adam step"]),
    "l2i_mean_teacher_reg": ("Regression", "train-MT.py", "mean_teacher",
                             ["one iteration of train(): teacher on u2 moved into u1's frame through mean/std, "
                              "SGD(0.9, wd 5e-4 on every parameter), UpdateEma then WeightEMA (no student decay)"]),
    "l2i_pseudo_label_reg": ("Regression", "train-PL.py", "pseudo_label",
                             ["one iteration of train(): the student labels u2 (no_grad), SGD, WeightEMA; the "
                              "teacher update is commented out in the original"]),
    "l2i_l2i_o_reg": ("Regression", "train-L2I-O.py", "l2i_o",
                      ["one iteration: MT step, WeightEMA, meta step on [u1; u2] with tanh inner loss, "
                       "virtual step 10 lr, meta-gradient through p only, second SGD step, UpdateEma, WeightEMA"]),
    "l2i_l2i_l_reg": ("Regression", "train-L2I-L.py", "l2i_l",
                      ["one iteration: MT step, WeightEMA, p = f(u2) (non-leaf), virtual step 1 lr, "
                       "p* = p - dL_meta/dp, L_u* on z_u, second SGD step, UpdateEma, WeightEMA"]),
}


def generate(only: list[str] | None = None) -> list[str]:
    from golden_io import save_golden

    written = []
    for name, (folder, script_name, method, notes) in CASES.items():
        if only and name not in only:
            continue
        runner = _run_classification if folder == "Classification" else _run_regression
        tensors, hyper = runner(script_name, method)
        randomness = ("mixup lambda and permutation ALIGNED (recorded from the original's np.random.beta / "
                      "torch.randperm, replayed by the test)" if method == "mixmatch" else
                      "none inside the step (no dropout: WRN dropRate 0 / TCDCNN IsUnlabeled never set)")
        info = meta(method, f"{folder}/{script_name}", notes + [WRN_NOTE if folder == "Classification" else TCDCNN_NOTE],
                    randomness, hyperparameters=hyper, how="importlib-loaded script, its train() for one iteration "
                    "(--val-iteration 1), see scripts/golden/gen_l2i.py")
        tensors, info["layout"] = pack(tensors)
        save_golden(name, _shrink(tensors), info)
        written.append(name)
    return written


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    print(generate(sys.argv[1:] or None))
