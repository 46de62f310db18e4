"""Reporting of the accuracy experiments (``python benchmarks/accuracy.py report``): tables, plots and the stored
record of every run, in ``docs/accuracy_results``. Kept apart from the running (accuracy.py) so that each stays
readable; it needs no nnU-Net run, only the run records."""
from __future__ import annotations

import glob
import json
import os
import statistics

from nnunetv2_allukan.tools.crossval import label_order


def run_key(r: dict) -> tuple:
    """What identifies a run across machines: the same key in the stored records and a work folder is one run.
    ``r`` is labelled (``_labelled``), so a run recorded under an old name and its stored copy share the key."""
    return (r["task"], r.get("plans", "nnUNetPlans"), r.get("batch_size"), r["iterations"], r["iterations_per_epoch"],
            r["fold"], r["seed"], r["trainer"])


def _labelled(r: dict) -> dict:
    """``r`` with ``trainer`` set to its ``run_label`` (``trained_as``: the name it ran under, where that differs)."""
    label = run_label(r)
    if label != r["trainer"]:
        r.setdefault("trained_as", r["trainer"])
        r["trainer"] = label
    return r


def collect_records(workdir: str, stored: str | None) -> list[dict]:
    """Every run record: those stored with the report (``runs.json`` from an earlier report, e.g. the committed
    one, possibly made on another machine whose work folder is gone), then the work folder's, which replace a
    stored record of the same run. Each record's ``trainer`` is its ``run_label`` (``trained_as``: the name it ran
    under, where that differs)."""
    records = []
    if stored and os.path.isfile(stored):
        with open(stored) as f:
            records = json.load(f)
    for path in sorted(glob.glob(os.path.join(os.path.abspath(workdir), "runs", "*", "*", "*", "*.json"))):
        with open(path) as f:
            records.append(json.load(f))
    merged = {}
    for r in map(_labelled, records):  # later (work folder) records replace earlier (stored) ones of the same run
        merged[run_key(r)] = r
    return list(merged.values())


def _rounded_curves(curves: dict) -> dict:
    return {k: [round(v, 5) for v in values] for k, values in curves.items()}


def report(args, class_sizes: dict | None = None) -> int:
    """Tables (Markdown), every run's record (JSON, learning curves rounded) and plots. Runs already in
    ``<out>/runs.json`` are kept, so a report made in a fresh work folder adds to the stored results; likewise the
    classes' sizes (``class_sizes``: task -> label -> name and share of the foreground voxels) in
    ``<out>/class_sizes.json``."""
    rows = collect_records(args.workdir, os.path.join(args.out, "runs.json"))
    os.makedirs(args.out, exist_ok=True)
    sizes_file = os.path.join(args.out, "class_sizes.json")
    sizes = {}
    if os.path.isfile(sizes_file):
        with open(sizes_file) as f:
            sizes = json.load(f)
    sizes.update(class_sizes or {})
    if sizes:
        with open(sizes_file, "w") as f:
            json.dump(sizes, f, indent=1, sort_keys=True)
    stored = [{**r, "curves": _rounded_curves(r["curves"])} if r.get("curves") else r for r in rows]
    with open(os.path.join(args.out, "runs.json"), "w") as f:
        json.dump(sorted(stored, key=lambda r: tuple(map(str, run_key(r)))), f, indent=1)
    lines = ["| task | plans | budget (iterations) | fold | seed | trainer | params | foreground Dice | "
             "per class (label 1, 2, ...) | "
             "train s | coef norm first→last | base weight last | clip engaged (last epoch) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], _plans_label(r), r["iterations"], r["fold"],
                                         r["seed"], -r["foreground_mean"])):
        ka = r.get("ka_statistics") or {}
        first, last = ka.get("first") or {}, ka.get("last") or {}
        coef = (f"{first['median_coef_norm']:.3f}→{last['median_coef_norm']:.3f}"
                if first.get("median_coef_norm") is not None else "–")
        base = f"{last['median_base_weight']:.3f}" if last.get("median_base_weight") is not None else "–"
        clip = f"{last['clipped_fraction']:.0%}" if "clipped_fraction" in last else "–"
        per_class = " / ".join(f"{r['dice'][k]:.3f}" for k in sorted(r["dice"], key=label_order))
        lines.append(f"| {r['task']} | {_plans_label(r)} | {r['iterations']} | {r['fold']} | {r['seed']} | "
                     f"{r['trainer']} | {r['parameters'] / 1e6:.2f} M | **{r['foreground_mean']:.4f}** | "
                     f"{per_class} | {r['train_seconds']:.0f} | {coef} | {base} | {clip} |")
    with open(os.path.join(args.out, "runs.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    summary = summary_tables(rows) + screen_tables(rows) + per_class_tables(rows, sizes)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary)
    print("\n".join(lines))
    print(summary)
    for task in sorted({r["task"] for r in rows if r.get("curves")}):  # one file per task: a readable size
        _plot_curves([r for r in rows if r.get("curves") and r["task"] == task],
                     os.path.join(args.out, f"learning_curves_{task}.png"))
    _plot_boxes(rows, os.path.join(args.out, "dice_boxplots.png"))
    return 0


BASELINE = "nnUNetTrainer"  # nnU-Net's CNN: every paired difference is against it
DEFAULT = "nnUNetTrainerAllUKAN"  # the control of the recipe screens
OLD_DEFAULT_RECIPE = " (0.1 recipe)"


def recipe_changed_in_0_2(trainer_name: str) -> bool:
    """True for ALL U-KAN trainers that took the default's recipe without choosing one: before 0.2.0 they trained
    the spline parameters in nnU-Net's single SGD group, since then with their own Adam."""
    from nnunetv2_allukan import trainers
    from nnunetv2_allukan.trainers.nnUNetTrainerAllUKAN import nnUNetTrainerAllUKAN

    cls = getattr(trainers, trainer_name, None)
    if cls is None or not issubclass(cls, nnUNetTrainerAllUKAN) or cls.ka_kwargs.get("activation", "spline") != "spline":
        return False  # not ALL U-KAN, or a fixed activation (no spline parameters: the recipe is nnU-Net's in both)
    own = cls.__mro__[:cls.__mro__.index(nnUNetTrainerAllUKAN)]
    return not any("spline_optimizer" in c.__dict__ or "configure_optimizers" in c.__dict__ for c in own)


# Trainers kept under an old name whose recipe is, since 0.2.0, exactly the default's: reported under the default's
# name, so that their runs and the default's pair up (tests/test_accuracy_report.py checks that they are the same).
SAME_RECIPE_AS = {"nnUNetTrainerAllUKAN_splineAdam": "nnUNetTrainerAllUKAN"}


def run_label(r: dict) -> str:
    """The trainer a run is reported under. Runs recorded before 0.2.0 (no ``spline_optimizer`` in the record) of
    trainers whose recipe changed then are labelled by what they ran: the old default is today's
    ``nnUNetTrainerAllUKAN_splineSGD``, other variants get OLD_DEFAULT_RECIPE appended. Aliases of the default's
    recipe (SAME_RECIPE_AS) get the default's name."""
    name = r.get("trained_as", r["trainer"])
    if name in SAME_RECIPE_AS:
        return SAME_RECIPE_AS[name]
    if "spline_optimizer" in r or not recipe_changed_in_0_2(name):
        return name
    return "nnUNetTrainerAllUKAN_splineSGD" if name == "nnUNetTrainerAllUKAN" else name + OLD_DEFAULT_RECIPE


def _plans_label(r: dict) -> str:
    """The plans, and the batch size when a run replaced the planned one (e.g. 'nnUNetResEncUNetMPlans, batch 6')."""
    plans = r.get("plans", "nnUNetPlans")
    replaced = r.get("batch_size") is not None and r.get("batch_size") != r.get("planned_batch_size", r["batch_size"])
    return f"{plans}, batch {r['batch_size']}" if replaced else plans


def _setting(r: dict) -> tuple:
    return r["task"], _plans_label(r)


def _same_machine(a: dict, b: dict) -> bool:
    """Runs recorded with their machine pair only on the same one; older records (without) pair as before."""
    return "machine" not in a or "machine" not in b or a["machine"]["boot_id"] == b["machine"]["boot_id"]


def summary_tables(rows: list[dict]) -> str:
    """Markdown: (1) mean over folds per trainer, budget and seed, with the paired difference to nnU-Net's CNN on
    the folds both have; (2) seed variance where a fold has several seeds; (3) gap versus budget per fold; (4) equal
    wall time: each run against the CNN run of the same task, fold and seed, at any budget, whose training took
    closest to as long (and not longer)."""
    out = ["## Mean over folds (equal iterations)", "",
           f"One row per seed (seeds are not averaged into the fold mean; see 'Seed variance'). Δ: paired "
           f"difference to `{BASELINE}` on the folds both trainers finished with that seed; wins: folds where the "
           "trainer's foreground Dice is higher.", "",
           "| task | plans | iterations | seed | trainer | folds | foreground Dice mean ± sd | Δ vs CNN (mean) | "
           "wins | train s (mean) |", "|---|---|---|---|---|---|---|---|---|---|"]
    by_key: dict = {}
    for r in rows:
        by_key.setdefault((*_setting(r), r["iterations"], r["seed"], r["trainer"]), []).append(r)
    for key in sorted(by_key, key=lambda k: (*k[:4], k[4] != BASELINE, k[4])):
        runs = sorted(by_key[key], key=lambda r: r["fold"])
        dice = [r["foreground_mean"] for r in runs]
        sd = f" ± {statistics.stdev(dice):.4f}" if len(dice) > 1 else ""
        base = {r["fold"]: r["foreground_mean"] for r in by_key.get((*key[:4], BASELINE), [])}
        paired = [r["foreground_mean"] - base[r["fold"]] for r in runs if r["fold"] in base]
        delta = "–" if key[4] == BASELINE or not paired else f"{statistics.mean(paired):+.4f} (n={len(paired)})"
        wins = "–" if key[4] == BASELINE or not paired else f"{sum(d > 0 for d in paired)}/{len(paired)}"
        folds = ",".join(str(r["fold"]) for r in runs)
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {folds} | "
                   f"**{statistics.mean(dice):.4f}**{sd} | {delta} | {wins} | "
                   f"{statistics.mean(r['train_seconds'] for r in runs):.0f} |")

    out += ["", "## Seed variance (one fold, several seeds)", "",
            "Runs of one trainer, fold and budget with different seeds (the seed fixes the initialisation, the "
            "patch sampling and the augmentation); Δ vs CNN paired by seed.", "",
            "| task | plans | iterations | fold | trainer | Dice per seed | mean ± sd | range | Δ vs CNN per seed |",
            "|---|---|---|---|---|---|---|---|---|"]
    by_fold: dict = {}
    for r in rows:
        by_fold.setdefault((*_setting(r), r["iterations"], r["fold"], r["trainer"]), {})[r["seed"]] = \
            r["foreground_mean"]
    for key in sorted(by_fold, key=lambda k: (*k[:4], k[4] != BASELINE, k[4])):
        seeds = by_fold[key]
        if len(seeds) < 2:
            continue
        values = [seeds[s] for s in sorted(seeds)]
        base = by_fold.get((*key[:4], BASELINE), {})
        deltas = "–" if key[4] == BASELINE else " / ".join(
            f"{seeds[s] - base[s]:+.4f}" if s in base else "–" for s in sorted(seeds))
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | "
                   + " / ".join(f"s{s} {seeds[s]:.4f}" for s in sorted(seeds))
                   + f" | {statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} | "
                     f"{max(values) - min(values):.4f} | {deltas} |")

    budgets = sorted({r["iterations"] for r in rows})
    out += ["", "## Gap versus budget (foreground Dice per fold)", "",
            "| task | plans | fold | seed | trainer | " + " | ".join(f"{b} it" for b in budgets) + " |",
            "|---|---|---|---|---|" + "---|" * len(budgets)]
    cells: dict = {}
    for r in rows:
        cells.setdefault((*_setting(r), r["fold"], r["seed"], r["trainer"]), {})[r["iterations"]] = r["foreground_mean"]
    for key in sorted(cells, key=lambda k: (k[0], k[1], k[2], k[3], k[4] != BASELINE, k[4])):
        values = " | ".join(f"{cells[key][b]:.4f}" if b in cells[key] else "" for b in budgets)
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {values} |")

    out += ["", "## Equal wall time", "",
            f"Each run against the `{BASELINE}` run of the same task, plans, fold and seed (any budget) whose training "
            "took longest without exceeding this run's time, with the same threads and, where both record it, on the "
            "same machine. Wall times are comparable only between runs made under the same conditions (machine load is "
            "not recorded: the runs here ran one at a time).", "",
            "| task | plans | fold | trainer | iterations | train s | Dice | CNN iterations | CNN train s | CNN Dice | "
            "Δ |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (*_setting(r), r["fold"], r["seed"], r["trainer"], r["iterations"])):
        if r["trainer"] == BASELINE:
            continue
        cnn = [c for c in rows if c["trainer"] == BASELINE and _setting(c) == _setting(r) and c["fold"] == r["fold"]
               and c["seed"] == r["seed"] and c.get("threads") == r.get("threads") and _same_machine(c, r)
               and c["train_seconds"] <= r["train_seconds"]]
        if not cnn:
            continue
        c = max(cnn, key=lambda c: c["train_seconds"])
        out.append(f"| {r['task']} | {_setting(r)[1]} | {r['fold']} | {r['trainer']} | {r['iterations']} | "
                   f"{r['train_seconds']:.0f} | {r['foreground_mean']:.4f} | {c['iterations']} | "
                   f"{c['train_seconds']:.0f} | {c['foreground_mean']:.4f} | "
                   f"{r['foreground_mean'] - c['foreground_mean']:+.4f} |")
    return "\n".join(out) + "\n"


def screen_tables(rows: list[dict], min_seeds: int = 2) -> str:
    """Markdown: recipe screens, one table per task, plans, budget and fold in which ``DEFAULT`` and at least one
    other trainer have ``min_seeds`` or more seeds: per trainer the Dice per seed, the difference to ``DEFAULT``
    paired by seed and its mean, the median epoch time relative to ``DEFAULT``'s, and from the last epoch's KA
    statistics the median and largest spline motion (mean over the seeds)."""
    cells: dict = {}
    for r in rows:
        cells.setdefault((*_setting(r), r["iterations"], r["fold"]), {}).setdefault(r["trainer"], {})[r["seed"]] = r
    out = []
    for key in sorted(cells):
        control = cells[key].get(DEFAULT, {})
        others = [t for t in cells[key] if t != DEFAULT and len(cells[key][t]) >= min_seeds]
        if len(control) < min_seeds or not others:
            continue
        if not out:
            out = ["", "## Recipe screens (one fold, several seeds)", "",
                   f"Each trainer against `{DEFAULT}` with the same seed (same initialisation stream, patches and "
                   "augmentation), same task, plans, budget and fold. Δ: per seed and mean; time: median epoch time "
                   f"over `{DEFAULT}`'s, per seed, median over the seeds (runs on the same machine and thread count "
                   "only); spline moved: max over the grid of |S(x) − S₀(x)| at the last "
                   "epoch, median over the KA layers and the largest layer's, mean over the seeds.", ""]
        out += [f"**{key[0]}, {key[1]}, {key[2]} iterations, fold {key[3]}**", "",
                "| trainer | seeds | Dice per seed | mean | Δ vs default per seed | mean Δ | time | spline moved "
                "(median / largest) |", "|---|---|---|---|---|---|---|---|"]
        for trainer in [DEFAULT, BASELINE] + sorted(t for t in others if t != BASELINE):
            runs = cells[key].get(trainer, {})
            if not runs:
                continue
            seeds = sorted(runs)
            dice = [runs[s]["foreground_mean"] for s in seeds]
            paired = [runs[s]["foreground_mean"] - control[s]["foreground_mean"] for s in seeds if s in control]
            last = [(r.get("ka_statistics") or {}).get("last") or {} for r in runs.values()]
            moved = [(x["median_spline_change"], x["max_spline_change"]) for x in last
                     if x.get("median_spline_change") is not None]
            motion = (f"{statistics.mean(m[0] for m in moved):.3f} / {statistics.mean(m[1] for m in moved):.3f}"
                      if moved else "–")
            ratios = [runs[s]["median_epoch_seconds"] / control[s]["median_epoch_seconds"] for s in seeds
                      if s in control and _same_machine(runs[s], control[s])
                      and runs[s].get("threads") == control[s].get("threads")]
            time = f"{statistics.median(ratios):.2f}×" if ratios else "–"
            delta = "–" if trainer == DEFAULT else " / ".join(
                f"{runs[s]['foreground_mean'] - control[s]['foreground_mean']:+.4f}" if s in control else "–"
                for s in seeds)
            mean_delta = "–" if trainer == DEFAULT or not paired else f"**{statistics.mean(paired):+.4f}**"
            out.append(f"| {trainer} | {','.join(map(str, seeds))} | {' / '.join(f'{d:.4f}' for d in dice)} | "
                       f"{statistics.mean(dice):.4f} | {delta} | {mean_delta} | {time} | {motion} |")
        out.append("")
    return "\n".join(out) + "\n" if out else ""


def _spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(a, b).statistic)


def per_class_tables(rows: list[dict], sizes: dict, min_folds: int = 3) -> str:
    """Markdown: for tasks with more than two foreground classes, per class and trainer the mean Dice over the
    folds whose held-out reference contains the class (``classes_present``), paired with nnU-Net's CNN on the same
    folds, and the class's share of the task's foreground voxels where ``sizes`` knows it; per trainer the Spearman
    rank correlation between that share and the difference to the CNN. Only trainers with ``min_folds`` folds
    paired with the CNN (fewer folds leave most classes on one or two folds)."""
    out = ["", "## Per class (tasks with more than two foreground classes)", "",
           f"Mean Dice of each class over the folds whose held-out reference contains it, for trainers with at least "
           f"{min_folds} folds paired with `{BASELINE}` (same task, plans, budget and seed); size: the class's share "
           "of the task's foreground voxels (all labelled cases); ρ: Spearman rank correlation of size and Δ over "
           "the classes.", ""]
    groups: dict = {}
    for r in rows:
        if len(r["dice"]) > 2 and r.get("classes_present") is not None:
            groups.setdefault((*_setting(r), r["iterations"], r["seed"]), {}).setdefault(r["trainer"], {})[
                r["fold"]] = r
    any_table = False
    for key in sorted(groups):
        cnn = groups[key].get(BASELINE, {})
        task_sizes = sizes.get(key[0], {})
        for trainer in sorted(t for t in groups[key] if t != BASELINE):
            folds = sorted(set(cnn) & set(groups[key][trainer]))
            if len(folds) < min_folds:
                continue
            any_table = True
            out += [f"**{key[0]}, {key[1]}, {key[2]} iterations, seed {key[3]}: {trainer} against {BASELINE}, "
                    f"folds {','.join(map(str, folds))}**", "",
                    "| class | size | folds present | CNN | " + trainer + " | Δ |", "|---|---|---|---|---|---|"]
            labels = sorted({k for f in folds for k in cnn[f]["classes_present"]}, key=label_order)
            deltas, shares = [], []
            for k in labels:
                present = [f for f in folds if k in cnn[f]["classes_present"]]
                a = statistics.mean(cnn[f]["dice"][k] for f in present)
                b = statistics.mean(groups[key][trainer][f]["dice"][k] for f in present)
                info = task_sizes.get(k, {})
                share = info.get("share")
                if share is not None:
                    deltas.append(b - a)
                    shares.append(share)
                out.append(f"| {info.get('name', k)} | {'–' if share is None else f'{share:.1%}'} | {len(present)} | "
                           f"{a:.3f} | {b:.3f} | {b - a:+.3f} |")
            if len(deltas) >= 3:
                out += ["", f"ρ(size, Δ) = {_spearman(shares, deltas):+.2f} over {len(deltas)} classes."]
            out.append("")
    return "\n".join(out) + "\n" if any_table else ""


def _plot_boxes(rows, path):
    """Per-fold foreground Dice per trainer, one panel per task x plans x budget with at least two folds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(*_setting(r), r["iterations"]) for r in rows})
    panels = [p for p in panels if len({r["fold"] for r in rows if (*_setting(r), r["iterations"]) == p}) > 1]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for panel, ax in zip(panels, axes[0]):
        runs = [r for r in rows if (*_setting(r), r["iterations"]) == panel]
        trainers = sorted({r["trainer"] for r in runs}, key=lambda t: (t != BASELINE, t))
        data = [[r["foreground_mean"] for r in runs if r["trainer"] == t] for t in trainers]
        ax.boxplot(data)
        for i, values in enumerate(data, start=1):
            ax.scatter([i] * len(values), values, s=12, zorder=3)
        ax.set_xticks(range(1, len(trainers) + 1),
                      [t.replace("nnUNetTrainer", "").lstrip("_") or "CNN" for t in trainers], rotation=30,
                      ha="right", fontsize=7)
        ax.set(title=f"{panel[0]} ({panel[1]}), {panel[2]} iterations", ylabel="foreground Dice per fold")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _plot_curves(rows, path):
    """nnU-Net's EMA pseudo-Dice per epoch, against iterations and wall time; one row of panels per plans x budget
    x fold of the task(s) in ``rows``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def group(r):
        return r["task"], _plans_label(r), r["iterations"], r["fold"]

    groups = sorted({group(r) for r in rows})
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 3.2 * len(groups)), squeeze=False)
    for (task, plans, iters, fold), (ax_it, ax_time) in zip(groups, axes):
        for r in rows:
            if group(r) != (task, plans, iters, fold):
                continue
            dice = r["curves"]["ema_pseudo_dice"]
            epochs = range(1, len(dice) + 1)
            elapsed = [sum(r["curves"]["epoch_seconds"][:i]) for i in epochs]
            label = f"{r['trainer']} s{r['seed']}"
            ax_it.plot([e * r["iterations_per_epoch"] for e in epochs], dice, label=label)
            ax_time.plot(elapsed, dice, label=label)
        ax_it.set(title=f"{task} ({plans}), fold {fold}, {iters} iterations", xlabel="iteration",
                  ylabel="EMA pseudo-Dice (nnU-Net)")
        ax_time.set(title="same, against training wall time", xlabel="seconds")
        ax_it.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
