"""The Ray cluster a run uses: a local one bound to loopback, and what a cluster can ever hold.

``sdeseg.launch.ensure_ray`` checks a run's request (``num_workers`` identical bundles, one per
Ray Train worker) before any worker starts. A fixed cluster holds what its nodes hold now; an
autoscaling one (KubeRay with ``minReplicas: 0``) may hold nothing yet and grow on demand, so
comparing with the current resources would refuse every GPU job there.

What a cluster can grow to, as Ray 2.60 tells a driver:

- **published limits**: an autoscaler may publish its node types (resources per node, max
  count) to the GCS (``ray._private.state.state.get_cluster_config()``; Ray Train reads the
  same record). Nothing in Ray 2.60's Python package publishes it (its v1 and v2 autoscalers,
  run on a local autoscaling cluster, leave it empty), so it is usually absent; when present
  the check is exact.
- **an autoscaler runs**: autoscaler v2 reports its state to the GCS (a state version > 0);
  autoscaler v1 writes its status to the GCS key-value store, naming each node's type. A
  cluster without an autoscaler runs a read-only monitor that names every node type after
  the node itself (``node_<id>``): nothing can be added there.

:func:`assess` is the pure decision over a :class:`ClusterView`; :func:`read_cluster_view`
fills one from the connected cluster. Every read of a private Ray API is guarded: when it
moves, the view says "unknown" instead of failing the run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

# Ray's name for the node type of a node that no autoscaler manages (read-only monitor)
READONLY_NODE_TYPE_PREFIX = "node_"
# Ray rounds resource quantities to 1e-4; a bundle of 0.3 GPU must still fit 3 times in 0.9999...
_EPS = 1e-6
# what the preflight calls each resource a worker asks for, for error messages
RESOURCE_KEYS = {"CPU": "runtime.cpus_per_worker", "GPU": "runtime.gpus_per_worker"}


@dataclass(frozen=True)
class NodeGroup:
    """One node type an autoscaler may start: resources per node and how many at most."""

    name: str
    resources: dict[str, float]
    max_count: int | None  # None: no limit


@dataclass(frozen=True)
class ClusterView:
    """What the preflight knows about a cluster.

    Args:
        nodes: total resources of each alive node.
        groups: the node types an autoscaler published, or None when none did.
        max_resources: cluster-wide caps published with ``groups`` (e.g. ``{"GPU": 16}``).
        autoscaler: ``"v1"`` / ``"v2"`` when an autoscaler that can add nodes runs, None when
            none does, ``"unknown"`` when the cluster has reported neither (no monitor status yet).
    """

    nodes: list[dict[str, float]]
    groups: list[NodeGroup] | None = None
    max_resources: dict[str, float] | None = None
    autoscaler: str | None = None


@dataclass(frozen=True)
class Assessment:
    """``fits``: room now. ``scales``: room once the autoscaler has added nodes (limits known).
    ``waits``: no room now, limits unknown, an autoscaler runs. ``never``: it can never fit;
    ``message`` names the config key to change."""

    status: Literal["fits", "scales", "waits", "never"]
    message: str = ""


def workers_per_node(bundle: dict[str, float], node: dict[str, float]) -> float:
    """How many bundles fit on one node (``math.inf`` for a bundle that asks for nothing)."""
    n = math.inf
    for name, need in bundle.items():
        if need > 0:
            n = min(n, math.floor(node.get(name, 0.0) / need + _EPS))
    return n


def capacity(bundle: dict[str, float], nodes: list[dict[str, float]]) -> float:
    """How many bundles a set of nodes holds. Exact for identical bundles: each node holds
    ``workers_per_node`` of them whatever the others hold."""
    return sum(workers_per_node(bundle, node) for node in nodes)


def capacity_at_limits(bundle: dict[str, float], groups: list[NodeGroup],
                       max_resources: dict[str, float] | None = None) -> float:
    """How many bundles the cluster holds once every node type is at its max count, within
    the cluster-wide caps."""
    total = 0.0
    for g in groups:
        per_node = workers_per_node(bundle, g.resources)
        if per_node > 0 and g.max_count != 0:
            total += math.inf if g.max_count is None else per_node * g.max_count
    for name, cap in (max_resources or {}).items():
        if bundle.get(name, 0) > 0:
            total = min(total, math.floor(cap / bundle[name] + _EPS))
    return total


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _totals(nodes: list[dict[str, float]], bundle: dict[str, float]) -> dict[str, float]:
    return {name: sum(n.get(name, 0.0) for n in nodes) for name in bundle}


def _never_one(bundle: dict[str, float], shapes: list[dict[str, float]], where: str) -> str:
    """Why not even one bundle fits on any node shape, naming the key to change."""
    for name, need in sorted(bundle.items()):
        largest = max((s.get(name, 0.0) for s in shapes), default=0.0)
        if need > largest + _EPS:
            if name == "GPU" and largest == 0:
                return (f"runtime.use_gpu: a worker asks for {need:g} GPU but {where} has no GPUs "
                        "(set runtime.use_gpu=false, or use a cluster with GPU nodes)")
            key = RESOURCE_KEYS.get(name, "runtime.num_workers")
            return f"{key}: a worker asks for {need:g} {name} but the largest node of {where} has {largest:g}"
    return (f"runtime.cpus_per_worker: a worker asks for {_fmt(bundle)} but no node of {where} has all of "
            f"it at once (nodes: {', '.join(_fmt(s) for s in shapes) or 'none'})")


def assess(bundle: dict[str, float], count: int, view: ClusterView) -> Assessment:
    """Can ``count`` workers of ``bundle`` each ever run on the cluster of ``view``?"""
    want = f"{count} workers x {_fmt(bundle)}"
    now = capacity(bundle, view.nodes)
    if now >= count:
        return Assessment("fits")
    has = _fmt(_totals(view.nodes, bundle))
    if view.groups is not None:
        limit = max(now, capacity_at_limits(bundle, view.groups, view.max_resources))
        if limit >= count:
            room = "as many such workers as it needs" if math.isinf(limit) else f"up to {limit:g} such workers"
            return Assessment("scales", f"the run needs {want}; the cluster has {has} now and its autoscaler "
                                        f"can add nodes for {room}: Ray Train waits for them")
        shapes = list(view.nodes) + [g.resources for g in view.groups if g.max_count != 0]
        if limit == 0:
            return Assessment("never", _never_one(bundle, shapes, "the cluster at its autoscaling limits"))
        return Assessment("never", f"runtime.num_workers: the run needs {want} but the cluster can grow to at most "
                                   f"{limit:g} such workers (node types: "
                                   + ", ".join(f"{g.name} {_fmt(g.resources)} x "
                                               f"{'unlimited' if g.max_count is None else g.max_count}"
                                               for g in view.groups) + ")")
    if view.autoscaler is not None:
        who = ("the cluster reports no autoscaler status, so whether nodes can be added is unknown"
               if view.autoscaler == "unknown" else
               f"an autoscaler ({view.autoscaler}) runs but does not publish its limits")
        return Assessment("waits", f"the run needs {want}; the cluster has {has} now and {who}. Ray Train waits "
                                   "until the nodes are there (it retries every 60 s; a request beyond the node "
                                   "groups' maxReplicas waits forever: check `ray status`)")
    if now == 0:
        return Assessment("never", _never_one(bundle, view.nodes, "the Ray cluster (no autoscaler)"))
    return Assessment("never", f"runtime.num_workers: the run needs {want} but the Ray cluster (no autoscaler) "
                               f"has {has}: room for {now:g} such workers")


# ----------------------------------------------------------------------------- reading a live cluster


def groups_from_cluster_config(config) -> tuple[list[NodeGroup], dict[str, float]] | None:
    """Node types and caps from Ray's published ``ClusterConfig`` message (None when absent
    or naming no node type). ``max_count == -1`` means unlimited."""
    if config is None or not config.node_group_configs:
        return None
    groups = [NodeGroup(g.name, {k: float(v) for k, v in g.resources.items()},
                        None if g.max_count == -1 else int(g.max_count)) for g in config.node_group_configs]
    return groups, {k: float(v) for k, v in config.max_resources.items()}


def autoscaler_from_status(v1_status: dict | None, v2_state_version: int) -> str | None:
    """Which autoscaler that can add nodes runs, from what each writes to the GCS: the v2
    state version (0: never reported) and the v1 status JSON, whose ``node_type_mapping``
    names ``node_<id>`` types only when no autoscaler (a read-only monitor) runs. ``"unknown"``
    while neither names a node type yet (a monitor writes its first status a few seconds
    after the cluster starts, and its first autoscaler report a little later)."""
    if v2_state_version > 0:
        return "v2"
    mapping = ((v1_status or {}).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    if not mapping:
        return "unknown"
    if any(t != f"{READONLY_NODE_TYPE_PREFIX}{node}" for node, t in mapping.items()):
        return "v1"
    return None


def read_cluster_view(autoscaler_possible: bool = True, status_wait_s: float = 30.0) -> ClusterView:
    """The view of the cluster this process is connected to (``ray.init`` done).

    Args:
        autoscaler_possible: False for a cluster started by this process (``ray.init()``
            without an address): it has no autoscaler, nothing to read.
        status_wait_s: how long to wait for the first monitor status of a fresh cluster.
    """
    import ray

    nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
    if not autoscaler_possible:
        return ClusterView(nodes)
    try:
        from ray._private.state import state

        limits = groups_from_cluster_config(state.get_cluster_config())
    except Exception:  # noqa: BLE001 - a private API: absent or moved means "not published"
        limits = None
    groups, max_resources = limits if limits is not None else (None, None)
    gcs_address = ray.get_runtime_context().gcs_address
    deadline = time.monotonic() + status_wait_s
    autoscaler = _read_autoscaler(gcs_address)
    while autoscaler == "unknown" and time.monotonic() < deadline:
        time.sleep(1.0)
        autoscaler = _read_autoscaler(gcs_address)
    return ClusterView(nodes, groups, max_resources, autoscaler)


def _read_autoscaler(gcs_address: str) -> str | None:
    v2_version = 0
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        v2_version = int(get_cluster_status(gcs_address).stats.autoscaler_version or 0)
    except Exception:  # noqa: BLE001 - no v2 state service / a moved API: not a v2 autoscaler
        v2_version = 0
    v1_status = None
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        v1_status = json.loads(raw) if raw else None
    except Exception:  # noqa: BLE001 - as above
        v1_status = None
    return autoscaler_from_status(v1_status, v2_version)


# ----------------------------------------------------------------------------- a local cluster


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """While ``ray.init`` starts a local cluster: every server of it binds 127.0.0.1.

    Ray binds its servers (GCS, raylet, agents, workers) to the node IP, and on Linux it turns
    a node IP of 127.0.0.1 into the machine's outward address so that other machines could
    join; a local cluster of sdeseg has no other machines. Ray skips that only where
    multi-machine clusters are off, a switch it reads from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
    once at import: set it here for the start only. ``tests/test_preflight_cluster.py``
    checks every listening socket, so a Ray that changes this fails the test, not silently."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


# Ray reads the GCS port of a cluster it starts from this variable (0 or unset: a free one)
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"


def start_local_cluster(num_cpus: int, **init_kwargs: Any) -> str:
    """Start a Ray cluster on this machine for this process (``ray.init``): loopback only, its GCS
    on a port chosen here, and ``RAY_ADDRESS`` naming that GCS in every worker's environment
    (beside the settings of ``sdeseg.launch.PASS_ENV`` that this process has). Returns the GCS
    address.

    Why the address: code inside the cluster that looks its cluster up through Ray's state API
    (Ray Train's placement-group cleaner does, every few seconds) takes ``RAY_ADDRESS``, else
    searches the machine for GCS processes; beside a second Ray instance (another sdeseg run, a
    ``ray start``) that search fails with "Found multiple active Ray instances", and the
    cleaner's monitor dies. ``RAY_GCS_SERVER_PORT``, when set, is used as the port."""
    import ray

    from sdeseg.launch import PASS_ENV

    # workers inherit the settings that change behaviour (ops backend, test hooks)
    env_vars = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    port = int(os.environ.get(GCS_PORT_ENV) or 0) or _free_loopback_port()
    address = f"127.0.0.1:{port}"
    saved = os.environ.get(GCS_PORT_ENV)
    os.environ[GCS_PORT_ENV] = str(port)
    try:
        with loopback_only():
            ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
                     runtime_env={"env_vars": env_vars | {"RAY_ADDRESS": address}}, **init_kwargs)
    finally:
        if saved is None:
            os.environ.pop(GCS_PORT_ENV, None)
        else:
            os.environ[GCS_PORT_ENV] = saved
    started = ray.get_runtime_context().gcs_address
    if started != address:  # a Ray that stops reading the variable: the workers' address would be wrong
        ray.shutdown()
        raise RuntimeError(f"Ray started its GCS at {started}, not at {address} ({GCS_PORT_ENV}): "
                           "this Ray version no longer takes the GCS port from the environment")
    return address


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
