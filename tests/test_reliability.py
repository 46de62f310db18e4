"""Reliability: autocast, DDP, non-finite losses, resume, prediction consistency, determinism, bad input."""
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunetv2_allukan.architectures import AllUKAN
from nnunetv2_allukan.trainers import nnUNetTrainerAllUKAN
from nnunetv2_allukan.trainers.guards import NonFiniteLossError

from conftest import D2, SMOKE, ext_path, run

TEST_TRAINERS = str(Path(__file__).parent / "ext_trainers")


def small_net(ds=False, seed=0, **ka):
    torch.manual_seed(seed)
    net = AllUKAN(1, 3, [4, 8, 8], torch.nn.Conv2d, 3, [[1, 1], [2, 2], [2, 2]], 1, 3, 1, deep_supervision=ds,
                  **ka)
    net.apply(net.initialize)
    return net


def toy_batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(n, 16, 16, dtype=torch.long)
    for i in range(n):
        r, c = torch.randint(2, 8, (2,), generator=g)
        y[i, r:r + 6, c:c + 6] = 1 + i % 2
    x = (y.float() * 1.5 + 0.3 * torch.randn(n, 16, 16, generator=g)).unsqueeze(1)
    return x, y


def test_bf16_autocast_training_loss_falls():
    net = small_net()
    x, y = toy_batch()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    losses = []
    for _ in range(15):  # bf16 convolutions are emulated (slow) on most CPUs: keep it short
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
            loss = F.cross_entropy(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert np.isfinite(losses[-1])
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_same_seed_same_weights_and_deterministic_forward():
    a, b = small_net(seed=3), small_net(seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not torch.equal(small_net(seed=4).state_dict()["encoder.stages.0.0.0.weight"],
                           a.state_dict()["encoder.stages.0.0.0.weight"])
    x, _ = toy_batch()
    assert torch.equal(a(x), a(x)) and torch.equal(a(x), b(x))


def test_extreme_inputs_give_finite_outputs_and_gradients():
    net = small_net(ds=True, spline_grad="exact")
    x = torch.full((2, 1, 16, 16), 1e4)
    x[:, :, :8] = -1e4
    out = net(x)
    assert all(torch.isfinite(o).all() for o in out)
    sum(o.mean() for o in out).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def _default_recipe_optimizer(net):
    """The default trainer's optimizer kind (trainers/recipes.py): SGD for the convolutions and an Adam of their own
    for the spline parameters, stepped together as one CombinedOptimizer."""
    from nnunetv2_allukan.trainers.recipes import CombinedOptimizer, split_spline_parameters

    spline, other = split_spline_parameters(net)
    return CombinedOptimizer([torch.optim.SGD(other, lr=0.1, momentum=0.99, nesterov=True),
                              torch.optim.Adam(spline, lr=1e-3)])


def _ddp_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    net = small_net(ds=True)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    x, y = toy_batch(4)
    half = slice(2 * rank, 2 * rank + 2)
    opt = _default_recipe_optimizer(net)
    loss = sum(F.cross_entropy(o, F.interpolate(y[half, None].float(), o.shape[2:]).long()[:, 0])
               for o in ddp(x[half]))
    loss.backward()
    opt.step()
    if rank == 0:
        torch.save(net.state_dict(), out_file)
    dist.destroy_process_group()


def test_one_ddp_step_equals_a_single_process_step_on_the_whole_batch(tmp_path):
    """2 gloo processes on half batches each give the same update as one process on the full batch, with the default
    recipe's combined optimizer (SGD + the splines' own Adam)."""
    import torch.multiprocessing as mp
    out_file = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), out_file), nprocs=2, join=True)
    net = small_net(ds=True)
    x, y = toy_batch(4)
    opt = _default_recipe_optimizer(net)
    # DDP averages gradients over ranks: the per-rank mean losses average to the full-batch mean here
    loss = 0.5 * sum(sum(F.cross_entropy(o, F.interpolate(y[h, None].float(), o.shape[2:]).long()[:, 0])
                         for o in net(x[h])) for h in (slice(0, 2), slice(2, 4)))
    loss.backward()
    opt.step()
    ddp_state = torch.load(out_file)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, atol=1e-5, rtol=1e-4)


def _guard_worker(rank, world, init_file, out_dir):
    """A stand-in trainer whose loss is NaN on rank 0 only, guarded by NonFiniteLossGuard under DDP."""
    import torch.distributed as dist
    from nnunetv2_allukan.trainers.guards import NonFiniteLossGuard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)

    class LocalLoss:
        def train_step(self, batch):
            return {"loss": np.array(float("nan") if rank == 0 else 0.5)}

    class Guarded(NonFiniteLossGuard, LocalLoss):
        is_ddp, device, current_epoch, output_folder = True, torch.device("cpu"), 3, str(out_dir)

        def print_to_log_file(self, *args, **kwargs):
            pass

    trainer = Guarded()
    outcome = "kept training"
    for i in range(2 * Guarded.max_consecutive_nonfinite):
        try:
            trainer.train_step({})
        except NonFiniteLossError:
            outcome = f"stopped at iteration {i}"
            break
    (Path(out_dir) / f"rank{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


def test_non_finite_loss_on_one_ddp_rank_stops_every_rank(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_guard_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    stop = f"stopped at iteration {nnUNetTrainerAllUKAN.max_consecutive_nonfinite - 1}"
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == [stop, stop]


def _trainer(nnunet, cls=nnUNetTrainerAllUKAN, dataset_json_edit=None, plans_edit=None):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    pre = Path(nnunet["env"]["nnUNet_preprocessed"]) / "Dataset990_KATest2D"
    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False
    dataset_json = load_json(str(pre / "dataset.json"))
    if dataset_json_edit:
        dataset_json_edit(dataset_json)
    if plans_edit:
        plans_edit(plans)
    return cls(plans, "2d", 0, dataset_json, device=torch.device("cpu"))


@pytest.fixture
def nnunet_paths(nnunet, monkeypatch):
    """In-process trainers read nnU-Net's folders from the environment."""
    for k, v in nnunet["env"].items():
        if k.startswith("nnUNet_"):
            monkeypatch.setenv(k, v)
    return nnunet


@pytest.mark.e2e
def test_non_finite_losses_stop_training_without_touching_checkpoints(nnunet_paths):
    nnunet = nnunet_paths

    class InjectNaN(nnUNetTrainerAllUKAN):
        def train_step(self, batch):
            if self.current_epoch == 1:
                batch["data"] = torch.full_like(batch["data"], float("nan"))
            return super().train_step(batch)

    trainer = _trainer(nnunet, InjectNaN)
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 3, 6, 1
    trainer.save_every = 1
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, iteration 4"):
        trainer.run_training()
    out = Path(trainer.output_folder)
    latest = torch.load(out / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 1  # written after the good epoch 0, never after the NaNs
    assert all(torch.isfinite(v).all() for v in latest["network_weights"].values() if v.is_floating_point())
    assert not (out / "checkpoint_final.pth").exists()
    log = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    assert "Training stopped: the loss was NaN/Inf for 5 iterations in a row" in log


def _all_finite(checkpoint_file) -> bool:
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    return all(torch.isfinite(v).all() for v in checkpoint["network_weights"].values() if v.is_floating_point())


@pytest.mark.e2e
@pytest.mark.parametrize("nan_epoch,refused", [(0, "checkpoint_latest.pth"), (1, "checkpoint_final.pth")])
def test_nan_in_the_last_iteration_of_an_epoch_never_reaches_a_checkpoint(nnunet_paths, nan_epoch, refused):
    """One NaN batch in the last iteration of an epoch (fewer than the 5 in a row that stop training) makes the
    weights NaN when nnU-Net checkpoints: at the end of that epoch (latest), or at the end of training (final,
    after which nnU-Net deletes latest). Neither may be written, and the message must say what is on disk."""

    def train_step(self, batch):
        if self.current_epoch == nan_epoch and \
                getattr(self, "_iteration_in_epoch", 0) == self.num_iterations_per_epoch - 1:
            batch["data"] = torch.full_like(batch["data"], float("nan"))
        return nnUNetTrainerAllUKAN.train_step(self, batch)

    # one class, so one output folder, per parametrisation
    nan_trainer = type(f"NaNAtEndOfEpoch{nan_epoch}", (nnUNetTrainerAllUKAN,), {"train_step": train_step})
    trainer = _trainer(nnunet_paths, nan_trainer)
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 2, 2, 1
    trainer.save_every = 1
    with pytest.raises(NonFiniteLossError, match=f"{refused} was not written") as stop:
        trainer.run_training()
    out = Path(trainer.output_folder)
    assert not (out / "checkpoint_final.pth").exists()
    assert all(_all_finite(f) for f in out.glob("checkpoint_*.pth"))
    if nan_epoch == 0:
        assert not list(out.glob("checkpoint_*.pth"))
        assert "this run wrote no checkpoint" in str(stop.value)
    else:  # the good checkpoint of epoch 0 is still there: nnU-Net's end of training did not delete it
        assert torch.load(out / "checkpoint_latest.pth", map_location="cpu", weights_only=False)["current_epoch"] == 1
        assert "checkpoint_latest.pth (after epoch 0)" in str(stop.value)
    assert "Nothing was saved" not in str(stop.value)
    log = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    assert str(stop.value) in log


@pytest.mark.e2e
def test_checkpoint_mismatch_says_what_differs(nnunet_paths, trained_2d):
    nnunet = nnunet_paths
    ckpt = str(trained_2d / "checkpoint_final.pth")

    def more_labels(dj):
        dj["labels"]["extra"] = 3

    trainer = _trainer(nnunet, dataset_json_edit=more_labels)
    trainer.initialize()
    with pytest.raises(RuntimeError, match="predicts 3 output channels but the dataset's labels need 4"):
        trainer.load_checkpoint(ckpt)

    def wider(plans):
        arch = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
        arch["features_per_stage"] = [f * 2 for f in arch["features_per_stage"]]

    trainer = _trainer(nnunet, plans_edit=wider)
    trainer.initialize()
    with pytest.raises(RuntimeError, match="layer shapes differ"):
        trainer.load_checkpoint(ckpt)


@pytest.mark.e2e
def test_resume_with_c_continues_at_the_right_epoch_and_lr(nnunet):
    env = {**nnunet["env"], "nnUNet_extTrainer": os.pathsep.join([ext_path(nnunet["env"]), TEST_TRAINERS])}
    trainer = "nnUNetTrainerAllUKAN_resumeTest"
    cmd = ["nnUNetv2_train", D2, "2d", "1", "-tr", trainer, "-device", "cpu"]
    crashed = run(cmd, {**env, "ALLUKAN_TEST_CRASH_AT_EPOCH": "2"}, expect_ok=False)
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    fold = Path(env["nnUNet_results"]) / "Dataset990_KATest2D" / f"{trainer}__nnUNetPlans__2d" / "fold_1"
    assert torch.load(fold / "checkpoint_latest.pth", map_location="cpu",
                      weights_only=False)["current_epoch"] == 2
    logs_before = set(fold.glob("training_log_*.txt"))
    run(cmd + ["--c"], env)
    assert (fold / "checkpoint_final.pth").is_file()
    new_log = "".join(p.read_text() for p in set(fold.glob("training_log_*.txt")) - logs_before)
    epochs = [int(m) for m in re.findall(r": Epoch (\d+)\s*$", new_log, flags=re.M)]
    assert epochs == [2]  # only the missing epoch was trained
    expected_lr = np.round(1e-2 * (1 - 2 / 3) ** 0.9, decimals=5)
    assert f"Current learning rate: {expected_lr}" in new_log


@pytest.mark.e2e
def test_predict_from_final_checkpoint_matches_fold_validation(nnunet, trained_2d, tmp_path):
    from PIL import Image
    env = {**nnunet["env"], "nnUNet_extTrainer": ext_path(nnunet["env"])}
    val_cases = [p.stem for p in (trained_2d / "validation").glob("*.png")]
    assert val_cases
    raw = Path(env["nnUNet_raw"]) / "Dataset990_KATest2D"
    inputs = tmp_path / "in"
    inputs.mkdir()
    for case in val_cases:
        (inputs / f"{case}_0000.png").write_bytes((raw / "imagesTr" / f"{case}_0000.png").read_bytes())
    out = tmp_path / "out"
    run(["nnUNetv2_predict", "-i", str(inputs), "-o", str(out), "-d", D2, "-c", "2d", "-f", "0", "-tr", SMOKE,
         "-device", "cpu", "-npp", "0", "-nps", "0"], env)
    for case in val_cases:
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{case}.png")),
                                      np.asarray(Image.open(trained_2d / "validation" / f"{case}.png")))


@pytest.mark.e2e
def test_cli_user_errors_are_one_line(nnunet, tmp_path):
    env = nnunet["env"]
    for cmd, expected in (
            (["crossval", "-d", "777", "-c", "2d", "-tr", SMOKE, "--collect-only"], "777"),
            (["crossval", "-d", D2, "-c", "2d", "-tr", SMOKE, "--collect-only", "--ref", "Other"], "--ref"),
            (["make-dataset", "icbm2d", "--raw", str(tmp_path / "missing" / "raw"), "--downsample", "0"],
             "downsample"),
    ):
        proc = run(["nnunetv2-allukan", *cmd], env, expect_ok=False)
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr and "Traceback" not in proc.stderr
    no_results = {k: v for k, v in env.items() if k != "nnUNet_results"}
    proc = run(["nnunetv2-allukan", "crossval", "-d", D2, "-c", "2d", "-tr", SMOKE, "--collect-only"], no_results,
               expect_ok=False)
    assert proc.returncode == 2 and "nnUNet_results is not set" in proc.stderr


def test_checkpoint_guard_reraises_what_is_not_a_mismatch():
    """Out of memory, or any error while the trainer has no optimizer yet (its initialisation failed), comes out
    unchanged: not explained away as a checkpoint mismatch, nor hidden behind an AttributeError."""
    from nnunetv2_allukan.trainers.guards import CheckpointMismatchMessage

    class Base:
        def __init__(self, error, optimizer=None):
            self.error, self.optimizer = error, optimizer

        def load_checkpoint(self, filename_or_checkpoint):
            raise self.error

    class Trainer(CheckpointMismatchMessage, Base):
        pass

    for error, optimizer in ((torch.OutOfMemoryError("CUDA out of memory"), torch.optim.SGD([torch.zeros(1)], 0.1)),
                             (RuntimeError("Error(s) in loading state_dict: size mismatch"), None),
                             (ValueError("something else"), torch.optim.SGD([torch.zeros(1)], 0.1))):
        with pytest.raises(type(error)) as raised:
            Trainer(error, optimizer).load_checkpoint({})
        assert raised.value is error
