"""The wheel carries both top-level folders as subpackages and the discovery folder."""
import subprocess
import sys
import zipfile

import pytest


def test_wheel_contains_subpackages(built_wheel):
    names = set(zipfile.ZipFile(built_wheel).namelist())
    assert "nnunetv2_allukan/__init__.py" in names
    assert "nnunetv2_allukan/architectures/__init__.py" in names
    assert "nnunetv2_allukan/trainers/__init__.py" in names
    assert "nnunetv2_allukan/nnunet_ext_trainers/nnunetv2_allukan_ext_trainers.py" in names
    # nnU-Net imports every module of the discovery folder by its top-level name: it must stay a plain folder.
    assert "nnunetv2_allukan/nnunet_ext_trainers/__init__.py" not in names
    assert not any(n.startswith(("tests/", "architectures/", "trainers/")) for n in names)


def test_core_layers_do_not_import_nnunet():
    code = ("import sys, nnunetv2_allukan, nnunetv2_allukan.reference, nnunetv2_allukan.memory;"
            "bad = [m for m in sys.modules if m.startswith(('nnunetv2.', 'dynamic_network_architectures'))"
            " or m == 'nnunetv2'];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def _torch_requirement(requirements):
    from packaging.requirements import Requirement
    found = [Requirement(r) for r in requirements if Requirement(r).name == "torch" and not Requirement(r).marker]
    assert len(found) == 1, requirements
    return found[0].specifier


def test_torch_pin_is_what_the_code_needs_and_keeps_nnunets_exclusions():
    import importlib.metadata
    from pathlib import Path

    import torch

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parents[1]
    ours = _torch_requirement(tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"])
    # the KA layers ask autocast per device type (torch.get_autocast_dtype): an API of torch 2.4
    assert any("torch.get_autocast_dtype" in p.read_text() for p in (root / "nnunetv2_allukan").rglob("*.py"))
    assert not ours.contains("2.3.1") and ours.contains("2.4.0")
    nnunet = _torch_requirement(importlib.metadata.requires("nnunetv2"))
    for version in ("2.1.2", "2.4.0", "2.8.0", "2.9.0", "2.9.1", "2.10.0"):
        if not nnunet.contains(version):
            assert not ours.contains(version), f"nnU-Net excludes torch {version}, the plugin must too"
    assert ours.contains(torch.__version__.split("+")[0])
