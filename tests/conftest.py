import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels are tested through Triton's interpreter, which must be chosen before triton is
# first imported (its own library functions are decorated then), i.e. here, before any test module imports
# torch._dynamo. Only Triton GPU code reads the variable (inductor's CPU code does not), so no other test changes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nnunetv2_allukan.data.synthetic import make_2d_dataset, make_3d_dataset

# Two cores in CI: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))



@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny networks: a second thread only adds OpenMP overhead (badly so on a busy 2-core
    machine). Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory):
    """A plain (non-editable) wheel of this checkout, built once per session."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                   check=True, cwd=out)
    wheels = list(out.glob("nnunetv2_allukan-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


@pytest.fixture(scope="session")
def wheel_install(built_wheel, tmp_path_factory):
    """The wheel installed into its own folder (use it with PYTHONPATH=<folder>)."""
    target = tmp_path_factory.mktemp("wheel_install")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(built_wheel)], check=True)
    return target


# --- nnU-Net end-to-end helpers (shared by the e2e, demo and crossval tests) ---

BIN = Path(sys.executable).parent
SMOKE = "nnUNetTrainerAllUKAN_smokeTest"
D2, D3 = "990", "991"


def run(cmd, env, expect_ok=True, timeout=900, cwd=None):
    exe = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
    proc = subprocess.run([exe, *cmd[1:]], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def ext_path(env):
    return run(["nnunetv2-allukan", "ext-path"], env).stdout.strip()


@pytest.fixture(scope="session")
def nnunet(tmp_path_factory):
    """nnU-Net folders with both datasets planned and preprocessed (once per session)."""
    root = tmp_path_factory.mktemp("nnunet")
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"),
               # 2 cores: no worker pools (DESIGN.md §4). Planning needs nnUNet_n_proc_DA >= 1.
               nnUNet_def_n_proc="1", nnUNet_n_proc_DA="1", OMP_NUM_THREADS="2")
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(env[key])
    make_2d_dataset(env["nnUNet_raw"], int(D2))
    make_3d_dataset(env["nnUNet_raw"], int(D3))
    run(["nnUNetv2_plan_and_preprocess", "-d", D2, "-c", "2d", "-np", "1", "-npfp", "1",
         "--verify_dataset_integrity"], env)
    run(["nnUNetv2_plan_and_preprocess", "-d", D3, "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env)
    env["nnUNet_n_proc_DA"] = "0"  # training: single-threaded augmentation
    return {"root": root, "env": env}


def results_folder(nnunet, dataset_name, trainer, config):
    return nnunet["root"] / "results" / dataset_name / f"{trainer}__nnUNetPlans__{config}" / "fold_0"


@pytest.fixture(scope="session")
def trained_2d(nnunet):
    """README: export nnUNet_extTrainer=$(nnunetv2-allukan ext-path); nnUNetv2_train D 2d 0 -tr ..."""
    env = {**nnunet["env"], "nnUNet_extTrainer": ext_path(nnunet["env"])}
    run(["nnUNetv2_train", D2, "2d", "0", "-tr", SMOKE, "-device", "cpu", "--npz"], env)
    return results_folder(nnunet, "Dataset990_KATest2D", SMOKE, "2d")


def count_ka_layers_fully_ka(net) -> int:
    """The number of KA layers of ``net``; fails if a plain conv/linear exists outside them or a module other than
    a normalisation (or the spline activation inside a KA layer) owns parameters."""
    from torch import nn
    from nnunetv2_allukan import KAModule, SharedSplineActivation

    n_ka = 0
    for name, module in net.named_modules():
        if isinstance(module, KAModule):
            n_ka += 1
        elif isinstance(module, (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)):
            pytest.fail(f"{name} is a plain {type(module).__name__}")
        elif list(module.parameters(recurse=False)):
            assert isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                       SharedSplineActivation)), name
    return n_ka
