"""Run telemetry: metrics.jsonl and TensorBoard on rank 0, Prometheus metrics, the progress line.

**metrics.jsonl** (``<run_dir>/metrics.jsonl``) holds one JSON object per record: ``kind``
(``train``, ``val``, ``event``, ``keys``), ``step``, ``time`` and the keys the stages log
(``depth/total``, ``perf/samples_per_s``, ``seg/iou/road``, ...). ``sdeseg.report``, the tests
and ``tune/`` read these keys; TensorBoard gets the same scalars.

**Restarts.** An attempt of a run starts at the step of the checkpoint it restored
(:meth:`MetricLogger.resumed`, called by ``StageContext.restore``), or at step 0 when there
was none. Before the attempt writes, the records of kinds other than ``event`` with a later
step, written by an earlier attempt that crashed after its last checkpoint, are dropped
(the file is rewritten atomically; TensorBoard purges the same steps). So every ``train`` and
``val`` step appears once, and the ``event`` records keep the history (``event/resumed``).

**Prometheus.** A fixed set of metrics (:data:`METRICS`); :data:`SERIES` maps the logged keys
onto them. Every series carries the labels ``run`` (``runtime.run_name``, else the run
directory's name), ``stage`` and ``rank``. Rank 0 exports the run's metrics; every rank
exports its own step and sample counters. Under Ray the metrics go through
``ray.util.metrics`` to each node's metrics-export port, which KubeRay's PodMonitor scrapes;
Ray prefixes the names with ``ray_`` (``ray_sdeseg_train_steps_total``). In-process runs
serve them with ``prometheus_client`` at ``runtime.metrics_port`` (0: off). Any number of runs
may share a process (the demo's stages, the ablation loop): the metric objects exist once
per process and each run labels its own series. A finished run's series stay on the
in-process endpoint with their last values until the process exits (so a scrape after the run
still sees its final validation; select runs by label); under Ray they age out after the
worker process exits.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
RUN_LABELS = ("run", "stage", "rank")
log = logging.getLogger("sdeseg")


@dataclass(frozen=True)
class Metric:
    """One Prometheus metric: ``kind`` is ``counter`` or ``gauge``; ``labels`` come on top of
    :data:`RUN_LABELS`."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("sdeseg_train_steps_total", "counter", "Optimizer steps made by this rank in this process."),
    Metric("sdeseg_train_samples_total", "counter", "Training samples this rank consumed in this process."),
    Metric("sdeseg_resumes_total", "counter", "Restarts of the run from a checkpoint."),
    Metric("sdeseg_train_step", "gauge", "The run's optimizer step at the last train record."),
    Metric("sdeseg_train_loss", "gauge", "Mean of a loss term over the last log interval.", ("term",)),
    Metric("sdeseg_learning_rate", "gauge", "Learning rate of a parameter group.", ("group",)),
    Metric("sdeseg_step_duration_seconds", "gauge", "Mean optimizer step time over the last log interval."),
    Metric("sdeseg_samples_per_second", "gauge", "Training samples per second over all ranks."),
    Metric("sdeseg_data_wait_ratio", "gauge", "Share of rank 0's step time spent waiting for data."),
    Metric("sdeseg_gpu_memory_peak_bytes", "gauge", "Peak CUDA memory allocated by rank 0 over the last log interval."),
    Metric("sdeseg_pseudo_label_confident_ratio", "gauge", "Share of pseudo-labelled pixels above the threshold."),
    Metric("sdeseg_val_step", "gauge", "The optimizer step of the last validation."),
    Metric("sdeseg_val_miou_ratio", "gauge", "Validation mean IoU.", ("model",)),
    Metric("sdeseg_val_pixel_accuracy_ratio", "gauge", "Validation pixel accuracy.", ("model",)),
    Metric("sdeseg_val_class_iou_ratio", "gauge", "Validation IoU of one class.", ("class",)),
    Metric("sdeseg_val_depth_abs_rel", "gauge", "Median-scaled absolute relative depth error.", ("predictor",)),
    Metric("sdeseg_val_depth_sq_rel_meters", "gauge", "Median-scaled squared relative depth error.", ("predictor",)),
    Metric("sdeseg_val_depth_rmse_meters", "gauge", "Median-scaled depth RMSE.", ("predictor",)),
    Metric("sdeseg_val_depth_rmse_log", "gauge", "Median-scaled RMSE of log depth.", ("predictor",)),
    Metric("sdeseg_val_depth_delta_ratio", "gauge", "Share of pixels with max(d/gt, gt/d) below the threshold.",
           ("predictor", "threshold")),
)}

# (record kind, key (a full-match regex), metric, extra labels; values may name the key's groups: \1)
# in order, first match wins; keys matching no row are not exported (depth/abs_rel_ratio is
# abs_rel{predictor="model"} / abs_rel{predictor="constant"}; time/*, transfer/*, keys: not metrics)
_MODEL, _CONSTANT = {"predictor": "model"}, {"predictor": "constant"}
SERIES: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("train", r"step", "sdeseg_train_step", {}),
    ("train", r"perf/step_s", "sdeseg_step_duration_seconds", {}),
    ("train", r"perf/samples_per_s", "sdeseg_samples_per_second", {}),
    ("train", r"perf/data_wait_frac", "sdeseg_data_wait_ratio", {}),
    ("train", r"perf/gpu_mem_peak_bytes", "sdeseg_gpu_memory_peak_bytes", {}),
    ("train", r"lr/(.+)", "sdeseg_learning_rate", {"group": r"\1"}),
    ("train", r"seg/confident", "sdeseg_pseudo_label_confident_ratio", {}),
    ("train", r"((?:seg|depth)/.+)", "sdeseg_train_loss", {"term": r"\1"}),
    ("val", r"step", "sdeseg_val_step", {}),
    ("val", r"seg/miou", "sdeseg_val_miou_ratio", {"model": "student"}),
    ("val", r"teacher/miou", "sdeseg_val_miou_ratio", {"model": "teacher"}),
    ("val", r"seg/acc", "sdeseg_val_pixel_accuracy_ratio", {"model": "student"}),
    ("val", r"teacher/acc", "sdeseg_val_pixel_accuracy_ratio", {"model": "teacher"}),
    ("val", r"seg/iou/(.+)", "sdeseg_val_class_iou_ratio", {"class": r"\1"}),
    ("val", r"depth/abs_rel", "sdeseg_val_depth_abs_rel", _MODEL),
    ("val", r"depth/abs_rel_baseline", "sdeseg_val_depth_abs_rel", _CONSTANT),
    ("val", r"depth/sq_rel", "sdeseg_val_depth_sq_rel_meters", _MODEL),
    ("val", r"depth/rmse", "sdeseg_val_depth_rmse_meters", _MODEL),
    ("val", r"depth/rmse_baseline", "sdeseg_val_depth_rmse_meters", _CONSTANT),
    ("val", r"depth/rmse_log", "sdeseg_val_depth_rmse_log", _MODEL),
    ("val", r"depth/a1", "sdeseg_val_depth_delta_ratio", _MODEL | {"threshold": "1.25"}),
    ("val", r"depth/a2", "sdeseg_val_depth_delta_ratio", _MODEL | {"threshold": "1.25^2"}),
    ("val", r"depth/a3", "sdeseg_val_depth_delta_ratio", _MODEL | {"threshold": "1.25^3"}),
    ("val", r"depth/a1_baseline", "sdeseg_val_depth_delta_ratio", _CONSTANT | {"threshold": "1.25"}),
    ("event", r"event/resumed", "sdeseg_resumes_total", {}),
)
_SERIES = tuple((kind, re.compile(key), metric, labels) for kind, key, metric, labels in SERIES)


def series_for(kind: str, key: str) -> tuple[str, dict[str, str]] | None:
    """The metric and extra labels a logged ``key`` of a ``kind`` record is exported as, or None."""
    for k, pattern, metric, labels in _SERIES:
        m = pattern.fullmatch(key) if k == kind else None
        if m is not None:
            return metric, {name: m.expand(value) for name, value in labels.items()}
    return None


def run_label(run_name: str | None, run_dir: Path) -> str:
    """The ``run`` label: ``runtime.run_name``, else the run directory's name."""
    return run_name or Path(run_dir).name


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else v
    return v


def _number(v: Any) -> float | None:
    v = _plain(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


# ----------------------------------------------------------------------------- Prometheus


class _ClientFamilies:
    """The metrics as ``prometheus_client`` objects in its default registry, served over HTTP."""

    def __init__(self) -> None:
        import prometheus_client

        self._client = prometheus_client
        self._objects: dict[str, Any] = {}
        self._ports: set[int] = set()

    def serve(self, port: int) -> None:
        if port in self._ports:  # an earlier run in this process serves it: one registry, all runs
            return
        try:
            self._client.start_http_server(port)
        except OSError as e:
            from sdeseg.config import ConfigError

            raise ConfigError(f"runtime.metrics_port: cannot serve Prometheus metrics on port {port}: {e}") from e
        self._ports.add(port)

    def _get(self, name: str):
        if name not in self._objects:
            m = METRICS[name]
            cls = self._client.Counter if m.kind == "counter" else self._client.Gauge
            self._objects[name] = cls(name, m.help, RUN_LABELS + m.labels)
        return self._objects[name]

    def record(self, name: str, value: float, labels: dict[str, str]) -> None:
        child = self._get(name).labels(**labels)
        if METRICS[name].kind == "counter":
            child.inc(value)
        else:
            child.set(value)


class _RayFamilies:
    """The metrics as ``ray.util.metrics`` objects: Ray's metrics agent on this node exports them."""

    def __init__(self) -> None:
        from ray.util import metrics

        self._ray = metrics
        self._objects: dict[str, Any] = {}

    def _get(self, name: str):
        if name not in self._objects:
            m = METRICS[name]
            cls = self._ray.Counter if m.kind == "counter" else self._ray.Gauge
            self._objects[name] = cls(name, description=m.help, tag_keys=RUN_LABELS + m.labels)
        return self._objects[name]

    def record(self, name: str, value: float, labels: dict[str, str]) -> None:
        if METRICS[name].kind == "counter":
            self._get(name).inc(value, tags=labels)
        else:
            self._get(name).set(value, tags=labels)


# One set of metric objects per process and backend: a registry accepts a metric name once,
# and every run in the process labels its own series on the same objects.
_FAMILIES: dict[str, _ClientFamilies | _RayFamilies] = {}


def _families(backend: str) -> _ClientFamilies | _RayFamilies:
    if backend not in _FAMILIES:
        _FAMILIES[backend] = _RayFamilies() if backend == "ray" else _ClientFamilies()
    return _FAMILIES[backend]


class PrometheusMetrics:
    """One rank's series of one run: the fixed metrics labelled ``run``, ``stage``, ``rank``."""

    def __init__(self, families, run: str, stage: str, rank: int):
        self._families = families
        self.labels = {"run": run, "stage": stage, "rank": str(rank)}

    @classmethod
    def for_run(cls, backend: str, port: int, run: str, stage: str, rank: int) -> PrometheusMetrics | None:
        """Ray workers export through Ray's metrics agent; in-process runs serve ``port``
        (None when it is 0: no Prometheus)."""
        if backend == "ray":
            return cls(_families("ray"), run, stage, rank)
        if port <= 0:
            return None
        families = _families("local")
        families.serve(port)
        return cls(families, run, stage, rank)

    def _record(self, name: str, value: float, extra: dict[str, str]) -> None:
        self._families.record(name, value, self.labels | extra)

    def record(self, kind: str, metrics: dict[str, Any]) -> None:
        """Export the numeric keys of a ``kind`` record that :data:`SERIES` maps."""
        for key, value in metrics.items():
            found = series_for(kind, key)
            value = _number(value)
            if found is None or value is None:
                continue
            if METRICS[found[0]].kind == "counter" and value <= 0:
                continue
            self._record(found[0], value, found[1])

    def count_steps(self, steps: int, samples: int) -> None:
        """This rank made ``steps`` optimizer steps on ``samples`` samples since the last call."""
        if steps > 0:
            self._record("sdeseg_train_steps_total", steps, {})
        if samples > 0:
            self._record("sdeseg_train_samples_total", samples, {})


# ----------------------------------------------------------------------------- progress line

# what the progress lines show when the record has it, in this order
PROGRESS_LOSSES = ("seg/total", "seg/sup", "seg/unsup", "depth/total", "depth/photo", "distill/berhu")
PROGRESS_VAL = ("seg/miou", "teacher/miou", "inst/pq", "inst/ap50", "unsup/miou", "depth/abs_rel", "depth/a1",
                "select/budget", "select/classes_present", "select/score_img_per_s")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressLine:
    """Rank 0's console lines: one per train record (step/total, main losses, samples/s,
    data-wait share, ETA), one per validation, one per resume; through the ``sdeseg`` logger."""

    def __init__(self, name: str, total_steps: int):
        self.name = name
        self.total = total_steps
        self._first: tuple[float, int] | None = None  # (time, step) of this attempt's first train record

    def train(self, step: int, metrics: dict[str, Any]) -> str:
        now = time.monotonic()
        if self._first is None:
            self._first = (now, step)
        t0, s0 = self._first
        per_step = (now - t0) / (step - s0) if step > s0 else metrics.get("perf/step_s") or 0.0
        parts = [f"{self.name} step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"]
        losses = [f"{k} {metrics[k]:.4g}" for k in PROGRESS_LOSSES if _number(metrics.get(k)) is not None]
        if losses:
            parts.append(" ".join(losses))
        if "perf/samples_per_s" in metrics:
            parts.append(f"{metrics['perf/samples_per_s']:.1f} samples/s")
        if "perf/data_wait_frac" in metrics:
            parts.append(f"data wait {100 * metrics['perf/data_wait_frac']:.0f}%")
        if "perf/gpu_mem_peak_bytes" in metrics:
            parts.append(f"GPU {metrics['perf/gpu_mem_peak_bytes'] / 2**30:.1f} GiB peak")
        parts.append(f"ETA {_duration(per_step * max(self.total - step, 0))}")
        return " | ".join(parts)

    def val(self, step: int, metrics: dict[str, Any]) -> str:
        shown = [f"{k} {metrics[k]:.4g}" for k in PROGRESS_VAL if _number(metrics.get(k)) is not None]
        return f"{self.name} validation at step {step}: {' '.join(shown) or '(no labelled data)'}"

    def resumed(self, step: int) -> str:
        return f"{self.name} resumed from the checkpoint of step {step}"


# ----------------------------------------------------------------------------- the log


def read_records(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The complete records of a metrics.jsonl after byte ``offset``, and the offset after them
    (a line still being written is left for the next call)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a torn line from a crashed writer
    return records, offset + end


def _kept(line: str, step: int) -> bool:
    """Whether a record survives a restart at ``step``: events always, other kinds up to ``step``."""
    try:
        record = json.loads(line)
    except ValueError:
        return False  # torn by the crash
    return record.get("kind") == "event" or record.get("step", 0) <= step


class MetricLogger:
    """Rank 0's log: metrics.jsonl, TensorBoard, Prometheus (when given) and the progress line.

    Other ranks get a :class:`NullLogger`.
    """

    def __init__(self, run_dir: Path, *, prometheus: PrometheusMetrics | None = None,
                 progress: ProgressLine | None = None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        # an earlier attempt's records are reconciled before this attempt's first step record
        self._reconciled = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - lives with the run
        self._tensorboard = tensorboard
        self._tb = self._tb_writer() if tensorboard else None
        self.prometheus = prometheus
        self.progress = progress

    def _tb_writer(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)

    def resumed(self, step: int) -> None:
        """This attempt continues from the checkpoint of ``step``: later non-event records of
        earlier attempts are dropped; an ``event/resumed`` record marks the restart."""
        self._drop_after(step)
        self.log(step, {"event/resumed": 1.0}, kind="event")
        if self.progress is not None:
            log.info(self.progress.resumed(step))

    def _drop_after(self, step: int) -> None:
        """Rewrite metrics.jsonl (atomically) without the non-event records after ``step``."""
        self._reconciled = True
        self._file.close()
        kept = [line + "\n" for line in self.path.read_text().splitlines() if _kept(line, step)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - lives with the run
        if self._tb is not None:  # TensorBoard hides the events from step + 1 on
            self._tb.close()
            self._tb = self._tb_writer(purge_step=step + 1)

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if kind != "event" and not self._reconciled:
            self._drop_after(0)  # no checkpoint was restored: this attempt started at step 0
        record = {"kind": kind, "step": step, "time": time.time()}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                v = _number(v)
                if v is not None:
                    self._tb.add_scalar(f"{kind}/{k}" if "/" not in k else k, v, step)
        if self.prometheus is not None:
            self.prometheus.record(kind, record)
        if self.progress is not None and kind in ("train", "val"):
            log.info(self.progress.train(step, metrics) if kind == "train" else self.progress.val(step, metrics))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class NullLogger:
    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        pass

    def resumed(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class StepMeter:
    """Running means of losses and timing between two log points: the stage calls
    :meth:`update` per micro-batch, the runtime (``StageContext.end_step``) :meth:`step_done`
    per optimizer step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.steps = 0
        self.samples = 0
        self.data_time = 0.0
        self.start = time.perf_counter()
        if _cuda_in_use():
            import torch

            torch.cuda.reset_peak_memory_stats()

    def update(self, losses: dict[str, Any], samples: int, data_time: float) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1
        self.samples += samples
        self.data_time += data_time

    def step_done(self) -> None:
        self.steps += 1

    def summary(self, world_size: int) -> dict[str, float]:
        """Mean loss terms per micro-batch; ``perf/samples_per_s`` over all ranks (this rank's
        rate times ``world_size``), ``perf/data_wait_frac`` of this rank, ``perf/step_s`` per
        optimizer step."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        out["perf/samples_per_s"] = self.samples * world_size / elapsed
        out["perf/data_wait_frac"] = self.data_time / elapsed
        out["perf/step_s"] = elapsed / max(self.steps or self.n, 1)
        if _cuda_in_use():
            import torch

            out["perf/gpu_mem_peak_bytes"] = float(torch.cuda.max_memory_allocated())
        return out


def _cuda_in_use() -> bool:
    """Whether this process has touched CUDA (its current device then holds the stage's tensors);
    never initialises CUDA itself."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()
