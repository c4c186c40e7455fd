"""The Ray preflight (``sdeseg.launch.ensure_ray``) on real local Ray clusters, no mocks of Ray.

- a local cluster started by sdeseg listens on loopback only;
- a fixed cluster (``ray start --head``): a request that fits passes, one that never fits is
  refused with a ConfigError naming the key;
- published autoscaling limits (a ``ClusterConfig`` in the GCS, the record Ray Train reads
  too): within them the run waits for the autoscaler, beyond them it is refused;
- a real autoscaling cluster (Ray's fake multi-node provider: autoscaler v1 and v2 start
  worker nodes as local processes): no GPU now, limits unpublished (as on KubeRay with Ray
  2.60), so the preflight warns what Ray Train waits for, and the autoscaler does add the
  nodes for that request.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from sdeseg.config import ConfigError, load_config
from sdeseg.runtime.cluster import (
    ClusterView,
    NodeGroup,
    assess,
    autoscaler_from_status,
    capacity,
    capacity_at_limits,
    loopback_only,
)
from tests.conftest import free_port, ray_node_ports

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(600)  # a cluster that does not come up fails, never hangs the suite

FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # Ray's fake provider's head


def _cfg(*overrides: str):
    return load_config("demo_sde", ["runtime.in_process=false", *overrides])


class RayHead:
    """``ray start --head --block`` in its own session and temp dir, on 127.0.0.1 only (Ray keeps
    a node IP of 127.0.0.1 only where multi-machine clusters are off). Optional autoscaling
    config: Ray's fake multi-node provider then starts worker nodes as local processes.
    Connect with :meth:`connect` (a plain ``ray.init`` would turn 127.0.0.1 into this
    machine's outward address, where nothing of this cluster listens)."""

    def __init__(self, base: Path, num_cpus: int, autoscaling: dict | None = None, v2: bool = False,
                 attempts: int = 2):
        base.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):  # Ray gives a raylet 30 s to register: a loaded machine misses it
            try:
                return self._start(base, num_cpus, autoscaling, v2)
            except RuntimeError:
                if attempt + 1 == attempts:
                    raise

    def _start(self, base: Path, num_cpus: int, autoscaling: dict | None, v2: bool) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray's socket paths live under the temp dir and must stay under 108 bytes
        self.temp_dir = tempfile.mkdtemp(prefix="sdeseg-ray-", dir="/tmp")
        env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        args = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={self.port}",
                f"--num-cpus={num_cpus}", "--num-gpus=0", "--node-ip-address=127.0.0.1",
                f"--temp-dir={self.temp_dir}", "--include-dashboard=false", "--disable-usage-stats",
                *ray_node_ports()]
        if autoscaling is not None:
            config = _fake_autoscaling_config(self.address, autoscaling, v2)
            (base / "autoscaling.json").write_text(json.dumps(config))
            args.append(f"--autoscaling-config={base / 'autoscaling.json'}")
            env |= {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
            if v2:
                env |= {"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
        self.log = open(base / "ray-start.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_until_up(base)

    def _wait_until_up(self, base: Path, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while "--block" not in (base / "ray-start.log").read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray start failed:\n{(base / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(0.5)

    def connect(self, monkeypatch) -> None:
        """Connect this process as ``ensure_ray`` does with ``RAY_ADDRESS`` set."""
        monkeypatch.setenv("RAY_ADDRESS", self.address)
        with loopback_only():
            ray.init(address=self.address)

    def stop(self) -> None:
        """Kill every process of this cluster, each by its pid: the ``ray start`` process, its
        descendants (GCS, raylets, the monitor and the nodes it started) and any that outlived
        their parent (their command line names this cluster's temp dir)."""
        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in psutil.process_iter(["cmdline"]):
            if p.pid not in {q.pid for q in procs} and any(self.temp_dir in a for a in p.info["cmdline"] or []):
                procs.append(p)
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=60)
        psutil.wait_procs(procs, timeout=30)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _fake_autoscaling_config(gcs_address: str, worker_types: dict, v2: bool) -> dict:
    provider = {"type": "external", "gcs_address": gcs_address,
                "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"}
    if v2:
        provider |= {"launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID}
    empty_lists = ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                   "setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                   "worker_start_ray_commands")
    head_type = {"ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0}}
    return {"cluster_name": "sdeseg-preflight", "max_workers": 8, "idle_timeout_minutes": 1,
            "upscaling_speed": 1.0, "provider": provider, "auth": {"ssh_user": "ubuntu"},
            "head_node_type": "ray.head.default", "available_node_types": head_type | worker_types,
            "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False,
            **{k: [] for k in empty_lists}}


@pytest.fixture
def no_ray(monkeypatch):
    """No Ray connection before the test; whatever the test connects to is closed after it."""
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    yield monkeypatch
    ray.shutdown()


def _listening(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    out = []
    for p in procs:
        try:
            out += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    return out


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


# ----------------------------------------------------------------------------- a local cluster


def test_local_cluster_listens_on_loopback_only(no_ray, synthetic_root, tmp_path):
    """A run on the local cluster ``ensure_ray`` starts: it trains, and nothing of that cluster
    (GCS, raylet, agents, workers) listens on anything but loopback."""
    from sdeseg.launch import ensure_ray, run_on_ray
    from tests.conftest import tiny_config

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cfg = tiny_config("demo_sde", synthetic_root, "runtime.in_process=false", "runtime.cpus_per_worker=1",
                      "train.steps=2")
    summary = run_on_ray(cfg, tmp_path / "run")
    assert summary["steps"] == 2
    ours = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    listening = _listening(ours)
    assert any(name.startswith("gcs_server") for name, _, _ in listening), listening
    assert [s for s in listening if not _is_loopback(s[1])] == []
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
    # a request that can never fit here: no GPU on this machine (the local cluster grows its
    # CPUs to the request, so CPUs always fit)
    if not ray.cluster_resources().get("GPU"):
        with pytest.raises(ConfigError, match="runtime.use_gpu: .*has no GPUs"):
            ensure_ray(_cfg("runtime.use_gpu=true", "runtime.num_workers=1"))


# ----------------------------------------------------------------------------- a fixed cluster


@pytest.fixture(scope="module")
def fixed_cluster(tmp_path_factory):
    head = RayHead(tmp_path_factory.mktemp("fixed"), num_cpus=2)
    yield head
    head.stop()


def test_fixed_cluster_fits_or_is_refused_naming_the_key(fixed_cluster, no_ray, caplog):
    from sdeseg.launch import ensure_ray

    fixed_cluster.connect(no_ray)
    with caplog.at_level(logging.WARNING, logger="sdeseg"):
        ensure_ray(_cfg("runtime.num_workers=2", "runtime.cpus_per_worker=1"))
    assert "waiting for resources" not in caplog.text
    with pytest.raises(ConfigError, match=r"runtime.num_workers: .*3 workers x \{CPU: 1\}.*no autoscaler.*room for 2"):
        ensure_ray(_cfg("runtime.num_workers=3", "runtime.cpus_per_worker=1"))
    with pytest.raises(ConfigError, match="runtime.cpus_per_worker: a worker asks for 4 CPU but the largest node"):
        ensure_ray(_cfg("runtime.num_workers=1", "runtime.cpus_per_worker=4"))
    with pytest.raises(ConfigError, match="runtime.use_gpu: a worker asks for 1 GPU but .* has no GPUs"):
        ensure_ray(_cfg("runtime.num_workers=1", "runtime.use_gpu=true"))


def test_local_cluster_finds_itself_beside_another_ray_instance(fixed_cluster, no_ray):
    """Another Ray instance runs on this machine (``fixed_cluster``, as a second sdeseg run's would):
    the local cluster ``ensure_ray`` starts is a separate one, and code in its workers that looks
    its cluster up through Ray's state API (as Ray Train's placement-group cleaner does) finds this
    one instead of failing with "Found multiple active Ray instances"."""
    from sdeseg.launch import ensure_ray

    ensure_ray(_cfg("runtime.num_workers=1", "runtime.cpus_per_worker=1"))
    ours = ray.get_runtime_context().gcs_address
    assert ours.startswith("127.0.0.1:") and ours != fixed_cluster.address

    @ray.remote(num_cpus=0)
    def look_up() -> tuple[str | None, list[str]]:
        from ray.util.state import list_nodes

        return os.environ.get("RAY_ADDRESS"), [n.node_id for n in list_nodes()]

    address, nodes = ray.get(look_up.remote(), timeout=180)
    assert address == ours
    assert nodes == [ray.get_runtime_context().get_node_id()]


def test_published_limits_decide_exactly(fixed_cluster, no_ray, caplog):
    """An autoscaler that publishes its node types (the GCS ``ClusterConfig`` Ray Train reads):
    the test plays that autoscaler and publishes a GPU group of at most 2 nodes."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    from sdeseg.launch import ensure_ray

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add()
    group.name, group.max_count = "gpu-workers", 2
    group.resources.update({"CPU": 4, "GPU": 1})
    GcsClient(address=fixed_cluster.address).report_cluster_config(config.SerializeToString())

    fixed_cluster.connect(no_ray)
    with caplog.at_level(logging.WARNING, logger="sdeseg"):
        ensure_ray(_cfg("runtime.use_gpu=true", "runtime.num_workers=2", "runtime.cpus_per_worker=2"))
    assert "can add nodes for up to 2 such workers" in caplog.text
    with pytest.raises(ConfigError, match="runtime.num_workers: .*can grow to at most 2 such workers.*gpu-workers"):
        ensure_ray(_cfg("runtime.use_gpu=true", "runtime.num_workers=3", "runtime.cpus_per_worker=2"))
    with pytest.raises(ConfigError, match="runtime.gpus_per_worker: a worker asks for 2 GPU but the largest node"):
        ensure_ray(_cfg("runtime.use_gpu=true", "runtime.num_workers=1", "runtime.gpus_per_worker=2"))


# ----------------------------------------------------------------------------- a real autoscaling cluster


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_autoscaling_cluster_waits_and_grows(version, tmp_path, no_ray, caplog):
    from ray.util.placement_group import placement_group, remove_placement_group

    from sdeseg.launch import ensure_ray

    gpu_group = {"gpu-workers": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {},
                                 "min_workers": 0, "max_workers": 2}}
    head = RayHead(tmp_path / version, num_cpus=1, autoscaling=gpu_group, v2=version == "v2")
    try:
        head.connect(no_ray)
        with caplog.at_level(logging.WARNING, logger="sdeseg"):
            ensure_ray(_cfg("runtime.use_gpu=true", "runtime.num_workers=2", "runtime.cpus_per_worker=1"))
        assert f"an autoscaler ({version}) runs but does not publish its limits" in caplog.text
        assert "2 workers x {CPU: 1, GPU: 1}" in caplog.text and "Ray Train waits" in caplog.text
        # what Ray Train then asks for (one bundle per worker) is granted once the nodes are up
        pg = placement_group([{"CPU": 1, "GPU": 1}] * 2)
        assert pg.wait(timeout_seconds=120), "the autoscaler did not add the GPU nodes"
        remove_placement_group(pg)
    finally:
        ray.shutdown()
        head.stop()


# ----------------------------------------------------------------------------- the decision, pure


def test_capacity_counts_whole_workers_per_node():
    bundle = {"CPU": 8, "GPU": 1}
    assert capacity(bundle, [{"CPU": 16, "GPU": 4}, {"CPU": 8, "GPU": 1}, {"CPU": 64}]) == 3
    assert capacity({"CPU": 1, "GPU": 0.5}, [{"CPU": 4, "GPU": 1}]) == 2
    assert capacity({"CPU": 0.3}, [{"CPU": 0.9}]) == 3  # despite 0.9 / 0.3 < 3 in floats
    # the sum of GPUs would suffice, no single node does
    assert capacity({"GPU": 2}, [{"GPU": 1}, {"GPU": 1}]) == 0


def test_capacity_at_limits():
    bundle = {"CPU": 4, "GPU": 1}
    groups = [NodeGroup("head", {"CPU": 4}, 1), NodeGroup("gpu", {"CPU": 8, "GPU": 2}, 3)]
    assert capacity_at_limits(bundle, groups) == 6
    assert capacity_at_limits(bundle, groups, {"GPU": 5}) == 5
    assert capacity_at_limits(bundle, [NodeGroup("gpu", {"CPU": 8, "GPU": 1}, None)]) == float("inf")
    assert capacity_at_limits(bundle, [NodeGroup("gpu", {"CPU": 2, "GPU": 1}, None)]) == 0


def test_assess_outcomes():
    bundle = {"CPU": 1, "GPU": 1}
    head = {"CPU": 4}
    assert assess(bundle, 2, ClusterView([head, {"CPU": 2, "GPU": 2}])).status == "fits"
    assert assess(bundle, 2, ClusterView([head], [NodeGroup("gpu", {"CPU": 1, "GPU": 1}, 2)], {})).status == "scales"
    assert assess(bundle, 2, ClusterView([head], autoscaler="v2")).status == "waits"
    unknown = assess(bundle, 2, ClusterView([head], autoscaler="unknown"))
    assert unknown.status == "waits" and "no autoscaler status" in unknown.message
    never = assess(bundle, 2, ClusterView([head], [NodeGroup("cpu", {"CPU": 8}, 4)], {}))
    assert never.status == "never" and never.message.startswith("runtime.use_gpu:")
    mixed = assess({"CPU": 8, "GPU": 1}, 1, ClusterView([{"CPU": 8}, {"CPU": 2, "GPU": 1}]))
    assert mixed.status == "never" and mixed.message.startswith("runtime.cpus_per_worker:")


def test_autoscaler_from_status():
    node = "8270c3239de90d1849d6619df7d36f2f622f4530eeac62e7508f502d"
    readonly = {"autoscaler_report": {"node_type_mapping": {node: f"node_{node}"}}}  # shape of a real status
    assert autoscaler_from_status(readonly, 0) is None
    assert autoscaler_from_status({"autoscaler_report": {"node_type_mapping": {node: "headgroup"}}}, 0) == "v1"
    assert autoscaler_from_status(None, 3) == "v2"
    assert autoscaler_from_status(None, 0) == "unknown"
    assert autoscaler_from_status({"load_metrics_report": {}}, 0) == "unknown"  # before the first report
