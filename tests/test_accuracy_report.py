"""benchmarks/accuracy.py report: the aggregate tables read what the runs say (synthetic run records, expected
values recomputed here from the records, not from the report)."""
import importlib.util
import json
import math
import random
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _accuracy_module():
    return _load("accuracy")


def _report_module():
    return _load("accuracy_report")


def _run(trainer, fold, iterations, dice, seconds, task="icbm"):
    return {"task": task, "plans": "nnUNetPlans", "trainer": trainer, "fold": fold, "seed": 0,
            "iterations": iterations, "iterations_per_epoch": 25, "foreground_mean": dice, "dice": {"1": dice},
            "train_seconds": seconds, "parameters": 1000, "threads": 2,
            "spline_optimizer": "shared" if trainer == "nnUNetTrainer" else "adam",  # a record of 0.2.0 or later
            "curves": {"ema_pseudo_dice": [0.1, dice], "epoch_seconds": [seconds / 2, seconds / 2]}}


def _row(table: str, *cells: str) -> list[str]:
    """The cells of the Markdown row whose leading cells are ``cells``."""
    for line in table.splitlines():
        parts = [p.strip() for p in line.strip("|").split("|")]
        if parts[:len(cells)] == list(cells):
            return parts
    raise AssertionError(f"no row starting with {cells}")


def test_summary_pairs_folds_counts_wins_and_matches_equal_wall_time(tmp_path):
    accuracy, reporting = _accuracy_module(), _report_module()
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
    text = reporting.summary_tables(rows)
    # A run whose batch replaced the planned one is its own setting, never averaged with the planned batch.
    assert _row(text, "icbm", "nnUNetResEncUNetMPlans, batch 6", "2000", "0", "nnUNetTrainer")[5] == "0"

    ka_dice = [ka[f] for f in range(3)] + [0.9]
    row = _row(text, "icbm", "nnUNetPlans", "2000", "0", "nnUNetTrainerAllUKAN")
    assert row[5] == "0,1,2,4"
    assert row[6] == f"**{statistics.mean(ka_dice):.4f}** ± {statistics.stdev(ka_dice):.4f}"
    paired = [ka[f] - cnn[f] for f in range(3)]
    assert row[7] == f"{statistics.mean(paired):+.4f} (n=3)"
    assert row[8] == f"{sum(d > 0 for d in paired)}/3"
    # A second seed of fold 1 is its own row, never averaged into seed 0's fold mean, and shows in the seed table.
    seeded = rows + [dict(_run("nnUNetTrainer", 1, 2000, 0.5, 500.0), seed=1),
                     dict(_run("nnUNetTrainerAllUKAN_splineAdam", 1, 2000, 0.55, 1100.0), seed=1)]
    seeded_text = reporting.summary_tables([dict(r, trainer=reporting.run_label(r)) for r in seeded])
    assert _row(seeded_text, "icbm", "nnUNetPlans", "2000", "0", "nnUNetTrainerAllUKAN")[5:7] == row[5:7]
    assert _row(seeded_text, "icbm", "nnUNetPlans", "2000", "1", "nnUNetTrainerAllUKAN")[5:8] == \
        ["1", "**0.5500**", "+0.0500 (n=1)"]
    seeds = _row(seeded_text.split("## Seed variance")[1], "icbm", "nnUNetPlans", "2000", "1", "nnUNetTrainerAllUKAN")
    assert seeds[5] == f"s0 {ka[1]:.4f} / s1 0.5500"
    assert seeds[6] == f"{statistics.mean([ka[1], 0.55]):.4f} ± {statistics.stdev([ka[1], 0.55]):.4f}"
    assert seeds[8] == f"{ka[1] - cnn[1]:+.4f} / +0.0500"

    budget_row = _row(text.split("## Gap versus budget")[1], "icbm", "nnUNetPlans", "1", "0", "nnUNetTrainer")
    assert budget_row[5:7] == [f"{cnn[1]:.4f}", f"{cnn[1] + 0.01:.4f}"]  # 2000 it, 4000 it columns

    # Equal wall time: AllUKAN's 1100 s run meets the CNN's 4000-iteration run (1000 s), not the 2000 one.
    wall = _row(text.split("## Equal wall time")[1], "icbm", "nnUNetPlans", "0", "nnUNetTrainerAllUKAN", "2000")
    assert wall[7:10] == ["4000", "1000", f"{cnn[0] + 0.01:.4f}"]
    # A CNN run of another machine is not a wall-time match (machines differ in speed); older records pair as before.
    here, there = ({"boot_id": b, "host": "vm", "cpu": "x", "cores": 2} for b in ("a", "b"))
    on_machines = [dict(r, machine=there if (r["trainer"], r["iterations"]) == ("nnUNetTrainer", 4000) else here)
                   for r in rows]
    wall = _row(reporting.summary_tables(on_machines).split("## Equal wall time")[1], "icbm", "nnUNetPlans", "0",
                "nnUNetTrainerAllUKAN", "2000")
    assert wall[7:10] == ["2000", "500", f"{cnn[0]:.4f}"]

    # The command writes the same tables and the plots.
    for r in rows:
        tag = f"{r['iterations']}_{r['plans']}_{r.get('batch_size')}"  # as budget_tag: one folder per setting
        path = tmp_path / "runs" / r["task"] / tag / r["trainer"] / f"fold_{r['fold']}_seed0.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    out = tmp_path / "report"
    assert accuracy.main(["report", "--workdir", str(tmp_path), "--out", str(out)]) == 0
    assert (out / "summary.md").read_text() == text
    assert (out / "dice_boxplots.png").stat().st_size > 0 and (out / "learning_curves_icbm.png").stat().st_size > 0


def _summary(per_case: list[dict]) -> dict:
    """nnU-Net's validation summary.json for cases given as {label: (tp, fp, fn)}, with nnU-Net's per-case Dice
    (NaN where tp + fp + fn = 0) and per-class means over the cases where it is defined."""
    def dice(tp, fp, fn):
        return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")

    cases = [{"metrics": {k: {"Dice": dice(*c[k]), "n_ref": c[k][0] + c[k][2], "n_pred": c[k][0] + c[k][1]}
                          for k in c}} for c in per_case]
    mean = {}
    for k in per_case[0]:
        values = [c["metrics"][k]["Dice"] for c in cases if not math.isnan(c["metrics"][k]["Dice"])]
        mean[k] = {"Dice": statistics.mean(values) if values else float("nan")}
    return {"metric_per_case": cases, "mean": mean,
            "foreground_mean": {"Dice": statistics.mean(v["Dice"] for v in mean.values())}}


def test_fold_dice_averages_the_classes_present_in_the_fold_and_lists_stray_predictions():
    """A slab without some structures: nnU-Net's foreground_mean is NaN (or 0 for a stray voxel) there."""
    accuracy = _accuracy_module()
    # label 1 present; 2 absent and never predicted (NaN); 3 absent but one stray voxel predicted (0); 4 present.
    summary = _summary([{"1": (8, 2, 0), "2": (0, 0, 0), "3": (0, 1, 0), "4": (3, 0, 3)},
                        {"1": (5, 0, 5), "2": (0, 0, 0), "3": (0, 0, 0), "4": (0, 0, 0)}])
    fields = accuracy.fold_dice(summary)
    assert math.isnan(fields["nnunet_foreground_mean"])
    assert fields["classes_present"] == ["1", "4"] and fields["absent_classes_predicted"] == ["3"]
    expected = statistics.mean([statistics.mean([16 / 18, 10 / 15]), 6 / 9])
    assert fields["foreground_mean"] == pytest.approx(expected)
    assert fields["dice"]["3"] == 0.0


def test_rescore_rewrites_old_records_from_the_validation_summaries(tmp_path):
    accuracy = _accuracy_module()
    summary = _summary([{"1": (8, 2, 0), "2": (0, 0, 0)}])
    folder = (tmp_path / "results" / "e80x25_seed1" / accuracy.TASKS["parcellation"]["name"]
              / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0" / "validation")
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    old = _run("nnUNetTrainer", 0, 2000, float("nan"), 100.0, task="parcellation")
    old.update(seed=1, dice={"1": 16 / 18, "2": float("nan")})
    del old["plans"]  # early records did not name the plans: nnU-Net's default
    record = tmp_path / "runs" / "parcellation" / "e80x25" / "nnUNetTrainer" / "fold_0_seed1.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps(old))
    other = dict(old, trainer="nnUNetTrainer", fold=0, dice={"1": 0.5, "2": float("nan")})
    other_record = tmp_path / "runs" / "parcellation" / "e20x25" / "nnUNetTrainer" / "fold_0_seed1.json"
    other_record.parent.mkdir(parents=True)
    other_record.write_text(json.dumps(other))
    (tmp_path / "results" / "e20x25_seed1").symlink_to(tmp_path / "results" / "e80x25_seed1")
    assert accuracy.main(["rescore", "--workdir", str(tmp_path)]) == 0
    new = json.loads(record.read_text())
    assert new["foreground_mean"] == pytest.approx(16 / 18) and new["classes_present"] == ["1"]
    assert new["train_seconds"] == 100.0  # the rest of the record is kept
    # a record whose folder now holds another run's summary (different per-class Dice) is left alone
    assert math.isnan(json.loads(other_record.read_text())["foreground_mean"])


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


def test_each_seed_trains_into_its_own_results_root():
    """Seed 1 of a budget must not overwrite seed 0's checkpoints (spline-motion reads them afterwards)."""
    accuracy = _accuracy_module()
    roots = {accuracy.results_root("/w", "e80x25", s) for s in (0, 1, 2)}
    assert len(roots) == 3 and accuracy.results_root("/w", "e80x25", 0) == "/w/results/e80x25"


@pytest.mark.e2e
def test_a_cut_run_resumes_from_its_latest_checkpoint(nnunet, monkeypatch):
    """A session that ends mid-run leaves checkpoint_latest.pth; the next ``train_one`` continues from it."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2_allukan.trainers import nnUNetTrainerAllUKAN

    accuracy = _accuracy_module()
    for k, v in nnunet["env"].items():
        if k.startswith("nnUNet_"):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_results", str(nnunet["root"] / "results_resume"))
    pre = Path(nnunet["env"]["nnUNet_preprocessed"]) / "Dataset990_KATest2D"

    def trainer(epochs):
        plans = {**load_json(str(pre / "nnUNetPlans.json")), "continue_training": False}
        t = nnUNetTrainerAllUKAN(plans, "2d", 0, load_json(str(pre / "dataset.json")), device=torch.device("cpu"))
        t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch, t.save_every = epochs, 2, 1, 1
        return t

    first = trainer(2)
    assert accuracy.resume_cut_run(first) is None  # nothing there: a fresh start
    first.run_training()
    out = Path(first.output_folder)
    assert (out / "checkpoint_final.pth").is_file() and not (out / "checkpoint_latest.pth").exists()
    assert accuracy.resume_cut_run(trainer(3)) is None  # a finished run is not resumed
    # Cut it: a run stopped after 2 of 3 epochs has only its latest checkpoint.
    (out / "checkpoint_final.pth").rename(out / "checkpoint_latest.pth")
    cut_weights = torch.load(out / "checkpoint_latest.pth", weights_only=False)["network_weights"]
    second = trainer(3)
    assert accuracy.resume_cut_run(second) == 2
    assert all(torch.equal(v, cut_weights[k]) for k, v in second.network.state_dict().items())
    second.run_training()  # trains epoch 2 only
    log = second.logger.my_fantastic_logging if hasattr(second.logger, "my_fantastic_logging") else \
        second.logger.local_logger.my_fantastic_logging
    assert len(log["epoch_end_timestamps"]) == 3 and len(log["train_losses"]) == 3
    moved = [k for k, v in second.network.state_dict().items() if not torch.equal(v, cut_weights[k])]
    assert moved  # it trained on from the checkpoint


def test_runs_of_the_old_default_recipe_are_reported_by_what_they_ran():
    """Records from before 0.2.0 have no spline_optimizer: an ALL U-KAN trainer that took the default's recipe then
    trained its splines in nnU-Net's SGD group, so its rows must not pass for today's default (Adam splines)."""
    reporting = _report_module()
    old = {"trainer": "nnUNetTrainerAllUKAN"}
    assert reporting.run_label(old) == "nnUNetTrainerAllUKAN_splineSGD"
    assert reporting.run_label({**old, "spline_optimizer": "adam"}) == "nnUNetTrainerAllUKAN"
    assert reporting.run_label({"trainer": "nnUNetTrainerAllUKAN_noTokens"}) == \
        "nnUNetTrainerAllUKAN_noTokens" + reporting.OLD_DEFAULT_RECIPE
    # trainers that chose their recipe, fixed activations (no splines) and the comparators keep their names
    for name in ("nnUNetTrainerAllUKAN_noTokensSplineAdam",
                 "nnUNetTrainerAllUKAN_splineWarmup", "nnUNetTrainerAllUKAN_AdamCosine",
                 "nnUNetTrainerAllUKAN_fixedSiLU", "nnUNetTrainerUKAN", "nnUNetTrainer"):
        assert reporting.run_label({"trainer": name}) == name


def test_report_keeps_the_stored_runs_and_lets_the_work_folder_replace_the_same_run(tmp_path):
    """A report made in a fresh work folder (another machine, the old one gone) must add to the committed
    runs.json, not replace it; a run present in both is the work folder's (its record is the newer)."""
    accuracy = _accuracy_module()
    out = tmp_path / "report"
    out.mkdir()
    stored_cnn = _run("nnUNetTrainer", 0, 2000, 0.70, 500.0)
    old_default = _run("nnUNetTrainerAllUKAN", 0, 2000, 0.60, 1000.0)
    del old_default["spline_optimizer"], old_default["curves"]  # stored by a 0.1 report: relabelled, no curves
    old_default["trainer"] = "nnUNetTrainerAllUKAN_splineSGD"
    (out / "runs.json").write_text(json.dumps([stored_cnn, old_default]))

    workdir = tmp_path / "fresh"
    rerun_cnn = _run("nnUNetTrainer", 0, 2000, 0.72, 480.0)
    new_default = _run("nnUNetTrainerAllUKAN", 0, 2000, 0.75, 1100.0)
    alias_fold1 = _run("nnUNetTrainerAllUKAN_splineAdam", 1, 2000, 0.65, 1100.0)
    del alias_fold1["spline_optimizer"]  # recorded before 0.2.0, under the name the default's recipe had then
    for r in (rerun_cnn, new_default, alias_fold1):
        path = workdir / "runs" / "icbm" / "e80x25" / r["trainer"] / f"fold_{r['fold']}_seed0.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(r))
    assert accuracy.main(["report", "--workdir", str(workdir), "--out", str(out)]) == 0
    stored = json.loads((out / "runs.json").read_text())
    alias = [r for r in stored if r["fold"] == 1]
    assert len(alias) == 1 and alias[0]["trainer"] == "nnUNetTrainerAllUKAN" \
        and alias[0]["trained_as"] == "nnUNetTrainerAllUKAN_splineAdam"
    runs = {r["trainer"]: r for r in stored if r["fold"] == 0}
    assert sorted(runs) == ["nnUNetTrainer", "nnUNetTrainerAllUKAN", "nnUNetTrainerAllUKAN_splineSGD"]
    assert runs["nnUNetTrainer"]["foreground_mean"] == 0.72  # the work folder's record of the same run
    assert runs["nnUNetTrainerAllUKAN_splineSGD"]["foreground_mean"] == 0.60  # kept, not re-labelled twice
    assert runs["nnUNetTrainerAllUKAN"]["curves"]["ema_pseudo_dice"] == [0.1, 0.75]  # curves are stored
    summary = (out / "summary.md").read_text()
    assert _row(summary, "icbm", "nnUNetPlans", "2000", "0", "nnUNetTrainerAllUKAN_splineSGD")[7] == "-0.1200 (n=1)"

    # Again from an empty work folder: nothing is lost, nothing changes.
    before = (out / "runs.json").read_text()
    assert accuracy.main(["report", "--workdir", str(tmp_path / "empty"), "--out", str(out)]) == 0
    assert (out / "runs.json").read_text() == before and (out / "summary.md").read_text() == summary


def test_a_trainer_reported_under_the_defaults_name_has_exactly_the_defaults_recipe():
    """SAME_RECIPE_AS pools an old name's runs with the default's: wrong the moment either recipe changes."""
    from nnunetv2_allukan import trainers

    reporting = _report_module()
    for alias, default in reporting.SAME_RECIPE_AS.items():
        a, d = getattr(trainers, alias), getattr(trainers, default)
        assert a.__mro__[1] is d  # a direct subclass: nothing in between that could change the recipe
        own = {k: v for k, v in vars(a).items() if not k.startswith("__")}
        for k, v in own.items():  # whatever it sets, it sets to the default's value; it overrides no method
            assert not callable(v) and getattr(d, k) == v, k
        assert reporting.run_label({"trainer": alias}) == default


def _case(name, **per_class):
    """A metric_per_case entry of nnU-Net's summary.json: per class (n_ref, n_pred, Dice)."""
    return {"reference_file": f"/gt/{name}.nii.gz", "prediction_file": f"/pred/{name}.nii.gz",
            "metrics": {k[1:]: {"n_ref": r, "n_pred": p, "Dice": d} for k, (r, p, d) in per_class.items()}}


def test_false_positive_counts_per_fold_are_counted_from_the_cases():
    pp = _load("accuracy_postprocessing")
    nan = float("nan")
    summary = {"metric_per_case": [
        # fold 0: class 1 everywhere, class 2 only in case a; case b predicts class 2 (stray, class present in
        # the fold), case a predicts class 3, absent from the whole fold
        _case("a", c1=(10, 12, 0.8), c2=(5, 5, 0.6), c3=(0, 4, 0.0)),
        _case("b", c1=(8, 8, 0.5), c2=(0, 7, 0.0), c3=(0, 0, nan)),
        # fold 1: nothing stray; class 2 neither in the reference nor predicted (Dice undefined, not counted)
        _case("c", c1=(9, 9, 0.9), c2=(0, 0, nan), c3=(3, 3, 0.7)),
    ]}
    counts = pp.false_positive_counts(summary, {0: {"a.nii.gz", "b.nii.gz"}, 1: {"c.nii.gz"}})
    assert counts["0"]["absent_classes_predicted"] == ["3"]
    assert counts["0"]["stray_case_classes"] == 2 and counts["0"]["stray_voxels"] == 4 + 7
    # present in fold 0: classes 1 and 2; class 2's Dice is the mean over the cases where it is defined (a and b)
    assert counts["0"]["foreground_mean"] == pytest.approx(((0.8 + 0.5) / 2 + (0.6 + 0.0) / 2) / 2)
    assert counts["1"] == {"cases": 1, "foreground_mean": pytest.approx(0.8), "absent_classes_predicted": [],
                           "stray_case_classes": 0, "stray_voxels": 0}
    with pytest.raises(ValueError, match="without a prediction"):
        pp.false_positive_counts(summary, {2: {"d.nii.gz"}})


def test_postprocessing_asks_for_the_missing_fold_and_writes_nothing(tmp_path, capsys):
    accuracy = _accuracy_module()
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="fold 3 has no finished validation.*accuracy.py run --task parcellation"):
        accuracy.main(["postprocessing", "--task", "parcellation", "--trainers", "nnUNetTrainer", "--folds", "3",
                       "--epochs", "80", "--workdir", str(tmp_path), "--out", str(out)])
    assert not out.exists()


def _parcellation_run(trainer, fold, dice, present):
    r = _run(trainer, fold, 2000, 0.0, 100.0, task="parcellation")
    r.update(dice={str(k): v for k, v in dice.items()}, classes_present=[str(k) for k in present])
    return r


def test_per_class_table_averages_each_class_over_the_folds_that_contain_it():
    report = _report_module()
    cnn, ka = "nnUNetTrainer", "nnUNetTrainerAllUKAN"
    # class 3 is absent from fold 2: its Dice there (0.0, stray voxels) must not enter either mean
    rows = [_parcellation_run(cnn, 0, {1: 0.5, 2: 0.4, 3: 0.2}, [1, 2, 3]),
            _parcellation_run(ka, 0, {1: 0.6, 2: 0.3, 3: 0.4}, [1, 2, 3]),
            _parcellation_run(cnn, 1, {1: 0.7, 2: 0.2, 3: 0.6}, [1, 2, 3]),
            _parcellation_run(ka, 1, {1: 0.7, 2: 0.5, 3: 0.5}, [1, 2, 3]),
            _parcellation_run(cnn, 2, {1: 0.9, 2: 0.6, 3: 0.0}, [1, 2]),
            _parcellation_run(ka, 2, {1: 0.85, 2: 0.6, 3: 0.0}, [1, 2])]
    sizes = {"parcellation": {"1": {"name": "big", "share": 0.6}, "2": {"name": "mid", "share": 0.3},
                              "3": {"name": "small", "share": 0.1}}}
    table = report.per_class_tables(rows, sizes)
    assert _row(table, "big") == ["big", "60.0%", "3", "0.700", "0.717", "+0.017"]
    assert _row(table, "small")[2:] == ["2", "0.400", "0.450", "+0.050"]
    # deltas: big +0.017, mid +0.067, small +0.05: ranks of size 3,2,1 against ranks of delta 1,3,2
    assert "ρ(size, Δ) = -0.50 over 3 classes" in table
    # fewer folds than asked for: no table
    assert report.per_class_tables(rows, sizes, min_folds=4) == ""


def test_class_sizes_are_the_shares_of_the_labelled_foreground(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    import numpy as np
    accuracy = _accuracy_module()
    folder = tmp_path / "raw" / accuracy.TASKS["parcellation"]["name"]
    (folder / "labelsTr").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2, "never": 3},
                                                     "file_ending": ".nii.gz"}))
    for name, data in (("c1", [[0, 1], [1, 2]]), ("c2", [[1, 1], [0, 0]])):
        nibabel.save(nibabel.Nifti1Image(np.array(data, dtype=np.uint8)[..., None], np.eye(4)),
                     str(folder / "labelsTr" / f"{name}.nii.gz"))
    sizes = accuracy.class_sizes(str(tmp_path))
    assert set(sizes) == {"parcellation"}
    assert sizes["parcellation"] == {"1": {"name": "a", "share": 0.8}, "2": {"name": "b", "share": 0.2},
                                     "3": {"name": "never", "share": 0.0}}


def _statistics_line(epoch, changes, fidelity=None):
    layers = {f"layer{i}": {"coef_norm": 1.0 + i, "base_weight": 1.0, "max_spline_slope": 0.1, "outside_grid": 0.01,
                            "spline_change": c, "base_weight_change": c / 2} for i, c in enumerate(changes)}
    entry = {"epoch": epoch, "layers": layers,
             "grad_norm": {"mean": 1.0, "clipped_fraction": 0.0, "share_of_squared_norm": {"weight": 1.0}}}
    if fidelity is not None:
        entry["gradient_fidelity"] = {"overall": fidelity, "per_layer": {}}
    return entry


def test_rescore_refreshes_the_ka_statistics_from_the_fold_folder(tmp_path):
    accuracy = _accuracy_module()
    fold = (tmp_path / "results" / "e20x25" / accuracy.TASKS["icbm"]["name"] / "nnUNetTrainerAllUKAN__nnUNetPlans__2d"
            / "fold_1")
    (fold / "validation").mkdir(parents=True)
    (fold / "validation" / "summary.json").write_text(json.dumps(_summary([{"1": (8, 2, 0), "2": (5, 0, 0)}])))
    lines = [_statistics_line(0, [0.0, 0.0, 0.0], fidelity=0.99), _statistics_line(19, [0.3, 0.1, 0.05])]
    (fold / "ka_statistics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    record = tmp_path / "runs" / "icbm" / "e20x25" / "nnUNetTrainerAllUKAN" / "fold_1_seed0.json"
    record.parent.mkdir(parents=True)
    old = _run("nnUNetTrainerAllUKAN", 1, 500, 0.8, 100.0)
    old.update(accuracy.fold_dice(_summary([{"1": (8, 2, 0), "2": (5, 0, 0)}])),
               ka_statistics={"first": {"epoch": 0}, "last": {"epoch": 19}})  # written before the new fields
    record.write_text(json.dumps(old))
    assert accuracy.main(["rescore", "--workdir", str(tmp_path)]) == 0
    stats = json.loads(record.read_text())["ka_statistics"]
    assert stats["last"]["median_spline_change"] == pytest.approx(0.1)
    assert stats["last"]["max_spline_change"] == pytest.approx(0.3)
    assert stats["last"]["median_base_weight_change"] == pytest.approx(0.05)
    assert stats["first"]["fidelity_overall"] == 0.99 and stats["last"]["fidelity_overall"] is None


def test_screen_table_pairs_each_variant_with_the_default_by_seed():
    report = _report_module()

    def run(trainer, seed, dice, epoch_seconds, moved=None):
        r = _run(trainer, 1, 500, dice, 100.0)
        r.update(seed=seed, median_epoch_seconds=epoch_seconds, machine={"boot_id": "a"})
        if moved is not None:
            r["ka_statistics"] = {"last": {"median_spline_change": moved[0], "max_spline_change": moved[1]}}
        return r

    rows = [run("nnUNetTrainerAllUKAN", 0, 0.70, 6.0, (0.02, 0.2)), run("nnUNetTrainerAllUKAN", 1, 0.74, 6.0, (0.04, 0.4)),
            run("nnUNetTrainerAllUKAN_grid8", 0, 0.73, 6.6, (0.1, 0.5)), run("nnUNetTrainerAllUKAN_grid8", 1, 0.73, 7.2),
            run("nnUNetTrainerAllUKAN_grid3", 0, 0.69, 5.0),  # one seed only: not a screen row
            run("nnUNetTrainer", 0, 0.72, 3.0), run("nnUNetTrainer", 1, 0.76, 3.0)]
    table = report.screen_tables(rows)
    assert _row(table, "nnUNetTrainerAllUKAN_grid8") == [
        "nnUNetTrainerAllUKAN_grid8", "0,1", "0.7300 / 0.7300", "0.7300", "+0.0300 / -0.0100", "**+0.0100**",
        "1.15×", "0.100 / 0.500"]
    assert _row(table, "nnUNetTrainerAllUKAN")[-1] == "0.030 / 0.300"
    assert _row(table, "nnUNetTrainer")[4:7] == ["+0.0200 / +0.0200", "**+0.0200**", "0.50×"]
    assert "grid3" not in table
    assert report.screen_tables([r for r in rows if r["seed"] == 0]) == ""  # one seed everywhere: no screen


def test_postprocessing_record_and_table_name_the_steps_and_count_before_and_after(tmp_path):
    pp = _load("accuracy_postprocessing")
    before = {"metric_per_case": [_case("a", c1=(10, 12, 0.8), c2=(0, 6, 0.0)), _case("b", c1=(8, 8, 0.5), c2=(4, 4, 1.0))]}
    after = {"metric_per_case": [_case("a", c1=(10, 10, 0.9), c2=(0, 6, 0.0)), _case("b", c1=(8, 8, 0.5), c2=(4, 4, 1.0))]}
    (tmp_path / "postprocessed").mkdir()
    (tmp_path / "summary.json").write_text(json.dumps(before))
    (tmp_path / "postprocessed" / "summary.json").write_text(json.dumps(after))
    for labels, steps, expected in (
            ({"background": 0, "gm": 1, "wm": 2},
             [[1, 2], 1], "largest component of: the whole foreground; gm"),
            # regions (regions_class_order): a region step is named, not taken for the whole foreground
            ({"background": 0, "brain": [1, 2], "wm": [2]}, [[1, 2]], "largest component of: brain")):
        (tmp_path / "postprocessing.json").write_text(json.dumps({
            "postprocessing_fns": ["remove_all_but_largest_component_from_segmentation"] * len(steps),
            "postprocessing_kwargs": [{"labels_or_regions": s} for s in steps]}))
        record = pp.trainer_record(str(tmp_path), {0: {"a.nii.gz", "b.nii.gz"}})
        assert record["before"]["0"]["stray_case_classes"] == 1 and record["after"]["0"]["stray_voxels"] == 6
        table = pp.markdown({"task": "t", "budget": "e1x1", "folds": [0], "seed": 0, "command": "c",
                             "labels": {k: v for k, v in labels.items() if v != 0}, "trainers": {"T": record}})
        assert _row(table, "T")[1] == expected
        # Dice over the present classes; class 2's stray prediction in case a counts 0 for it (as in nnU-Net)
        assert _row(table, "T")[3] == "0.5750 -> 0.6000"
