"""The SDE stage in-process: it trains and validates, and resumes exactly."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sdeseg.launch import run_in_process
from sdeseg.runtime.engine import init_single_process_group
from tests.conftest import tiny_config


def _keys(run_dir):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "keys":
            out.setdefault(rec["step"], []).extend(rec["keys"])
    return out


def test_sde_stage_trains_validates_and_exports(synthetic_root, tmp_path):
    cfg = tiny_config("demo_sde", synthetic_root, "train.steps=4", "train.ckpt_every=2")
    summary = run_in_process(cfg, tmp_path / "run")
    assert summary["steps"] == 4
    for k in ("depth/abs_rel", "depth/a1", "depth/abs_rel_baseline", "depth/a1_baseline", "samples_per_s"):
        assert k in summary and summary[k] == summary[k], k  # present and not NaN
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "summary.json").exists()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} >= {"train", "val"}
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run" / "tensorboard").iterdir())
    payload = torch.load(summary["exports"]["last"], weights_only=True)
    assert payload["kind"] == "sde" and payload["step"] == 4


def test_sde_exact_resume(synthetic_root, tmp_path):
    common = ["train.ckpt_every=3", "train.log_keys=true", "train.seed=5"]
    straight = run_in_process(tiny_config("demo_sde", synthetic_root, "train.steps=6", *common), tmp_path / "a")
    run_in_process(tiny_config("demo_sde", synthetic_root, "train.steps=3", *common), tmp_path / "b")
    resumed = run_in_process(tiny_config("demo_sde", synthetic_root, "train.steps=6", *common), tmp_path / "b")
    assert resumed["steps"] == 6 and resumed["steps_this_run"] == 3
    a = torch.load(straight["exports"]["last"], weights_only=True)["depth"]
    b = torch.load(resumed["exports"]["last"], weights_only=True)["depth"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    ka, kb = _keys(tmp_path / "a"), _keys(tmp_path / "b")
    assert [ka[s] for s in range(1, 7)] == [kb[s] for s in range(1, 7)]


def test_a_tampered_checkpoint_is_refused_before_it_is_loaded(synthetic_root, tmp_path):
    from sdeseg.runtime.checkpoint import CheckpointIntegrityError, verify_checkpoint

    run_in_process(tiny_config("demo_sde", synthetic_root, "train.steps=2", "train.ckpt_every=2"), tmp_path)
    ckpt = tmp_path / "checkpoints" / "ckpt_000002"
    assert verify_checkpoint(ckpt) >= 3  # the model/optimizer states, the rank file, DeepSpeed's 'latest'
    model_file = next((ckpt / "state").glob("*model_states.pt"))
    data = bytearray(model_file.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in a pickled file from a bucket
    model_file.write_bytes(bytes(data))
    resume = tiny_config("demo_sde", synthetic_root, "train.steps=4", "train.ckpt_every=2")
    with pytest.raises(CheckpointIntegrityError, match=r"state/.*model_states\.pt does not match the sha256"):
        run_in_process(resume, tmp_path)
    model_file.write_bytes(bytes(data[:-100]) + b"x" * 100)  # and an extra file nobody wrote
    (ckpt / "state" / "extra.pt").write_bytes(b"\x80")
    with pytest.raises(CheckpointIntegrityError, match="extra.pt is not in any sha256 manifest"):
        verify_checkpoint(ckpt)
    for m in ckpt.glob("sha256_rank_*.json"):
        m.unlink()
    with pytest.raises(CheckpointIntegrityError, match="has no sha256 manifest"):
        verify_checkpoint(ckpt)


def test_in_process_world_leaves_no_rendezvous_port_to_child_processes():
    """A child of a process that ran a stage in-process builds its own world of one."""
    port_before = os.environ.get("MASTER_PORT")
    init_single_process_group()
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
    assert os.environ.get("MASTER_PORT") == port_before
    child = ("import torch.distributed as d; from sdeseg.runtime.engine import init_single_process_group as i; "
             "i(); print(d.get_world_size())")
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "1"
