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

    ``kinds`` maps a name to the parameters of that kind; only parameters the clip actually sees are counted. The
    norms stay tensors on the gradients' device (0-dim; None for a kind without gradients): reading them here would
    be several host-device syncs per training step on a GPU. ``summarize_clip_record`` reads them all at once.
    """
    def make(original):
        def clip(parameters, max_norm, *args, **kwargs):
            seen = _not_skipped(parameters)
            seen_ids = {id(p) for p in seen}
            squared = {}
            for kind, params in kinds.items():
                grads = [p.grad.detach() for p in params if id(p) in seen_ids and p.grad is not None]
                squared[kind] = (torch.stack(torch._foreach_norm(grads)).float().square().sum() if grads
                                 else None)
            total = original(seen, max_norm, *args, **kwargs)
            total = total.detach().float() if torch.is_tensor(total) else torch.tensor(float(total))
            record.append((total, squared, float(max_norm)))
            return total
        return clip

    with _replaced_clip(make):
        yield


def summarize_clip_record(record: list, kinds) -> dict:
    """One epoch's record as numbers (one host read): mean and max of the total norm, the fraction of steps the clip
    engaged, each kind's share of the squared norm, and the steps whose norm was not finite (``skipped_steps``:
    with fp16 GradScaler skips such a step, routinely in the first iterations) left out of all of those."""
    if not record:
        return {"mean": float("nan"), "max": float("nan"), "steps": 0, "skipped_steps": 0,
                "clipped_fraction": float("nan"), "share_of_squared_norm": {k: 0.0 for k in kinds}}
    values = [r[0].reshape(()).cpu() for r in record]
    for r in record:
        values += [(v if v is not None else torch.zeros(())).reshape(()).cpu() for v in r[1].values()]
    flat = torch.stack(values).tolist()
    totals, per_kind = flat[:len(record)], flat[len(record):]
    rows = [dict(zip(record[i][1], per_kind[i * len(kinds):(i + 1) * len(kinds)])) for i in range(len(record))]
    finite = [i for i, t in enumerate(totals) if t == t and abs(t) != float("inf")]
    if not finite:
        return {"mean": float("nan"), "max": float("nan"), "steps": 0, "skipped_steps": len(record),
                "clipped_fraction": float("nan"), "share_of_squared_norm": {k: 0.0 for k in kinds}}
    kept = [totals[i] for i in finite]
    squared_sum = {k: sum(rows[i].get(k, 0.0) for i in finite) for k in kinds}
    all_squared = sum(squared_sum.values()) or 1.0
    return {"mean": sum(kept) / len(kept), "max": max(kept), "steps": len(kept),
            "skipped_steps": len(record) - len(kept),
            "clipped_fraction": sum(totals[i] > record[i][2] for i in finite) / len(kept),
            "share_of_squared_norm": {k: v / all_squared for k, v in squared_sum.items()}}


__all__ = ["clip_without", "recording_clip_norm", "summarize_clip_record"]
