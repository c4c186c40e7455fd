"""The one place DeepSpeed is configured and created.

The DeepSpeed JSON is generated from the typed config (never hand-written):
micro-batch = ``data.batch_size``, accumulation = ``runtime.grad_accum``, ZeRO
stage, precision and gradient clipping from ``runtime``. The optimizer and LR
schedule are plain PyTorch objects (``sdeseg.optim``) handed to DeepSpeed, so
parameter groups (encoder vs heads learning rates) work the same at every ZeRO stage.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from sdeseg.config import Config
from sdeseg.optim import build_optimizer, build_scheduler

AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX tiles), where oneDNN's
    bf16 convolutions are faster than fp32; elsewhere it emulates them, many times slower."""
    import torch.cpu

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """DeepSpeed JSON for this run."""
    rt = cfg.runtime
    micro = cfg.data.batch_size
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": rt.grad_accum,
        "train_batch_size": micro * rt.grad_accum * world_size,
        "zero_optimization": {"stage": rt.zero_stage},
        # ZeRO with a client (torch) optimizer: DeepSpeed only vouches for its own ones
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # progress is logged by the stage, not by DeepSpeed
        "wall_clock_breakdown": False,
    }
    if rt.grad_clip > 0:
        ds["gradient_clipping"] = rt.grad_clip
    if rt.precision != "fp32":
        # Mixed precision as torch autocast: parameters, optimizer state and losses stay fp32,
        # the engine's forward runs matmuls/convs in bf16/fp16 (DeepSpeed adds the loss scaler
        # for fp16). DeepSpeed's own "bf16"/"fp16" modes cast the parameters instead, which
        # needs every input cast too and puts the geometry (K^-1, poses) in low precision.
        ds["torch_autocast"] = {"enabled": True, "dtype": AUTOCAST_DTYPES[rt.precision]}
    return ds


def init_single_process_group(use_gpu: bool = False) -> None:
    """A world of one for in-process runs, so the same DeepSpeed path is used: gloo, and with
    ``use_gpu`` NCCL for CUDA tensors beside it (``cpu:gloo,cuda:nccl``): gloo has no CUDA
    reduce, all-gather or reduce-scatter, which DeepSpeed's ZeRO-1/2 call on the gradients.

    The rendezvous goes through an in-memory store, not MASTER_ADDR/MASTER_PORT: a port put in
    the environment would be inherited by child processes while this process's store still
    holds it, and their own world of one would then fail to listen on it (EADDRINUSE).
    DeepSpeed reads LOCAL_RANK from the environment, so the ranks are set there.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    backend = "cpu:gloo,cuda:nccl" if use_gpu else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def build_engine(model: torch.nn.Module, groups: list[dict], cfg: Config, world_size: int,
                 device: torch.device, total_steps: int | None = None):
    """Wrap ``model`` in a DeepSpeed engine with the config's optimizer and schedule.

    With ``runtime.sync_batchnorm`` on CUDA ranks (NCCL) the BatchNorm layers become
    SyncBatchNorm (statistics over the global batch; the parameters are shared, so
    ``groups`` stays valid). SyncBatchNorm has no CPU kernel: CPU ranks keep per-rank
    statistics and the stage averages the buffers before validating, exporting or saving
    (``StageContext.sync_buffers``).

    The LR schedule spans ``total_steps`` optimizer steps (default ``train.steps``; a stage
    that trains several models one after another, like data selection, names each one's).

    Returns the DeepSpeed engine: ``engine(x)``, ``engine.backward(loss)``, ``engine.step()``,
    ``engine.module``, ``engine.save_checkpoint`` / ``engine.load_checkpoint``.
    """
    import deepspeed

    if cfg.runtime.sync_batchnorm and world_size > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)

    # deepspeed_shm_comm only serves CPU inference all-reduce; skip its ~40 s JIT build
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    optimizer = build_optimizer(groups, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.train.steps if total_steps is None else total_steps, cfg.optim)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size),
        dist_init_required=False,
    )
    return engine


def engine_lrs(engine) -> dict[str, float]:
    """Current learning rate of each parameter group, by its name (``sdeseg.optim.param_groups``)."""
    return {str(g.get("name", i)): float(g["lr"]) for i, g in enumerate(engine.optimizer.param_groups)}
