"""The component-study launcher: its table and its command line (the runs themselves are stage runs,
tested in test_stage_semiseg)."""

import argparse

import pytest

from tune import ablation


def test_table_averages_seeds_and_reports_thin_classes(tmp_path):
    runs = {
        "supervised only": [{"seg/miou": 0.40, "seg/iou/pole": 0.10}, {"seg/miou": 0.50, "seg/iou/pole": 0.30}],
        "+ DepthMix": [{"seg/miou": 0.55, "seg/iou/person": 0.2}],
    }
    path = ablation.write_table(tmp_path, runs, argparse.Namespace())
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in path.read_text().splitlines()[2:]}
    assert rows["supervised only"][:2] == ["45.0", "40.0, 50.0"]
    assert rows["supervised only"][2] == "20.0"  # pole IoU, mean over seeds
    assert rows["+ DepthMix"][0] == "55.0" and rows["+ DepthMix"][4] == "20.0"  # person


def test_unknown_rows_are_refused_before_any_run(capsys):
    # an override written after --rows is swallowed by it: refused with the valid row names
    with pytest.raises(SystemExit):
        ablation.main(["--data", "d", "--sde-export", "e", "--rows", "supervised only", "train.steps=5"])
    err = capsys.readouterr().err
    assert "train.steps=5" in err and "+ DepthMix" in err
