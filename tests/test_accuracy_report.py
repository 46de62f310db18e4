"""benchmarks/accuracy.py report: the aggregate tables read what the runs say (synthetic run records, expected
values recomputed here from the records, not from the report)."""
import importlib.util
import json
import random
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _accuracy_module():
    spec = importlib.util.spec_from_file_location("accuracy", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(trainer, fold, iterations, dice, seconds, task="icbm"):
    return {"task": task, "plans": "nnUNetPlans", "trainer": trainer, "fold": fold, "seed": 0,
            "iterations": iterations, "iterations_per_epoch": 25, "foreground_mean": dice, "dice": {"1": dice},
            "train_seconds": seconds, "parameters": 1000, "threads": 2,
            "curves": {"ema_pseudo_dice": [0.1, dice], "epoch_seconds": [seconds / 2, seconds / 2]}}


def _row(table: str, *cells: str) -> list[str]:
    """The cells of the Markdown row whose leading cells are ``cells``."""
    for line in table.splitlines():
        parts = [p.strip() for p in line.strip("|").split("|")]
        if parts[:len(cells)] == list(cells):
            return parts
    raise AssertionError(f"no row starting with {cells}")


def test_summary_pairs_folds_counts_wins_and_matches_equal_wall_time(tmp_path):
    accuracy = _accuracy_module()
    rng = random.Random(3)
    cnn = {f: rng.uniform(0.6, 0.8) for f in range(3)}
    ka = {f: rng.uniform(0.6, 0.8) for f in range(3)}
    rows = [_run("nnUNetTrainer", f, 2000, cnn[f], 500.0) for f in range(3)]
    rows += [_run("nnUNetTrainer", f, 4000, cnn[f] + 0.01, 1000.0) for f in range(3)]
    rows += [_run("nnUNetTrainerAllUKAN", f, 2000, ka[f], 1100.0) for f in range(3)]
    rows.append(_run("nnUNetTrainerAllUKAN", 4, 2000, 0.9, 1100.0))  # fold without a CNN run: not paired
    resenc = _run("nnUNetTrainer", 0, 2000, 0.5, 100.0)
    resenc.update(plans="nnUNetResEncUNetMPlans", batch_size=6, planned_batch_size=123)
    rows.append(resenc)
    text = accuracy.summary_tables(rows)
    # A run whose batch replaced the planned one is its own setting, never averaged with the planned batch.
    assert _row(text, "icbm", "nnUNetResEncUNetMPlans, batch 6", "2000", "nnUNetTrainer")[4] == "0"

    ka_dice = [ka[f] for f in range(3)] + [0.9]
    row = _row(text, "icbm", "nnUNetPlans", "2000", "nnUNetTrainerAllUKAN")
    assert row[4] == "0,1,2,4"
    assert row[5] == f"**{statistics.mean(ka_dice):.4f}** ± {statistics.stdev(ka_dice):.4f}"
    paired = [ka[f] - cnn[f] for f in range(3)]
    assert row[6] == f"{statistics.mean(paired):+.4f} (n=3)"
    assert row[7] == f"{sum(d > 0 for d in paired)}/3"

    budget_row = _row(text, "icbm", "nnUNetPlans", "1", "0", "nnUNetTrainer")
    assert budget_row[5:7] == [f"{cnn[1]:.4f}", f"{cnn[1] + 0.01:.4f}"]  # 2000 it, 4000 it columns

    # Equal wall time: AllUKAN's 1100 s run meets the CNN's 4000-iteration run (1000 s), not the 2000 one.
    wall = _row(text.split("## Equal wall time")[1], "icbm", "nnUNetPlans", "0", "nnUNetTrainerAllUKAN", "2000")
    assert wall[7:10] == ["4000", "1000", f"{cnn[0] + 0.01:.4f}"]

    # The command writes the same tables and the plots.
    for r in rows:
        tag = f"{r['iterations']}_{r['plans']}_{r.get('batch_size')}"  # as budget_tag: one folder per setting
        path = tmp_path / "runs" / r["task"] / tag / r["trainer"] / f"fold_{r['fold']}_seed0.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    out = tmp_path / "report"
    assert accuracy.main(["report", "--workdir", str(tmp_path), "--out", str(out)]) == 0
    assert (out / "summary.md").read_text() == text
    assert (out / "dice_boxplots.png").stat().st_size > 0 and (out / "learning_curves.png").stat().st_size > 0


def test_resenc_plans_reuse_the_default_plans_preprocessed_data(tmp_path):
    """Preprocessing ResEnc plans again would rewrite the folder that running trainings of the default plans read."""
    accuracy = _accuracy_module()

    def plans(name, identifier):
        (tmp_path / f"{name}.json").write_text(json.dumps({"configurations": {"2d": {"data_identifier": identifier}}}))

    plans("nnUNetPlans", "nnUNetPlans_2d")
    plans("nnUNetResEncUNetMPlans", "nnUNetPlans_2d")
    plans("OtherPlans", "OtherPlans_2d")
    shares = lambda name: accuracy._shares_preprocessed_data(str(tmp_path), name, "nnUNetPlans", "2d")  # noqa: E731
    assert not shares("nnUNetResEncUNetMPlans")  # the default plans' data is not there yet
    (tmp_path / "nnUNetPlans_2d").mkdir()
    (tmp_path / "nnUNetPlans_2d" / "case.pkl").write_bytes(b"")
    assert shares("nnUNetResEncUNetMPlans") and not shares("OtherPlans")
