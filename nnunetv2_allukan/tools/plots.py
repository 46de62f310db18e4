"""PNG figures: learned spline activations, example segmentations."""
from __future__ import annotations

import math

import numpy as np


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_activations(network, out_png: str, max_channels: int = 4, title: str | None = None) -> int:
    """One panel per KA layer: phi (solid), its silu part (dashed) and spline part (dotted) over the grid range.

    For ``share="channel"`` (or ``"group"``) the first ``max_channels`` channels' (groups') splines are overlaid. Returns the number of panels.
    """
    from ..activation import SharedSplineActivation

    layers = [(name.removesuffix(".activation"), m) for name, m in network.named_modules()
              if isinstance(m, SharedSplineActivation)]
    if not layers:
        raise ValueError("the network has no SharedSplineActivation (is it a KA network?)")
    plt = _pyplot()
    cols = min(8, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.9 * rows), squeeze=False)
    for ax, (name, act) in zip(axes.ravel(), layers):
        xs, base, spline_part = act.curves()
        lo, hi = act.grid_range
        for c in range(min(max_channels, base.shape[1])):
            line, = ax.plot(xs, base[:, c] + spline_part[:, c], lw=1.2)
            ax.plot(xs, base[:, c], ls="--", lw=0.6, color=line.get_color())
            ax.plot(xs, spline_part[:, c], ls=":", lw=0.8, color=line.get_color())
        ax.axvspan(lo, hi, color="0.93", zorder=0)
        ax.set_title(_short(name), fontsize=6)
        ax.tick_params(labelsize=5)
    for ax in axes.ravel()[len(layers):]:
        ax.axis("off")
    fig.suptitle(title or "Learned shared spline activations: phi (solid) = w_b silu (dashed) + spline (dotted); "
                 "shaded: grid range", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return len(layers)


def _short(name: str) -> str:
    return (name.replace("encoder.stages.", "enc").replace("decoder.stages.", "dec")
            .replace("decoder.upsamplers.", "up").replace("decoder.seg_layers.", "head")
            .replace("token_linears.", "tokLin").replace("depthwise.", "dw"))


def plot_examples(examples: list[dict], out_png: str, n_classes: int):
    """Rows of (image, ground truth overlay, prediction overlay). Each example: title, image, gt, pred (2D)."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    colours = ListedColormap([(0, 0, 0, 0), (1.0, 0.55, 0.0, 0.55), (0.1, 0.6, 1.0, 0.55), (0.3, 0.9, 0.3, 0.55),
                              (0.9, 0.2, 0.9, 0.55)][:max(n_classes, 2)])
    fig, axes = plt.subplots(len(examples), 3, figsize=(7.5, 2.6 * len(examples)), squeeze=False)
    for row, ex in zip(axes, examples):
        img = np.asarray(ex["image"], np.float32)
        for ax, (label, seg) in zip(row, (("image", None), ("ground truth", ex["gt"]), ("prediction", ex["pred"]))):
            ax.imshow(img, cmap="gray", origin="lower")
            if seg is not None:
                ax.imshow(np.asarray(seg), cmap=colours, vmin=0, vmax=colours.N - 1, origin="lower",
                          interpolation="nearest")
            ax.set_title(f"{ex['title']}: {label}" if label == "image" else label, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
