"""How it is reported: terminal and Markdown tables, CSV, JSON and a chart of one profile result."""
from __future__ import annotations

import csv
import json
import os

from .measure import RATIO_FIELDS

COLUMNS = [
    # (header, row -> text); "/CNN" and "/Stacked" are ratios to the CNN row (the plans' own, e.g.
    # PlainConvUNet or ResidualEncoderUNet) and to StackedKAN at the same size.
    ("network", lambda r: r["name"]),
    ("size", lambda r: r["size"]),
    ("params", lambda r: _human(r["params"])),
    ("params /CNN", lambda r: _ratio(r["params_vs_cnn"])),
    ("params /Stacked", lambda r: _ratio(r["params_vs_stacked"])),
    ("GFLOP f+b", lambda r: "n/a" if r["flops"] is None else f"{r['flops'] / 1e9:.2f}"),
    ("saved MiB", lambda r: _mib(r["saved_bytes"], r["saved_is_estimate"])),
    ("saved /CNN", lambda r: _ratio(r["saved_bytes_vs_cnn"], r["saved_bytes_vs_cnn_is_estimate"])),
    ("saved /Stacked", lambda r: _ratio(r["saved_bytes_vs_stacked"], r["saved_bytes_vs_stacked_is_estimate"])),
    ("peak CUDA MiB", lambda r: _mib(r["peak_cuda_bytes"])),
    ("eager s", lambda r: _seconds(r["eager_s"])),
    ("eager /CNN", lambda r: _ratio(r["eager_s_vs_cnn"])),
    ("eager /Stacked", lambda r: _ratio(r["eager_s_vs_stacked"])),
    ("compiled s", lambda r: _seconds(r["compiled_s"])),
    ("compiled /CNN", lambda r: _ratio(r["compiled_s_vs_cnn"])),
    ("note", lambda r: r["note"] or ("" if r["status"] == "ok" else r["status"])),
]


def _human(n) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _mib(n, estimate: bool = False) -> str:
    if n is None:
        return "n/a"
    return f"{'~' if estimate else ''}{n / 2 ** 20:.1f}"


def _ratio(value, estimate: bool = False) -> str:
    if value is None:
        return "n/a"
    text = f"{value:#.4g}" if value < 10 else f"{value:.1f}"
    return ("~" if estimate else "") + text


def _seconds(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _table_cells(rows):
    return [[text(r) for _, text in COLUMNS] for r in rows]


def terminal_table(rows) -> str:
    headers = [h for h, _ in COLUMNS]
    cells = _table_cells(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda values: "  ".join(v.ljust(w) if i in (0, 1, len(values) - 1) else v.rjust(w)
                                    for i, (v, w) in enumerate(zip(values, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


def markdown_table(rows) -> str:
    headers = [h for h, _ in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in _table_cells(rows)]
    return "\n".join(lines)


def markdown_report(result: dict) -> str:
    parts = [f"# Profile: {result['source']}", "",
             f"patch {result['patch']}, batch {result['batch']}, {result['input_channels']} input channel(s), "
             f"{result['num_classes']} classes; device {result['device_name']} ({result['threads']} threads), torch "
             f"{result['torch']}, {result['date']}.", "",
             "Saved MiB: bytes autograd keeps for backward (unique storages, parameters excluded, fp32). "
             "`~`: estimated on fake tensors because the network did not fit at this size. GFLOP: matmul and "
             "convolution FLOPs of one forward+backward (torch.utils.flop_counter). Times: median training step "
             "(forward, deep-supervision cross-entropy, backward, SGD step).", "",
             markdown_table(result["rows"])]
    for table in result["fallback"]:
        parts += ["", f"## All networks at {table[0]['size']} (where a network that did not fit above was measured)",
                  "", markdown_table(table)]
    return "\n".join(parts) + "\n"


CSV_FIELDS = ["table", "key", "name", "size", "status", "params", "flops", "saved_bytes", "saved_is_estimate",
              "peak_cuda_bytes", "peak_cuda_compiled_bytes", "eager_s", "compiled_s", "compile_s"] + \
             [f"{f}_vs_{s}" for s in ("cnn", "stacked") for f in RATIO_FIELDS] + ["note"]


def write_csv(result: dict, path: str):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in result["rows"]:
            writer.writerow({**row, "table": "requested"})
        for table in result["fallback"]:
            for row in table:
                writer.writerow({**row, "table": f"at {row['size']}"})


CHART_METRICS = [("params", "parameters"), ("saved_bytes", "saved activation bytes"),
                 ("eager_s", "eager step time"), ("compiled_s", "compiled step time")]


def write_chart(result: dict, path: str):
    """Bars per network: ratio to the CNN row (log scale) for params, saved bytes and step times.

    Without a CNN row the bars show the absolute values instead.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cnn_rows = [r for r in result["rows"] if r["key"] == "cnn" and r["status"] == "ok"]
    has_cnn = bool(cnn_rows) and len(result["rows"]) > 1
    rows = [r for r in result["rows"] if r["key"] != "cnn"] if has_cnn else result["rows"]
    suffix = "_vs_cnn" if has_cnn else ""
    metrics = [(key + suffix, label) for key, label in CHART_METRICS if any(r[key + suffix] for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4.2 * max(1, len(metrics)), 0.45 * len(rows) + 1.8),
                             sharey=True, squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        values = [r[key] or 0.0 for r in rows]
        bars = ax.barh(range(len(rows)), [v if v > 0 else float("nan") for v in values], color="tab:blue")
        for bar, row in zip(bars, rows):
            if key.startswith("saved_bytes") and row["saved_is_estimate"]:
                bar.set_hatch("//")
        if has_cnn:
            ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{label}\n({'x ' + cnn_rows[0]['name'] if has_cnn else 'absolute'})", fontsize=9)
        for i, v in enumerate(values):
            ax.text(v if v > 0 else 1.0, i, f" {v:.2g}" if v > 0 else " n/a", va="center", fontsize=7)
    axes[0][0].set_yticks(range(len(rows)))
    axes[0][0].set_yticklabels([r["name"] for r in rows], fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"{result['dim']}D, patch {'x'.join(map(str, result['patch']))}, batch {result['batch']} "
                 f"({result['device_name']}); hatched = estimated", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"profile.{ext}") for ext in ("md", "csv", "json", "png")}
    with open(paths["md"], "w") as f:
        f.write(markdown_report(result))
    write_csv(result, paths["csv"])
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=2)
    write_chart(result, paths["png"])
    return paths
