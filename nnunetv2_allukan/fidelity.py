"""Gradient fidelity of the Grad-Free Spline: cosine similarity of free and exact gradients, per layer.

For one network and one batch every parameter's gradient is computed twice, with ``spline_grad="free"`` and
``"exact"`` (same weights, same batch). Used by the ``gradfid`` command and, during training, by the trainers'
statistics mixin. Pure torch: no nnU-Net.
"""
from __future__ import annotations

import torch

from .activation import SharedSplineActivation


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else 1.0


def _layer_name(param_name: str) -> str:
    """Group a parameter with the KA layer (or norm) that owns it."""
    owner = param_name.rsplit(".", 1)[0]
    return owner.removesuffix(".activation")


def gradient_fidelity(network: torch.nn.Module, inputs: torch.Tensor, loss_fn) -> dict:
    activations = [m for m in network.modules() if isinstance(m, SharedSplineActivation)]
    if not activations:
        raise ValueError("the network has no SharedSplineActivation: nothing to compare")
    original = [a.spline_grad for a in activations]

    def gradients(mode: str) -> dict:
        for a in activations:
            a.spline_grad = mode
        network.zero_grad(set_to_none=True)
        loss_fn(network(inputs)).backward()
        return {n: p.grad.detach().clone() for n, p in network.named_parameters() if p.grad is not None}

    try:
        free, exact = gradients("free"), gradients("exact")
    finally:
        for a, mode in zip(activations, original):
            a.spline_grad = mode
        network.zero_grad(set_to_none=True)
    layers: dict[str, list[str]] = {}
    for name in exact:
        layers.setdefault(_layer_name(name), []).append(name)
    per_layer = {layer: _cosine(torch.cat([free[n].flatten() for n in names]),
                                torch.cat([exact[n].flatten() for n in names]))
                 for layer, names in layers.items()}
    return {
        "overall": _cosine(torch.cat([free[n].flatten() for n in exact]),
                           torch.cat([exact[n].flatten() for n in exact])),
        "per_layer": per_layer,
        "per_parameter": {n: _cosine(free[n], exact[n]) for n in exact},
    }


__all__ = ["gradient_fidelity"]
