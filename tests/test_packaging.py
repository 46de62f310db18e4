"""The wheel carries both top-level folders as subpackages and the discovery folder."""
import subprocess
import sys
import zipfile


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
