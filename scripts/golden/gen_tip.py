"""Golden fixtures of siyi-wind/TIP: one pretraining step of the original ``TIP3Loss`` (fixture ``tip``).

Imports the checkout named by TIP_ORIGINAL_SRC (nothing of it is copied) with stand-ins for what it
imports from packages it pins: lightly's SimCLRProjectionHead (lightly 1.2.22: Linear-ReLU-Linear,
as in scripts/benchmark_original.py), pl_bolts' LinearWarmupCosineAnnealingLR (records its arguments)
and pl_bolts' ``torchvision_ssl_encoder`` (a torchvision ResNet, ``fc`` = Identity, returning its
feature maps as pl_bolts' copy does; key names unchanged).

Built in the DVM configuration of the checkout's config_dvm_TIP.yaml with tiny widths (ResNet-18 at
32 px, d = 8, one tabular and one multimodal layer, P = 8; the image width 512 is fixed by ResNet-18), every weight
overwritten by ``tests._golden_seeded.seeded_state`` (seed 1), float64. One step:
``training_step`` -> backward -> the module's own Adam (lr 1e-3, weight decay 1e-2 on every
parameter, as configure_optimizers builds it). Randomness inside the step: the hard-negative draws
(``torch.multinomial``, one call per row) are recorded and replayed by the test; there is no dropout
(drop rates 0 in the config). The augmented image, corrupted and masked rows are inputs (seeded).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import types
from pathlib import Path

ENV = "TIP_ORIGINAL_SRC"
NEEDS = ("pytorch_lightning", "torchmetrics", "omegaconf", "torchvision", "scikit-learn", "timm")

ROOT = Path(__file__).resolve().parents[2]
FIELD_LENGTHS = [3, 4, 1, 1, 1]
B, IMG, SEED_WEIGHTS, SEED_INPUT = 6, 32, 1, 4
TINY = dict(model="resnet18", embedding_dim=512, img_size=IMG, num_cat=2, num_con=3, num_classes=3,
            tabular_embedding_dim=8, multimodal_embedding_dim=8, projection_dim=8,
            tabular_transformer_num_layers=1, multimodal_transformer_num_layers=1,
            lr=1e-3, weight_decay=1e-2, batch_size=B, checkpoint=None)
CONFIG_FILES = ("config_dvm_TIP.yaml", "models/resnet50.yaml", "dataset/dvm_all_server_reordered.yaml")


def _install_stand_ins() -> None:
    import torchvision
    from torch import nn

    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark_original import install_stand_ins

    install_stand_ins()  # lightly head, pl_bolts scheduler

    class _FeatureMapResNet(torchvision.models.ResNet):
        """pl_bolts' resnet copy: the list of feature maps (all stages, or the pooled output)."""

        return_all_feature_maps = False

        def forward(self, x):
            x0 = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x1 = self.layer1(x0)
            x2 = self.layer2(x1)
            x3 = self.layer3(x2)
            x4 = self.layer4(x3)
            if self.return_all_feature_maps:
                return [x0, x1, x2, x3, x4]
            return [self.fc(self.avgpool(x4).flatten(1))]

    def torchvision_ssl_encoder(name, pretrained=False, return_all_feature_maps=False):
        blocks = {"resnet18": (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2]),
                  "resnet50": (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3])}[name]
        model = _FeatureMapResNet(*blocks)
        model.return_all_feature_maps = return_all_feature_maps
        model.fc = nn.Identity()
        return model

    utils = types.ModuleType("pl_bolts.utils")
    utils.self_supervised = types.ModuleType("pl_bolts.utils.self_supervised")
    utils.self_supervised.torchvision_ssl_encoder = torchvision_ssl_encoder
    sys.modules["pl_bolts.utils"] = utils
    sys.modules["pl_bolts.utils.self_supervised"] = utils.self_supervised
    sys.modules["pl_bolts"].utils = utils


def compose_original(src: str, module_cls, config_files, tiny: dict, pin_start_epoch: bool = False):
    """(module, hparams): the original LightningModule ``module_cls`` built quietly from its hydra files
    ``config_files`` (their ``defaults`` dropped), merged with ``tiny`` and our table's field lengths. With
    ``pin_start_epoch`` its ``current_epoch`` reads start_epoch + 1, so every loss term is on."""
    import torch
    from omegaconf import OmegaConf

    cls = module_cls
    if pin_start_epoch:
        class _AtEpoch(module_cls):
            pinned_epoch = 0

            @property
            def current_epoch(self):
                return self.pinned_epoch

        cls = _AtEpoch
    parts = []
    for name in config_files:
        part = OmegaConf.load(os.path.join(src, "configs", name))
        part.pop("defaults", None)
        parts.append(part)
    hp = OmegaConf.merge(*parts)
    with tempfile.TemporaryDirectory() as tmp:
        lengths = os.path.join(tmp, "tabular_lengths.pt")
        torch.save(FIELD_LENGTHS, lengths)
        hp.merge_with(dict(tiny, field_lengths_tabular=lengths))
        with contextlib.redirect_stdout(io.StringIO()):
            module = cls(hp)
    if pin_start_epoch:
        module.pinned_epoch = int(hp.start_epoch) + 1
    return module, hp


def build_original(src: str):
    import torch

    from tests._golden_seeded import float_shapes, seeded_state

    from gen_stil import use_checkout

    use_checkout(src)
    _install_stand_ins()
    from models.Tips.TipModel3Loss import TIP3Loss

    module, hp = compose_original(src, TIP3Loss, CONFIG_FILES, TINY)
    module.double()
    weights = seeded_state(float_shapes(module.state_dict()), SEED_WEIGHTS)
    with torch.no_grad():
        module.load_state_dict(weights, strict=False)
    return module, hp


def make_inputs():
    """An augmented image per row, the clean row, a corrupted row (30 % of the fields from other
    rows, as the dataset's marginal draws), the masked row and its mask (50 % of the fields, all
    special-token masks: replace_random_rate 0)."""
    import torch

    from tests._golden_seeded import seeded_images

    g = torch.Generator().manual_seed(SEED_INPUT)
    n_fields = len(FIELD_LENGTHS)
    cat = torch.stack([torch.randint(0, k, (B,), generator=g) for k in FIELD_LENGTHS if k > 1], 1)
    clean = torch.cat([cat.double(), torch.randn(B, n_fields - cat.shape[1], generator=g, dtype=torch.float64)], 1)
    corrupted = clean.clone()
    for row in range(B):
        fields = torch.randperm(n_fields, generator=g)[: round(0.3 * n_fields)]
        donors = torch.randint(0, B, (len(fields),), generator=g)
        corrupted[row, fields] = clean[donors, fields]
    mask = torch.zeros(B, n_fields, dtype=torch.bool)
    for row in range(B):
        mask[row, torch.randperm(n_fields, generator=g)[: round(0.5 * n_fields)]] = True
    return dict(image=seeded_images(B, IMG, SEED_INPUT), clean=clean, corrupted=corrupted, mask=mask)


def generate() -> list[str]:
    import torch

    from golden_io import save_golden
    from gen_stil import _git_commit
    from tests._golden_seeded import record

    src = os.environ[ENV]
    torch.set_num_threads(2)
    module, hp = build_original(src)
    x = make_inputs()
    batch = ([torch.zeros(0), x["image"]], [x["corrupted"], x["clean"].clone(), x["mask"], x["mask"].clone()],
             torch.zeros(B, dtype=torch.long), None, x["clean"])

    calls = {"itc": [], "tr": [], "itm": []}

    def recording(fn, key):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            calls[key].append(out)
            return out
        return wrapped

    module.criterion_train_itc.forward = recording(module.criterion_train_itc.forward, "itc")
    module.criterion_tr.forward = recording(module.criterion_tr.forward, "tr")
    module.criterion_itm.forward = recording(module.criterion_itm.forward, "itm")
    module.log = lambda *a, **k: None
    draws = []
    multinomial = torch.multinomial

    def recorded_multinomial(*a, **k):
        out = multinomial(*a, **k)
        draws.append(int(out.item()))
        return out

    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    torch.manual_seed(SEED_INPUT)
    torch.multinomial = recorded_multinomial
    try:
        out = module.training_step(batch, 0)
    finally:
        torch.multinomial = multinomial
    loss = out["loss"]
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    optimizer.step()

    # the reconstruction's two halves, from the recorded call's outputs (its loss = (cat + con) / 2)
    loss_tr, prob_cat, target_cat, mask_cat = calls["tr"][0]
    with torch.no_grad():
        loss_cat = (-torch.log(prob_cat.gather(1, target_cat[:, None]).squeeze(1) + 1e-8) * mask_cat).sum() / mask_cat.sum()
    tensors = {"input.clean": x["clean"], "input.corrupted": x["corrupted"], "input.mask": x["mask"],
               "input.negative_tables": torch.tensor(draws[:B]), "input.negative_images": torch.tensor(draws[B:])}
    tensors.update(record("input.", {"image": x["image"]}))
    terms = {"loss_itc": calls["itc"][0][0], "loss_itm": calls["itm"][0], "loss_mtr": loss_tr,
             "loss_mtr_cat": loss_cat, "loss_mtr_con": 2 * loss_tr - loss_cat, "loss": loss}
    tensors.update({f"term.{k}": v.detach() for k, v in terms.items()})
    tensors.update(record("grad.", grads))
    tensors.update(record("post.", {k: v for k, v in module.state_dict().items() if v.is_floating_point()}))
    meta = {
        "original": {"repository": "siyi-wind/TIP", "commit": _git_commit(src), "file": "models/Tips/TipModel3Loss.py",
                     "class": "TIP3Loss", "config": " + ".join(CONFIG_FILES)},
        "overrides": {k: v for k, v in TINY.items() if k != "checkpoint"}, "field_lengths": FIELD_LENGTHS, "batch": B,
        "seeds": {"weights": SEED_WEIGHTS, "inputs": SEED_INPUT},
        "weights": "tests/_golden_seeded.seeded_state over the sorted float tensors of the whole module",
        "dtype": "float64",
        "randomness": {"hard_negatives": "aligned: the original's torch.multinomial draws recorded as input.negative_tables "
                                         "(one per image) and input.negative_images (one per table), replayed by the test",
                       "dropout": "none in the configuration (drop rates 0)",
                       "views": "inputs: the augmented image, corrupted and masked rows are given, not drawn"},
        "optimizer": "the module's configure_optimizers: Adam(lr, weight_decay) over all seven modules",
        "loss_mtr_cat": "recomputed from the recorded reconstruction call's outputs (prob_cat, targets, mask): "
                        "-log(prob + 1e-8) averaged over masked categorical cells, as ReconstructionLoss does; "
                        "loss_mtr_con = 2 loss_mtr - loss_mtr_cat",
    }
    save_golden("tip", tensors, meta)
    return ["tip"]
