"""STiL method (modeling_stil/methods/stil.py) against docs/methods.md "stil":
an independent float64 re-computation of every loss term, gradient routing of each term, CGPL / PGLS /
prototypes by hand, start_epoch gating, the EMAN teacher, monitor_labels, method-state loading."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from modeling_stil.convert_original import METHOD_STATE_FILENAME, STIL_METHOD_BUFFERS, STIL_METHOD_PREFIXES
from modeling_stil.methods.base import DataInfo, TrainState, get_method_class
from modeling_stil.methods.stil import Stil, StilArguments
from modeling_stil.modeling_stil import StilModel
from tests.helpers.stil import N_L, N_U, batches, random_prototypes, tiny_config, view


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return StilModel(tiny_config())


def make_method(base_model, **kw):
    kw.setdefault("projection_dim", 8)
    method = Stil(copy.deepcopy(base_model), StilArguments(**kw))
    return method.train()


# ---------------------------------------------------------------------------------------------- reference
def mlp(x, prefix, params):
    """Linear-ReLU-Linear from raw weights (plain ops)."""
    h = (x @ params[f"{prefix}.0.weight"].T + params[f"{prefix}.0.bias"]).clamp_min(0)
    return h @ params[f"{prefix}.2.weight"].T + params[f"{prefix}.2.bias"]


def ce_hard(z, y):
    return (torch.logsumexp(z, 1) - z.gather(1, y[:, None]).squeeze(1)).mean()


def reference(method, student_before, teacher_before, labeled, unlabeled, coins, th1, epoch):
    """Every loss of one step, from the spec, float64, without the method's code."""
    a = method.args
    tau, rho, m = a.temperature, a.rate_pseudo, a.ema_momentum
    params = {k: v.detach().double() for k, v in method.named_parameters() if not k.startswith(("model.", "ema."))}
    x = {k: torch.cat([labeled["stil"][k], unlabeled["stil"][k]]) for k in labeled["stil"]}
    y = labeled["labels"]
    student = copy.deepcopy(student_before).train()
    s = student(**x)
    # EMAN: teacher = m teacher + (1-m) student (BN buffers after the student forward); counters copied
    s_state = student.state_dict()
    new_state = {k: (m * v + (1 - m) * s_state[k]) if v.is_floating_point() else s_state[k].clone() for k, v in teacher_before.items()}
    teacher = copy.deepcopy(student_before).eval()
    teacher.load_state_dict(new_state)
    with torch.no_grad():
        t = teacher(**x)
    norm = lambda v: v / v.norm(dim=1, keepdim=True)  # noqa: E731
    h_m = norm(mlp(s.features, "projector_multimodal.layers", params))
    h_i = norm(s.image_shared @ params["projector_imaging.weight"].T + params["projector_imaging.bias"])
    h_t = norm(s.tabular_shared @ params["projector_tabular.weight"].T + params["projector_tabular.bias"])
    hT = norm(mlp(t.features, "projector_multimodal.layers", params))
    out = {}
    out["sup_loss_multimodal"] = ce_hard(s.logits[:N_L], y)
    out["sup_loss_image"] = ce_hard(s.image_logits[:N_L], y)
    out["sup_loss_tabular"] = ce_hard(s.tabular_logits[:N_L], y)
    S = h_i @ h_t.T / tau
    diag = torch.diagonal(S)
    out["loss_cc"] = 0.5 * (torch.logsumexp(S, 1) - diag).mean() + 0.5 * (torch.logsumexp(S, 0) - diag).mean()
    for mod, club, u, v in (("image", "imaging", s.image_specific_pre, s.image_shared), ("tabular", "tabular", s.tabular_specific_pre, s.tabular_shared)):
        mu = mlp(u, f"CLUB_{club}.p_mu", params)
        D = ((mu[:, None, :] - v[None, :, :]) ** 2).sum(-1)  # D[n, j] = |mu_n - v_j|^2
        out[f"club_bound_{mod}"] = (-0.5 * torch.diagonal(D) + 0.5 * D.mean(1)).mean()
        out[f"club_estimator_{mod}"] = torch.diagonal(D).mean()
    P = method.prototypes.double()
    zm, zi, zt = t.logits[N_L:], t.image_logits[N_L:], t.tabular_logits[N_L:]
    q = torch.softmax(hT[N_L:] @ P.T / tau, 1)
    p_tilde = torch.softmax(zm, 1)
    p_hat = rho * p_tilde + (1 - rho) * q
    u_losses = {"multimodal": 0.0, "image": 0.0, "tabular": 0.0}
    cases = []
    p_bar_rows = []
    for n in range(N_U):
        am, ai, at = int(zm[n].argmax()), int(zi[n].argmax()), int(zt[n].argmax())
        if am == ai == at:
            case, logit, heads = 1, (zm[n] + zi[n] + zt[n]) / 3, ["multimodal", "image", "tabular"]
        elif am == ai:
            case, logit, heads = 2, (zm[n] + zi[n]) / 2, ["tabular"]
        elif am == at:
            case, logit, heads = 2, (zm[n] + zt[n]) / 2, ["image"]
        else:
            case, logit, heads = 3, zm[n], ["image" if coins[n] else "tabular"]
        cases.append(case)
        p_bar = rho * torch.softmax(logit, 0) + (1 - rho) * q[n]
        p_bar_rows.append(p_bar)
        if p_hat[n].max() >= th1:
            for head in heads:
                z = {"multimodal": s.logits, "image": s.image_logits, "tabular": s.tabular_logits}[head][N_L + n]
                u_losses[head] = u_losses[head] - (p_bar * torch.log_softmax(z, 0)).sum()
    for head, value in u_losses.items():
        out[f"unsup_loss_{head}"] = torch.as_tensor(value, dtype=torch.float64) / N_U
    y_hat = torch.cat([F.one_hot(y, 3).double(), p_hat if epoch > a.start_epoch else torch.zeros_like(p_hat)])
    sim = torch.softmax(h_m @ P.T / tau, 1)
    pt = 0.0
    for n in range(N_L + N_U):
        if y_hat[n].max() >= th1:
            pt = pt - torch.log(sim[n, int(y_hat[n].argmax())] + 1e-7)
    out["loss_pt"] = pt / (N_L + N_U)
    out = {k: v.detach() for k, v in out.items()}
    extra = dict(p_hat=p_hat.detach(), hT=hT.detach(), y_hat=y_hat.detach(), cases=cases, p_bar=torch.stack(p_bar_rows).detach())
    return out, extra


def test_every_loss_term_matches_a_float64_recomputation(base_model):
    # club_hidden_dim=32: the random draws below were chosen with estimators of this width
    method = make_method(base_model, start_epoch=0, ema_momentum=0.7, repeat_ratio=2, club_hidden_dim=32).double()
    with torch.no_grad():  # a teacher that differs from the student, and informative prototypes
        for p in method.ema.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name in ("classifier_multimodal", "classifier_imaging", "classifier_tabular"):
            for module in (method.model, method.ema.module):
                getattr(module, name).weight.mul_(8.0)
    random_prototypes(method)
    coins = torch.tensor([True, False] * (N_U // 2))
    method._coin_flips = lambda n, device: coins[:n].to(device)
    labeled, unlabeled = batches(method.model.config, dtype=torch.float64)
    student_before = copy.deepcopy(method.model)
    teacher_before = copy.deepcopy(method.ema.module.state_dict())
    state = TrainState(epoch=1, step=3)
    # pick th1 between the rows' confidences so the mask is mixed
    _, extra = reference(method, student_before, teacher_before, labeled, unlabeled, coins, 1.0, 1)
    conf = extra["p_hat"].max(1).values.sort().values
    th1 = float((conf[N_U // 2 - 1] + conf[N_U // 2]) / 2)
    method.args.th1 = th1
    expected, extra = reference(method, student_before, teacher_before, labeled, unlabeled, coins, th1, 1)
    assert len(set(extra["cases"])) >= 2, "test batch should mix CGPL cases"

    loss, logs = method(labeled, unlabeled, state)
    for name, value in expected.items():
        torch.testing.assert_close(logs[name].double(), value, atol=1e-6, rtol=0, msg=name)
    a = method.args
    total = (
        a.alpha * sum(expected[f"sup_loss_{h}"] for h in ("multimodal", "image", "tabular"))
        + a.beta * expected["loss_cc"]
        + a.gamma * sum(expected[f"club_{p}_{m}"] for p in ("bound", "estimator") for m in ("image", "tabular"))
        + a.rate_pt * expected["loss_pt"]
        + a.rate_uce * sum(expected[f"unsup_loss_{h}"] for h in ("multimodal", "image", "tabular"))
    )
    torch.testing.assert_close(loss.detach(), total, atol=1e-6, rtol=0)
    assert logs["mask_ratio"].item() == 0.5
    # the teacher the method used is the EMAN update of the old one
    # prototype sums: teacher features of confident rows, labelled rows / R
    conf_rows = extra["y_hat"].max(1).values >= th1
    weights = torch.where(torch.arange(N_L + N_U) < N_L, 0.5, 1.0) * conf_rows
    onehot = F.one_hot(extra["y_hat"].argmax(1), 3).double() * weights[:, None]
    torch.testing.assert_close(method.prototypes_sum, onehot.T @ extra["hT"], atol=1e-9, rtol=0)
    torch.testing.assert_close(method.prototypes_count_sum, onehot.sum(0)[:, None], atol=1e-12, rtol=0)
    # pseudo-label accuracy uses argmax p_bar against monitor_labels
    expected_acc = (extra["p_bar"].argmax(1) == unlabeled["monitor_labels"]).double().mean()
    torch.testing.assert_close(logs["pseudo_label_accuracy"].double(), expected_acc)


# ---------------------------------------------------------------------------------------------- gradients
def group_of(name):
    if name.startswith("model."):
        return "model." + name.split(".")[1]
    return name.split(".")[0]


def touched(method, term):
    params = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(term, [p for _, p in params], retain_graph=True, allow_unused=True)
    return {group_of(n) for (n, _), g in zip(params, grads) if g is not None and g.abs().sum() > 0}


ENCODERS = {"model.encoder_imaging", "model.encoder_tabular"}


@pytest.mark.parametrize("club_standard", [False, True])
def test_each_term_reaches_exactly_its_parameters(base_model, club_standard):
    method = make_method(base_model, start_epoch=0, th1=0.0, club_standard=club_standard)
    random_prototypes(method)
    even = torch.arange(N_U) % 2 == 0  # rows alternate case1 / case3 (routing is tested by hand below)
    none = torch.zeros(N_U, dtype=torch.bool)
    method.cgpl = lambda zm, zi, zt: (zm.softmax(1), even, none, none, ~even)
    labeled, unlabeled = batches(method.model.config)
    terms, _ = method.compute_terms(labeled, unlabeled, TrainState(epoch=1, step=0))
    assert all(not p.requires_grad for p in method.ema.parameters())
    assert not method.prototypes.requires_grad
    g = {name: touched(method, value) for name, value in terms.items()}
    # supervised CE: each head's classifier (and the backbone below it), never the loss-side heads
    assert "model.classifier_multimodal" in g["sup_loss_multimodal"] and "model.classifier_imaging" not in g["sup_loss_multimodal"]
    assert "model.classifier_imaging" in g["sup_loss_image"] and "model.classifier_multimodal" not in g["sup_loss_image"]
    assert "model.classifier_tabular" in g["sup_loss_tabular"] and "model.classifier_imaging" not in g["sup_loss_tabular"]
    for name in ("sup_loss_multimodal", "sup_loss_image", "sup_loss_tabular", "unsup_loss_multimodal", "unsup_loss_image", "unsup_loss_tabular"):
        assert not g[name] & {"projector_multimodal", "projector_imaging", "projector_tabular", "CLUB_imaging", "CLUB_tabular"}, name
    # unlabelled CE: the routed head; the teacher-side target (teacher, student g_m under no_grad) is detached
    assert "model.classifier_multimodal" in g["unsup_loss_multimodal"]
    assert "model.classifier_imaging" in g["unsup_loss_image"] and "model.classifier_tabular" in g["unsup_loss_tabular"]
    assert "model.classifier_multimodal" not in g["unsup_loss_image"] | g["unsup_loss_tabular"]
    # L_cc: the shared branches and their projectors only
    assert {"projector_imaging", "projector_tabular", "model.projection_ai", "model.projection_at"} <= g["loss_cc"]
    assert not g["loss_cc"] & {"projector_multimodal", "CLUB_imaging", "CLUB_tabular", "model.projection_si", "model.projection_st",
                               "model.classifier_multimodal", "model.reduce", "model.transformer"}
    # L_pt: student features through g_m; the prototypes are a buffer
    assert "projector_multimodal" in g["loss_pt"] and not g["loss_pt"] & {"projector_imaging", "CLUB_imaging", "model.classifier_multimodal"}
    # CLUB
    for mod, own, other, spec, shared in (("image", "CLUB_imaging", "CLUB_tabular", "model.projection_si", "model.projection_ai"),
                                          ("tabular", "CLUB_tabular", "CLUB_imaging", "model.projection_st", "model.projection_at")):
        est, bound = g[f"club_estimator_{mod}"], g[f"club_bound_{mod}"]
        club = {own}
        assert other not in est | bound
        if club_standard:  # estimator NLL trains only the estimator; the bound never trains it
            assert est == club
            assert own not in bound and {spec, shared} <= bound
        else:  # the original: one loss, both terms reach estimator and features
            assert club | {spec, shared} <= est and club | {spec, shared} <= bound
    # nothing reaches the teacher through the total loss
    loss = sum(terms.values())
    loss.backward()
    assert all(p.grad is None for p in method.ema.parameters())


# ---------------------------------------------------------------------------------------------- by hand
def test_cgpl_cases_and_routing_by_hand():
    zm = torch.tensor([[2.0, 0, 0], [2.0, 0, 0], [2.0, 0, 0], [2.0, 0, 0], [2.0, 0, 0]])
    zi = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 1.0, 0]])
    zt = torch.tensor([[0.0, 0, -1], [0, 0, 3.0], [4.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    p, c1, c2i, c2t, c3 = Stil.cgpl(zm, zi, zt)
    assert c1.tolist() == [True, False, False, False, False]
    assert c2i.tolist() == [False, True, False, False, False]
    assert c2t.tolist() == [False, False, True, False, False]
    assert c3.tolist() == [False, False, False, True, True]  # i == t != m, and all different
    assert (c1.int() + c2i.int() + c2t.int() + c3.int()).tolist() == [1] * 5
    expected = torch.stack([
        torch.softmax(torch.tensor([3.0, 0, -1]) / 3, 0),
        torch.softmax(torch.tensor([3.0, 0, 0]) / 2, 0),
        torch.softmax(torch.tensor([6.0, 0, 0]) / 2, 0),
        torch.softmax(torch.tensor([2.0, 0, 0]), 0),
        torch.softmax(torch.tensor([2.0, 0, 0]), 0),
    ])
    torch.testing.assert_close(p, expected)
    r = torch.tensor([True, True, True, True, False])
    rm, ri, rt = Stil.routes(c1, c2i, c2t, c3, r)
    assert rm.tolist() == [True, False, False, False, False]
    assert ri.tolist() == [True, False, True, True, False]  # case1, case2t, case3 & r
    assert rt.tolist() == [True, True, False, False, True]  # case1, case2i, case3 & ~r


def test_pgls_smoothing_by_hand():
    p = torch.tensor([[0.8, 0.2], [0.5, 0.5]])
    p_tilde = torch.tensor([[1.0, 0.0], [0.6, 0.4]])
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    P = torch.tensor([[0.1, 0.0], [0.0, 0.0]])
    p_bar, p_hat, mask, q = Stil.pgls(p, p_tilde, h, P, rho=0.9, temperature=0.1, threshold=0.9)
    e = torch.exp(torch.tensor(1.0))
    q0 = torch.tensor([e / (e + 1), 1 / (e + 1)])  # logits (1, 0) for row 0; row 1: uniform
    torch.testing.assert_close(q, torch.stack([q0, torch.tensor([0.5, 0.5])]))
    torch.testing.assert_close(p_bar[0], 0.9 * p[0] + 0.1 * q0)
    torch.testing.assert_close(p_hat[1], torch.tensor([0.59, 0.41]))
    assert mask.tolist() == [1.0, 0.0]  # p_hat[0,0] = 0.9 + 0.1 q0[0] >= 0.9; row 1 max 0.59
    # epoch 0: zero prototypes -> uniform q
    _, _, _, q_zero = Stil.pgls(p, p_tilde, h, torch.zeros(2, 2), 0.9, 0.1, 0.9)
    torch.testing.assert_close(q_zero, torch.full((2, 2), 0.5))


def test_prototypes_by_hand_with_repeat_ratio_reduce_sum_and_an_empty_class(base_model):
    method = make_method(base_model, projection_dim=2, th1=0.9, repeat_ratio=4)
    old = torch.tensor([[9.0, 9.0], [8.0, 8.0], [7.0, 7.0]])
    method.prototypes.copy_(old)
    calls = []

    def doubling(t):
        calls.append(t.shape)
        return 2 * t

    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.5, 0.5], [1.0, 1.0]])
    y_hat = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0.0, 0.95, 0.05], [0.0, 0.5, 0.5], [0.05, 0.95, 0.0]])
    method.accumulate_prototypes(features, y_hat, num_labeled=2, state=TrainState(reduce_sum=doubling))
    assert len(calls) == 2
    # class 0: two labelled rows at 1/4 each, doubled by reduce_sum; class 1: rows 2 and 4; row 3 unconfident
    torch.testing.assert_close(method.prototypes_sum, torch.tensor([[0.5, 0.5], [3.2, 3.6], [0.0, 0.0]]))
    torch.testing.assert_close(method.prototypes_count_sum, torch.tensor([[1.0], [4.0], [0.0]]))
    logs = method.on_epoch_end(TrainState())
    torch.testing.assert_close(method.prototypes, torch.tensor([[0.5, 0.5], [0.8, 0.9], [7.0, 7.0]]))
    assert logs["prototypes_empty"].item() == 1.0
    assert method.prototypes_sum.abs().sum() == 0 and method.prototypes_count_sum.abs().sum() == 0
    # a fractional count (one labelled row / R, where the original asserts count >= 1) is still a mean
    method.accumulate_prototypes(features[:1], y_hat[:1], num_labeled=1, state=TrainState())
    method.on_epoch_end(TrainState())
    torch.testing.assert_close(method.prototypes[0], features[0])


def test_training_step_sums_prototypes_through_reduce_sum(base_model):
    method = make_method(base_model, th1=0.0, start_epoch=0)
    seen = []
    state = TrainState(epoch=1, reduce_sum=lambda t: seen.append(1) or 2 * t)
    method(*batches(method.model.config), state)
    assert len(seen) == 2
    torch.testing.assert_close(method.prototypes_count_sum.sum(), torch.tensor(2.0 * (N_L + N_U)))  # R = 1


def test_repeat_ratio_from_data_sizes(base_model):
    method = make_method(base_model)
    # DVM 1%: 705 labelled, 69_862 unlabelled, batches 64 / 448 -> 69862 // (7 * 705) - 1 = 13
    method.setup(DataInfo(num_labeled=705, num_unlabeled=69_862, labeled_batch_size=64, unlabeled_batch_size=448, num_labels=3))
    assert method.repeat_ratio == 13
    method.setup(DataInfo(num_labeled=7056, num_unlabeled=63_509, labeled_batch_size=64, unlabeled_batch_size=448, num_labels=3))
    assert method.repeat_ratio == 1
    method.setup(DataInfo(num_labeled=10, num_unlabeled=1000, labeled_batch_size=4, unlabeled_batch_size=28, num_labels=5))
    assert method.prototypes.shape == (5, 8) and method.prototypes_count_sum.shape == (5, 1)
    assert make_method(base_model, repeat_ratio=3).repeat_ratio == 3


# ---------------------------------------------------------------------------------------------- behaviour
def test_monitor_labels_never_reach_the_loss(base_model):
    method = make_method(base_model, th1=0.0, start_epoch=0)
    cfg = method.model.config
    results = []
    for monitor in (torch.arange(N_U) % 3, torch.full((N_U,), 2)):
        m = copy.deepcopy(method)
        torch.manual_seed(0)
        results.append(m(*batches(cfg, monitor=monitor), TrainState(epoch=1)))
    (loss_a, logs_a), (loss_b, logs_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(logs_a[k], logs_b[k]) for k in logs_a if not k.startswith("pseudo_label"))
    assert not torch.equal(logs_a["pseudo_label_accuracy"], logs_b["pseudo_label_accuracy"])


def test_start_epoch_gating(base_model):
    method = make_method(base_model, th1=0.01, start_epoch=2, repeat_ratio=2)  # > 0: zero targets never pass
    a = method.args
    cfg = method.model.config
    for epoch, active in ((0, False), (2, False), (3, True)):
        m = copy.deepcopy(method)
        loss, logs = m(*batches(cfg), TrainState(epoch=epoch))
        three = a.alpha * logs["sup_loss"] + a.beta * logs["loss_cc"] + a.gamma * logs["loss_ds"]
        assert logs["unsup_active"].item() == float(active)
        assert logs["unsup_loss"] > 0  # computed and logged every step, like the original
        if active:
            torch.testing.assert_close(loss.detach(), three + a.rate_pt * logs["loss_pt"] + a.rate_uce * logs["unsup_loss"])
            assert m.prototypes_count_sum.sum().item() == N_L / 2 + N_U
        else:
            torch.testing.assert_close(loss.detach(), three)
            # unlabelled rows neither in L_pt's targets nor in the prototypes before start_epoch
            assert m.prototypes_count_sum.sum().item() == N_L / 2


def test_eman_teacher_updated_once_per_step_before_its_forward(base_model):
    method = make_method(base_model, ema_momentum=0.996)
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(0.1)
    teacher_old = copy.deepcopy(method.ema.module.state_dict())
    student = copy.deepcopy(method.model)
    labeled, unlabeled = batches(method.model.config)
    x = {k: torch.cat([labeled["stil"][k], unlabeled["stil"][k]]) for k in labeled["stil"]}
    student(**x)  # the BN statistics the method's student will have after its forward
    method(labeled, unlabeled, TrainState(step=7))
    s_state, t_state = student.state_dict(), method.ema.module.state_dict()
    for k, v in teacher_old.items():
        if v.is_floating_point():
            torch.testing.assert_close(t_state[k], 0.996 * v + 0.004 * s_state[k], msg=k)
        else:
            assert torch.equal(t_state[k], s_state[k]), k
    assert any("running_mean" in k for k in t_state)
    after_first = copy.deepcopy(t_state)
    method(labeled, unlabeled, TrainState(step=7))  # second micro-batch of the same optimizer step
    assert all(torch.equal(after_first[k], v) for k, v in method.ema.module.state_dict().items())
    method(labeled, unlabeled, TrainState(step=8))
    assert not torch.equal(after_first["classifier_multimodal.weight"], method.ema.module.state_dict()["classifier_multimodal.weight"])
    assert method.eval_model() is method.model


def test_evaluation_step_reports_three_heads(base_model):
    method = make_method(base_model)
    g = torch.Generator().manual_seed(0)
    out = method.evaluation_step(method.model.eval(), {"labels": torch.tensor([0, 1]), "eval": view(method.model.config, 2, g)})
    assert set(out) == {"logits", "image_logits", "tabular_logits"}
    metrics = method.compute_eval_metrics(out, torch.tensor([0, 1]), lambda p, r: {"accuracy": 0.5})
    assert set(metrics) == {"accuracy", "image/accuracy", "tabular/accuracy"}


def test_init_from_pretrained_round_trip(base_model, tmp_path):
    source = make_method(base_model)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in list(source.parameters()) + list(source.ema.module.parameters()):
            p.copy_(torch.randn_like(p))
        for name in ("prototypes", "prototypes_sum", "prototypes_count_sum"):
            getattr(source, name).copy_(torch.rand_like(getattr(source, name)))
    state = {k: v for k, v in source.state_dict().items() if k.startswith(STIL_METHOD_PREFIXES) or k in STIL_METHOD_BUFFERS}
    state.update({"ema." + k: v for k, v in source.ema.module.state_dict().items()})  # the converter's other copy
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / METHOD_STATE_FILENAME))

    target = make_method(base_model)
    report = target.init_from_pretrained(str(tmp_path))
    assert sorted(report["loaded"]) == sorted(state) and report["skipped"] == []
    own = target.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k.replace("ema.", "ema.module.", 1) if k.startswith("ema.") else k], v), k
    assert make_method(base_model).init_from_pretrained(str(tmp_path / "nothing")) == {"loaded": [], "skipped": []}
    # wrong shapes and wrong projector type: clear errors
    bad = dict(state, prototypes=torch.zeros(5, 8))
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / METHOD_STATE_FILENAME))
    with pytest.raises(ValueError, match="prototypes.*shape"):
        make_method(base_model).init_from_pretrained(str(tmp_path))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / METHOD_STATE_FILENAME))
    with pytest.raises(ValueError, match="unimodal_projector"):
        make_method(base_model, unimodal_projector="mlp").init_from_pretrained(str(tmp_path))


def test_model_without_three_heads_is_refused():
    with pytest.raises(ValueError, match="stil needs a StilModel"):
        Stil(nn.Linear(3, 3))
    assert get_method_class("stil") is Stil


def test_short_loop_lowers_the_loss_with_unlabelled_terms_on(base_model):
    torch.manual_seed(0)
    method = make_method(base_model, th1=0.0, start_epoch=0, ema_momentum=0.9)
    optimizer = torch.optim.Adam(method.trainable_parameters(), lr=3e-3)
    assert not any(p is q for p in method.trainable_parameters() for q in method.ema.parameters())
    labeled, unlabeled = batches(method.model.config)
    losses = []
    for step in range(12):
        epoch = 0 if step < 2 else 1
        loss, logs = method(labeled, unlabeled, TrainState(step=step, epoch=epoch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(TrainState(step=step + 1, epoch=epoch))
        if step == 1:
            method.on_epoch_end(TrainState(step=step + 1, epoch=0))
            assert method.prototypes.abs().sum() > 0
        if epoch == 1:
            losses.append(logs["loss"].item())
            assert logs["unsup_loss"] > 0 and logs["loss_pt"] > 0 and logs["unsup_active"] == 1
    assert losses[-1] < losses[0]


def test_view_option_chooses_the_one_shared_view(base_model):
    """``view`` replaces the original's "stil" view for labelled and unlabelled rows alike (the key
    compute_terms reads stays "stil"); the default is the original's; an unknown name is refused."""
    assert make_method(base_model).labeled_views == {"stil": "stil"}
    method = make_method(base_model, view="weak")
    assert method.labeled_views == {"stil": "weak"} and method.unlabeled_views == {"stil": "weak"}
    assert Stil.labeled_views == {"stil": "stil"}  # the class default is untouched
    labeled, unlabeled = batches(tiny_config())
    loss, _ = method.training_step(labeled, unlabeled, TrainState(epoch=0, step=0))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="view must be one of"):
        StilArguments(view="crop")
