"""Finding and running nnU-Net's own commands with the ALL U-KAN trainers discoverable.

The bottom of the tools wing: every command that starts an nnU-Net command or needs nnU-Net's folders uses these
helpers, and this module imports none of the commands (so none of them needs the CLI module).
"""
from __future__ import annotations

import os
import sys

# The discovery folder ships next to the package's modules (package data), one level above this wing.
EXT_TRAINER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nnunet_ext_trainers")


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, without a traceback."""


def nnunet_executable(name: str) -> str:
    """An nnU-Net console script from this environment, also when its bin folder is not on PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else name


def with_ext_trainer_path(environ: dict) -> dict:
    """``environ`` with this package's discovery folder added to nnUNet_extTrainer (kept if already there)."""
    paths = [p for p in environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if EXT_TRAINER_DIR not in paths:
        paths.append(EXT_TRAINER_DIR)
    return {**environ, "nnUNet_extTrainer": os.pathsep.join(paths)}


def run_nnunet_entry(prog: str, entry, argv: list[str]) -> int:
    """Run an nnU-Net console entry point in this process, as ``prog argv...``, with our trainers discoverable."""
    os.environ.update(with_ext_trainer_path(dict(os.environ)))
    sys.argv = [prog, *argv]
    result = entry()
    return result if isinstance(result, int) else 0


def require_env(name: str) -> str:
    """The folder an nnU-Net path variable names; UserError if it is unset or not a folder."""
    value = os.environ.get(name)
    if not value:
        raise UserError(f"{name} is not set: export it as for any nnU-Net command (see nnU-Net's "
                        f"documentation/setting_up_paths.md)")
    if not os.path.isdir(value):
        raise UserError(f"{name}={value} is not a folder")
    return value


def dataset_name(dataset: str) -> str:
    """nnU-Net's dataset name (DatasetXXX_Name) for an id or name; UserError if nnU-Net knows none."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        raise UserError(f"dataset {dataset!r} was not found in nnUNet_raw, nnUNet_preprocessed or nnUNet_results; "
                        f"check the id or run nnUNetv2_plan_and_preprocess first") from None
