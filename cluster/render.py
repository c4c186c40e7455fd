#!/usr/bin/env python3
"""sdeseg's Kubernetes manifests, rendered from one table (:data:`JOBS`).

    python cluster/render.py             # write the manifests checked in under cluster/
    python cluster/render.py --check     # exit 1 naming every checked-in file that differs
    python cluster/render.py --bucket s3://team-bucket --out my-manifests   # for another bucket

Written: ``raycluster.yaml`` (a long-lived autoscaling cluster for ``ray job submit``),
``jobs/<name>.yaml`` (one RayJob per stage: a cluster per job, deleted when it ends),
``podmonitor.yaml`` (Prometheus scrapes Ray's metrics port) and ``serviceaccount.yaml``.
Every Ray pod is built by :func:`ray_cluster_spec` from the same parts: the image, non-root
security contexts, Ray token authentication, object-storage credentials, Ray's metrics port,
and for training jobs the ImageNet weights fetched into ``/models`` by an init container.
Adding a job is one :class:`Job` entry. Needs only the standard library and PyYAML.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RAY_VERSION = "2.60.0"  # >= 2.52 for token authentication
KUBERAY_VERSION = "1.6.2"  # the operator the README installs: authOptions.secretName needs >= 1.6
UID = 1000  # the image's user (Dockerfile: SDESEG_UID)
METRICS_PORT = 8080  # Ray's metrics agent (metrics-export-port); sdeseg's metrics go through it
SERVICE_ACCOUNT = "sdeseg"  # annotate it for IRSA / GKE workload identity (README)
STORAGE_SECRET = "sdeseg-storage"  # optional: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...
AUTH_SECRET = "sdeseg-ray-token"  # key auth_token: Ray's token, shared by every pod of a cluster
WEIGHTS_DIR = "/models"
WEIGHTS_FILE = f"{WEIGHTS_DIR}/resnet101-imagenet.pth"  # what the jobs pass as model.pretrained
TRAIN_DRIVER, TUNE_DRIVERS = "TRAIN_DRIVER", 16  # sdeseg.tuning.DRIVER_RESOURCE; concurrent trials at most
RUNS_DIR = "/home/sdeseg/runs"  # the driver's local copy of a run; the run itself is in the bucket
LABELS = {"app.kubernetes.io/name": "sdeseg"}

POD_SECURITY = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"runAsNonRoot": True, "runAsUser": UID, "allowPrivilegeEscalation": False,
                      "capabilities": {"drop": ["ALL"]}}

# Downloads the ImageNet weights into the emptyDir at WEIGHTS_DIR with fsspec (https://, s3://,
# gs://; credentials from the pod's environment). A torchvision file name carries the start of
# its sha256 ("resnet101-63fe2227.pth"): checked as torch.hub does.
FETCH_WEIGHTS = """\
import hashlib, os, re, sys
import fsspec
url, dest = sys.argv[1], sys.argv[2]
digest, part = hashlib.sha256(), dest + ".part"
with fsspec.open(url, "rb") as src, open(part, "wb") as out:
    for chunk in iter(lambda: src.read(1 << 20), b""):
        digest.update(chunk)
        out.write(chunk)
prefix = re.search(r"-([0-9a-f]{8,64})\\.[A-Za-z]+$", url)
if prefix and not digest.hexdigest().startswith(prefix.group(1)):
    sys.exit(f"{url}: sha256 {digest.hexdigest()} does not start with {prefix.group(1)}")
os.replace(part, dest)
print(f"{url} -> {dest} (sha256 {digest.hexdigest()})")
"""


@dataclass(frozen=True)
class Site:
    """Where a deployment's things are; the checked-in manifests use the defaults."""

    bucket: str = "s3://my-bucket"
    image: str = "ghcr.io/sdeseg/sdeseg:0.1.0"
    weights_url: str = "https://download.pytorch.org/models/resnet101-63fe2227.pth"  # torchvision V1

    @property
    def raw(self) -> str:  # the official Cityscapes zips, unpacked
        return f"{self.bucket}/cityscapes"

    @property
    def sequences(self) -> str:
        return f"{self.bucket}/cityscapes-seq-512x1024"

    @property
    def labeled(self) -> str:
        return f"{self.bucket}/cityscapes-labeled-512x1024"

    @property
    def runs(self) -> str:  # runtime.storage_path: checkpoints, and each run's files under <name>/run/
        return f"{self.bucket}/sdeseg-runs"

    def export(self, run_name: str, which: str = "best") -> str:
        return f"{self.runs}/{run_name}/run/export/{which}.pt"


@dataclass(frozen=True)
class Workers:
    """One worker group: every pod alike, ``gpus`` NVIDIA GPUs each."""

    group: str
    replicas: int
    cpus: int
    memory: str
    gpus: int = 0
    shm: str = "16Gi"


@dataclass(frozen=True)
class Job:
    """One RayJob: shell commands run by the driver on the head, and the workers they need."""

    name: str
    about: str
    commands: list[str]
    workers: Workers
    weights: bool = True  # the ImageNet weights at WEIGHTS_FILE (training jobs)
    deadline_s: int = 3 * 24 * 3600


def gpu_workers(n: int) -> Workers:
    return Workers("gpu-workers", n, cpus=8, memory="64Gi", gpus=1)


def train(preset: str, run_name: str, site: Site, *overrides: str) -> str:
    """``sdeseg train`` with the run on the bucket under a fixed name (so the next stage knows
    where its export is, and a re-applied job resumes)."""
    return " ".join([f"sdeseg train {preset} --run-dir {RUNS_DIR}/{run_name}", f"runtime.run_name={run_name}",
                     f"runtime.storage_path={site.runs}", f"model.pretrained={WEIGHTS_FILE}", *overrides])


def prep(site: Site, frames: str, out: str) -> str:
    return f"sdeseg prep cityscapes --root {site.raw} --out {out} --frames {frames} --ray --no-progress"


def jobs(site: Site) -> list[Job]:
    """The pipeline, one entry per job: prep -> sde -> semiseg, and the component study (a search)."""
    return [
        Job("prep", "Cityscapes -> shards: every sequence frame (SDE) and the labeled frames (semiseg)",
            [prep(site, "all", site.sequences), prep(site, "labeled", site.labeled)],
            Workers("cpu-workers", 8, cpus=16, memory="32Gi"), weights=False, deadline_s=12 * 3600),
        Job("sde", "stage 1: self-supervised depth on the sequences, 8 GPUs",
            [train("cityscapes_sde", "sde-r101", site, f"data.root={site.sequences}")], gpu_workers(8)),
        Job("semiseg", "stage 2: semi-supervised segmentation from the SDE export, 4 GPUs",
            [train("cityscapes_semiseg", "semiseg-r101", site, f"data.root={site.labeled}",
                   f"semiseg.sde_checkpoint={site.export('sde-r101')}")], gpu_workers(4)),
        Job("component-study", "the paper's component study of stage 2 as a Ray Tune grid "
            "(sdeseg tune cityscapes_component_study): 15 trials of 4 GPUs, 4 at a time",
            [f"sdeseg tune cityscapes_component_study --out {RUNS_DIR}/component-study "
             f"data.root={site.labeled} semiseg.sde_checkpoint={site.export('sde-r101')} "
             f"runtime.storage_path={site.runs} model.pretrained={WEIGHTS_FILE}"], gpu_workers(16),
            deadline_s=14 * 24 * 3600),
    ]


# ----------------------------------------------------------------------------- pods


def _env_from() -> list[dict]:
    # object-storage keys when the Secret exists; a service account role (IRSA, GKE workload
    # identity) needs none
    return [{"secretRef": {"name": STORAGE_SECRET, "optional": True}}]


def _resources(cpus: int | str, memory: str, gpus: int = 0) -> dict:
    amount = {"cpu": str(cpus), "memory": memory} | ({"nvidia.com/gpu": str(gpus)} if gpus else {})
    return {"requests": dict(amount), "limits": dict(amount)}


def _fetch_weights(site: Site) -> dict:
    return {"name": "fetch-weights", "image": site.image,
            "command": ["python", "-c", FETCH_WEIGHTS, site.weights_url, WEIGHTS_FILE],
            "envFrom": _env_from(), "resources": _resources(1, "2Gi"),
            "volumeMounts": [{"name": "models", "mountPath": WEIGHTS_DIR}],
            "securityContext": dict(CONTAINER_SECURITY)}


def _pod(site: Site, container: dict, weights: bool, volumes: list[dict], **spec) -> dict:
    """A Ray pod template: non-root, the storage credentials, and the weights when asked."""
    container = {"image": site.image, **container, "envFrom": _env_from(),
                 "securityContext": dict(CONTAINER_SECURITY)}
    pod = {"serviceAccountName": SERVICE_ACCOUNT, **spec, "securityContext": dict(POD_SECURITY)}
    if weights:
        pod["initContainers"] = [_fetch_weights(site)]
        container.setdefault("volumeMounts", []).append({"name": "models", "mountPath": WEIGHTS_DIR,
                                                          "readOnly": True})
        volumes = [*volumes, {"name": "models", "emptyDir": {"sizeLimit": "1Gi"}}]
    pod["containers"] = [container]
    if volumes:
        pod["volumes"] = volumes
    return {"metadata": {"labels": dict(LABELS)}, "spec": pod}


def head_group(site: Site, weights: bool) -> dict:
    container = {"name": "ray-head",
                 "ports": [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                           {"containerPort": 10001, "name": "client"},
                           {"containerPort": METRICS_PORT, "name": "metrics"}],
                 "resources": _resources(4, "16Gi")}
    # the dashboard (job submission) listens on the pod IP: token authentication is on (authOptions)
    # TRAIN_DRIVER: the drivers of `sdeseg tune`'s trials run on the head and hold one each, no CPU
    return {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0",
                               "metrics-export-port": str(METRICS_PORT),
                               "resources": f'"{{\\"{TRAIN_DRIVER}\\": {TUNE_DRIVERS}}}"'},
            "template": _pod(site, container, weights, [])}


def worker_group(site: Site, w: Workers, weights: bool, autoscale: bool = False) -> dict:
    container = {"name": "ray-worker", "ports": [{"containerPort": METRICS_PORT, "name": "metrics"}],
                 "resources": _resources(w.cpus, w.memory, w.gpus)}
    volumes, extra = [], {"automountServiceAccountToken": False}
    if w.gpus:
        container["env"] = [{"name": "NCCL_DEBUG", "value": "WARN"},
                            {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"}]
        # DataLoader workers hand batches over through /dev/shm
        container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": w.shm}})
        extra["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"groupName": w.group, "replicas": 0 if autoscale else w.replicas,
            "minReplicas": 0 if autoscale else w.replicas, "maxReplicas": w.replicas,
            "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
            "template": _pod(site, container, weights, volumes, **extra)}


def ray_cluster_spec(site: Site, workers: Workers, weights: bool, autoscale: bool = False) -> dict:
    """The RayCluster spec every manifest uses (a RayJob's ``rayClusterSpec`` too)."""
    spec = {"rayVersion": RAY_VERSION, "authOptions": {"mode": "token", "secretName": AUTH_SECRET}}
    if autoscale:
        spec["enableInTreeAutoscaling"] = True
        spec["autoscalerOptions"] = {"idleTimeoutSeconds": 600, "resources": _resources(1, "1Gi"),
                                     "securityContext": dict(CONTAINER_SECURITY)}
    spec["headGroupSpec"] = head_group(site, weights)
    spec["workerGroupSpecs"] = [worker_group(site, workers, weights, autoscale)]
    return spec


def _submitter(site: Site) -> dict:
    # KubeRay fills in `ray job submit ... -- <entrypoint>` and the token; this pod needs nothing else
    return {"metadata": {"labels": dict(LABELS)},
            "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                     "securityContext": dict(POD_SECURITY),
                     "containers": [{"name": "ray-job-submitter", "image": site.image,
                                     "resources": _resources(1, "1Gi"),
                                     "securityContext": dict(CONTAINER_SECURITY)}]}}


# ----------------------------------------------------------------------------- manifests


def ray_job(site: Site, job: Job) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": f"sdeseg-{job.name}", "labels": LABELS | {"app.kubernetes.io/component": job.name}},
            "spec": {"entrypoint": " && ".join(job.commands),
                     "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 600,
                     "activeDeadlineSeconds": job.deadline_s, "backoffLimit": 2, "submissionMode": "K8sJobMode",
                     "submitterPodTemplate": _submitter(site),
                     "rayClusterSpec": ray_cluster_spec(site, job.workers, job.weights)}}


def ray_cluster(site: Site) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": "sdeseg", "labels": dict(LABELS)},
            "spec": ray_cluster_spec(site, gpu_workers(8), weights=True, autoscale=True)}


def pod_monitor() -> dict:
    cluster_label = {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"], "targetLabel": "ray_io_cluster"}
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
            "metadata": {"name": "sdeseg-ray", "labels": {"release": "prometheus"}},
            "spec": {"selector": {"matchLabels": dict(LABELS),
                                  "matchExpressions": [{"key": "ray.io/node-type", "operator": "In",
                                                        "values": ["head", "worker"]}]},
                     "podMetricsEndpoints": [{"port": "metrics", "interval": "15s",
                                              "relabelings": [cluster_label]}]}}


def service_account() -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SERVICE_ACCOUNT, "labels": dict(LABELS)}}


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the init container's script stays readable), and
    every value written out in place (no YAML anchors for the shared security contexts)."""

    def ignore_aliases(self, data) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)

HEADER = "# {about}\n# Generated by cluster/render.py from its job table; edit that, then run it.\n"


def render(site: Site | None = None) -> dict[str, str]:
    """Relative path -> file text of every manifest."""
    site = site or Site()

    def text(doc: dict, about: str) -> str:
        return HEADER.format(about=about) + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120)

    files = {f"jobs/{j.name}.yaml": text(ray_job(site, j), f"RayJob {j.name}: {j.about}.") for j in jobs(site)}
    files["raycluster.yaml"] = text(ray_cluster(site), "A long-lived RayCluster: GPU workers scale 0..8 on "
                                                       "demand; submit with `ray job submit`.")
    files["podmonitor.yaml"] = text(pod_monitor(), f"Prometheus Operator: scrape Ray's metrics port "
                                                   f"({METRICS_PORT}) of every sdeseg head and worker pod.")
    files["serviceaccount.yaml"] = text(service_account(), "The pods' identity: annotate it with a cloud role "
                                                           "for the bucket (IRSA, GKE workload identity).")
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    p.add_argument("--out", type=Path, default=HERE, help="output folder (default: cluster/)")
    p.add_argument("--bucket", default=Site.bucket, help=f"object-storage URL prefix (default {Site.bucket})")
    p.add_argument("--image", default=Site.image, help=f"container image (default {Site.image})")
    p.add_argument("--weights-url", default=Site.weights_url, help="where the init container fetches the "
                   "ImageNet ResNet-101 state_dict (https:// or a bucket URL)")
    args = p.parse_args(argv)
    files = render(Site(args.bucket.rstrip("/"), args.image, args.weights_url))
    if args.check:
        stale = [rel for rel, text in files.items()
                 if not (args.out / rel).is_file() or (args.out / rel).read_text() != text]
        for rel in stale:
            print(f"{args.out / rel}: differs from `python cluster/render.py`", file=sys.stderr)
        return 1 if stale else 0
    for rel, text in files.items():
        (args.out / rel).parent.mkdir(parents=True, exist_ok=True)
        (args.out / rel).write_text(text)
    print(f"wrote {len(files)} manifests under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
