"""The accuracy issue's options do what they say: fixed and leaky-initialised activations, the spline parameter
group (own optimizer, out of the clip, warm-up) and the per-epoch KA statistics."""
import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_allukan import KALinear, KAModule, KAonv2d, SharedSplineActivation
from nnunetv2_allukan.architectures import AllUKAN
from nnunetv2_allukan.spline import bspline_basis
from nnunetv2_allukan.trainers.clipping import clip_without, recording_clip_norm, summarize_clip_record
from nnunetv2_allukan.trainers.recipes import (CombinedOptimizer, EpochPolyLRScheduler, SplineParameterGroup,
                                              split_spline_parameters)
from nnunetv2_allukan.trainers.statistics import (initial_splines, ka_layer_snapshot, parameter_kinds, spline_change,
                                                 spline_max_slope)


def _inputs():
    # inside the grid, far outside it (only the base function acts there), exact zeros and the grid knots
    return torch.cat([torch.randn(500) * 2, torch.tensor([-50.0, -3.0, -1.8, 0.0, 1.2, 3.0, 40.0])])


@pytest.mark.parametrize("impl", ["function", "plain"])
@pytest.mark.parametrize("share", ["layer", "channel"])
def test_leaky_init_is_nnunets_leaky_relu_exactly(impl, share):
    x = _inputs().reshape(1, 507, 1)
    act = SharedSplineActivation(num_channels=507, share=share, impl=impl, spline_init="leakyrelu")
    assert torch.equal(act(x), F.leaky_relu(x, 0.01))
    assert act.coef.requires_grad and act.base_weight.requires_grad  # still learnable


@pytest.mark.parametrize("spline_grad", ["free", "exact"])
def test_leaky_base_gradients_match_autograd_of_the_closed_form(spline_grad):
    torch.manual_seed(1)
    x = (torch.randn(2, 3, 6, 6) * 2).double().requires_grad_()
    layer = KAonv2d(3, 4, 3, padding=1, spline_init="leakyrelu", spline_grad=spline_grad).double()
    with torch.no_grad():
        layer.activation.coef.normal_(0, 0.3)
        layer.activation.base_weight.fill_(0.7)
    y = layer(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, layer.activation.coef, layer.activation.base_weight, layer.weight], g)
    # independent reference: leaky base + the Cox-free closed-form basis through plain autograd
    x2 = x.detach().clone().requires_grad_()
    coef = layer.activation.coef.detach().clone().requires_grad_()
    wb = layer.activation.base_weight.detach().clone().requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    basis_input = x2 if spline_grad == "exact" else x2.detach()
    basis = bspline_basis(basis_input.reshape(-1), 5, (-3.0, 3.0)).reshape(*x2.shape, -1)
    phi = wb * F.leaky_relu(x2, 0.01) + basis @ coef[0]
    y_ref = F.conv2d(phi, w, layer.bias.detach(), padding=1)
    ref = torch.autograd.grad(y_ref, [x2, coef, wb, w], g)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want.reshape(got.shape), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind,fn", [("fixed-silu", F.silu), ("fixed-leakyrelu", lambda v: F.leaky_relu(v, 0.01))])
def test_fixed_activations_are_the_function_and_have_no_parameters(kind, fn):
    x = torch.randn(2, 5, 7, 7, requires_grad=True)
    conv = KAonv2d(5, 3, 3, padding=1, activation=kind)
    assert [n for n, _ in conv.named_parameters()] == ["weight", "bias"]
    assert not any("activation" in k for k in conv.state_dict())
    y = conv(x)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.conv2d(fn(x_ref), conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x_ref, g)[0],
                               rtol=1e-5, atol=1e-6)
    lin = KALinear(5, 2, activation=kind)
    assert [n for n, _ in lin.named_parameters()] == ["weight", "bias"]


def _tiny_allukan(**ka):
    return AllUKAN(1, 3, [4, 8, 8], torch.nn.Conv2d, 3, [1, 2, 2], 1, 3, 1, deep_supervision=False, **ka)


def test_fixed_leaky_network_equals_leaky_initialised_network():
    """At initialisation a spline network with leaky init computes what the fixed-leaky control computes."""
    torch.manual_seed(0)
    fixed = _tiny_allukan(activation="fixed-leakyrelu")
    learnable = _tiny_allukan(spline_init="leakyrelu")
    learnable.load_state_dict(fixed.state_dict(), strict=False)
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(learnable(x), fixed(x), rtol=0, atol=0)
    assert sum(p.numel() for p in learnable.parameters()) > sum(p.numel() for p in fixed.parameters())


def test_network_rejects_unknown_activation_options():
    with pytest.raises(ValueError, match="activation='relu'"):
        _tiny_allukan(activation="relu")
    with pytest.raises(ValueError, match="spline_init"):
        _tiny_allukan(spline_init="zeros")


def _configure(network, optimizer="adam", warmup=0.0, epochs=10, lr=1e-3):
    """SplineParameterGroup.configure_optimizers on a stand-in with the trainer attributes it reads."""
    stand_in = types.SimpleNamespace(network=network, initial_lr=1e-2, weight_decay=3e-5, num_epochs=epochs,
                                     spline_optimizer=optimizer, spline_lr=lr, spline_warmup_fraction=warmup)
    return SplineParameterGroup.configure_optimizers(stand_in)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_spline_group_holds_exactly_the_activation_parameters(optimizer):
    net = _tiny_allukan()
    opt, _ = _configure(net, optimizer)
    groups = opt.param_groups
    assert len(groups) == 2
    acts = [m for m in net.modules() if isinstance(m, SharedSplineActivation)]
    spline_ids = {id(a.coef) for a in acts} | {id(a.base_weight) for a in acts}
    assert {id(p) for p in groups[1]["params"]} == spline_ids
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in net.parameters()} - spline_ids
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 3e-5
    if optimizer == "adam":
        assert [type(o).__name__ for o in opt.optimizers] == ["SGD", "Adam"]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_network_without_splines_gets_nnunets_single_sgd_group(optimizer):
    """A fixed activation has no spline parameters: one SGD group over every parameter, no empty Adam."""
    net = _tiny_allukan(activation="fixed-leakyrelu")
    opt, scheduler = _configure(net, optimizer, warmup=0.2)
    assert type(opt) is torch.optim.SGD and len(opt.param_groups) == 1
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in net.parameters()}
    assert opt.param_groups[0]["weight_decay"] == 3e-5 and opt.param_groups[0]["momentum"] == 0.99
    scheduler.step(5)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * (1 - 5 / 10) ** 0.9)


def test_default_trainer_trains_splines_by_adam_and_comparators_keep_nnunets_recipe():
    from nnunetv2_allukan.trainers import (nnUNetTrainerAllUKAN, nnUNetTrainerAllUKAN_splineSGD,
                                           nnUNetTrainerAllUKAN_smokeTest, nnUNetTrainerUKAN)

    # the default's optimizer comes from the spline group mixin (not nnU-Net's), with the splines' own Adam
    assert nnUNetTrainerAllUKAN.configure_optimizers is SplineParameterGroup.configure_optimizers
    assert (nnUNetTrainerAllUKAN.spline_optimizer, nnUNetTrainerAllUKAN.spline_lr) == ("adam", 1e-3)
    assert nnUNetTrainerAllUKAN_smokeTest.spline_optimizer == "adam"
    assert nnUNetTrainerAllUKAN_splineSGD.spline_optimizer == "shared"
    assert nnUNetTrainerUKAN.spline_optimizer == "shared"  # comparator numbers were measured with nnU-Net's SGD
    opt, _ = _configure(_tiny_allukan(), nnUNetTrainerAllUKAN.spline_optimizer, lr=nnUNetTrainerAllUKAN.spline_lr)
    assert [type(o).__name__ for o in opt.optimizers] == ["SGD", "Adam"]


def test_shared_recipe_is_nnunets_optimizer_and_schedule_exactly():
    """'shared' (the pre-0.2.0 recipe) against nnU-Net's own configure_optimizers: same groups, same parameter
    order (so its checkpoints continue), same lr at every epoch."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    torch.manual_seed(0)
    net = _tiny_allukan()
    ours, our_schedule = _configure(net, "shared", epochs=10)
    stand_in = types.SimpleNamespace(network=net, initial_lr=1e-2, weight_decay=3e-5, num_epochs=10)
    theirs, their_schedule = nnUNetTrainer.configure_optimizers(stand_in)
    assert type(ours) is type(theirs) is torch.optim.SGD
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]
    assert [id(p) for p in ours.param_groups[0]["params"]] == [id(p) for p in theirs.param_groups[0]["params"]]
    for epoch in (0, 3, 9):
        our_schedule.step(epoch)
        their_schedule.step(epoch)
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-12)
    # a state written by nnU-Net's optimizer after a step loads into ours, momentum buffers on the same parameters
    net(torch.randn(2, 1, 16, 16)).square().mean().backward()
    theirs.step()
    ours.load_state_dict(theirs.state_dict())
    assert len(theirs.state) > 10 and set(ours.state) == set(theirs.state)
    for p, state in theirs.state.items():
        assert torch.equal(ours.state[p]["momentum_buffer"], state["momentum_buffer"])
    with pytest.raises(ValueError, match="group of their own"):
        _configure(net, "shared", warmup=0.1)


def _trainer_stand_in(name, optimizer, output_folder):
    """CheckpointMismatchMessage over a base that loads the optimizer state as nnU-Net's load_checkpoint does."""
    from nnunetv2_allukan.trainers.guards import CheckpointMismatchMessage

    class _LoadsOptimizerState:
        def load_checkpoint(self, checkpoint):
            self.optimizer.load_state_dict(checkpoint["optimizer_state"])

    trainer = type(name, (CheckpointMismatchMessage, _LoadsOptimizerState), {})()
    trainer.optimizer, trainer.output_folder = optimizer, output_folder
    return trainer


def test_continuing_a_checkpoint_of_the_old_recipe_says_how():
    net = _tiny_allukan()
    old, _ = _configure(net, "shared")
    checkpoint = {"optimizer_state": old.state_dict(), "trainer_name": "nnUNetTrainerAllUKAN"}
    folder = "/r/Dataset001_X/nnUNetTrainerAllUKAN__nnUNetPlans__2d/fold_0"
    trainer = _trainer_stand_in("nnUNetTrainerAllUKAN", _configure(net, "adam")[0], folder)
    with pytest.raises(RuntimeError) as info:
        trainer.load_checkpoint(checkpoint)
    message = str(info.value)
    n_all, n_spline = len(list(net.parameters())), len(split_spline_parameters(net)[0])
    assert f"1 group(s) of {n_all} parameters" in message
    assert f"1 group(s) of {n_all - n_spline} parameters + 1 group(s) of {n_spline} parameters" in message
    assert "-tr nnUNetTrainerAllUKAN_splineSGD --c" in message
    assert "/r/Dataset001_X/nnUNetTrainerAllUKAN_splineSGD__nnUNetPlans__2d" in message
    # the other way round (a new checkpoint continued with the old recipe): torch's KeyError becomes the message
    trainer = _trainer_stand_in("nnUNetTrainerAllUKAN_splineSGD", old, folder)
    with pytest.raises(RuntimeError, match="one optimizer per part"):
        trainer.load_checkpoint({"optimizer_state": _configure(net, "adam")[0].state_dict()})
    # a matching state loads without complaint
    _trainer_stand_in("nnUNetTrainerAllUKAN_splineSGD", old, folder).load_checkpoint(checkpoint)


def test_warmup_freezes_the_splines_then_releases_them():
    torch.manual_seed(0)
    net = _tiny_allukan()
    opt, scheduler = _configure(net, "sgd", warmup=0.2, epochs=10, lr=1e-2)  # 2 frozen epochs
    coefs = [m.coef for m in net.modules() if isinstance(m, SharedSplineActivation)]
    x = torch.randn(2, 1, 16, 16)
    history = []
    for epoch in range(4):
        scheduler.step(epoch)
        before = [c.detach().clone() for c in coefs]
        other_before = net.encoder.stages[0][0][0].weight.detach().clone()
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
        history.append((opt.param_groups[1]["lr"], any(not torch.equal(b, c) for b, c in zip(before, coefs)),
                        not torch.equal(other_before, net.encoder.stages[0][0][0].weight)))
    assert [h[1] for h in history] == [False, False, True, True]   # splines frozen for 2 epochs, then learn
    assert all(h[2] for h in history)                               # the rest learns from the start
    assert history[0][0] == 0.0 and history[2][0] == pytest.approx(1e-2 * (1 - 2 / 10) ** 0.9)


def test_poly_schedule_keeps_each_groups_own_lr():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = CombinedOptimizer([torch.optim.SGD([p], lr=1e-2), torch.optim.Adam([q], lr=1e-3)])
    sched = EpochPolyLRScheduler(opt, 100)
    sched.step(50)
    factor = 0.5 ** 0.9
    assert opt.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 * factor)
    assert opt.optimizers[1].param_groups[0]["lr"] == pytest.approx(1e-3 * factor)


def test_combined_optimizer_state_round_trip_and_clear_error():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = CombinedOptimizer([torch.optim.SGD([p], lr=0.1, momentum=0.9), torch.optim.Adam([q], lr=0.1)])
    (p.sum() + q.square().sum()).backward()
    opt.step()
    state = opt.state_dict()
    p2, q2 = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt2 = CombinedOptimizer([torch.optim.SGD([p2], lr=0.1, momentum=0.9), torch.optim.Adam([q2], lr=0.1)])
    opt2.load_state_dict(state)
    assert torch.equal(opt2.optimizers[1].state_dict()["state"][0]["exp_avg"],
                       opt.optimizers[1].state_dict()["state"][0]["exp_avg"])
    with pytest.raises(ValueError, match="combined optimizer"):
        opt2.load_state_dict(torch.optim.SGD([p2], lr=0.1).state_dict())


def test_clip_without_leaves_the_skipped_gradients_out_and_restores_torch():
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((4,), 3.0), torch.full((4,), 100.0)
    original = torch.nn.utils.clip_grad_norm_
    with clip_without([b]):
        total = torch.nn.utils.clip_grad_norm_([a, b], 1.0)
    assert torch.nn.utils.clip_grad_norm_ is original
    assert float(total) == pytest.approx(6.0)            # the norm of a alone
    assert float(a.grad.norm()) == pytest.approx(1.0, rel=1e-4)
    assert torch.equal(b.grad, torch.full((4,), 100.0))   # untouched
    with pytest.raises(RuntimeError):
        with clip_without([b]):
            raise RuntimeError("boom")
    assert torch.nn.utils.clip_grad_norm_ is original


def test_recorded_norm_shares_add_up_per_parameter_kind():
    net = _tiny_allukan()
    net(torch.randn(2, 1, 16, 16)).square().mean().backward()
    kinds = parameter_kinds(net)
    n_ka_layers = sum(1 for m in net.modules() if isinstance(m, KAModule))
    assert len(kinds["spline_coef"]) == len(kinds["base_weight"]) == n_ka_layers
    record = []
    expected = float(torch.sqrt(sum(p.grad.square().sum() for p in net.parameters() if p.grad is not None)))
    with recording_clip_norm(kinds, record):
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1e9)
    total, squared, max_norm = record[0]
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert sum(float(v) for v in squared.values() if v is not None) == pytest.approx(expected ** 2, rel=1e-4)
    summary = summarize_clip_record(record, list(kinds))
    assert summary["steps"] == 1 and summary["skipped_steps"] == 0 and summary["mean"] == pytest.approx(expected,
                                                                                                      rel=1e-5)
    assert sum(summary["share_of_squared_norm"].values()) == pytest.approx(1.0)


def test_steps_with_a_non_finite_norm_are_counted_as_skipped_not_averaged():
    """With fp16, GradScaler skips a step whose gradients hold inf (routine in the first iterations): its norm is
    inf, and averaging it would make the epoch's mean and max inf and its shares NaN."""
    net = _tiny_allukan()
    kinds = parameter_kinds(net)
    record = []
    with recording_clip_norm(kinds, record):
        for poison in (False, True, False):
            net.zero_grad()
            net(torch.randn(2, 1, 16, 16)).square().mean().backward()
            if poison:
                next(iter(net.parameters())).grad.view(-1)[0] = float("inf")
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
    summary = summarize_clip_record(record, list(kinds))
    assert summary["steps"] == 2 and summary["skipped_steps"] == 1
    assert summary["mean"] == pytest.approx((float(record[0][0]) + float(record[2][0])) / 2)
    assert all(v == v for v in summary["share_of_squared_norm"].values())
    assert sum(summary["share_of_squared_norm"].values()) == pytest.approx(1.0)


def test_spline_max_slope_matches_autograd_derivative():
    torch.manual_seed(3)
    act = SharedSplineActivation(grid_size=5)
    with torch.no_grad():
        act.coef.normal_(0, 1.0)
    xs = torch.linspace(-6.6, 6.6, 4001, dtype=torch.float64, requires_grad=True)
    spline_part = bspline_basis(xs, 5, (-3.0, 3.0)) @ act.coef.detach().double()[0]
    slope = torch.autograd.grad(spline_part.sum(), xs)[0].abs().max()
    assert spline_max_slope(act, num_points=4001) == pytest.approx(float(slope), rel=2e-3)


def test_spline_change_is_the_largest_move_of_the_spline_curve():
    """Against the B-spline basis evaluated here on a fine grid: max |sum_j (c_j - c0_j) B_j(x)|; base weights
    separately; zero for an untouched layer."""
    torch.manual_seed(0)
    net = _tiny_allukan(share="channel")
    start = initial_splines(net)
    layers = {n: m for n, m in net.named_modules() if isinstance(m, KAModule)}
    moved_name, moved = next(iter(layers.items()))
    delta = torch.randn_like(moved.activation.coef) * 0.3
    with torch.no_grad():
        moved.activation.coef += delta
        moved.activation.base_weight -= 0.25
    snapshot = ka_layer_snapshot(net, start)
    lo, hi = moved.activation.grid_range
    h = (hi - lo) / moved.activation.grid_size
    xs = torch.linspace(lo - 3 * h, hi + 3 * h, 20001)
    expected = (bspline_basis(xs, moved.activation.grid_size, moved.activation.grid_range) @ delta.t()).abs().max()
    assert snapshot[moved_name]["spline_change"] == pytest.approx(float(expected), rel=1e-3)
    assert snapshot[moved_name]["base_weight_change"] == pytest.approx(0.25)
    others = [v for n, v in snapshot.items() if n != moved_name]
    assert others and all(v["spline_change"] == 0.0 and v["base_weight_change"] == 0.0 for v in others)
    assert spline_change(moved.activation, start[moved_name]["coef"]) == snapshot[moved_name]["spline_change"]
    assert "spline_change" not in ka_layer_snapshot(net)[moved_name]  # no start known: not reported


@pytest.mark.e2e
def test_statistics_file_and_log_line_per_epoch(nnunet, monkeypatch):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2_allukan.trainers import nnUNetTrainerAllUKAN_splineAdamNoClip

    for k, v in nnunet["env"].items():
        if k.startswith("nnUNet_"):
            monkeypatch.setenv(k, v)
    pre = Path(nnunet["env"]["nnUNet_preprocessed"]) / "Dataset990_KATest2D"
    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False
    trainer = nnUNetTrainerAllUKAN_splineAdamNoClip(plans, "2d", 0, load_json(str(pre / "dataset.json")),
                                                    device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 2, 3, 1
    trainer.run_training()
    out = Path(trainer.output_folder)
    entries = [json.loads(line) for line in (out / "ka_statistics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in entries] == [0, 1]
    ka_layers = {n: m for n, m in trainer.network.named_modules() if isinstance(m, KAModule)}
    last = entries[-1]
    assert set(last["layers"]) == set(ka_layers)
    for name, layer in last["layers"].items():
        assert 0.0 <= layer["outside_grid"] <= 1.0
        assert layer["coef_norm"] == pytest.approx(float(ka_layers[name].activation.coef.norm()), rel=1e-5)
        assert layer["spline_change"] >= 0.0 and layer["base_weight_change"] >= 0.0
    assert any(layer["spline_change"] > 0 for layer in last["layers"].values())  # Adam moved the splines
    start = torch.load(out / "ka_initial_splines.pt", weights_only=True)
    assert set(start) == set(ka_layers) and entries[0]["layers"][name]["coef_norm"] != pytest.approx(0.0)
    g = last["grad_norm"]
    assert g["steps"] == 3 and g["skipped_steps"] == 0 and 0.0 <= g["clipped_fraction"] <= 1.0
    assert g["share_of_squared_norm"]["spline_coef"] == 0.0  # left out of the clip by this recipe
    assert sum(g["share_of_squared_norm"].values()) == pytest.approx(1.0)
    log = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    assert log.count("KA statistics: median over layers") == 2
    # gradient fidelity at the first, middle and last epoch (here: epochs 0 and 1)
    for e in entries:
        fidelity = e["gradient_fidelity"]
        assert -1.0 <= fidelity["overall"] <= 1.0 + 1e-9
        # nnU-Net gives the lowest-resolution head a deep-supervision weight of 0: it gets no gradient at all
        assert set(ka_layers) - set(fidelity["per_layer"]) == {"decoder.seg_layers.0"}
        assert all(-1.0 - 1e-9 <= v <= 1.0 + 1e-9 for v in fidelity["per_layer"].values())
    assert log.count("Grad-Free Spline fidelity on the last batch") == 2
    # A fresh run in the same fold folder starts fresh statistics and a fresh starting point (not the old run's).
    plans["continue_training"] = False
    doctored = {k: {"coef": v["coef"] + 1.0, "base_weight": v["base_weight"]} for k, v in start.items()}
    torch.save(doctored, out / "ka_initial_splines.pt")  # as if another run had started from elsewhere
    again = nnUNetTrainerAllUKAN_splineAdamNoClip(plans, "2d", 0, load_json(str(pre / "dataset.json")),
                                                  device=torch.device("cpu"))
    again.num_epochs, again.num_iterations_per_epoch, again.num_val_iterations_per_epoch = 1, 2, 1
    again.run_training()
    entries = [json.loads(line) for line in (out / "ka_statistics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in entries] == [0]
    restart = torch.load(out / "ka_initial_splines.pt", weights_only=True)
    assert not torch.equal(restart[name]["coef"], doctored[name]["coef"])  # the new run's own initialisation


def test_combined_optimizer_under_nnunets_grad_scaler_steps_as_without_and_skips_on_inf():
    """nnU-Net's CUDA train_step: scaler.scale(loss).backward(), unscale_, clip at 12, scaler.step, update. With the
    default's SGD + Adam, the scaled path must give the unscaled path's parameters, and an inf gradient must make
    both inner optimizers skip the step (GradScaler on the CPU follows the same code)."""
    import copy

    torch.manual_seed(0)
    net = _tiny_allukan()
    twin = copy.deepcopy(net)
    x = torch.randn(2, 1, 16, 16)
    scaled_opt, plain_opt = _configure(net, "adam")[0], _configure(twin, "adam")[0]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for _ in range(2):
        scaled_opt.zero_grad()
        scaler.scale(net(x).square().mean()).backward()
        scaler.unscale_(scaled_opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        scaler.step(scaled_opt)
        scaler.update()
        plain_opt.zero_grad()
        twin(x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 12)
        plain_opt.step()
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    before = [p.detach().clone() for p in net.parameters()]
    scaled_opt.zero_grad()
    scaler.scale(net(x).square().mean() * float("inf")).backward()
    scaler.unscale_(scaled_opt)
    scaler.step(scaled_opt)
    scaler.update()
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters()))  # skipped, splines included
    assert scaler.get_scale() == 2.0 ** 9
