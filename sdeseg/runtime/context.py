"""What a stage gets from the runtime: rank, device, engine, checkpoints, logging, collectives.

A stage (``sdeseg/stages/*.py``) is ``run(cfg, ctx) -> StageResult`` and never imports
ray or deepspeed; the same stage runs under Ray Train (``RayBackend``) and in-process
(``LocalBackend``, a world of one) with identical code.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdeseg.config import Config
from sdeseg.optim import assert_finite
from sdeseg.runtime.checkpoint import LocalCheckpoints, load_engine_checkpoint, save_engine_checkpoint
from sdeseg.runtime.engine import build_engine, engine_lrs
from sdeseg.runtime.telemetry import MetricLogger, NullLogger

FAULT_ENV = "SDESEG_FAULT_AT_STEP"  # test hook: rank 1 (or 0 in a world of one) dies once at this step


@dataclass
class StageResult:
    """Final flat metrics (``depth/abs_rel``, ``seg/miou``, ...) and exported files."""

    summary: dict[str, Any]
    exports: dict[str, str] = field(default_factory=dict)


class StageContext:
    def __init__(self, cfg: Config, run_dir: Path, rank: int, world_size: int, device: torch.device,
                 backend: str = "local"):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.backend = backend
        self.is_main = rank == 0
        self.logger = MetricLogger(self.run_dir, cfg.runtime.metrics_port) if self.is_main else NullLogger()
        self._local_ckpts = LocalCheckpoints(self.run_dir)

    # ------------------------------------------------------------------ engine and resume

    def build_engine(self, model: torch.nn.Module, groups: list[dict]):
        """DeepSpeed engine around ``model`` (see ``sdeseg.runtime.engine``)."""
        return build_engine(model.to(self.device), groups, self.cfg, self.world_size)

    def restore(self, engine) -> tuple[dict, dict] | None:
        """Load the latest checkpoint into ``engine``; return (client_state, rank_state) or None."""
        if self.backend == "ray":
            import ray.train

            ckpt = ray.train.get_checkpoint()
            if ckpt is None:
                return None
            with ckpt.as_directory() as d:
                return load_engine_checkpoint(engine, Path(d), self.rank)
        latest = self._local_ckpts.latest()
        return None if latest is None else load_engine_checkpoint(engine, latest, self.rank)

    def due(self, step: int) -> tuple[bool, bool]:
        """(validation due, checkpoint due) after optimizer step ``step``; both at the last step."""
        t = self.cfg.train
        last = step == t.steps
        return (last or bool(t.val_every and step % t.val_every == 0),
                last or bool(t.ckpt_every and step % t.ckpt_every == 0))

    def log_progress(self, step: int, meter, engine) -> None:
        """Every ``train.log_every`` steps: mean losses, throughput and learning rates; fail on NaN."""
        t = self.cfg.train
        if step % t.log_every and step != t.steps:
            return
        summary = meter.summary(self.world_size)
        assert_finite(summary, step)
        lrs = engine_lrs(engine)
        self.log(step, summary | {"lr/encoder": lrs[0], "lr/heads": lrs[-1]})
        meter.reset()

    # ------------------------------------------------------------------ reporting

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        """Rank 0 writes metrics.jsonl / TensorBoard / Prometheus; other ranks do nothing."""
        self.logger.log(step, metrics, kind)

    def report(self, step: int, metrics: dict[str, Any], checkpoint: tuple[Any, dict, dict] | None = None) -> None:
        """Report metrics (and optionally a checkpoint) — every rank must call this together.

        ``checkpoint`` is ``(engine, client_state, rank_state)``: each rank saves its part.
        """
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        metrics["step"] = step
        if self.backend == "ray":
            import ray.train

            if checkpoint is None:
                ray.train.report(metrics)
                return
            engine, client_state, rank_state = checkpoint
            with tempfile.TemporaryDirectory(prefix="sdeseg_ckpt_") as tmp:
                save_engine_checkpoint(engine, Path(tmp), client_state, self.rank, rank_state)
                ray.train.report(
                    metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"ckpt_{step:06d}"
                )
            return
        if checkpoint is not None:
            engine, client_state, rank_state = checkpoint
            self._local_ckpts.save(engine, step, client_state, self.rank, rank_state)

    def maybe_inject_fault(self, step: int) -> None:
        """Test hook for fault tolerance: with SDESEG_FAULT_AT_STEP=N one rank dies hard once at step N."""
        at = os.environ.get(FAULT_ENV)
        victim = 1 if self.world_size > 1 else 0
        if at is None or int(at) != step or self.rank != victim:
            return
        marker = self.run_dir / "fault_injected"
        if marker.exists():
            return
        marker.write_text(json.dumps({"step": step, "rank": self.rank}))
        os._exit(17)

    # ------------------------------------------------------------------ collectives

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place on a device copy); identity in a world of one."""
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        t = tensor.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.to(tensor.device)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    # ------------------------------------------------------------------ exports

    def export(self, name: str, payload: dict[str, Any]) -> str:
        """Rank 0 writes ``<run_dir>/export/<name>.pt`` atomically (tensors and plain types only)."""
        path = self.run_dir / "export" / f"{name}.pt"
        if self.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".pt.tmp")
            torch.save(payload, tmp)
            tmp.replace(path)
        return str(path)

    def close(self) -> None:
        self.logger.close()
