import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Two cores in CI: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
