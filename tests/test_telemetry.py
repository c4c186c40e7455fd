"""Telemetry: Prometheus metrics in process (prometheus_client) and under Ray (the node's
metrics-export port), metrics.jsonl that holds each step once across restarts, the progress
line, and the CLI's quiet console."""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from sdeseg.runtime.telemetry import (
    METRICS,
    SERIES,
    MetricLogger,
    ProgressLine,
    PrometheusMetrics,
    StepMeter,
    series_for,
)
from tests.conftest import free_port, tiny_config


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of metric ``name`` in a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        m = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}} (\S+)", line)
        if m:
            out.append((dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1))), float(m.group(2))))
    return out


def _one(text: str, name: str, **labels: str) -> float:
    found = [v for lab, v in _samples(text, name) if labels.items() <= lab.items()]
    assert len(found) == 1, (name, labels, _samples(text, name))
    return found[0]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


TRAIN = {"depth/total": 0.5, "depth/photo": 0.4, "perf/samples_per_s": 12.0, "perf/data_wait_frac": 0.25,
         "perf/step_s": 0.2, "lr/encoder": 1e-4, "lr/heads": 1e-3}
VAL = {"seg/miou": 0.4, "teacher/miou": 0.42, "seg/iou/road": 0.9, "seg/iou/traffic light": 0.1,
       "depth/abs_rel": 0.3, "depth/abs_rel_baseline": 0.5, "depth/a1": 0.6, "time/elapsed_s": 3.0}


# ----------------------------------------------------------------------------- the metric table


def test_every_series_names_a_declared_metric_with_prometheus_conventions():
    for _, _, metric, labels in SERIES:
        m = METRICS[metric]
        assert set(labels) == set(m.labels), metric
    for name, m in METRICS.items():
        assert re.fullmatch(r"sdeseg_[a-z_]+", name)
        assert name.endswith("_total") == (m.kind == "counter"), name  # _total only on counters
        assert not name.endswith(("_s", "_frac", "_secs")), name
    assert series_for("train", "seg/confident") == ("sdeseg_pseudo_label_confident_ratio", {})
    assert series_for("train", "seg/unsup") == ("sdeseg_train_loss", {"term": "seg/unsup"})
    assert series_for("val", "seg/iou/traffic sign") == ("sdeseg_val_class_iou_ratio", {"class": "traffic sign"})
    assert series_for("val", "depth/a2") == ("sdeseg_val_depth_delta_ratio",
                                             {"predictor": "model", "threshold": "1.25^2"})
    assert series_for("val", "depth/abs_rel_ratio") is None and series_for("train", "keys") is None


# ----------------------------------------------------------------------------- in process: prometheus_client


def test_two_runs_in_one_process_export_their_own_series(tmp_path):
    """The demo's stages and the ablation loop run many loggers in one process: one set of
    metric objects, one endpoint, each run labelled; no duplicate registration."""
    port = free_port()
    loggers = {}
    for run, stage in (("sde-a", "sde"), ("seg-b", "semiseg")):
        prom = PrometheusMetrics.for_run("local", port, run, stage, 0)
        loggers[run] = MetricLogger(tmp_path / run, prometheus=prom, tensorboard=False)
        prom.count_steps(3, 12)
    loggers["sde-a"].log(3, TRAIN)
    loggers["seg-b"].log(3, TRAIN | {"depth/total": 0.7, "seg/confident": 0.8})
    loggers["seg-b"].log(4, VAL, kind="val")
    loggers["seg-b"].resumed(4)
    text = _scrape(port)
    for lg in loggers.values():
        lg.close()

    for run, stage, loss in (("sde-a", "sde", 0.5), ("seg-b", "semiseg", 0.7)):
        labels = {"run": run, "stage": stage, "rank": "0"}
        assert _one(text, "sdeseg_train_loss", term="depth/total", **labels) == loss
        assert _one(text, "sdeseg_train_steps_total", **labels) == 3
        assert _one(text, "sdeseg_train_samples_total", **labels) == 12
        assert _one(text, "sdeseg_train_step", **labels) == 3
        assert _one(text, "sdeseg_data_wait_ratio", **labels) == 0.25
        assert _one(text, "sdeseg_learning_rate", group="heads", **labels) == 1e-3
    seg = {"run": "seg-b"}
    assert _one(text, "sdeseg_val_miou_ratio", model="teacher", **seg) == 0.42
    assert _one(text, "sdeseg_val_class_iou_ratio", **{"class": "traffic light"}, **seg) == 0.1
    assert _one(text, "sdeseg_val_depth_abs_rel", predictor="constant", **seg) == 0.5
    assert _one(text, "sdeseg_pseudo_label_confident_ratio", **seg) == 0.8
    assert _one(text, "sdeseg_resumes_total", **seg) == 1

    # a third run in the process (same port) adds its series next to the others
    third = PrometheusMetrics.for_run("local", port, "sde-c", "sde", 0)
    third.record("train", {"step": 7, "depth/total": 0.1})
    text = _scrape(port)
    assert _one(text, "sdeseg_train_step", run="sde-c") == 7 and _one(text, "sdeseg_train_step", run="sde-a") == 3


def test_in_process_runs_without_a_port_export_nothing(tmp_path):
    assert PrometheusMetrics.for_run("local", 0, "r", "sde", 0) is None


# ----------------------------------------------------------------------------- under Ray: the node's metrics port


def _log_through_a_stage_context(config: dict, run_dir: str) -> str:
    """In a Ray worker: rank 0's StageContext (backend ray) logs a train and a val record."""
    import torch

    from sdeseg.config import from_dict
    from sdeseg.runtime import StageContext

    ctx = StageContext(from_dict(config), Path(run_dir), 0, 1, torch.device("cpu"), backend="ray")
    ctx.log(2, TRAIN)
    ctx.log(2, VAL | {"seg/acc": 0.8}, kind="val")
    ctx.prometheus.count_steps(2, 8)
    ctx.close()
    return "logged"


@pytest.fixture
def ray_with_metrics_port(tmp_path):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("needs its own Ray cluster (metrics port, report interval)")
    port = free_port()
    ray.init(num_cpus=1, include_dashboard=False, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 1000})  # Ray exports every 10 s by default
    yield ray, port
    ray.shutdown()


def test_ray_workers_export_on_the_node_metrics_port(ray_with_metrics_port, tmp_path):
    from sdeseg.config import load_config

    ray, port = ray_with_metrics_port
    cfg = load_config("demo_semiseg", ["runtime.run_name=probe-run"])

    @ray.remote(num_cpus=1)
    class Rank0:
        def run(self, config, run_dir):
            return _log_through_a_stage_context(config, run_dir)

    worker = Rank0.remote()  # alive until the scrape: Ray drops a dead worker's series
    assert ray.get(worker.run.remote(cfg.to_dict(), str(tmp_path / "run"))) == "logged"
    labels = {"run": "probe-run", "stage": "semiseg", "rank": "0"}
    wanted = ("ray_sdeseg_train_steps_total", "ray_sdeseg_train_loss", "ray_sdeseg_val_miou_ratio",
              "ray_sdeseg_val_class_iou_ratio", "ray_sdeseg_learning_rate")
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = _scrape(port)
        if all(any(labels.items() <= lab.items() for lab, _ in _samples(text, n)) for n in wanted):
            break
        time.sleep(0.5)
    assert _one(text, "ray_sdeseg_train_steps_total", **labels) == 2
    assert _one(text, "ray_sdeseg_train_samples_total", **labels) == 8
    assert _one(text, "ray_sdeseg_train_loss", term="depth/photo", **labels) == pytest.approx(0.4)
    assert _one(text, "ray_sdeseg_learning_rate", group="encoder", **labels) == pytest.approx(1e-4)
    assert _one(text, "ray_sdeseg_samples_per_second", **labels) == pytest.approx(12.0)
    assert _one(text, "ray_sdeseg_val_miou_ratio", model="student", **labels) == pytest.approx(0.4)
    assert _one(text, "ray_sdeseg_val_pixel_accuracy_ratio", model="student", **labels) == pytest.approx(0.8)
    assert _one(text, "ray_sdeseg_val_class_iou_ratio", **{"class": "road"}, **labels) == pytest.approx(0.9)
    assert _one(text, "ray_sdeseg_val_depth_delta_ratio", predictor="model", threshold="1.25",
                **labels) == pytest.approx(0.6)
    assert "# TYPE ray_sdeseg_train_steps_total counter" in text
    assert "# TYPE ray_sdeseg_train_loss gauge" in text
    ray.kill(worker)


# ----------------------------------------------------------------------------- metrics.jsonl across restarts


def _attempt(run_dir: Path, steps: range, resume_at: int | None, val_every: int = 4) -> None:
    lg = MetricLogger(run_dir, tensorboard=False)
    if resume_at is not None:
        lg.resumed(resume_at)
    for s in steps:
        lg.log(s, {"keys": [f"k{s}"]}, kind="keys")
        lg.log(s, TRAIN)
        if s % val_every == 0:
            lg.log(s, VAL, kind="val")
    lg.close()


def _kind_steps(records, kind):
    return [r["step"] for r in records if r["kind"] == kind]


def test_a_resumed_run_logs_each_step_once(tmp_path):
    run = tmp_path / "run"
    lg = MetricLogger(run, tensorboard=False)
    lg.log(0, {"transfer/loaded": 10}, kind="event")
    lg.close()
    _attempt(run, range(1, 11), None)      # crashed after step 10, last checkpoint at 8
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')   # and tore the line it was writing
    _attempt(run, range(9, 14), 8)         # the restart: steps 9..13
    _attempt(run, range(14, 14), 13)       # finished run started again: nothing to redo
    records = _records(run)
    assert _kind_steps(records, "train") == list(range(1, 14))
    assert _kind_steps(records, "keys") == list(range(1, 14))
    assert _kind_steps(records, "val") == [4, 8, 12]
    assert [(r["step"], sorted(k for k in r if "/" in k)) for r in records if r["kind"] == "event"] == [
        (0, ["transfer/loaded"]), (8, ["event/resumed"]), (13, ["event/resumed"])]
    assert not list(run.glob("*.tmp"))


def test_a_restart_without_checkpoint_starts_the_log_over(tmp_path):
    run = tmp_path / "run"
    _attempt(run, range(1, 4), None)   # crashed before its first checkpoint
    lg = MetricLogger(run, tensorboard=False)
    lg.log(0, {"transfer/loaded": 3}, kind="event")  # events before the first step keep the history
    lg.close()
    _attempt(run, range(1, 6), None)   # no checkpoint to restore: from step 0 again
    records = _records(run)
    assert _kind_steps(records, "train") == [1, 2, 3, 4, 5] and _kind_steps(records, "val") == [4]
    assert _kind_steps(records, "event") == [0]


def test_an_in_process_run_that_lost_its_last_checkpoint_logs_each_step_once(synthetic_root, tmp_path):
    """Real stage, real checkpoints: the checkpoint of the last step is lost (the run died while
    committing it), the re-run resumes from step 2 and redoes steps 3-4."""
    from sdeseg.launch import run_in_process

    cfg = tiny_config("demo_sde", synthetic_root, "train.steps=4", "train.ckpt_every=2", "train.val_every=2")
    run = tmp_path / "run"
    run_in_process(cfg, run)
    shutil.rmtree(run / "checkpoints" / "ckpt_000004")
    summary = run_in_process(cfg, run)
    assert summary["steps_this_run"] == 2
    records = _records(run)
    assert _kind_steps(records, "train") == [1, 2, 3, 4] and _kind_steps(records, "val") == [2, 4]
    assert [r["step"] for r in records if "event/resumed" in r] == [2]


# ----------------------------------------------------------------------------- what the user sees


def test_progress_line_shows_step_losses_throughput_data_wait_and_eta(tmp_path, caplog):
    lg = MetricLogger(tmp_path, progress=ProgressLine("sde", 100), tensorboard=False)
    with caplog.at_level(logging.INFO, logger="sdeseg"):
        lg.log(10, TRAIN)
        lg.log(20, TRAIN)
        lg.log(20, VAL, kind="val")
        lg.resumed(20)
    lg.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("sde step 10/100 (10%) | depth/total 0.5 depth/photo 0.4 | 12.0 samples/s | "
                               "data wait 25% | ETA ")
    assert lines[0].endswith("ETA 18s")  # 90 steps left at perf/step_s 0.2 before a second record
    assert lines[1].startswith("sde step 20/100 (20%)")
    assert lines[2] == "sde validation at step 20: seg/miou 0.4 teacher/miou 0.42 depth/abs_rel 0.3 depth/a1 0.6"
    assert lines[3] == "sde resumed from the checkpoint of step 20"
    # the instance and contrastive stages' headline metrics (not "(no labelled data)")
    assert ProgressLine("instance", 300).val(100, {"seg/miou": 0.2, "inst/pq": 0.15, "inst/ap50": 0.01}) == (
        "instance validation at step 100: seg/miou 0.2 inst/pq 0.15 inst/ap50 0.01")
    assert ProgressLine("contrastive", 250).val(125, {"unsup/miou": 0.1, "unsup/acc": 0.5}) == (
        "contrastive validation at step 125: unsup/miou 0.1")
    assert ProgressLine("semiseg", 10).val(5, {}) == "semiseg validation at step 5: (no labelled data)"
    gpu = ProgressLine("semiseg", 100).train(10, TRAIN | {"perf/gpu_mem_peak_bytes": 3.5 * 2**30})
    assert "| data wait 25% | GPU 3.5 GiB peak | ETA " in gpu


def test_step_meter_reports_gpu_memory_only_where_cuda_is_in_use():
    """On CPU (CI) no GPU key; on CUDA the peak of the interval: at least a tensor allocated in
    it, and reset by the next interval. Either way the key is a Prometheus series."""
    assert series_for("train", "perf/gpu_mem_peak_bytes") == ("sdeseg_gpu_memory_peak_bytes", {})
    meter = StepMeter()
    meter.update({"seg/total": 1.0}, samples=2, data_time=0.0)
    meter.step_done()
    if not torch.cuda.is_available():
        assert "perf/gpu_mem_peak_bytes" not in meter.summary(1)
        return
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB
    meter.reset()
    x = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")  # 512 MiB in this interval
    del x
    peak = meter.summary(1)["perf/gpu_mem_peak_bytes"]
    assert peak >= (256 + 512) * 2**20
    meter.reset()
    assert meter.summary(1)["perf/gpu_mem_peak_bytes"] < peak - 500 * 2**20  # the freed 512 MiB is gone
    del big


def test_verbose_flag_before_or_after_the_subcommand():
    from sdeseg.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["-v", "train", "demo_sde"]).verbose
    assert parser.parse_args(["train", "demo_sde", "--verbose"]).verbose
    assert not parser.parse_args(["train", "demo_sde"]).verbose


def test_quiet_libraries_drops_deepspeed_info_and_torch_deprecations():
    import os
    import warnings

    import ray

    from sdeseg.runtime.quiet import _BelowError, quiet_libraries

    ds = logging.getLogger("DeepSpeed")
    saved = list(ds.filters)
    ds.filters[:] = [f for f in saved if not isinstance(f, _BelowError)]  # an earlier test's CLI call may have set it
    # a Ray module whose logger is named by its file path, out of LoggingConfig's reach
    by_path = logging.getLogger(os.path.join(os.path.dirname(ray.__file__), "train", "fake_module.py"))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_libraries(verbose=False)
            quiet_libraries(verbose=False)  # idempotent
            warnings.warn_explicit("deprecated", FutureWarning, "c10d_logger.py", 1,
                                   module="torch.distributed.c10d_logger")
            warnings.warn_explicit("ours", FutureWarning, "x.py", 1, module="sdeseg.x")
        assert [str(w.message) for w in caught] == ["ours"]
        assert sum(isinstance(f, _BelowError) for f in ds.filters) == 1
        warn = logging.LogRecord("DeepSpeed", logging.WARNING, "x", 1, "Setting accelerator to CPU", None, None)
        err = logging.LogRecord("DeepSpeed", logging.ERROR, "x", 1, "real problem", None, None)
        assert not ds.filter(warn) and ds.filter(err)
        assert by_path.level == logging.WARNING
    finally:
        ds.filters[:] = saved
