"""Training-time statistics of every KA layer, written once per epoch next to nnU-Net's log.

``KAStatistics`` is a trainer mixin (cheap: one extra reduction per KA layer on the first training iteration of an
epoch, and a norm per parameter group each iteration). Per epoch it appends one JSON line to
``<fold folder>/ka_statistics.jsonl`` and one summary line to nnU-Net's training log:

* per KA layer: fraction of phi's inputs outside the grid range (first iteration of the epoch), spline coefficient
  norm, mean base weight, the spline's largest slope max |d/dx sum_j c_j B_j(x)|, and how far phi has moved since
  training began: max over the grid of |S(x) - S_0(x)| for the spline part and |w_b - w_b0| (the starting values
  are kept in ``ka_initial_splines.pt`` next to the log, so a run continued with ``--c`` measures from the same
  start);
* the global gradient norm that nnU-Net's ``clip_grad_norm_(…, 12)`` sees (before clipping), how often it exceeds
  the clip, and each parameter kind's share of the squared norm (spline coefficients, base weights, conv/linear
  weights, biases, normalisation) — which groups dominate the norm;
* at the first, middle and last epoch: the gradient fidelity of the Grad-Free Spline on two samples of that
  epoch's last training batch, under the run's autocast (cosine of free and exact gradients, overall and per layer;
  two extra forward+backward passes), so the bias is known along a real run, not only at initialisation.

On a GPU the per-step statistics stay on the device (norms and outside-grid fractions as tensors, read once per
epoch), and a step whose gradient norm is not finite (fp16 GradScaler skips it) is counted as ``skipped_steps``
and left out of the norm statistics.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics as stats

import torch

from nnunetv2_allukan.fidelity import gradient_fidelity
from nnunetv2_allukan.layers import KAModule
from nnunetv2_allukan.spline import bspline_basis

from .clipping import recording_clip_norm, summarize_clip_record

NNUNET_CLIP_NORM = 12.0
INITIAL_SPLINES_FILE = "ka_initial_splines.pt"
PARAMETER_KINDS = ("spline_coef", "base_weight", "weight", "bias", "norm")


def parameter_kind(name: str, module_of_parameter: torch.nn.Module) -> str:
    if name.endswith("activation.coef"):
        return "spline_coef"
    if name.endswith("activation.base_weight"):
        return "base_weight"
    if isinstance(module_of_parameter, (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm,
                                        torch.nn.GroupNorm)):
        return "norm"
    return "bias" if name.endswith("bias") else "weight"


def parameter_kinds(network: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    kinds = {k: [] for k in PARAMETER_KINDS}
    modules = dict(network.named_modules())
    for name, p in network.named_parameters():
        owner = modules.get(name.rsplit(".", 1)[0], network) if "." in name else network
        kinds[parameter_kind(name, owner)].append(p)
    return kinds


def spline_max_slope(activation, num_points: int = 400) -> float:
    """max |d/dx spline part| over the extended grid, by central differences of the spline curve."""
    xs, _, spline_part = activation.curves(num_points=num_points, margin=0.0)
    slope = (spline_part[2:] - spline_part[:-2]) / (xs[2:] - xs[:-2])[:, None]
    return float(slope.abs().max())


def spline_change(activation, initial_coef: torch.Tensor, num_points: int = 400) -> float:
    """max over the extended grid (and over the splines of a layer) of |S(x) - S_0(x)|: how far the learned spline
    part has moved from the coefficients ``initial_coef``, in the units of phi."""
    xs, _, spline_part = activation.curves(num_points=num_points, margin=0.0)
    basis = bspline_basis(xs, activation.grid_size, activation.grid_range)
    initial_part = basis @ initial_coef.detach().float().cpu().t()
    return float((spline_part - initial_part).abs().max())


def initial_splines(network: torch.nn.Module) -> dict[str, dict]:
    """Every KA layer's spline coefficients and base weights, to measure later changes against."""
    return {name: {"coef": m.activation.coef.detach().float().cpu().clone(),
                   "base_weight": m.activation.base_weight.detach().float().cpu().clone()}
            for name, m in network.named_modules() if isinstance(m, KAModule)}


def ka_layer_snapshot(network: torch.nn.Module, initial: dict | None = None) -> dict[str, dict]:
    """Per KA layer: coefficient norm, mean base weight and largest spline slope (no data needed); with
    ``initial`` (``initial_splines`` of the same network earlier) also how far phi moved since."""
    out = {}
    for name, module in network.named_modules():
        if isinstance(module, KAModule):
            act = module.activation
            out[name] = {"coef_norm": float(act.coef.detach().norm()),
                         "base_weight": float(act.base_weight.detach().float().mean()),
                         "max_spline_slope": spline_max_slope(act)}
            start = (initial or {}).get(name)
            if start is not None and start["coef"].shape == act.coef.shape:
                out[name]["spline_change"] = spline_change(act, start["coef"])
                out[name]["base_weight_change"] = float(
                    (act.base_weight.detach().float().cpu() - start["base_weight"]).abs().max())
    return out


class KAStatistics:
    """Mixin: per-epoch statistics of the KA layers and of the gradient norm (see the module docstring)."""

    statistics_file = "ka_statistics.jsonl"

    def on_train_start(self):
        super().on_train_start()
        # phi's starting point, per fold folder (rank 0): a fresh run (epoch 0) writes it, and starts a fresh
        # statistics file; a run continued with --c reads both back and appends. (A fresh run in an old fold folder
        # must not measure spline_change from another run's start, nor follow another run's lines.)
        path = os.path.join(self.output_folder, INITIAL_SPLINES_FILE)
        if self.current_epoch == 0:
            self._initial_splines = initial_splines(self._statistics_network())
            if self.local_rank == 0:
                torch.save(self._initial_splines, path)
                open(os.path.join(self.output_folder, self.statistics_file), "w").close()
        elif os.path.isfile(path):
            self._initial_splines = torch.load(path, weights_only=True)
        else:  # continued from a checkpoint written before this file existed: no start known
            self._initial_splines = None
        # Hooks registered once (adding and removing them every epoch would make torch.compile recompile); they
        # measure only while _outside_pending is set, i.e. on an epoch's first training iteration.
        self._outside, self._outside_pending = {}, False
        self._outside_hooks = [module.register_forward_pre_hook(self._outside_hook(name))
                               for name, module in self._statistics_network().named_modules()
                               if isinstance(module, KAModule)]

    def on_train_end(self):
        for handle in getattr(self, "_outside_hooks", []):
            handle.remove()
        self._outside_hooks = []
        super().on_train_end()

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._clip_record = []
        self._outside = {}
        self._outside_pending = True
        # The parameters do not change within an epoch: group them once here, not in every train_step.
        self._parameter_kinds = parameter_kinds(self._statistics_network())

    def _statistics_network(self) -> torch.nn.Module:
        net = self.network.module if self.is_ddp else self.network
        return getattr(net, "_orig_mod", net)

    def _outside_hook(self, name):
        def hook(module, args):
            if self._outside_pending:  # a tensor: read at the epoch's end, not here (a host sync per layer)
                lo, hi = module.activation.grid_range
                x = args[0].detach()
                self._outside[name] = ((x < lo) | (x > hi)).float().mean()
        return hook

    def train_step(self, batch: dict) -> dict:
        self._last_batch = batch  # a reference only: the gradient-fidelity check reuses the epoch's last batch
        with recording_clip_norm(self._parameter_kinds, self._clip_record):
            result = super().train_step(batch)
        self._outside_pending = False  # the first iteration of an epoch is sample enough
        return result

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if self.local_rank != 0:
            return
        entry = self.ka_statistics_entry()
        has_ka_layers = any(isinstance(m, KAModule) for m in self._statistics_network().modules())
        if self.current_epoch in self.fidelity_epochs() and has_ka_layers and \
                getattr(self, "_last_batch", None) is not None:
            entry["gradient_fidelity"] = self._gradient_fidelity(self._last_batch)
            self.print_to_log_file("Grad-Free Spline fidelity on the last batch: cosine(free, exact) overall "
                                   f"{entry['gradient_fidelity']['overall']:.4f}, lowest layer "
                                   f"{min(entry['gradient_fidelity']['per_layer'].values()):.4f}")
        with open(os.path.join(self.output_folder, self.statistics_file), "a") as f:
            f.write(json.dumps(entry) + "\n")
        g = entry["grad_norm"]
        layers = entry["layers"].values()
        self.print_to_log_file(
            "KA statistics: median over layers: outside grid {:.3f}, coef norm {:.3f}, base weight {:.3f}, max "
            "spline slope {:.3f}, spline moved {:.3f}; grad norm mean {:.2f} (clip at {:g} engaged in {:.0%} of "
            "steps), share of norm²: {}".format(
                _median(layers, "outside_grid"), _median(layers, "coef_norm"), _median(layers, "base_weight"),
                _median(layers, "max_spline_slope"), _median(layers, "spline_change"),
                g["mean"], NNUNET_CLIP_NORM, g["clipped_fraction"],
                ", ".join(f"{k} {v:.2f}" for k, v in g["share_of_squared_norm"].items())))

    def fidelity_epochs(self) -> set[int]:
        return {0, self.num_epochs // 2, self.num_epochs - 1}

    # Samples of the batch the fidelity probe uses: two extra forward+backward passes on the full batch would need
    # about twice the activation memory nnU-Net sized the batch for.
    fidelity_samples = 2

    def _gradient_fidelity(self, batch: dict) -> dict:
        """Free against exact gradients on the first ``fidelity_samples`` samples of ``batch``, under the run's own
        autocast (nnU-Net's fp16 on CUDA)."""
        net = self._statistics_network()
        n = self.fidelity_samples
        data = batch["data"][:n].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t[:n].to(self.device) for t in target] if isinstance(target, list) else target[:n].to(self.device)
        autocast = torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" \
            else contextlib.nullcontext()

        def loss(out):
            with autocast:
                return self.loss(out, target)

        with autocast:
            result = gradient_fidelity(net, data, loss)
        return {"overall": result["overall"], "per_layer": result["per_layer"], "samples": int(data.shape[0])}

    def ka_statistics_entry(self) -> dict:
        layers = ka_layer_snapshot(self._statistics_network(), getattr(self, "_initial_splines", None))
        outside = {name: float(v) for name, v in self._outside.items()}
        for name, layer in layers.items():
            layer["outside_grid"] = outside.get(name, float("nan"))
        return {"epoch": int(self.current_epoch),
                "grad_norm": summarize_clip_record(self._clip_record, PARAMETER_KINDS),
                "layers": layers}


def _median(layers, key: str) -> float:
    values = [l[key] for l in layers if key in l]
    return stats.median(values) if values else float("nan")


__all__ = ["KAStatistics", "initial_splines", "ka_layer_snapshot", "parameter_kinds", "recording_clip_norm",
           "spline_change", "spline_max_slope"]
