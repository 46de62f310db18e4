"""``nnunetv2-allukan gradfid``: how far the Grad-Free Spline's gradients are from the exact ones.

The paper's reviewers asked whether detaching the spline basis biases optimisation. For one network and one
batch this computes every parameter's gradient twice, with ``spline_grad="free"`` and ``"exact"`` (same
weights, same batch), and reports their cosine similarity per layer and overall, plus a PNG. The free mode
only drops dphi/dx, so the last KA layers' own parameters (the segmentation heads) get identical gradients
(similarity 1); every layer that lies before a spline sees the difference, the more the deeper it sits.

The batch is random (z-scored-like inputs, random labels, nnU-Net's deep-supervision cross-entropy): it
measures the gradient map of the network, not of a dataset.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from ..fidelity import gradient_fidelity


def plot(result: dict, out_png: str, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["per_layer"])
    values = [result["per_layer"][n] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(names)), 3.6))
    ax.bar(range(len(names)), values, color=["tab:blue" if v > 0.99 else "tab:orange" for v in values])
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=5)
    ax.set_ylabel("cosine(free, exact)")
    ax.set_title(f"{title}\ncosine(free, exact) overall {result['overall']:.4f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from .profiling.configs import synthetic_plans
    from .profiling.measure import deep_supervision_loss, random_targets
    from .profiling.variants import VARIANT_BY_KEY, build_network

    parser = argparse.ArgumentParser(prog="nnunetv2-allukan gradfid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="checkpoint .pth or nnU-Net model/fold folder (default: random "
                                                 "init)")
    parser.add_argument("-f", dest="fold", help="fold of a model folder (default: its only fold)")
    parser.add_argument("-chk", dest="checkpoint_name",
                        help="checkpoint file name (default: checkpoint_final.pth, else best, else latest)")
    parser.add_argument("--dim", type=int, default=2, choices=[2, 3], help="random init: 2D or 3D plans")
    parser.add_argument("--patch", type=int, nargs="+", default=[64, 64])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--base-features", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="gradfid", help="output folder (JSON and PNG)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    if args.model:
        from .checkpoints import checkpoint_configuration, load_network
        network, checkpoint = load_network(args.model, args.fold, args.checkpoint_name)
        # nnU-Net's plans classes resolve inheritance (2d_allukan, 3d_cascade_fullres take their parent's patch)
        _, configuration_manager, n_in, _ = checkpoint_configuration(checkpoint)
        patch = [int(p) for p in configuration_manager.patch_size]
        title = f"{checkpoint['trainer_name']} ({checkpoint['checkpoint_file']})"
    else:
        cfg = synthetic_plans(args.dim, args.patch, args.batch, base_features=args.base_features)
        network = build_network(VARIANT_BY_KEY["free"], cfg)
        patch, n_in, title = cfg.patch, cfg.input_channels, f"random init, {cfg.source}"
    network.train()
    decoder = getattr(network, "decoder", None)
    if decoder is not None and hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = True
    x = torch.randn(args.batch, n_in, *patch)
    with torch.no_grad():
        outputs = network(x)
    n_classes = (outputs[0] if isinstance(outputs, (list, tuple)) else outputs).shape[1]
    targets = random_targets(outputs if isinstance(outputs, (list, tuple)) else [outputs], n_classes)
    result = gradient_fidelity(network, x, lambda out: deep_supervision_loss(out, targets))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gradfid.json"), "w") as f:
        json.dump({"title": title, "patch": list(patch), "batch": args.batch, **result}, f, indent=2)
    plot(result, os.path.join(args.out, "gradfid.png"), title)
    worst = sorted(result["per_layer"].items(), key=lambda kv: kv[1])[:5]
    print(f"cosine(free, exact): overall {result['overall']:.4f}; lowest layers: "
          + ", ".join(f"{k} {v:.4f}" for k, v in worst))
    print(f"wrote {args.out}/gradfid.json and gradfid.png")
    return 0
