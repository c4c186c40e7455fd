"""Shared fixtures: a tiny synthetic dataset (generated once per session) and tiny configs."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

TINY = [
    "data.size=32x64", "data.batch_size=2", "data.labeled_batch_size=2", "data.val_batch_size=4",
    "data.num_workers=0", "data.shuffle_buffer=8",
    "model.width=16", "model.pose_width=16", "model.decoder_channels=[8,8,16,16,32]",
    "train.log_every=1", "train.val_every=0", "runtime.in_process=true", "runtime.num_workers=1",
]


# what the ``early`` markers' functions returned when the session started, by test id
_EARLY: dict[str, tuple[object, Path]] = {}


def pytest_collection_modifyitems(items):
    """Tests with an ``early`` marker run last, so that their early work overlaps the most tests."""
    items.sort(key=lambda item: item.get_closest_marker("early") is not None)  # stable: the rest keep their order


def pytest_collection_finish(session):
    """Run each selected test's ``early(start)`` marker function now, with a directory of its own:
    network-bound work (the image's pip resolve) then overlaps the CPU-bound tests before it."""
    for item in session.items:
        marker = item.get_closest_marker("early")
        if marker is not None:
            directory = Path(tempfile.mkdtemp(prefix="sdeseg-early-"))
            try:
                started = marker.args[0](directory)
            except Exception as e:  # that test fails with it (the ``early`` fixture raises it), not the session
                started = e
            _EARLY[item.nodeid] = (started, directory)


def pytest_sessionfinish(session):
    for started, directory in _EARLY.values():
        if hasattr(started, "poll") and started.poll() is None:  # a process its test did not wait for
            started.kill()
            started.wait()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def early(request) -> tuple[object, Path]:
    """What the test's ``early`` marker function returned when the session started, and its directory."""
    started, directory = _EARLY[request.node.nodeid]
    if isinstance(started, Exception):
        raise started
    return started, directory


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> str:
    """24 training triplets + 8 validation + 8 test samples at 32x64 (the splits' scenes differ)."""
    from data_prep.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic") / "city"
    generate(str(root), num_train=24, num_val=8, num_test=8, size=(32, 64), seed=3, procs=1, shard_size=6,
             progress=False)
    return str(root)


@pytest.fixture(scope="session")
def sde_export(synthetic_root, tmp_path_factory) -> str:
    """The last export of a 2-step SDE run on ``synthetic_root`` (in-process)."""
    from sdeseg.launch import run_in_process

    run_dir = tmp_path_factory.mktemp("sde_export")
    return run_in_process(tiny_config("demo_sde", synthetic_root, "train.steps=2"), run_dir)["exports"]["last"]


def tiny_config(preset: str, root: str, *overrides: str):
    from sdeseg.config import load_config

    return load_config(preset, [f"data.root={root}", *TINY, *overrides])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_node_ports() -> list[str]:
    """``ray start`` options that put every port with a fixed default (dashboard 8265, its
    agent 52365, Ray client 10001, ...) on a free one: a test's cluster must not depend on
    what else runs on the machine (another Ray, another node of the same test)."""
    names = ("dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "ray-client-server-port", "runtime-env-agent-port", "metrics-export-port")
    return [f"--{name}={free_port()}" for name in names]


S3_ENV = {"AWS_ACCESS_KEY_ID": "sdeseg-test", "AWS_SECRET_ACCESS_KEY": "sdeseg-test-secret",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, in its own process.

    Yields the environment that points boto3/s3fs/pyarrow at it (``AWS_ENDPOINT_URL`` and
    test credentials); tests put it into ``os.environ`` themselves when they need it there."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    port = free_port()
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on {url}") from None
            time.sleep(0.2)
    yield S3_ENV | {"AWS_ENDPOINT_URL": url}
    proc.terminate()
    proc.wait(timeout=30)


BUCKET = "sdeseg-test"


@pytest.fixture(scope="session")
def s3(s3_server):
    """The server's environment in os.environ (Ray workers inherit it) and an s3fs client."""
    saved = {k: os.environ.get(k) for k in s3_server}
    os.environ.update(s3_server)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    yield fs
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_data(s3):
    """The tiny synthetic dataset (as ``synthetic_root``) written by prep straight into the bucket."""
    from data_prep.synthetic import generate

    url = f"s3://{BUCKET}/data/city"
    generate(url, num_train=24, num_val=8, num_test=8, size=(32, 64), seed=3, procs=1, shard_size=6, progress=False)
    return url
