"""Narrowing and observing nnU-Net's gradient clip without touching its train_step.

nnU-Net's ``train_step`` calls ``torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)``. The two context
managers here replace that function for the duration of one step and restore it afterwards (also on errors):
``clip_without`` leaves some parameters out of the clip, ``recording_clip_norm`` records the norm the clip sees
and each parameter kind's share of it. They nest in either order and agree: parameters left out of the clip are
left out of the record as well.
"""
from __future__ import annotations

import contextlib

import torch

# Parameters currently left out of the clip (one set per active clip_without block).
_skipped_ids: list[set[int]] = []


def _not_skipped(parameters) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    skipped = set().union(*_skipped_ids)
    return [p for p in parameters if id(p) not in skipped]


@contextlib.contextmanager
def _replaced_clip(make_replacement):
    original = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = make_replacement(original)
    try:
        yield
    finally:
        torch.nn.utils.clip_grad_norm_ = original


@contextlib.contextmanager
def clip_without(parameters_to_skip):
    """Within the block, ``torch.nn.utils.clip_grad_norm_`` neither sees nor scales ``parameters_to_skip``."""
    _skipped_ids.append({id(p) for p in parameters_to_skip})
    try:
        with _replaced_clip(lambda original: lambda parameters, *a, **k: original(_not_skipped(parameters), *a, **k)):
            yield
    finally:
        _skipped_ids.pop()


@contextlib.contextmanager
def recording_clip_norm(kinds: dict[str, list[torch.Tensor]], record: list):
    """Within the block, every clip call also appends (total norm before clipping, {kind: squared norm}, max_norm).

    ``kinds`` maps a name to the parameters of that kind; only parameters the clip actually sees are counted.
    """
    def make(original):
        def clip(parameters, max_norm, *args, **kwargs):
            seen = _not_skipped(parameters)
            seen_ids = {id(p) for p in seen}
            squared = {}
            for kind, params in kinds.items():
                grads = [p.grad.detach().float() for p in params if id(p) in seen_ids and p.grad is not None]
                squared[kind] = float(sum((g * g).sum() for g in grads)) if grads else 0.0
            total = original(seen, max_norm, *args, **kwargs)
            record.append((float(total), squared, float(max_norm)))
            return total
        return clip

    with _replaced_clip(make):
        yield


__all__ = ["clip_without", "recording_clip_norm"]
