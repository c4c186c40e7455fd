"""The runtime core every stage is built on: mixed precision, gradient accumulation,
the SDE export's pose net, the ImageNet feature distance, preflight errors, run identity."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from sdeseg.cli import main as cli_main
from sdeseg.launch import ray_run_name, run_in_process, run_on_ray
from sdeseg.optim import lr_factor
from tests.conftest import tiny_config


def _seg(root, export, *extra):
    return tiny_config("demo_semiseg", root, f"semiseg.sde_checkpoint={export}", "data.num_labeled=4", *extra)


def _records(run_dir, kind="train"):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


# ----------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("stage", ["sde", "semiseg", "semiseg-multitask"])
def test_bf16_trains_every_stage_with_first_loss_close_to_fp32(stage, synthetic_root, sde_export, tmp_path):
    total = "depth/total" if stage == "sde" else "seg/total"
    first = {}
    for precision in ("fp32", "bf16"):
        extra = ["train.steps=3", f"runtime.precision={precision}"]
        if stage == "sde":
            cfg = tiny_config("demo_sde", synthetic_root, *extra)
        else:
            multitask = str(stage.endswith("multitask")).lower()
            cfg = _seg(synthetic_root, sde_export, *extra, f"model.multitask={multitask}")
        summary = run_in_process(cfg, tmp_path / precision)
        rows = _records(tmp_path / precision)
        assert summary["steps"] == 3 and [r["step"] for r in rows] == [1, 2, 3]
        assert all(isinstance(r[total], float) and abs(r[total]) < 1e6 for r in rows)  # finite (NaN is None)
        first[precision] = rows[0][total]
    assert first["bf16"] == pytest.approx(first["fp32"], rel=0.05)


def test_bf16_geometry_stays_float32():
    """The reference warp inverts K and builds rays in float32 even for bf16 depth."""
    from sdeseg.models import PoseNet
    from sdeseg.ops import inverse_warp

    src = torch.rand(2, 3, 8, 12)
    depth = torch.full((2, 1, 8, 12), 5.0, dtype=torch.bfloat16)
    K = torch.tensor([[10.0, 0, 5.5], [0, 10.0, 3.5], [0, 0, 1]]).expand(2, 3, 3).bfloat16()
    T = torch.eye(4).expand(2, 4, 4).bfloat16()
    out = inverse_warp(src, depth, T, K)
    assert torch.allclose(out.float(), src, atol=1e-5)  # identity pose reproduces the source exactly
    pose = PoseNet(18, width=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pose({f: torch.rand(1, 3, 32, 32) for f in (-1, 0, 1)})
    assert out[("T", 1)].dtype == torch.float32 and out[("T", -1)].dtype == torch.float32


# ----------------------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("stage", ["sde", "semiseg"])
def test_grad_accum_counts_optimizer_steps(stage, synthetic_root, sde_export, tmp_path):
    extra = ["train.steps=3", "runtime.grad_accum=2", "optim.schedule=poly", "train.log_keys=true"]
    if stage == "sde":
        cfg = tiny_config("demo_sde", synthetic_root, *extra)
        per_micro = cfg.data.batch_size
    else:
        cfg = _seg(synthetic_root, sde_export, *extra)
        per_micro = cfg.data.batch_size + cfg.data.labeled_batch_size
    summary = run_in_process(cfg, tmp_path / "run")
    assert summary["steps"] == 3
    rows = _records(tmp_path / "run")
    # the LR schedule advances once per optimizer step and reaches its end (poly: 0)
    o = cfg.optim
    expected = [o.lr * lr_factor(k, 3, o) for k in (1, 2, 3)]
    assert [r["lr/heads"] for r in rows] == pytest.approx(expected, abs=1e-12)
    assert expected[-1] == 0.0 and expected[1] > 0
    # two micro-batches per optimizer step
    keys = {}
    for r in _records(tmp_path / "run", "keys"):
        keys[r["step"]] = keys.get(r["step"], 0) + len(r["keys"])
    assert keys == {1: 2 * per_micro, 2: 2 * per_micro, 3: 2 * per_micro}
    if stage == "semiseg":
        assert summary["teacher/updates"] == 3  # the EMA teacher follows once per optimizer step


def test_two_accumulated_micro_batches_equal_one_double_batch(tmp_path):
    """On a model without batch statistics, grad_accum=2 with micro-batch b gives the weights
    of grad_accum=1 with batch 2b (same data, same optimizer, deterministic CPU)."""
    from sdeseg.config import load_config
    from sdeseg.optim import param_groups
    from sdeseg.runtime import StageContext
    from sdeseg.runtime.engine import init_single_process_group

    init_single_process_group()
    data = torch.randn(4, 8, 3, 6, 6, generator=torch.Generator().manual_seed(0))  # 4 optimizer steps of 8
    target = torch.randn(4, 8, 2, 6, 6, generator=torch.Generator().manual_seed(1))

    def train(b, accum):
        cfg = load_config("demo_sde", [f"data.batch_size={b}", f"runtime.grad_accum={accum}", "optim.name=sgd",
                                       "optim.lr=0.1", "runtime.zero_stage=2", "train.steps=4"])
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
        ctx = StageContext(cfg, tmp_path / f"b{b}", 0, 1, torch.device("cpu"))
        engine = ctx.build_engine(model, param_groups(model, cfg.optim))
        for x, y in zip(data, target):
            for xm, ym in zip(x.split(b), y.split(b)):
                loss = ((engine(xm) - ym) ** 2).mean()
                engine.backward(loss)
                engine.step()
        ctx.close()
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}

    one, two = train(8, 1), train(4, 2)
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-6, rtol=1e-5), k
    torch.manual_seed(0)
    init = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).state_dict()
    assert all((one[k] - init[k]).abs().max() > 1e-3 for k in one)  # the steps did move every tensor
    # and 4 micro-batches of 2 with grad_accum=2 (2 per step) are not the same run: the check can fail
    other = train(2, 2)
    assert any(not torch.allclose(one[k], other[k], atol=1e-6, rtol=1e-5) for k in one)


# ----------------------------------------------------------------------------- transfer and losses


def test_sde_export_restores_the_pose_net_into_the_multitask_model(synthetic_root, sde_export, tmp_path):
    from sdeseg.runtime import StageContext
    from sdeseg.stages.semiseg import build_models

    payload = torch.load(sde_export, weights_only=True)
    assert payload["kind"] == "sde" and payload["pose"] and payload["depth_range"]["mapping"] == "log"
    cfg = _seg(synthetic_root, sde_export, "model.multitask=true")
    model, _ = build_models(cfg, StageContext(cfg, tmp_path, 0, 1, torch.device("cpu")))
    pose = model.pose.state_dict()
    assert pose.keys() == payload["pose"].keys()
    for k, v in payload["pose"].items():
        assert torch.equal(pose[k], v), k
    # and the depth decoder continues from the SDE one
    assert torch.equal(model.depth_decoder.state_dict()["disp_heads.0.conv.weight"],
                       payload["depth"]["decoder.disp_heads.0.conv.weight"])


def test_feature_distance_trains_with_a_user_given_imagenet_encoder(synthetic_root, tmp_path):
    from sdeseg.models import ResNet

    weights = tmp_path / "resnet18-imagenet.pth"
    torch.manual_seed(0)
    torch.save(ResNet(18).state_dict(), weights)  # torchvision parameter names, as a downloaded file
    cfg = tiny_config("demo_sde", synthetic_root, "train.steps=2", "model.width=64",
                      f"model.pretrained={weights}", "depth_loss.feature_distance=0.01")
    summary = run_in_process(cfg, tmp_path / "run")
    rows = _records(tmp_path / "run")
    assert summary["steps"] == 2 and all(r["depth/feat"] > 0 for r in rows)
    assert all(r["depth/total"] > r["depth/feat"] for r in rows)


# ----------------------------------------------------------------------------- preflight


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.num_labeled=0"], "data.num_labeled"),
        (["semiseg.sde_checkpoint=null"], "semiseg.sde_checkpoint"),
        (["model.num_classes=5"], "model.num_classes=5"),
        (["data.num_labeled=100000"], "cannot draw 100000 labeled keys"),
    ],
)
def test_semiseg_config_errors_are_raised_before_any_worker(overrides, message, synthetic_root, sde_export,
                                                           tmp_path):
    import ray

    cfg = _seg(synthetic_root, sde_export, "runtime.in_process=false", *overrides)
    with pytest.raises(Exception, match=message):
        run_on_ray(cfg, tmp_path / "run")
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "demo_sde", "data.size=abc"], "data.size: expected HxW"),
        (["train", "demo_semiseg", "data.num_labeled=0"], "data.num_labeled"),
        (["train", "demo_semiseg", "data.num_labeled=4"], "semiseg.sde_checkpoint"),
    ],
)
def test_cli_exits_2_naming_the_key(args, message, synthetic_root, tmp_path, capsys):
    code = cli_main([*args, f"data.root={synthetic_root}", "--run-dir", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_wrong_export_kind_is_named(synthetic_root, sde_export, tmp_path):
    from sdeseg.exports import ExportError

    seg = run_in_process(_seg(synthetic_root, sde_export, "train.steps=1"), tmp_path / "seg")["exports"]["last"]
    with pytest.raises(ExportError, match=r"last\.pt: expected a 'sde' export, found 'seg'"):
        run_in_process(_seg(synthetic_root, seg, "train.steps=1"), tmp_path / "run")


# ----------------------------------------------------------------------------- run identity


def test_ray_run_name_is_unique_per_run_directory(tmp_path):
    a, b = tmp_path / "a" / "semiseg", tmp_path / "b" / "semiseg"
    storage = "s3://bucket/runs"
    assert ray_run_name(a, storage) != ray_run_name(b, storage)
    assert ray_run_name(a, storage) == ray_run_name(tmp_path / "a" / "x" / ".." / "semiseg", storage)
    assert ray_run_name(a, storage).startswith("semiseg-")
    assert ray_run_name(a, storage, "mine") == "mine"


def test_stage_streams_ship_uint8_for_batch_to_and_pin_them_only_for_a_gpu(synthetic_root, tmp_path):
    """ctx.train_stream hands out uint8 images, which the stage's Batch.to(ctx.device) turns into
    the float batch a host stream (as_float=True, for stages that work on the host first) gives;
    the batches are page-locked for a CUDA rank only."""
    from sdeseg.runtime import StageContext

    cfg = tiny_config("demo_sde", synthetic_root)
    ctx = StageContext(cfg, tmp_path / "cpu", 0, 1, torch.device("cpu"))
    shipped, host = ctx.train_stream(), ctx.train_stream(as_float=True)
    assert not shipped.pin_memory and not host.pin_memory
    for a, b in zip(shipped, host):
        assert a.images[0].dtype == torch.uint8 and b.images[0].dtype == torch.float32
        moved = a.to(ctx.device)
        assert all(torch.equal(moved.images[f], b.images[f]) and torch.equal(moved.images_aug[f], b.images_aug[f])
                   for f in (-1, 0, 1))
        assert torch.equal(moved.K, b.K) and torch.equal(moved.T[1], b.T[1])
        break
    ctx.close()
    gpu = StageContext(cfg, tmp_path / "gpu", 0, 1, torch.device("cuda", 0))  # nothing here touches CUDA
    assert gpu.train_stream().pin_memory and not gpu.train_stream(as_float=True).pin_memory
    gpu.close()
