"""The component-study launcher: its table and its command line (the runs themselves are stage runs,
tested in test_stage_semiseg)."""

import argparse

import pytest

from tune import ablation


def test_table_reports_test_split_averaged_over_seeds_with_val_beside(tmp_path):
    runs = {
        "supervised only": [{"seg/miou": 0.40, "test/seg/miou": 0.30, "test/seg/iou/pole": 0.10},
                            {"seg/miou": 0.50, "test/seg/miou": 0.40, "test/seg/iou/pole": 0.30}],
        "+ DepthMix": [{"seg/miou": 0.55, "test/seg/miou": 0.52, "test/seg/iou/person": 0.2}],
        "old run": [{"seg/miou": 0.6}],  # made before the test split existed
    }
    path = ablation.write_table(tmp_path, runs, argparse.Namespace())
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in path.read_text().splitlines()[2:]}
    assert rows["supervised only"][:3] == ["35.0", "30.0, 40.0", "45.0"]  # test mean, per seed, val mean
    assert rows["supervised only"][3] == "20.0"  # test pole IoU, mean over seeds
    assert rows["+ DepthMix"][0] == "52.0" and rows["+ DepthMix"][5] == "20.0"  # test person IoU
    assert rows["+ DepthMix"][3] == "n/a"  # a class missing from a run is not taken as 0
    assert rows["old run"][:3] == ["n/a", "n/a", "60.0"]


def test_unknown_rows_are_refused_before_any_run(capsys):
    # an override written after --rows is swallowed by it: refused with the valid row names
    with pytest.raises(SystemExit):
        ablation.main(["--data", "d", "--sde-export", "e", "--rows", "supervised only", "train.steps=5"])
    err = capsys.readouterr().err
    assert "train.steps=5" in err and "+ DepthMix" in err


def test_upper_bound_row_uses_every_label_of_the_split(synthetic_root):
    from sdeseg.data.labeled import labeled_candidates, labeled_keys_for

    args = argparse.Namespace(data=synthetic_root, sde_export="e.pt", steps=7, preset="demo_semiseg",
                              overrides=["data.num_labeled=3", "data.labeled_keys=keys.txt"])
    n_train = len(labeled_candidates(synthetic_root, "train"))
    assert n_train == 24  # the fixture's training triplets, all labeled
    upper = ablation.row_config(args, ablation.UPPER_BOUND, seed=1)
    assert upper.data.num_labeled == n_train and upper.data.labeled_keys is None  # over the command line
    assert len(labeled_keys_for(upper.data)) == n_train
    assert (upper.semiseg.pseudo_label, upper.semiseg.mix, upper.train.steps) == (False, "none", 7)
    base = ablation.row_config(args, "supervised only", seed=1)
    assert base.data.labeled_keys == "keys.txt" and base.data.labeled_seed == 1
    assert ablation.UPPER_BOUND not in ablation.DEFAULT_ROWS and len(ablation.DEFAULT_ROWS) == 6


def test_rebalanced_rows_differ_from_their_mix_only_by_the_rebalance(synthetic_root):
    args = argparse.Namespace(data=synthetic_root, sde_export="e.pt", steps=7, preset="demo_semiseg", overrides=[])
    for mix in ("+ ClassMix", "+ DepthMix", "full (multi-task + DepthMix)"):
        row = f"{mix}, rebalanced"
        assert row in ablation.ROWS and row not in ablation.DEFAULT_ROWS
        plain, rebal = ablation.row_config(args, mix, seed=0), ablation.row_config(args, row, seed=0)
        assert (plain.semiseg.mix_rebalance, rebal.semiseg.mix_rebalance) == (False, True)
        assert rebal.semiseg.mix == plain.semiseg.mix and rebal.semiseg.pseudo_label
        rebal.semiseg.mix_rebalance = False
        assert rebal.to_dict() == plain.to_dict()
