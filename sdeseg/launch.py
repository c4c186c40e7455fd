"""Run a stage: in-process (a world of one) or on a Ray cluster with Ray Train + DeepSpeed.

``sdeseg train`` calls :func:`run_stage`. First :func:`preflight` checks, in this
process, everything that can be known before a worker starts (paths, the dataset, the
stage's own ``preflight``), so bad input fails at once with a message naming the key or
file. On Ray, the cluster is the one named by ``RAY_ADDRESS`` (e.g. a KubeRay head) or a
local one started here. Every worker parses the same config, builds a
:class:`StageContext` and calls the stage. Checkpoints go through ``ray.train.report``;
``FailureConfig(max_failures)`` restarts a failed worker group from the latest committed
one, and re-running with the same run directory resumes a stopped run
(:func:`ray_run_name`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from sdeseg.config import Config, ConfigError, from_dict, save_config
from sdeseg.runtime.context import FAULT_ENV, StageContext
from sdeseg.stages import stage_module

log = logging.getLogger("sdeseg")
PASS_ENV = ("SDESEG_OPS_BACKEND", "TRITON_INTERPRET", FAULT_ENV, "RAY_AUTH_MODE")


def _absolute(path: str | None) -> str | None:
    """Local relative paths are made absolute: Ray workers do not share the driver's cwd."""
    if path is None or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def preflight(cfg: Config) -> Config:
    """Resolve local paths and check inputs exist, before any worker starts."""
    from sdeseg.data.manifest import read_manifest

    cfg = copy.deepcopy(cfg)
    cfg.data.root = _absolute(cfg.data.root)
    cfg.data.labeled_keys = _absolute(cfg.data.labeled_keys)
    cfg.semiseg.sde_checkpoint = _absolute(cfg.semiseg.sde_checkpoint)
    cfg.model.pretrained = _absolute(cfg.model.pretrained)
    cfg.runtime.storage_path = _absolute(cfg.runtime.storage_path)
    read_manifest(cfg.data.root)  # clear DatasetError for a missing/empty dataset
    files = {"data.labeled_keys": cfg.data.labeled_keys, "semiseg.sde_checkpoint": cfg.semiseg.sde_checkpoint,
             "model.pretrained": cfg.model.pretrained}
    for key, path in files.items():
        if path is not None and "://" not in path and not Path(path).is_file():
            raise ConfigError(f"{key}: file {path} does not exist")
    check = getattr(stage_module(cfg.stage), "preflight", None)
    if check is not None:
        check(cfg)
    return cfg


def ray_run_name(run_dir: Path, storage_path: str | None, run_name: str | None = None) -> str:
    """The Ray Train run name: ``runtime.run_name`` when set, else the run directory's name
    plus a digest of the whole run directory and storage path. Ray resumes a run from
    ``<storage>/<name>``: two run directories that share a last component (``/runs/a/semiseg``,
    ``/runs/b/semiseg``) must never resume each other's checkpoints, and one directory must
    always find its own."""
    if run_name:
        return run_name
    digest = hashlib.sha256(f"{Path(run_dir).resolve()}\n{storage_path or ''}".encode()).hexdigest()[:12]
    return f"{Path(run_dir).name}-{digest}"


def prepare_run_dir(cfg: Config, run_dir: str | Path) -> Path:
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def _write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
    tmp.replace(run_dir / "summary.json")


def _run_worker(cfg: Config, run_dir: Path, rank: int, world_size: int, device: torch.device, backend: str):
    torch.set_num_threads(cfg.runtime.torch_threads)
    from sdeseg.ops import set_backend

    if cfg.runtime.ops_backend != "auto":  # "auto" leaves SDESEG_OPS_BACKEND in charge
        set_backend(cfg.runtime.ops_backend)
    ctx = StageContext(cfg, run_dir, rank, world_size, device, backend=backend)
    start = time.perf_counter()
    try:
        result = stage_module(cfg.stage).run(cfg, ctx)
    finally:
        ctx.close()
    summary = dict(result.summary)
    summary.setdefault("wall_time_s", time.perf_counter() - start)
    summary["exports"] = result.exports
    if rank == 0:
        _write_summary(run_dir, summary)
    return summary


def run_in_process(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """Run the stage in this process as a world of one (gloo), same DeepSpeed path."""
    from sdeseg.runtime.engine import init_single_process_group

    if cfg.runtime.use_gpu and not torch.cuda.is_available():
        raise ConfigError("runtime.use_gpu: this machine has no CUDA GPU (set runtime.use_gpu=false)")
    cfg = preflight(cfg)
    run_dir = prepare_run_dir(cfg, run_dir)
    init_single_process_group()
    device = torch.device("cuda", 0) if cfg.runtime.use_gpu else torch.device("cpu")
    return _run_worker(cfg, run_dir, 0, 1, device, "local")


def _train_loop_per_worker(loop_config: dict) -> None:
    import ray.train

    cfg = from_dict(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    ctx = ray.train.get_context()
    if cfg.runtime.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    summary = _run_worker(cfg, run_dir, ctx.get_world_rank(), ctx.get_world_size(), device, "ray")
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float))} | {"done": True})


def ensure_ray(cfg: Config):
    """Connect to RAY_ADDRESS or start a local cluster; fail early when resources can't exist."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            need = cfg.runtime.num_workers * cfg.runtime.cpus_per_worker
            # workers inherit the settings that change behaviour (ops backend, test hooks)
            env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
            ray.init(num_cpus=max(int(need + 0.999), os.cpu_count() or 1),
                     log_to_driver=True, runtime_env={"env_vars": env} if env else None)
    total = ray.cluster_resources()
    rt = cfg.runtime
    if rt.use_gpu:
        need_gpu = rt.num_workers * rt.gpus_per_worker
        if total.get("GPU", 0) < need_gpu:
            raise ConfigError(
                f"runtime.use_gpu: the config asks for {need_gpu:g} GPUs ({rt.num_workers} workers x "
                f"{rt.gpus_per_worker:g}) but the Ray cluster has {total.get('GPU', 0):g}"
            )
    need_cpu = rt.num_workers * rt.cpus_per_worker
    if total.get("CPU", 0) < need_cpu:
        raise ConfigError(
            f"runtime.cpus_per_worker: {rt.num_workers} workers x {rt.cpus_per_worker:g} CPUs = {need_cpu:g} "
            f"but the Ray cluster has {total.get('CPU', 0):g} CPUs"
        )
    return ray


def run_on_ray(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """Run the stage with Ray Train: one DeepSpeed rank per worker, fault tolerant, resumable."""
    cfg = preflight(cfg)
    run_dir = prepare_run_dir(cfg, run_dir)
    ensure_ray(cfg)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    rt = cfg.runtime
    resources = {"CPU": rt.cpus_per_worker}
    if rt.use_gpu:
        resources["GPU"] = rt.gpus_per_worker
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": str(run_dir)},
        torch_config=TorchConfig(backend="nccl" if rt.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=rt.num_workers, use_gpu=rt.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=ray_run_name(run_dir, rt.storage_path, rt.run_name),
            storage_path=rt.storage_path or str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=rt.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    return dict(result.metrics or {})


def run_stage(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    return run_in_process(cfg, run_dir) if cfg.runtime.in_process else run_on_ray(cfg, run_dir)
