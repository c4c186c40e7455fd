"""Object storage for real: a moto S3 server on 127.0.0.1 (its own process) holds the shards,
checkpoints, exports, metrics and config of a run on a real local Ray cluster; a worker killed
mid-run and a stopped run both resume from the bucket; bad storage input fails in preflight
with one line naming the URL."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BUCKET, free_port, tiny_config


def _sdeseg(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | env
    return subprocess.run([sys.executable, "-m", "sdeseg.cli", *args], capture_output=True, text=True, env=full,
                          cwd=cwd, timeout=300)


def test_prep_writes_shards_and_manifest_to_the_bucket(s3, s3_data):
    from sdeseg.data.manifest import read_manifest

    names = [Path(p).name for p in s3.ls(s3_data)]
    assert "manifest.parquet" in names and sum(n.endswith(".tar") for n in names) >= 4
    assert not [n for n in names if ".tmp" in n], "nothing half-written is left in the bucket"
    assert len(read_manifest(s3_data)) == 24 + 8 + 8


@pytest.mark.parametrize("case", ["no bucket", "no credentials", "unreachable endpoint", "missing export",
                                  "data in no bucket"])
def test_bad_storage_input_is_one_line_before_workers_start(case, s3_server, s3, synthetic_root, tmp_path):
    env = dict(s3_server)
    args = ["train", "demo_sde", f"data.root={synthetic_root}", "runtime.in_process=false",
            f"runtime.storage_path=s3://{BUCKET}/runs"]
    expect = {
        "no bucket": "runtime.storage_path: s3://no-such-bucket/runs: the bucket does not exist",
        "no credentials": "no credentials found",
        "unreachable endpoint": "cannot reach http://127.0.0.1:",
        "missing export": f"semiseg.sde_checkpoint: s3://{BUCKET}/runs/nope/export/best.pt does not exist",
        "data in no bucket": "data.root: s3://no-such-bucket/data: the bucket does not exist",
    }[case]
    if case == "no bucket":
        args[-1] = "runtime.storage_path=s3://no-such-bucket/runs"
    elif case == "no credentials":
        env = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        env["AWS_SHARED_CREDENTIALS_FILE"] = env["AWS_CONFIG_FILE"] = str(tmp_path / "none")
    elif case == "unreachable endpoint":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    elif case == "missing export":
        args[1] = "demo_semiseg"
        args.append(f"semiseg.sde_checkpoint=s3://{BUCKET}/runs/nope/export/best.pt")
    elif case == "data in no bucket":
        args[2] = "data.root=s3://no-such-bucket/data"
    result = _sdeseg(args, env, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert expect in lines[-1], result.stderr[-3000:]
    assert len(lines[-1]) < 400 and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("ckpt_*"))


@pytest.fixture(scope="module")
def ray_with_s3(s3):
    ray = pytest.importorskip("ray")
    env = {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_a_run_on_s3_keeps_every_rank_in_the_bucket_and_resumes_from_it(ray_with_s3, s3, s3_data, tmp_path):
    """SDE on two ZeRO-2 ranks with storage in the bucket; continued from an empty directory; a
    tampered checkpoint refused. (A rank killed mid-run, resumed from the bucket: test_multinode.)"""
    from sdeseg.exports import read_export
    from sdeseg.launch import run_on_ray

    name = "sde-on-s3"
    common = [f"runtime.storage_path=s3://{BUCKET}/runs", f"runtime.run_name={name}", "runtime.in_process=false",
              "runtime.num_workers=2", "runtime.zero_stage=2", "runtime.max_failures=1", "train.ckpt_every=2",
              "train.val_every=4"]
    summary = run_on_ray(tiny_config("demo_sde", s3_data, "train.steps=8", *common), tmp_path / "a")
    assert summary["steps"] == 8
    run = f"{BUCKET}/runs/{name}"
    ckpts = sorted(Path(p).name for p in s3.glob(f"{run}/ckpt_*"))
    assert ckpts and ckpts[-1] == "ckpt_000008"
    in_ckpt = {Path(p).name for p in s3.find(f"{run}/ckpt_000008")}
    assert {"rank_00000.pt", "rank_00001.pt", "sha256_rank_00000.json", "sha256_rank_00001.json"} <= in_ckpt
    for rel in ("config.yaml", "summary.json", "metrics.jsonl", "export/last.pt", "export/best.pt"):
        assert s3.exists(f"{run}/run/{rel}"), rel
    records = [json.loads(x) for x in s3.cat_file(f"{run}/run/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    assert not [r for r in records if "event/resumed" in r]
    # the driver's run directory gets local copies; the URLs name the originals
    assert Path(summary["exports"]["last"]).is_file()
    assert summary["export_urls"]["last"] == f"s3://{run}/run/export/last.pt"
    assert read_export(summary["export_urls"]["last"], "sde")["step"] == 8
    # stopped, then continued from another machine's empty run directory: the bucket has it all
    more = run_on_ray(tiny_config("demo_sde", s3_data, "train.steps=10", *common), tmp_path / "elsewhere")
    assert more["steps"] == 10 and more["steps_this_run"] == 2
    records = [json.loads(x) for x in (tmp_path / "elsewhere" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 11))
    assert [r["step"] for r in records if "event/resumed" in r] == [8]
    # a checkpoint changed in the bucket is refused before DeepSpeed unpickles it, in one line
    from sdeseg.runtime.checkpoint import CheckpointIntegrityError

    model_file = next(p for p in s3.find(f"{run}/ckpt_000010") if p.endswith("model_states.pt"))
    data = bytearray(s3.cat_file(model_file))
    data[-100] ^= 0xFF
    s3.pipe_file(model_file, bytes(data))
    with pytest.raises(CheckpointIntegrityError, match=r"model_states\.pt does not match the sha256"):
        run_on_ray(tiny_config("demo_sde", s3_data, "train.steps=12", *common), tmp_path / "tampered")


def test_derived_maps_are_written_to_and_joined_from_the_bucket(s3, s3_data):
    """A derived dataset in the bucket (``write_derived``), joined to training batches by a
    DataLoader worker reading it over S3: the maps are the batches' own pixels, cropped and
    flipped with them."""
    import numpy as np
    import torch

    from sdeseg.config import AugmentConfig
    from sdeseg.data.codec import encode_npy
    from sdeseg.data.derived import write_derived
    from sdeseg.data.reader import ShardStream

    url = write_derived(s3_data, f"s3://{BUCKET}/derived/red",
                        lambda key, frame: {"red.npy": encode_npy(frame[..., 0].astype(np.float32))})
    assert {"manifest.parquet", "derived.json"} <= {Path(p).name for p in s3.ls(url)}
    stream = ShardStream(s3_data, batch_size=4, crop=(24, 48), augment=AugmentConfig(), frames=(0,), num_workers=1,
                         epochs=1, derived={"red": (url, "red.npy")})
    batches = list(stream)
    assert len(batches) == 6 and 0 < int(torch.cat([b.geometry[:, 4] for b in batches]).sum()) < 24
    for b in batches:
        assert torch.equal(b.derived["red"], b.images[0][:, 0].mul(255).round())
