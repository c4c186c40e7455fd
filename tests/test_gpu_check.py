"""``make gpu-check`` (tune.gpu_check) without a GPU, and the ``auto`` ops backend it gates.

The check itself needs CUDA: here it must refuse with exit code 2, and its machinery (budgets,
failures that do not stop the next step, the table, the parsers, the comparison) is tested on
stand-in steps. The overrides of its training runs are checked to load as configs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from sdeseg.config import load_config
from sdeseg.ops import api
from tune import gpu_check
from tune.gpu_check import GpuCheck, StepFailed


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the real check would run")
def test_exits_2_with_a_clear_message_without_cuda(tmp_path):
    out = tmp_path / "gpu_check"
    proc = subprocess.run([sys.executable, "-m", "tune.gpu_check", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr and "nothing was run" in proc.stderr
    assert not out.exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_failed_and_timed_out_steps_are_recorded_and_the_next_steps_run(tmp_path):
    check = GpuCheck(tmp_path, budget_s=120)
    pid_file = tmp_path / "grandchild.pid"

    def fail(timeout):
        raise StepFailed("loss differs 30%")

    def crash(timeout):
        return {}["missing"]  # a bug in a step: KeyError

    def exits_3(timeout):
        return check.command("exits 3", [sys.executable, "-c", "print('bad'); raise SystemExit(3)"], timeout), {}

    def hangs(timeout):  # a child that starts a grandchild and waits on it
        script = f"sleep 60 & echo $! > {pid_file}; wait"
        return check.command("hangs", ["sh", "-c", script], timeout), {}

    check.run("ok", 10, lambda t: ("fine", {"x": 1}))
    check.run("fails", 10, fail)
    check.run("crashes", 10, crash)
    check.run("exits 3", 10, exits_3)
    start = time.monotonic()
    check.run("hangs", 2, hangs)
    assert time.monotonic() - start < 30
    check.run("after", 10, lambda t: ("still ran", {}))

    results = {o.step: o for o in check.outcomes}
    assert [o.result for o in check.outcomes] == ["pass", "FAIL", "FAIL", "FAIL", "TIMEOUT", "pass"]
    assert "loss differs 30%" in results["fails"].summary
    assert "KeyError" in results["crashes"].summary
    assert "exit code 3" in results["exits 3"].summary and "bad" in results["exits 3"].summary
    assert results["exits 3"].log == "logs/exits_3.log"
    deadline = time.monotonic() + 10  # the whole process group was killed, the grandchild too
    while _alive(int(pid_file.read_text())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(int(pid_file.read_text()))
    assert not check.passed

    md = check.write().read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[0] == "| step | result | seconds | figures |" and len(table) == 2 + 6
    assert md.count("| step |") == 1 and "**FAIL** (2/6 steps passed)" in md
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["passed"] is False and [s["step"] for s in data["steps"]][-1] == "after"
    assert data["steps"][0]["figures"] == {"x": 1}


def test_steps_past_the_overall_budget_are_skipped(tmp_path):
    check = GpuCheck(tmp_path, budget_s=0)
    outcome = check.run("late", 60, lambda t: pytest.fail("must not run"))
    assert outcome.result == "skipped" and not check.passed


def test_a_second_check_in_the_same_directory_starts_clean(tmp_path):
    (tmp_path / "runs" / "sde_reference").mkdir(parents=True)  # would be resumed by `sdeseg train`
    (tmp_path / "gpu_check.md").write_text("old")
    (tmp_path / "keep.txt").write_text("not ours")
    GpuCheck(tmp_path)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "gpu_check.md").exists()
    assert (tmp_path / "keep.txt").exists() and (tmp_path / "logs").is_dir()


def test_parse_bench_reads_the_benchmark_table():
    text = "\n".join([
        "device: NVIDIA H200  torch 2.13.0",
        "| op | shape | pass | reference ms | fused ms | speed-up | fused GB/s | % of copy |",
        "|---|---|---|---:|---:|---:|---:|---:|",
        "| depth_mix | demo 8x96x192 | fwd | 0.210 | 0.050 | 4.20x | 1500 | 35% |",
        "| depth_mix | demo 8x96x192 | fwd+bwd | 0.900 | 0.300 | 3.00x | 900 | 21% |",
        "| inverse_warp | sde 2x512x1024 | fwd+bwd | 2.000 | 2.500 | 0.80x | 700 | 16% |",
    ])
    rows = gpu_check.parse_bench(text)
    assert [(r["op"], r["pass"], r["speedup"]) for r in rows] == [
        ("depth_mix", "fwd", 4.2), ("depth_mix", "fwd+bwd", 3.0), ("inverse_warp", "fwd+bwd", 0.8)]
    assert rows[2]["shape"] == "sde 2x512x1024" and rows[2]["pct_of_copy"] == 16


def test_parse_handoff_reads_both_rows_of_the_handoff_benchmark():
    text = "\n".join([
        "hand-off benchmark: 2 jittered triplets of 512x1024 + label, device cuda, torch threads 8, median of 10",
        "| hand-off | ms / batch | image MB copied |", "|---|---|---|",
        "| host float32 | 41.3 | 75.5 |", "| uint8, converted on the device | 3.2 | 18.9 |",
    ])
    assert gpu_check.parse_handoff(text) == {"host float32": (41.3, 75.5),
                                             "uint8, converted on the device": (3.2, 18.9)}
    assert gpu_check.parse_handoff("| hand-off | ms / batch | image MB copied |") == {}


def test_parse_junit_counts_the_cuda_cases(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="t" name="test_a[cuda-1]"/>'
        '<testcase classname="t" name="test_a[cpu-1]"><skipped message="needs"/></testcase>'
        '<testcase classname="t" name="test_b[cuda]"><failure message="x"/></testcase>'
        '<testcase classname="t" name="test_c"/>'
        "</testsuite></testsuites>")
    counts = gpu_check.parse_junit(xml)
    assert {k: counts[k] for k in ("passed", "failed", "skipped", "cuda_passed", "cuda_failed")} == {
        "passed": 2, "failed": 1, "skipped": 1, "cuda_passed": 1, "cuda_failed": 1}
    assert counts["failed_names"] == ["test_b[cuda]"]


def _run(losses, metric=0.3, step_s=0.02):
    return {"losses": losses, "metric": metric, "step_s": step_s, "export": None}


def test_compare_runs_passes_close_runs_and_fails_diverging_ones():
    ref = _run([1.0] + [0.5] * 29)
    ok, summary, figures = gpu_check.compare_runs(ref, _run([1.001] + [0.52] * 29, 0.31, 0.01))
    assert ok and figures["speedup"] == pytest.approx(2.0) and "2.00x" in summary
    assert not gpu_check.compare_runs(ref, _run([1.05] + [0.5] * 29))[0]  # step 1: same weights, 5% off
    assert not gpu_check.compare_runs(ref, _run([1.0] + [0.5] * 25 + [0.7] * 4))[0]  # the last steps drift
    assert not gpu_check.compare_runs(ref, _run([1.0] + [0.5] * 29, metric=0.4))[0]


def test_read_run_takes_losses_step_time_and_export(tmp_path):
    records = [{"kind": "train", "step": s, "depth/total": 1.0 / s, "perf/step_s": 9.0 if s <= 5 else 0.1}
               for s in range(1, 11)]
    records.insert(3, {"kind": "val", "step": 3, "depth/abs_rel": 0.5})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "summary.json").write_text(json.dumps({"depth/abs_rel": 0.4, "exports": {"last": "e/last.pt"}}))
    run = gpu_check.read_run(tmp_path, "depth/total", "depth/abs_rel")
    assert run["losses"] == [1.0 / s for s in range(1, 11)]
    assert run["metric"] == 0.4 and run["export"] == "e/last.pt"
    assert run["step_s"] == pytest.approx(0.1)  # the warm-up steps (compilation) are left out


@pytest.mark.parametrize("stage", sorted(gpu_check.STAGES))
def test_training_overrides_load_as_a_config(stage, tmp_path):
    preset = gpu_check.STAGES[stage][0]
    extra = [f"semiseg.sde_checkpoint={tmp_path / 'best.pt'}"] if stage == "semiseg" else []
    cfg = load_config(preset, gpu_check.train_overrides(tmp_path, "triton", 30) + extra)
    assert cfg.stage == stage and cfg.train.steps == 30
    rt = cfg.runtime
    assert (rt.use_gpu, rt.precision, rt.ops_backend, rt.in_process) == (True, "bf16", "triton", True)


# ---------------------------------------------------------------------------------------------
# the gate: "auto" runs the reference ops on CUDA until the GPU check has passed (it has: 2026-12-04)


@pytest.fixture
def cuda_present(monkeypatch):
    monkeypatch.setattr(api, "_forced", None)
    monkeypatch.delenv("SDESEG_OPS_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_auto_uses_the_reference_ops_on_cuda_while_the_gate_is_closed(cuda_present, monkeypatch):
    monkeypatch.setattr(api, "AUTO_USES_TRITON_ON_CUDA", False)
    assert api.get_backend() == "auto"
    assert all(api._fused_module(op) is None for op in ("depth_mix", "inverse_warp", "photometric_error"))


def test_auto_picks_triton_on_cuda_since_the_gpu_check_passed(cuda_present):
    pytest.importorskip("triton")
    assert api.AUTO_USES_TRITON_ON_CUDA is True, "opened after the passing `make gpu-check` of 2026-12-04"
    assert all(api._fused_available(op, "auto") for op in ("depth_mix", "inverse_warp", "photometric_error"))


def test_reference_backend_still_forces_the_plain_ops_on_cuda(cuda_present):
    api.set_backend("reference")  # what runtime.ops_backend=reference does
    assert all(api._fused_module(op) is None for op in ("depth_mix", "inverse_warp", "photometric_error"))


@pytest.mark.parametrize("how", ["env", "set_backend"])
def test_triton_stays_available_explicitly(cuda_present, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("SDESEG_OPS_BACKEND", "triton")
    else:
        api.set_backend("triton")  # what runtime.ops_backend=triton does
    assert api.get_backend() == "triton"
    assert all(api._fused_available(op, api.get_backend()) for op in ("depth_mix", "photometric_error"))
