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
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from sdeseg.config import Config, ConfigError, from_dict, save_config
from sdeseg.runtime.context import FAULT_DELAY_ENV, FAULT_ENV, StageContext
from sdeseg.runtime.quiet import quiet_libraries, train_log_level
from sdeseg.stages import stage_module
from sdeseg.storage import RunStore, check_storage, fetch, is_url

log = logging.getLogger("sdeseg")
PASS_ENV = ("SDESEG_OPS_BACKEND", "TRITON_INTERPRET", FAULT_ENV, FAULT_DELAY_ENV, "RAY_AUTH_MODE")


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
    cfg.select.sde_checkpoint = _absolute(cfg.select.sde_checkpoint)
    cfg.ssda.source_sde_checkpoint = _absolute(cfg.ssda.source_sde_checkpoint)
    cfg.ssda.source_root = _absolute(cfg.ssda.source_root)
    cfg.ssda.source_depth_root = _absolute(cfg.ssda.source_depth_root)
    cfg.selftrain.pseudo_root = _absolute(cfg.selftrain.pseudo_root)
    cfg.semiseg.init_checkpoint = _absolute(cfg.semiseg.init_checkpoint)
    cfg.contrastive.regions_root = _absolute(cfg.contrastive.regions_root)
    cfg.contrastive.init_checkpoint = _absolute(cfg.contrastive.init_checkpoint)
    cfg.model.pretrained = _absolute(cfg.model.pretrained)
    cfg.runtime.storage_path = _absolute(cfg.runtime.storage_path)
    check_storage(cfg.data.root, "data.root", write=False)  # bucket, credentials, endpoint: one line each
    read_manifest(cfg.data.root)  # clear DatasetError for a missing/empty dataset
    if not cfg.runtime.in_process:
        check_storage(cfg.runtime.storage_path, "runtime.storage_path")
    files = {"data.labeled_keys": cfg.data.labeled_keys, "semiseg.sde_checkpoint": cfg.semiseg.sde_checkpoint,
             "select.sde_checkpoint": cfg.select.sde_checkpoint,
             "ssda.source_sde_checkpoint": cfg.ssda.source_sde_checkpoint,
             "model.pretrained": cfg.model.pretrained,
             "contrastive.init_checkpoint": cfg.contrastive.init_checkpoint}
    if cfg.semiseg.init_from == "contrastive":  # ignored otherwise (a grid may keep it set on other arms)
        files["semiseg.init_checkpoint"] = cfg.semiseg.init_checkpoint
    for key, path in files.items():
        if path is None:
            continue
        if is_url(path):
            try:
                fetch(path)  # downloaded once here, then from the same cache on this node's workers
            except FileNotFoundError as e:
                raise ConfigError(f"{key}: {e}") from e
        elif not Path(path).is_file():
            raise ConfigError(f"{key}: file {path} does not exist")
    # the paper's encoders; contrastive pretraining starts without ImageNet on purpose
    if cfg.model.pretrained is None and cfg.model.encoder in ("resnet50", "resnet101") and cfg.stage != "contrastive":
        log.warning("model.pretrained is not set: the %s encoder starts from random weights (the paper starts "
                    "from ImageNet weights: set model.pretrained to a torchvision state_dict file)", cfg.model.encoder)
    if cfg.stage == "threestage":
        raise ConfigError("stage: threestage is a pipeline of three runs: start it with `sdeseg train` "
                          "(sdeseg.launch.run_stage), not as one Ray Train run")
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


def _run_worker(cfg: Config, run_dir: Path, rank: int, world_size: int, device: torch.device, backend: str,
                store: RunStore | None = None):
    torch.set_num_threads(cfg.runtime.torch_threads)
    from sdeseg.ops import set_backend

    if cfg.runtime.ops_backend != "auto":  # "auto" leaves SDESEG_OPS_BACKEND in charge
        set_backend(cfg.runtime.ops_backend)
    if is_url(cfg.model.pretrained):  # the models read local files; the runtime fetches
        cfg.model.pretrained = str(fetch(cfg.model.pretrained))
    ctx = StageContext(cfg, run_dir, rank, world_size, device, backend=backend, store=store)
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
        if store is not None:
            store.put(run_dir / "summary.json", "summary.json")
    return summary


def run_in_process(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """Run the stage in this process as a world of one (gloo; NCCL beside it on a GPU), same DeepSpeed path."""
    from sdeseg.runtime.engine import init_single_process_group

    if cfg.runtime.use_gpu and not torch.cuda.is_available():
        raise ConfigError("runtime.use_gpu: this machine has no CUDA GPU (set runtime.use_gpu=false)")
    cfg = preflight(cfg)
    run_dir = prepare_run_dir(cfg, run_dir)
    init_single_process_group(cfg.runtime.use_gpu)
    device = torch.device("cuda", 0) if cfg.runtime.use_gpu else torch.device("cpu")
    return _run_worker(cfg, run_dir, 0, 1, device, "local")


def _train_loop_per_worker(loop_config: dict) -> None:
    import ray.train

    cfg = from_dict(loop_config["config"])
    quiet_libraries(cfg.runtime.verbose)  # before DeepSpeed is imported
    run_dir = Path(loop_config["run_dir"])
    store = RunStore(loop_config["store"]) if loop_config.get("store") else None
    ctx = ray.train.get_context()
    if store is not None:  # files go to the store; this rank's scratch holds them meanwhile
        run_dir = scratch_dir(f"{loop_config['run_name']}-{loop_config['attempt']}/rank_{ctx.get_world_rank()}")
    if cfg.runtime.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    summary = _run_worker(cfg, run_dir, ctx.get_world_rank(), ctx.get_world_size(), device, "ray", store)
    if store is not None:
        shutil.rmtree(run_dir, ignore_errors=True)  # everything is in the store
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float))} | {"done": True})


def ensure_ray(cfg: Config):
    """Connect to RAY_ADDRESS or start a local cluster; fail early when the workers can never run.

    A local cluster binds 127.0.0.1 only (node IP and dashboard). On a cluster that cannot
    hold the workers now, an autoscaler may still add nodes: the request is refused only when
    it provably never fits (the autoscaler's published limits, or no autoscaler at all), and
    otherwise a warning says what Ray Train waits for (:mod:`sdeseg.runtime.cluster`)."""
    import ray

    from sdeseg.runtime.cluster import assess, read_cluster_view, start_local_cluster

    rt = cfg.runtime
    started_here = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            need = rt.num_workers * rt.cpus_per_worker
            start_local_cluster(max(int(need + 0.999), os.cpu_count() or 1), log_to_driver=True)
    bundle = {"CPU": rt.cpus_per_worker} | ({"GPU": rt.gpus_per_worker} if rt.use_gpu else {})
    verdict = assess(bundle, rt.num_workers, read_cluster_view(autoscaler_possible=False))
    if verdict.status != "fits" and not started_here:  # no room now: can the cluster grow?
        verdict = assess(bundle, rt.num_workers, read_cluster_view())
    if verdict.status == "never":
        raise ConfigError(verdict.message)
    if verdict.status in ("scales", "waits"):
        log.warning("waiting for resources: %s", verdict.message)
    return ray


def run_on_ray(cfg: Config, run_dir: str | Path, callbacks: list | None = None) -> dict[str, Any]:
    """Run the stage with Ray Train: one DeepSpeed rank per worker, fault tolerant, resumable.
    ``callbacks``: Ray Train callbacks (a Tune trial passes ``TuneReportCallback``)."""
    cfg = preflight(cfg)
    run_dir = prepare_run_dir(cfg, run_dir)
    ensure_ray(cfg)
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    rt = cfg.runtime
    name = ray_run_name(run_dir, rt.storage_path, rt.run_name)
    store = RunStore.for_run(rt.storage_path, name)
    if store is not None:
        store.put(run_dir / "config.yaml", "config.yaml")
        log.info("run %s: checkpoints, exports and metrics go to %s", name, store.url)
    resources = {"CPU": rt.cpus_per_worker}
    if rt.use_gpu:
        resources["GPU"] = rt.gpus_per_worker
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": str(run_dir), "run_name": name,
                           "store": store.url if store else None, "attempt": uuid.uuid4().hex[:8]},
        torch_config=TorchConfig(backend="nccl" if rt.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=rt.num_workers, use_gpu=rt.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=rt.storage_path or str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=rt.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level=train_log_level(rt.verbose)),
            callbacks=callbacks,
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray Train raises TrainingFailedError from fit()
        cause = _input_error(e)
        if cause is None:
            raise
        raise cause from None
    if result.error is not None:
        raise _input_error(result.error) or result.error
    if store is not None:
        return _download_results(store, run_dir)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    return dict(result.metrics or {})


def _input_error(error: BaseException) -> BaseException | None:
    """The first error of the workers that is about the input (a tampered checkpoint, a bad
    file, a config error found only there), unwrapped from Ray's wrappers, so the CLI shows
    it in one line; None for other failures."""
    from sdeseg.data.manifest import DatasetError
    from sdeseg.exports import ExportError
    from sdeseg.runtime.checkpoint import CheckpointIntegrityError

    kinds = (CheckpointIntegrityError, ConfigError, DatasetError, ExportError, FileNotFoundError)
    for failure in getattr(error, "worker_failures", {}).values():
        seen = 0
        while failure is not None and seen < 10:
            if isinstance(failure, kinds):
                return failure
            # Ray Train wraps a worker's exception (UserExceptionWithTraceback._base_exc), Ray core too (.cause)
            failure = (getattr(failure, "_base_exc", None) or getattr(failure, "cause", None)
                       or failure.__cause__)
            seen += 1
    return None


def scratch_dir(name: str) -> Path:
    """A rank's working directory on its node for one ``fit()`` of a run whose files live in
    object storage (a new one per invocation: nothing stale from an earlier one is picked up)."""
    import tempfile

    path = Path(tempfile.gettempdir()) / "sdeseg-runs" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _download_results(store: RunStore, run_dir: Path) -> dict[str, Any]:
    """Copy a finished run's summary, metrics and exports from the store into the local run
    directory; the summary's ``exports`` name the local copies, ``export_urls`` the originals."""
    for rel in ("summary.json", "metrics.jsonl"):
        if store.exists(rel):
            store.get(rel, run_dir / rel)
    store.pull("selection", run_dir / "selection")  # the selection stage's key files and tables
    local = {p.stem: str(p) for p in store.pull("export", run_dir / "export") if p.suffix == ".pt"}
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["export_urls"] = {name: store.uri(f"export/{Path(path).name}") for name, path in local.items()}
    summary["exports"] = local
    _write_summary(run_dir, summary)
    return summary


def run_stage(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """Run a stage (in this process or on Ray, ``runtime.in_process``), or a pipeline of them
    (``stage: threestage``)."""
    if cfg.stage == "threestage":
        from sdeseg.pipelines.threestage import run_pipeline

        return run_pipeline(cfg, run_dir)
    return run_in_process(cfg, run_dir) if cfg.runtime.in_process else run_on_ray(cfg, run_dir)


# Keys that name or watch a run without changing what it computes: two runs that differ only in
# these train the same model (``finished_run(..., any_identity=True)``, ``sdeseg tune --reuse``).
RESULT_NEUTRAL = ("run_name", "storage_path", "max_failures", "metrics_port", "progress", "verbose")


def finished_run(cfg: Config, run_dir: Path, any_identity: bool = False) -> dict[str, Any] | None:
    """The summary of a run in ``run_dir`` that ended with exactly this config (the one written
    beside it, after preflight) and all its steps; None when there is no such run. With
    ``any_identity`` the runtime keys of ``RESULT_NEUTRAL`` (run name, storage, ...) may differ."""
    import yaml

    summary_file, config_file = run_dir / "summary.json", run_dir / "config.yaml"
    if not (summary_file.exists() and config_file.exists()):
        return None
    resolved = preflight(cfg)
    try:  # read as a config: keys added since (with their defaults) do not count as a change
        stored = from_dict(yaml.safe_load(config_file.read_text())).to_dict()
    except ConfigError:  # a key that no longer exists, a value no longer allowed: not this config
        return None
    wanted = resolved.to_dict()
    if any_identity:
        for d in (stored, wanted):
            d["runtime"] = {k: v for k, v in d["runtime"].items() if k not in RESULT_NEUTRAL}
    if stored != wanted:
        return None
    summary = json.loads(summary_file.read_text())
    return summary if summary.get("steps", -1) >= resolved.loop_steps() else None
