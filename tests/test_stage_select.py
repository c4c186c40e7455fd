"""The data-selection stage in-process: every method, key files, exact resume, semi-supervised
training on a selected set, bad input before any worker starts."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from sdeseg.config import ConfigError
from sdeseg.exports import ExportError
from sdeseg.launch import preflight, run_in_process
from sdeseg.runtime.context import FAULT_ENV
from tests.conftest import TINY, tiny_config

BUDGETS = "select.budgets=[2,4,7]"


def _select(root, export, *extra):
    return tiny_config("demo_select", root, f"select.sde_checkpoint={export}", BUDGETS, "select.student_steps=[3,4]",
                       "train.ckpt_every=2", *extra)


def _keyfile(run_dir, n):
    return json.loads((run_dir / "selection" / f"labeled_keys_{n}.json").read_text())


@pytest.fixture(scope="module")
def depth_run(synthetic_root, sde_export, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("select_depth")
    return run_dir, run_in_process(_select(synthetic_root, sde_export), run_dir)


def test_depth_selection_writes_nested_key_files_with_both_terms(depth_run, synthetic_root):
    from sdeseg.data.labeled import labeled_candidates

    run_dir, summary = depth_run
    files = [_keyfile(run_dir, n) for n in (2, 4, 7)]
    for f, n in zip(files, (2, 4, 7)):
        assert f["method"] == "depth" and f["budget"] == n and len(f["keys"]) == len(set(f["keys"])) == n
        assert [p["key"] for p in f["picks"]] == f["keys"]
    assert files[1]["keys"][:2] == files[0]["keys"] and files[2]["keys"][:4] == files[1]["keys"]
    assert set(files[2]["keys"]) <= set(labeled_candidates(synthetic_root, "train"))
    picks = files[2]["picks"]
    assert picks[0]["diversity"] is None  # the seeded random first image
    assert picks[1]["diversity"] > 0 and picks[1]["difficulty"] is None  # round 0: diversity only
    assert all(p["diversity"] > 0 and p["difficulty"] > 0 for p in picks[2:])  # later: both terms
    assert all(p["round"] == r for p, r in zip(picks, (0, 0, 1, 1, 2, 2, 2)))
    table = pq.read_table(run_dir / "selection" / "summary.parquet").to_pylist()
    assert [row["key"] for row in table] == files[2]["keys"]
    assert [row["budget"] for row in table] == [2, 2, 4, 4, 7, 7, 7]
    # every candidate scored exactly once per round, on all classes' pixels
    for r in range(3):
        scores = torch.load(run_dir / "selection" / f"scores_round{r}.pt", weights_only=True)
        assert torch.equal(scores["count"], torch.ones(24))
        assert scores["features"].shape[0] == 24 and scores["class_pixels"].sum() == 24 * 32 * 64
    assert summary["steps"] == 3 + 4 + 3  # student steps + one per selection
    assert summary["select/7/classes_present"] >= summary["select/2/classes_present"]


def test_the_greedy_step_is_reproduced_from_the_saved_scores(depth_run):
    from sdeseg.selection import farthest_point_selection

    run_dir, _ = depth_run
    scores = torch.load(run_dir / "selection" / "scores_round2.pt", weights_only=True)
    keys, before = scores["keys"], _keyfile(run_dir, 4)["keys"]
    idx = [keys.index(k) for k in before]
    difficulty = scores["difficulty"].clone()
    difficulty[idx] = 0
    chosen = farthest_point_selection(scores["features"], difficulty, idx, 7, 1000.0)
    assert [keys[i] for i in chosen] == _keyfile(run_dir, 7)["keys"]


@pytest.mark.parametrize("method", ["random", "depth_diversity", "depth_difficulty", "entropy"])
def test_every_method_selects_its_budgets(synthetic_root, sde_export, tmp_path, method):
    run_in_process(_select(synthetic_root, sde_export, f"select.method={method}"), tmp_path)
    files = [_keyfile(tmp_path, n) for n in (2, 4, 7)]
    assert [len(f["keys"]) for f in files] == [2, 4, 7]
    assert files[2]["keys"][:4] == files[1]["keys"]
    later = files[2]["picks"][2:]
    if method in ("entropy", "depth_difficulty"):  # scored by the round's student, highest first per round
        assert all(p["difficulty"] is not None and p["diversity"] is None for p in later)
        round2 = [p["difficulty"] for p in later if p["round"] == 2]
        assert round2 == sorted(round2, reverse=True)
    if method == "depth_diversity":
        assert all(p["difficulty"] is None and p["diversity"] > 0 for p in later)
        # no student: one farthest-point pass, the distances never grow
        d = [p["diversity"] for p in files[2]["picks"][1:]]
        assert d == sorted(d, reverse=True)


def test_a_killed_selection_resumes_to_the_same_result(synthetic_root, sde_export, tmp_path, depth_run):
    """Killed in round 2 (after its checkpoint at step 7), restarted with the same command: same key files."""
    args = [f"data.root={synthetic_root}", *TINY, f"select.sde_checkpoint={sde_export}", BUDGETS,
            "select.student_steps=[3,4]", "train.ckpt_every=2"]
    cmd = [sys.executable, "-m", "sdeseg.cli", "train", "demo_select", "--run-dir", str(tmp_path), *args]
    env = {**os.environ, FAULT_ENV: "8"}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 17, first.stderr[-2000:]
    assert (tmp_path / "selection" / "labeled_keys_4.json").exists()
    assert not (tmp_path / "selection" / "labeled_keys_7.json").exists()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "event/resumed" in r] == [7]
    reference, _ = depth_run
    for n in (2, 4, 7):
        assert _keyfile(tmp_path, n)["picks"] == _keyfile(reference, n)["picks"]


def test_a_key_file_feeds_the_semi_supervised_stage(depth_run, synthetic_root, sde_export, tmp_path):
    run_dir, _ = depth_run
    keyfile = run_dir / "selection" / "labeled_keys_4.json"
    cfg = tiny_config("demo_semiseg", synthetic_root, f"semiseg.sde_checkpoint={sde_export}",
                      f"data.labeled_keys={keyfile}", "train.steps=2", "train.log_keys=true")
    summary = run_in_process(cfg, tmp_path)
    assert summary["labeled_samples"] == 4
    records = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "keys"]
    labeled = {k for r in records for k in r["keys"][:2]}  # each step logs its 2 labeled keys first
    assert len(records) == 2 and labeled <= set(_keyfile(run_dir, 4)["keys"]) and len(labeled) >= 2


def test_bad_input_is_refused_before_workers_start(synthetic_root, sde_export, tmp_path):
    keys = tmp_path / "keys.txt"
    from sdeseg.data.labeled import labeled_candidates

    keys.write_text("\n".join(labeled_candidates(synthetic_root, "train")[:3]))
    with pytest.raises(ConfigError, match="first budget 2 does not grow the 3 keys"):
        preflight(_select(synthetic_root, sde_export, f"data.labeled_keys={keys}"))
    wrong = tmp_path / "seg.pt"
    torch.save({"kind": "seg", "model_config": {}, "model": {}}, wrong)
    with pytest.raises(ExportError, match="expected a 'sde' export, found 'seg'"):
        preflight(_select(synthetic_root, wrong))
    with pytest.raises(ConfigError, match="no labeled samples of split 'train'"):
        preflight(_select(synthetic_root, sde_export, "data.domain=elsewhere"))
    with pytest.raises(ConfigError, match="more than the 24 candidates"):
        preflight(_select(synthetic_root, sde_export, "select.budgets=[2,4,30]"))
    with pytest.raises(ConfigError, match="select.sde_checkpoint"):
        preflight(tiny_config("demo_select", synthetic_root))
    with pytest.raises(ConfigError, match="select.budgets: must increase"):
        _select(synthetic_root, sde_export, "select.budgets=[4,2]")
    with pytest.raises(ConfigError, match="select.student_steps"):
        _select(synthetic_root, sde_export, "select.student_steps=[1,2,3]")


def test_the_cli_exits_2_with_one_line_for_a_bad_budget(synthetic_root, sde_export, tmp_path):
    from sdeseg.cli import main

    assert main(["train", "demo_select", "--run-dir", str(tmp_path), f"data.root={synthetic_root}", *TINY,
                 f"select.sde_checkpoint={sde_export}", "select.budgets=[2,30]", "select.student_steps=[3]"]) == 2
    assert not (tmp_path / "selection").exists()


def test_the_study_tool_selects_trains_evaluates_and_draws(synthetic_root, sde_export, tmp_path):
    """tune.selection_study end to end on the tiny data (2 methods, 1 seed, 2 training steps);
    a second call reuses every finished part."""
    from tune.selection_study import main

    args = ["--data", synthetic_root, "--sde-export", sde_export, "--out", str(tmp_path), "--methods", "random",
            "depth_diversity", "--seeds", "0", "--budget", "4", "--budgets", "[2,4]", "--student-steps", "[1]",
            "--steps", "2", "--select-overrides", *TINY, "--train-overrides", *TINY]
    assert main(args) == 0
    table = (tmp_path / "selection.md").read_text()
    assert "| random |" in table and "| depth_diversity |" in table
    png = tmp_path / "selection.png"
    assert png.stat().st_size > 10_000
    stamp = (tmp_path / "train" / "random_s0" / "eval_test.json").stat().st_mtime
    assert main(args) == 0
    assert (tmp_path / "train" / "random_s0" / "eval_test.json").stat().st_mtime == stamp
