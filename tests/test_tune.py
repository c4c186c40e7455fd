"""`sdeseg tune`: search files checked before anything starts; real Ray Tune searches of real
Ray Train runs on a local 2-CPU cluster (ASHA stops a trial early, a stopped driver resumes
without redoing finished trials, a killed trial worker resumes from its checkpoint)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from sdeseg.config import ConfigError
from sdeseg.runtime.context import FAULT_DELAY_ENV, FAULT_ENV
from sdeseg.search import example_params, grid_points, load_search
from tests.conftest import TINY

TINY_TRIAL = [o for o in TINY if not o.startswith(("runtime.in_process", "runtime.num_workers"))]


def _search(tmp_path: Path, root: str, **fields) -> Path:
    data = {
        "base": "demo_semiseg",
        "overrides": [f"data.root={root}", *TINY_TRIAL, "data.num_labeled=8", "semiseg.pseudo_label=false",
                      "semiseg.transfer=false", "semiseg.mix=none", "optim.schedule=constant", "train.steps=4",
                      "train.val_every=2", "train.ckpt_every=2", "runtime.max_failures=1"],
        "space": {"optim.lr": {"grid": [3e-2, 1e-12, 3e-2, 1e-12]}},
        "metric": "seg/miou", "mode": "max",
        "scheduler": {"name": "asha", "grace_period": 2, "max_t": 4, "reduction_factor": 2},
        "search": {"name": "grid"},
        "resources": {"num_workers": 1, "cpus_per_worker": 0.5},
        "max_concurrent": 2,
    } | fields
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- the search file


def test_shipped_searches_load_and_count_their_trials():
    assert load_search("component_study").grid_size() == 12  # 6 rows x 2 seeds
    assert load_search("label_budgets").grid_size() == 18
    curve = load_search("label_curve")  # 4 budgets x 2 methods x 1 seed, at the component study's schedule
    assert curve.grid_size() == 8 and curve.max_steps() == load_search("component_study").max_steps() == 3200
    spec = load_search("demo_loss_weights")
    assert spec.scheduler.name == "asha" and spec.num_samples == 16 and spec.max_steps() == 800
    for name in ("cityscapes_loss_weights", "cityscapes_component_study", "cityscapes_label_budgets"):
        assert load_search(name).resources.gpus_per_worker == 1


def test_searches_with_seeds_compare_over_them():
    """Seeds are aggregated where a search has them: by its compare block (the studies name their
    baseline row) or, without one, whenever train.seed is a grid of two or more values."""
    assert load_search("component_study").compare.baseline == {"row": "supervised only"}
    assert load_search("label_budgets").compare.baseline == {"selection": "random"}
    assert load_search("label_curve").compare.seeds == "train.seed"
    assert load_search("demo_loss_weights").compare is None  # no seed dimension


def test_the_summary_gives_each_row_over_seeds_and_paired_against_the_baseline(tmp_path):
    """write_results of a component-study-like grid: per row the mean over its completed seeds with
    the Student-t interval, and the seed-paired difference to the baseline row (a trial stopped
    early is left out, and the pairing uses only the seeds both rows completed)."""
    from sdeseg.tuning import over_seeds, write_results

    spec = load_search("component_study")

    def row(i, name, seed, test, val, status="completed"):
        return {"trial_id": f"t{i}", "param/train.seed": seed, "param/row": name, "steps": [3200], "values": [val],
                "final": val, "best": val, "test": test, "steps_done": 3200, "status": status, "wall_s": 1.0,
                "run_dir": str(tmp_path / f"t{i}"), "error": None}

    sup, mix = "supervised only", "+ DepthMix"
    rows = [row(0, sup, 0, 0.30, 0.31), row(1, sup, 1, 0.32, 0.33), row(2, sup, 2, 0.31, 0.30),
            row(3, mix, 0, 0.33, 0.34), row(4, mix, 1, 0.36, 0.35), row(5, mix, 2, 0.99, 0.99, status="stopped early"),
            row(6, "+ ClassMix", 0, 0.40, 0.40)]
    write_results(spec, rows, tmp_path)
    table = {e["params"]["row"]: e for e in over_seeds(spec, rows)}
    assert table[sup]["seeds"] == [0, 1, 2] and table[sup]["test_mean"] == pytest.approx(0.31)
    # three seeds 0.30, 0.32, 0.31: sd 0.01, half-width t(0.975, 2) = 4.302653 times 0.01 / sqrt(3)
    assert table[sup]["test_sd"] == pytest.approx(0.01)
    assert table[sup]["test_high"] - 0.31 == pytest.approx(4.302653 * 0.01 / 3 ** 0.5, rel=1e-6)
    assert table[sup]["diff_per_seed"] is None  # the baseline itself
    d = table[mix]  # seeds 0 and 1 only: +0.03, +0.04; sd 0.00707, half-width t(0.975, 1) = 12.7062 x sd / sqrt 2
    assert d["seeds"] == [0, 1] and d["diff_per_seed"] == {"0": pytest.approx(0.03), "1": pytest.approx(0.04)}
    assert d["diff_mean"] == pytest.approx(0.035)
    assert d["diff_low"] == pytest.approx(0.035 - 12.7062 * 0.005, rel=1e-4) and d["diff_low"] < 0  # unresolved
    assert table["+ ClassMix"]["diff_n"] == 1 and table["+ ClassMix"]["diff_low"] is None  # one seed: no interval
    summary = (tmp_path / "summary.md").read_text()
    assert "## Over seeds (`train.seed`)" in summary
    assert "| + DepthMix | 2 | 0.3450 [" in summary and "| +0.0350 [-0.0285, +0.0985] | +0.0300, +0.0400 |" in summary
    assert "| supervised only | 3 | 0.3100 [0.2852, 0.3348] |" in summary and "(baseline)" in summary
    # the best row is chosen on val among the rows with the most seeds: ClassMix (one seed, val 0.40) is not
    chosen = json.loads((tmp_path / "best.json").read_text())["over_seeds"]
    assert chosen["params"] == {"row": sup} and chosen["val_n"] == 3 and chosen["val_mean"] == pytest.approx(0.94 / 3)
    assert "Best row on validation, mean over its 3 seeds (`best.json` `over_seeds`): row = supervised only" in summary
    saved = pq.read_table(tmp_path / "over_seeds.parquet").to_pylist()
    assert sorted(json.loads(e["params"])["row"] for e in saved) == sorted(table)


def test_rows_over_seeds_take_list_values():
    """A grid of lists (e.g. the selection student's steps per round) groups and pairs like any value."""
    import dataclasses

    from sdeseg.search import Compare
    from sdeseg.tuning import over_seeds

    spec = dataclasses.replace(load_search("component_study"),
                               compare=Compare(baseline={"select.student_steps": [100, 200]}))
    rows = [{"param/train.seed": seed, "param/select.student_steps": steps, "final": v, "test": v,
             "status": "completed"} for seed, steps, v in ((0, [100, 200], 0.30), (1, [100, 200], 0.32),
                                                          (0, [300, 600], 0.31), (1, [300, 600], 0.35))]
    table = {str(e["params"]["select.student_steps"]): e for e in over_seeds(spec, rows)}
    assert table["[300, 600]"]["diff_per_seed"] == {"0": pytest.approx(0.01), "1": pytest.approx(0.03)}
    assert table["[100, 200]"]["diff_per_seed"] is None and table["[100, 200]"]["test_mean"] == pytest.approx(0.31)


def test_group_overrides_name_the_trials_values(tmp_path):
    spec = load_search("label_budgets")
    points = grid_points(spec)
    assert len(points) == 18
    depth = next(p for p in points if p["selection"] == "depth" and p["data.num_labeled"] == 33)
    assert "data.labeled_keys=runs/select_depth/selection/labeled_keys_33.json" in spec.trial_overrides(depth)
    cfg = spec.trial_config(example_params(spec))
    assert cfg.runtime.num_workers == 1 and cfg.runtime.in_process is False


@pytest.mark.parametrize(("change", "message"), [
    ({"space": {"semiseg.no_such_key": {"grid": [1]}}}, r"space.semiseg.no_such_key: .*unknown key"),
    ({"space": {"optim.lr": {"uniform": [1e-2, 1e-3]}}, "search": {"name": "random"}}, "low must be below high"),
    ({"space": {"optim.lr": {"loguniform": [0, 1e-3]}}, "search": {"name": "random"}}, "loguniform needs low > 0"),
    ({"space": {"optim.lr": {"normal": [0, 1]}}}, "unknown distribution 'normal'"),
    ({"space": {"train.steps": {"grid": [0]}}}, r"space.train.steps: .*train.steps: must be >= 1"),
    ({"space": {"optim.lr": {"choice": [1e-3]}}}, "grid search takes only grid dimensions"),
    ({"metric": "depth/abs_rel"}, "not reported by the semiseg stage"),
    ({"mode": "best"}, "mode: must be min or max"),
    ({"scheduler": {"name": "asha", "grace_period": 1, "max_t": 4}}, r"train.val_every \(2\) must be > 0 and <="),
    ({"scheduler": {"name": "pbt"}}, "asha or fifo"),
    ({"resources": {"num_workers": 1, "cpus": 2}}, "resources.cpus: unknown key"),
    ({"samples": 3}, "samples: unknown key"),
    ({"groups": {"row": {"bad": ["semiseg.mix=nothing"]}}}, r"groups.row.bad: .*semiseg.mix: must be one of"),
    ({"compare": {"seeds": "train.seed"}}, "compare.seeds: 'train.seed' is not a grid key of the space"),
    ({"compare": {"seeds": "optim.lr", "baseline": {"optim.lr": 3e-2}}},
     "compare.baseline.optim.lr: the seeds key pairs the rows"),
    ({"compare": {"seeds": "optim.lr", "baseline": {"row": "nope"}}, "groups": {"row": {"a": [], "b": []}}},
     r"compare.baseline.row: 'nope' is not one of the group's options \(a, b\)"),
    ({"compare": {"seeds": "optim.lr", "pairs": 2}}, "compare.pairs: unknown key"),
])
def test_a_bad_search_file_is_refused_naming_the_key(tmp_path, synthetic_root, change, message):
    with pytest.raises(ConfigError, match=message):
        load_search(_search(tmp_path, synthetic_root, **change))


def test_the_cli_refuses_a_bad_search_before_ray_starts(tmp_path, synthetic_root, capsys):
    from sdeseg.cli import main

    path = _search(tmp_path, synthetic_root, space={"semiseg.no_such_key": {"grid": [1]}})
    assert main(["tune", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "semiseg.no_such_key" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- real searches


def _tune_cmd(search: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "sdeseg.cli", "tune", str(search), "--out", str(out)]


def _env(**extra) -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", **extra}


@pytest.mark.slow
def test_asha_stops_a_weak_trial_and_every_trial_is_in_the_results(tmp_path, synthetic_root):
    """16-step trials, validated every 2 steps, ASHA milestones at 2, 4, 8: a trial that trails
    is stopped there, its run never ends (no summary.json), while the others train to the end.
    Two learning rates x two seeds: the summary gives each rate over its completed seeds."""
    base = yaml.safe_load(_search(tmp_path, synthetic_root).read_text())["overrides"]
    search = _search(tmp_path, synthetic_root, overrides=base + ["train.steps=16", "train.ckpt_every=8"],
                     space={"optim.lr": {"grid": [3e-2, 1e-12]}, "train.seed": {"grid": [0, 1]}},
                     scheduler={"name": "asha", "grace_period": 2, "max_t": 16, "reduction_factor": 2})
    out = tmp_path / "out"
    done = subprocess.run(_tune_cmd(search, out), env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert len(rows) == 4
    assert sorted(json.loads(r["param/optim.lr"]) for r in rows) == [1e-12, 1e-12, 3e-2, 3e-2]
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped and all(r["steps_done"] < 16 for r in stopped)  # (the tiny model's mIoU is noisy: any may trail)
    assert not any((Path(r["run_dir"]) / "summary.json").exists() for r in stopped)
    completed = [r for r in rows if r["status"] == "completed"]
    assert completed and all(r["steps"] == list(range(2, 17, 2)) and len(r["values"]) == 8 for r in completed)
    best = json.loads((out / "best.json").read_text())
    assert best["final"] == max(r["final"] for r in rows) and best["trial_id"] in {r["trial_id"] for r in rows}
    assert (out / "curves.png").stat().st_size > 5000 and "| trial |" in (out / "summary.md").read_text()
    for r in completed:  # the final model's held-out score, next to the last validation
        assert r["test"] == json.loads((Path(r["run_dir"]) / "summary.json").read_text())["test/seg/miou"]
    assert all(r["test"] is None for r in stopped)
    over = {e["params"]: e for e in pq.read_table(out / "over_seeds.parquet").to_pylist()}
    for lr in {json.loads(r["param/optim.lr"]) for r in completed}:
        done_lr = [r for r in completed if json.loads(r["param/optim.lr"]) == lr]
        e = over[json.dumps({"optim.lr": lr})]
        assert json.loads(e["seeds"]) == sorted(json.loads(r["param/train.seed"]) for r in done_lr)
        assert e["test_mean"] == pytest.approx(sum(r["test"] for r in done_lr) / len(done_lr))
    assert "## Over seeds (`train.seed`)" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_a_stopped_search_resumes_and_a_killed_trial_worker_resumes_from_its_checkpoint(tmp_path, synthetic_root):
    """FIFO grid of 2 trials of 6 steps, one at a time; every trial's worker dies once at step 3 (it
    resumes from its step-2 checkpoint); the driver gets SIGINT once the first trial has finished,
    and the same command then finishes the search without running that trial again (the trial the
    SIGINT cut resumes from its newest checkpoint, or starts again if it had none)."""
    search = _search(tmp_path, synthetic_root, scheduler={"name": "fifo"},
                     space={"optim.lr": {"grid": [3e-2, 1e-12]}}, max_concurrent=1,
                     overrides=yaml.safe_load(_search(tmp_path, synthetic_root).read_text())["overrides"]
                     + ["train.steps=6"])
    out = tmp_path / "out"
    env = _env(**{FAULT_ENV: "3", FAULT_DELAY_ENV: "4"})  # the step-2 checkpoint reaches the controller first
    log = tmp_path / "first.log"  # a file, not a pipe: nobody reads while it runs, a full pipe would block it
    with open(log, "w") as f:
        proc = subprocess.Popen(_tune_cmd(search, out), env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not list((out / "trials").glob("*/summary.json")):
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(1)
    finished = {p.parent.name: p.stat().st_mtime for p in (out / "trials").glob("*/summary.json")}
    assert len(finished) == 1  # the second trial is cut: the search really resumes
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    # interrupted: the results so far say which trial is cut, and the exit code says it is not done
    assert proc.returncode == 130, log.read_text()[-3000:]
    cut = [r["status"] for r in pq.read_table(out / "results.parquet").to_pylist()]
    # the cut trial is listed as unfinished if Tune had created it, else not yet listed
    assert cut.count("completed") == 1 and set(cut) <= {"completed", "unfinished"}, cut
    assert "interrupted with 1 of 2 trials unfinished" in log.read_text()
    again = subprocess.run(_tune_cmd(search, out), env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "completed" and r["steps_done"] == 6 for r in rows), rows
    for trial, mtime in finished.items():  # finished before the interruption: not trained again
        assert (out / "trials" / trial / "summary.json").stat().st_mtime == mtime
    for row in rows:
        run_dir = Path(row["run_dir"])
        assert json.loads((run_dir / "fault_injected").read_text())["step"] == 3
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        resumed = [r["step"] for r in records if "event/resumed" in r]
        # the killed worker resumed from its step-2 checkpoint; the trial the SIGINT cut resumed
        # once more, from its newest checkpoint (2 or 4)
        assert 2 in resumed and set(resumed) <= {2, 4} and resumed == sorted(resumed), resumed
        assert max(r["step"] for r in records if r["kind"] == "train") == 6


@pytest.mark.slow
def test_a_search_reuses_the_finished_trials_of_another(tmp_path, synthetic_root):
    """`sdeseg tune B --reuse A`: B's trial with the config A trained already adopts A's run (same
    validations, same test score, its own export copy) and trains nothing; B's other trial trains."""
    base = yaml.safe_load(_search(tmp_path, synthetic_root).read_text())["overrides"]
    first = _search(tmp_path, synthetic_root, scheduler={"name": "fifo"}, space={"optim.lr": {"grid": [3e-2]}},
                    overrides=base)
    done = subprocess.run(_tune_cmd(first, tmp_path / "a"), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (source,) = pq.read_table(tmp_path / "a" / "results.parquet").to_pylist()
    second = first.with_name("second.yaml")
    second.write_text(yaml.safe_dump(yaml.safe_load(first.read_text())
                                     | {"space": {"optim.lr": {"grid": [1e-12, 3e-2]}}}))
    done = subprocess.run(_tune_cmd(second, tmp_path / "b") + ["--reuse", str(tmp_path / "a")], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {json.loads(r["param/optim.lr"]): r for r in pq.read_table(tmp_path / "b" / "results.parquet").to_pylist()}
    assert all(r["status"] == "completed" and r["steps_done"] == 4 for r in rows.values()), rows
    reused, trained = rows[3e-2], rows[1e-12]
    assert reused["reused_from"] == source["run_dir"] and trained["reused_from"] is None
    assert (reused["steps"], reused["values"], reused["test"]) == (source["steps"], source["values"], source["test"])
    records = [json.loads(x) for x in (Path(reused["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert records == [json.loads(x) for x in (Path(source["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((Path(reused["run_dir"]) / "summary.json").read_text())
    export = Path(summary["exports"]["last"])
    assert export.parent == Path(reused["run_dir"]) / "export"
    assert export.read_bytes() == (Path(source["run_dir"]) / "export" / "last.pt").read_bytes()
    assert not list((tmp_path / "b" / "ray").glob(f"*{reused['trial_id']}*"))  # no Ray Train run of its own
    assert list((tmp_path / "b" / "ray").glob(f"*{trained['trial_id']}*"))
    assert "(reused)" in (tmp_path / "b" / "summary.md").read_text()


def test_optuna_tpe_suggests_points_of_the_space(tmp_path, synthetic_root):
    """search.name=optuna: Ray Tune's OptunaSearch takes the converted space and suggests values
    inside it (no cluster needed to ask it)."""
    pytest.importorskip("optuna")
    from sdeseg.tuning import _param_space, _search_alg

    spec = load_search(_search(tmp_path, synthetic_root, search={"name": "optuna"}, scheduler={"name": "fifo"},
                               space={"optim.lr": {"loguniform": [1e-4, 1e-2]},
                                      "semiseg.pseudo_threshold": {"uniform": [0.9, 0.99]},
                                      "semiseg.ema_alpha_max": {"choice": [0.99, 0.999]}}))
    alg = _search_alg(spec)
    assert alg.set_search_properties(spec.metric, spec.mode, _param_space(spec))
    for i in range(3):
        point = alg.suggest(f"t{i}")
        assert 1e-4 <= point["optim.lr"] <= 1e-2 and 0.9 <= point["semiseg.pseudo_threshold"] <= 0.99
        assert point["semiseg.ema_alpha_max"] in (0.99, 0.999)
        spec.trial_config(point)  # every suggestion is a valid trial config
        alg.on_trial_complete(f"t{i}", {"seg/miou": 0.1 * i, "step": 4})
    with pytest.raises(ConfigError, match="optuna samples every dimension itself"):
        load_search(_search(tmp_path, synthetic_root, search={"name": "optuna"}, scheduler={"name": "fifo"}))


def test_a_finished_run_is_recognised_only_with_its_config_and_all_its_steps(tmp_path, synthetic_root):
    """What a resumed search (and the three-stage pipeline) uses to skip a run that ended."""
    import yaml as _yaml

    from sdeseg.config import save_config
    from sdeseg.launch import finished_run, preflight
    from tests.conftest import tiny_config

    cfg = tiny_config("demo_semiseg", synthetic_root, "train.steps=6", "semiseg.transfer=false", "semiseg.mix=none")
    assert finished_run(cfg, tmp_path) is None  # nothing there
    save_config(preflight(cfg), tmp_path / "config.yaml")
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 6, "seg/miou": 0.25}))
    assert finished_run(cfg, tmp_path)["seg/miou"] == 0.25
    assert finished_run(tiny_config("demo_semiseg", synthetic_root, "train.steps=8", "semiseg.transfer=false",
                                    "semiseg.mix=none"), tmp_path) is None  # more steps asked: not finished
    other = tiny_config("demo_semiseg", synthetic_root, "train.steps=6", "semiseg.transfer=false", "semiseg.mix=none",
                        "optim.lr=0.5")
    assert finished_run(other, tmp_path) is None  # another config
    stored = _yaml.safe_load((tmp_path / "config.yaml").read_text())
    del stored["selftrain"]  # written before a section existed: its defaults are assumed
    (tmp_path / "config.yaml").write_text(_yaml.safe_dump(stored))
    assert finished_run(cfg, tmp_path) is not None
    stored["optim"]["no_longer_a_key"] = 1
    (tmp_path / "config.yaml").write_text(_yaml.safe_dump(stored))
    assert finished_run(cfg, tmp_path) is None


def test_a_finished_run_of_the_same_config_is_found_and_adopted_with_its_files(tmp_path, synthetic_root):
    """--reuse: a run that differs only in name and storage is found (in a search's trials/, a
    directory of runs, or given itself); another value or fewer steps is not. Adopting copies its
    files but not its Ray checkpoints, points the exports at the copies, and leaves a run that a
    resumed search recognises as this trial's and that is no source itself."""
    from sdeseg.config import save_config
    from sdeseg.launch import finished_run, preflight
    from sdeseg.tuning import REUSED_FILE, adopt_run, find_reusable
    from tests.conftest import tiny_config

    args = ("train.steps=6", "semiseg.transfer=false", "semiseg.mix=none")
    source = tmp_path / "earlier" / "trials" / "t0"
    trained = tiny_config("demo_semiseg", synthetic_root, *args, "runtime.run_name=earlier-t0",
                          f"runtime.storage_path={tmp_path / 'earlier' / 'ray'}")
    save_config(preflight(trained), source / "config.yaml")
    (source / "export").mkdir()
    (source / "export" / "last.pt").write_bytes(b"weights")
    (source / "ray" / "checkpoint_000001").mkdir(parents=True)
    (source / "metrics.jsonl").write_text(json.dumps({"kind": "val", "step": 6, "seg/miou": 0.25}) + "\n")
    (source / "summary.json").write_text(json.dumps({"steps": 6, "seg/miou": 0.25, "test/seg/miou": 0.24,
                                                     "exports": {"last": str(source / "export" / "last.pt")}}))
    short = tmp_path / "runs" / "short"  # the same config cut at 4 of its 6 steps
    save_config(preflight(trained), short / "config.yaml")
    (short / "summary.json").write_text(json.dumps({"steps": 4}))

    trial = tiny_config("demo_semiseg", synthetic_root, *args, "runtime.run_name=later-t3",
                        "runtime.storage_path=s3://bucket/later", "runtime.max_failures=3")
    for where in (tmp_path / "earlier", source.parent, source):
        assert find_reusable(trial, [tmp_path / "runs", where]) == source
    assert find_reusable(trial, [tmp_path / "runs"]) is None  # not all its steps
    for other in ("optim.lr=0.5", "train.seed=1", "runtime.num_workers=2"):
        assert find_reusable(tiny_config("demo_semiseg", synthetic_root, *args, other), [tmp_path / "earlier"]) is None

    run_dir = tmp_path / "later" / "trials" / "t3"
    run_dir.mkdir(parents=True)
    summary = adopt_run(trial, source, run_dir)
    assert summary["seg/miou"] == 0.25 and summary["reused_from"] == str(source)
    assert summary["exports"] == {"last": str(run_dir / "export" / "last.pt")}
    assert (run_dir / "export" / "last.pt").read_bytes() == b"weights" and not (run_dir / "ray").exists()
    assert (run_dir / "metrics.jsonl").read_text() == (source / "metrics.jsonl").read_text()
    assert json.loads((run_dir / REUSED_FILE).read_text()) == {"source": str(source)}
    assert finished_run(trial, run_dir)["test/seg/miou"] == 0.24  # exactly this trial's run now
    assert find_reusable(trial, [run_dir.parent]) is None  # an adopted run is not a source again


def test_results_carry_the_test_score_and_the_plot_draws_test_and_val(tmp_path):
    """write_results on rows as collect_results makes them: the table has a test column (– for a
    trial without one), best.json is chosen on validation, plot.png has one test and one val
    line per series."""
    from sdeseg.tuning import plot_lines, write_results

    spec = load_search("label_curve")

    def row(i, labels, method, val, test, status="completed"):
        return {"trial_id": f"t{i}", "param/data.num_labeled": labels, "param/train.seed": 0, "param/method": method,
                "steps": [400, 800], "values": [val - 0.05, val], "final": val, "best": val, "test": test,
                "steps_done": 800, "status": status, "wall_s": 10.0, "run_dir": str(tmp_path / f"t{i}"), "error": None}

    rows = [row(0, 16, "supervised only", 0.30, 0.28), row(1, 33, "supervised only", 0.35, 0.36),
            row(2, 16, "DepthMix", 0.33, 0.34), row(3, 33, "DepthMix", 0.38, 0.33),
            row(4, 100, "DepthMix", 0.20, None, status="stopped early")]
    best = write_results(spec, rows, tmp_path)
    assert best["trial_id"] == "t3"  # highest validation, not highest test
    table = (tmp_path / "summary.md").read_text()
    assert "| final | best | test |" in table and "| 0.3800 | 0.3800 | 0.3300 |" in table and "| – |" in table
    assert json.loads((tmp_path / "best.json").read_text())["test"] == 0.33
    assert [r["test"] for r in pq.read_table(tmp_path / "results.parquet").to_pylist()] == [0.28, 0.36, 0.34, 0.33,
                                                                                          None]
    assert (tmp_path / "plot.png").stat().st_size > 5000
    rows.append(row(5, 33, "DepthMix", 0.36, 0.37))  # a second seed: lines are means over seeds
    assert plot_lines(spec, rows) == {
        ("DepthMix", "test"): {16.0: 0.34, 33.0: pytest.approx(0.35)},
        ("DepthMix", "val"): {16.0: 0.33, 33.0: pytest.approx(0.37)},
        ("supervised only", "test"): {16.0: 0.28, 33.0: 0.36},
        ("supervised only", "val"): {16.0: 0.30, 33.0: 0.35}}
