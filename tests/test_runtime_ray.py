"""Real Ray Train + real DeepSpeed (ZeRO-2, gloo) on a local cluster: both stages survive a
worker killed with os._exit, the ranks hold one model, and run directories keep their own
checkpoints on a shared storage path."""

import json
import os
from pathlib import Path

import pytest
import torch

from sdeseg.runtime.context import FAULT_ENV
from tests.conftest import tiny_config

FAULT_STEP = 5  # rank 1 dies hard once at this step in every run that gets there (a marker file per run)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ[FAULT_ENV] = str(FAULT_STEP)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {FAULT_ENV: str(FAULT_STEP)}})
    yield ray
    ray.shutdown()
    os.environ.pop(FAULT_ENV, None)


def _two_workers(*extra):
    return ["runtime.in_process=false", "runtime.num_workers=2", "runtime.zero_stage=2", "runtime.max_failures=1",
            "train.steps=8", "train.ckpt_every=2", "train.val_every=4", *extra]


def _check_recovery(run_dir: Path, summary: dict, ckpt_every: int) -> None:
    fault = json.loads((run_dir / "fault_injected").read_text())
    assert fault["step"] == FAULT_STEP and fault["rank"] == 1
    assert summary["steps"] == 8
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [r["step"] for r in records if r["kind"] == "event" and "event/resumed" in r]
    assert len(resumed) == 1
    # Ray may drop a checkpoint reported within ~2 s of a hard crash: at most two intervals redone
    assert FAULT_STEP - resumed[0] <= 2 * ckpt_every
    assert max(r["step"] for r in records if r["kind"] == "train") == 8
    assert list((run_dir / "ray").rglob("rank_00001.pt")), "every rank's state is part of the committed checkpoints"


@pytest.mark.slow
def test_semiseg_on_ray_survives_a_killed_worker_and_validates_one_model(ray_cluster, synthetic_root, sde_export,
                                                                        tmp_path):
    """(The SDE stage's killed worker on two ZeRO-2 ranks: tests/test_object_storage.py, on S3.)"""
    from sdeseg.exports import load_seg_model
    from sdeseg.launch import run_on_ray
    from sdeseg.runtime import StageContext
    from sdeseg.stages.semiseg import validate

    cfg = tiny_config("demo_semiseg", synthetic_root, f"semiseg.sde_checkpoint={sde_export}", "data.num_labeled=4",
                      *_two_workers())
    summary = run_on_ray(cfg, tmp_path / "run")
    _check_recovery(tmp_path / "run", summary, cfg.train.ckpt_every)
    assert summary["teacher/updates"] == 8
    # The two ranks validated halves of the split and summed their confusion matrices. They held
    # one model (BatchNorm buffers averaged first): evaluating the exported model alone on the
    # whole split gives the same numbers.
    model = load_seg_model(summary["exports"]["last"])
    alone = validate(model, cfg, StageContext(cfg, tmp_path / "eval", 0, 1, torch.device("cpu")))
    assert alone["seg/miou"] == pytest.approx(summary["seg/miou"], abs=1e-9)
    assert alone["seg/acc"] == pytest.approx(summary["seg/acc"], abs=1e-9)


def _rank_buffers_after_sync(config: dict) -> None:
    """Ray Train worker: BatchNorm running statistics from rank-specific batches, then the
    runtime's sync; each rank writes its buffers (before and after) for the test to compare."""
    import ray.train

    from sdeseg.config import from_dict
    from sdeseg.runtime import StageContext

    cfg = from_dict(config["config"])
    rank = ray.train.get_context().get_world_rank()
    ctx = StageContext(cfg, Path(config["run_dir"]), rank, ray.train.get_context().get_world_size(),
                       torch.device("cpu"), backend="ray")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.BatchNorm2d(4))
    model.train()
    model(torch.randn(2, 3, 8, 8) * (rank + 1) + rank)  # ranks see different data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx.sync_buffers(model)
    torch.save({"before": before, "after": model.state_dict()}, Path(config["run_dir"]) / f"bn_{rank}.pt")
    ctx.close()


@pytest.mark.slow
def test_batchnorm_buffers_agree_across_ranks_after_sync(ray_cluster, synthetic_root, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = tiny_config("demo_sde", synthetic_root, "runtime.num_workers=2")
    TorchTrainer(
        _rank_buffers_after_sync, train_loop_config={"config": cfg.to_dict(), "run_dir": str(tmp_path)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="bn", storage_path=str(tmp_path / "ray")),
    ).fit()
    r0, r1 = (torch.load(tmp_path / f"bn_{r}.pt", weights_only=True) for r in (0, 1))
    stats = [k for k in r0["after"] if "running" in k]
    assert stats and any(not torch.equal(r0["before"][k], r1["before"][k]) for k in stats)
    for k in r0["after"]:
        assert torch.equal(r0["after"][k], r1["after"][k]), k
        if "running" in k:  # the mean of the two ranks' statistics
            assert torch.allclose(r0["after"][k], (r0["before"][k] + r1["before"][k]) / 2)


@pytest.mark.slow
def test_run_directories_with_one_basename_keep_their_checkpoints(ray_cluster, synthetic_root, tmp_path):
    from sdeseg.launch import run_on_ray

    storage = tmp_path / "shared-storage"
    common = ["runtime.in_process=false", "runtime.num_workers=1", "train.steps=2", "train.ckpt_every=1",
              f"runtime.storage_path={storage}"]
    a = run_on_ray(tiny_config("demo_sde", synthetic_root, *common), tmp_path / "a" / "sde")
    b = run_on_ray(tiny_config("demo_sde", synthetic_root, *common), tmp_path / "b" / "sde")
    assert a["steps_this_run"] == 2 and b["steps_this_run"] == 2  # b did not resume a's checkpoints
    assert len([p for p in storage.iterdir() if p.is_dir()]) == 2
    # (that one directory always finds its own: test_ray_run_name_is_unique_per_run_directory, and every
    # killed-worker test resumes a run on Ray from its own checkpoints)


@pytest.mark.slow
def test_selection_scores_on_two_workers_equal_in_process(ray_cluster, synthetic_root, sde_export, tmp_path):
    """Each rank scores its share of the candidates; gathered, the scores are the in-process ones
    (same teacher, same fresh student: student_steps=0), each candidate scored exactly once."""
    from sdeseg.launch import run_in_process, run_on_ray

    common = [f"select.sde_checkpoint={sde_export}", "select.budgets=[3,6]", "select.student_steps=[0]"]
    run_on_ray(tiny_config("demo_select", synthetic_root, *common, "runtime.in_process=false",
                           "runtime.num_workers=2"), tmp_path / "ray")
    run_in_process(tiny_config("demo_select", synthetic_root, *common), tmp_path / "local")
    for r in (0, 1):
        ray_scores, local = (torch.load(tmp_path / d / "selection" / f"scores_round{r}.pt", weights_only=True)
                             for d in ("ray", "local"))
        assert ray_scores["keys"] == local["keys"] and len(local["keys"]) == 24
        assert torch.equal(ray_scores["count"], torch.ones(24))
        assert torch.allclose(ray_scores["features"], local["features"], atol=1e-4)
        assert torch.allclose(ray_scores["difficulty"], local["difficulty"], atol=1e-6)
        assert torch.equal(ray_scores["class_pixels"], local["class_pixels"])
    assert float(local["difficulty"].abs().sum()) > 0
    keys = [json.loads((tmp_path / d / "selection" / "labeled_keys_6.json").read_text())["keys"]
            for d in ("ray", "local")]
    assert keys[0] == keys[1]
