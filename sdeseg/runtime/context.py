"""What a stage gets from the runtime: rank, device, engine, data, checkpoints, logging, collectives.

A stage (``sdeseg/stages/*.py``) is ``run(cfg, ctx) -> StageResult`` and never imports
ray or deepspeed; the same stage runs under Ray Train (``backend="ray"``) and in-process
(``"local"``, a world of one) with identical code. The stage's loop stays explicit:

    state = TrainState(engine, shared={"progress": progress}, per_rank={"reader": stream})
    ctx.restore(state)                      # every part, and the RNG states, from the latest checkpoint
    while progress.step < cfg.train.steps:
        ...                                 # grad_accum micro-batches, one optimizer step
        progress.step += 1
        ctx.end_step(progress.step, meter, engine)
        val_due, ckpt_due = ctx.due(progress.step)
        if val_due or ckpt_due:
            ctx.sync_buffers(engine.module)  # the ranks agree before validating, exporting, saving
        ...
        ctx.report(progress.step, metrics, state if ckpt_due else None)
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdeseg.config import Config
from sdeseg.optim import assert_finite
from sdeseg.runtime.checkpoint import LocalCheckpoints, TrainState, load_train_state, save_train_state
from sdeseg.runtime.engine import build_engine, engine_lrs
from sdeseg.runtime.telemetry import MetricLogger, NullLogger, ProgressLine, PrometheusMetrics, run_label

# Fault injection for the fault-tolerance tests, read by the runtime (never by a stage):
# with SDESEG_FAULT_AT_STEP=N, rank 1 (rank 0 in a world of one) exits hard once after step N,
# SDESEG_FAULT_DELAY_S seconds later (default 0). Ray Train's controller collects a worker's
# reports every 2 s: a lone worker that dies sooner after reporting a checkpoint loses that
# report, and its restart begins from the one before (a delay makes a test deterministic).
FAULT_ENV = "SDESEG_FAULT_AT_STEP"
FAULT_DELAY_ENV = "SDESEG_FAULT_DELAY_S"
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StageResult:
    """Final flat metrics (``depth/abs_rel``, ``seg/miou``, ...) and exported files."""

    summary: dict[str, Any]
    exports: dict[str, str] = field(default_factory=dict)


class StageContext:
    def __init__(self, cfg: Config, run_dir: Path, rank: int, world_size: int, device: torch.device,
                 backend: str = "local", store=None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.backend = backend
        self.is_main = rank == 0
        self.store = store  # sdeseg.storage.RunStore when the run's files live in object storage
        if self.is_main and store is not None and store.exists("metrics.jsonl"):
            store.get("metrics.jsonl", self.run_dir / "metrics.jsonl")  # a restart continues the log
        rt = cfg.runtime
        # every rank exports its step and sample counters; rank 0 writes the log and the run's metrics
        self.prometheus = PrometheusMetrics.for_run(backend, rt.metrics_port, run_label(rt.run_name, self.run_dir),
                                                    cfg.stage, rank)
        progress = ProgressLine(cfg.stage, cfg.loop_steps()) if rt.progress else None
        self.logger = (MetricLogger(self.run_dir, prometheus=self.prometheus, progress=progress) if self.is_main
                       else NullLogger())
        self._local_ckpts = LocalCheckpoints(self.run_dir)

    # ------------------------------------------------------------------ engine and precision

    def build_engine(self, model: torch.nn.Module, groups: list[dict], total_steps: int | None = None):
        """DeepSpeed engine around ``model`` (see ``sdeseg.runtime.engine``); its LR schedule
        spans ``total_steps`` (default ``train.steps``)."""
        return build_engine(model, groups, self.cfg, self.world_size, self.device, total_steps)

    def autocast(self):
        """``runtime.precision``'s autocast for forward passes outside the engine (EMA teacher,
        frozen depth net, validation); the engine's own forward is autocast by DeepSpeed.
        Losses are computed outside it, in float32."""
        dtype = AUTOCAST.get(self.cfg.runtime.precision)
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ data

    def train_stream(self, frames: tuple[int, ...] = (-1, 0, 1), labels: bool = True, as_float: bool = False,
                     **overrides: Any):
        """This rank's endless training stream of ``data.train_split`` (``sdeseg.data.reader.ShardStream``).

        Its batches carry uint8 images, page-locked on a CUDA rank: the stage moves each to
        ``self.device`` with ``Batch.to``, which converts them there (the host neither converts
        nor copies float32). ``as_float=True``: float32 images on the host, for a stage that
        works on them there before moving them."""
        from sdeseg.data.reader import make_loader

        return make_loader(self.cfg.data, rank=self.rank, world_size=self.world_size, seed=self.cfg.train.seed,
                           frames=frames, labels=labels, as_float=as_float,
                           pin_memory=not as_float and torch.device(self.device).type == "cuda", **overrides)

    def val_loader(self, split: str | None = None, frames: tuple[int, ...] = (0,), max_batches: int | None = None):
        """This rank's share of an evaluation split (default ``data.val_split``, capped at
        ``train.val_batches`` batches per rank), full resolution, no augmentation."""
        from sdeseg.data.reader import ValLoader

        d = self.cfg.data
        return ValLoader(
            d.root, split or d.val_split, batch_size=d.val_batch_size, rank=self.rank, world_size=self.world_size,
            domain=d.domain, frames=frames, max_corrupt_fraction=d.max_corrupt_fraction,
            max_batches=self.cfg.train.val_batches if max_batches is None else max_batches,
        )

    def test_metrics(self, evaluate) -> dict[str, Any]:
        """``evaluate(split)`` on the held-out ``data.test_split``, keys prefixed ``test/``; empty
        when the config names none or the dataset has no such split. Every rank calls this."""
        from sdeseg.data.shardio import ShardIndex

        split = self.cfg.data.test_split
        if split is None or not ShardIndex.load(self.cfg.data.root).select(split, self.cfg.data.domain):
            return {}
        return {f"test/{k}": v for k, v in evaluate(split).items()}

    def labeled_pool(self, keys: list[str]):
        """This rank's endless batches of the labeled subset ``keys`` (``sdeseg.data.labeled.LabeledPool``)."""
        from sdeseg.data.labeled import LabeledPool

        d = self.cfg.data
        return LabeledPool(d.root, keys, batch_size=d.labeled_batch_size, crop=d.size, augment=d.augment,
                           seed=self.cfg.train.seed, rank=self.rank, world_size=self.world_size)

    # ------------------------------------------------------------------ checkpoints

    def restore(self, state: TrainState) -> bool:
        """Load every part of ``state`` and this rank's RNG states from the latest checkpoint.

        Returns False (and changes nothing) when the run has no checkpoint yet.
        """
        if self.backend == "ray":
            import ray.train

            ckpt = ray.train.get_checkpoint()
            if ckpt is None:
                return False
            import pyarrow.fs

            if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
                with ckpt.as_directory() as d:  # the files themselves, no copy
                    load_train_state(state, Path(d), self.rank)
            else:
                # each rank downloads into its own directory: as_directory() shares one download
                # between the ranks of a node, and a rank could read files still being written
                with tempfile.TemporaryDirectory(prefix=f"sdeseg_restore_{self.rank}_") as d:
                    ckpt.to_directory(d)
                    load_train_state(state, Path(d), self.rank)
        else:
            latest = self._local_ckpts.latest()
            if latest is None:
                return False
            load_train_state(state, latest, self.rank)
        progress = state.shared.get("progress")
        self.logger.resumed(getattr(progress, "step", 0))  # drops the log's records after this step
        return True

    def due(self, step: int) -> tuple[bool, bool]:
        """(validation due, checkpoint due) after optimizer step ``step``; both at the last step."""
        t = self.cfg.train
        last = step == t.steps
        return (last or bool(t.val_every and step % t.val_every == 0),
                last or bool(t.ckpt_every and step % t.ckpt_every == 0))

    def report(self, step: int, metrics: dict[str, Any], state: TrainState | None = None) -> None:
        """Report metrics, with a checkpoint of ``state`` when given — every rank calls this together."""
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        metrics["step"] = step
        if self.backend == "ray":
            import ray.train

            if state is None:
                ray.train.report(metrics)
                return
            with tempfile.TemporaryDirectory(prefix="sdeseg_ckpt_") as tmp:
                save_train_state(state, Path(tmp), self.rank)
                ray.train.report(
                    metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"ckpt_{step:06d}"
                )
            self._upload_metrics()
            return
        if state is not None:
            self._local_ckpts.save(state, step, self.rank)

    # ------------------------------------------------------------------ per step

    def end_step(self, step: int, meter, engine) -> None:
        """After optimizer step ``step``: every ``train.log_every`` steps log mean losses,
        throughput and learning rates (and fail on a non-finite loss), and count this rank's
        steps and samples for Prometheus; then the runtime's fault-injection hook of the tests
        (``SDESEG_FAULT_AT_STEP``)."""
        t = self.cfg.train
        meter.step_done()
        if step % t.log_every == 0 or step == t.steps:
            summary = meter.summary(self.world_size)
            assert_finite(summary, step)
            self.log(step, summary | {f"lr/{name}": lr for name, lr in engine_lrs(engine).items()})
            if self.prometheus is not None:
                self.prometheus.count_steps(meter.steps, meter.samples)
            meter.reset()
        self._maybe_inject_fault(step)

    def _maybe_inject_fault(self, step: int) -> None:
        at = os.environ.get(FAULT_ENV)
        victim = 1 if self.world_size > 1 else 0
        if at is None or int(at) != step or self.rank != victim:
            return
        marker = self.run_dir / "fault_injected"
        if marker.exists():
            return
        marker.write_text(json.dumps({"step": step, "rank": self.rank}))
        time.sleep(float(os.environ.get(FAULT_DELAY_ENV, "0")))
        os._exit(17)

    # ------------------------------------------------------------------ logging

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        """Rank 0 writes metrics.jsonl / TensorBoard / Prometheus (``sdeseg.runtime.telemetry``)
        and, with ``runtime.progress``, a progress line; other ranks do nothing."""
        self.logger.log(step, metrics, kind)

    # ------------------------------------------------------------------ collectives

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (on a device copy); identity in a world of one."""
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        t = tensor.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.to(tensor.device)

    @torch.no_grad()
    def sync_buffers(self, *modules: torch.nn.Module) -> None:
        """Average the floating-point buffers (BatchNorm running statistics) of ``modules``
        over the ranks, in place, so every rank holds the same model.

        Parameters already agree (data-parallel gradients are all-reduced); buffers do not:
        each rank's BatchNorm tracks its own batches. Call before validation (so the ranks
        evaluate one model), exports and checkpoints (which keep rank 0's copy). One
        all-reduce of all buffers, flattened. A no-op in a world of one.
        """
        if self.world_size == 1:
            return
        import torch.distributed as dist

        bufs = [b for m in modules for b in m.buffers() if b.is_floating_point()]
        if not bufs:
            return
        flat = torch.cat([b.detach().reshape(-1).to(self.device, torch.float32) for b in bufs])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for b in bufs:
            n = b.numel()
            b.copy_(flat[offset:offset + n].view_as(b))
            offset += n

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` (picklable) on every rank; identity in a world of one."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a world of one (e.g. the
        per-image annotations of a mask AP, which do not reduce to a sum)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

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
            if self.store is not None:
                self.store.put(path, f"export/{path.name}")
        return str(path)

    def write_output(self, rel: str, data: bytes) -> str:
        """Rank 0 writes ``<run_dir>/<rel>`` atomically (and to the run's store); returns the path."""
        path = self.run_dir / rel
        if self.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            if self.store is not None:
                self.store.put(path, rel)
        return str(path)

    def exports(self) -> dict[str, str]:
        """Name -> path of every export of this run (``<run_dir>/export/*.pt``)."""
        return {p.stem: str(p) for p in sorted((self.run_dir / "export").glob("*.pt"))}

    def _upload_metrics(self) -> None:
        """Rank 0 copies metrics.jsonl to the store (at checkpoints and at the end)."""
        log_file = self.run_dir / "metrics.jsonl"
        if self.is_main and self.store is not None and log_file.exists():
            self.store.put(log_file, "metrics.jsonl")

    def close(self) -> None:
        self.logger.close()
        self._upload_metrics()
