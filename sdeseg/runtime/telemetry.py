"""Run telemetry on rank 0: metrics.jsonl, TensorBoard events, an optional Prometheus endpoint."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else v
    return v


class MetricLogger:
    """Writes one JSON object per logged step or validation; mirrors scalars to TensorBoard/Prometheus.

    Only rank 0 creates one; other ranks get a :class:`NullLogger`.
    """

    def __init__(self, run_dir: Path, metrics_port: int = 0, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - lives with the run
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._gauges: dict[str, Any] = {}
        self._prom = None
        if metrics_port > 0:
            import prometheus_client

            self._prom = prometheus_client
            prometheus_client.start_http_server(metrics_port)

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        record = {"kind": kind, "step": step, "time": time.time()}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            v = _plain(v)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v is None:
                continue
            if self._tb is not None:
                self._tb.add_scalar(f"{kind}/{k}" if "/" not in k else k, v, step)
            if self._prom is not None:
                self._gauge(k).set(v)
        if self._prom is not None:
            self._gauge("step").set(step)

    def _gauge(self, key: str):
        name = "sdeseg_" + "".join(c if c.isalnum() else "_" for c in key)
        if name not in self._gauges:
            self._gauges[name] = self._prom.Gauge(name, f"sdeseg metric {key}")
        return self._gauges[name]

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class NullLogger:
    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        pass

    def close(self) -> None:
        pass


class StepMeter:
    """Running means of losses and timing between two log points."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.samples = 0
        self.data_time = 0.0
        self.start = time.perf_counter()

    def update(self, losses: dict[str, Any], samples: int, data_time: float) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1
        self.samples += samples
        self.data_time += data_time

    def summary(self, world_size: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        out["perf/samples_per_s"] = self.samples * world_size / elapsed
        out["perf/data_wait_frac"] = self.data_time / elapsed
        out["perf/step_s"] = elapsed / max(self.n, 1)
        return out
