"""The KubeRay manifests under cluster/: rendered from one table, valid against the official CRDs,
secure, consistent with the presets and with each other, and the walkthrough's commands checked.

The CRD schemas come from ``../shared/kuberay-crds`` when present, else from the vendored copy
``tests/data/kuberay-crds-v1.json.gz``; with neither, the CRD tests fail under ``CI=true``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdeseg.config import load_config
from sdeseg.runtime.cluster import NodeGroup, capacity, capacity_at_limits

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SHARED_CRDS = ROOT.parent / "shared" / "kuberay-crds"


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


render = _module("sdeseg_cluster_render", CLUSTER / "render.py")
vendor = _module("sdeseg_vendor_kuberay_crds", ROOT / "tests" / "data" / "vendor_kuberay_crds.py")
FILES = render.render()  # relative path -> text
DOCS = {rel: yaml.safe_load(text) for rel, text in FILES.items()}
RAY = sorted(rel for rel, doc in DOCS.items() if doc["apiVersion"] == "ray.io/v1")
JOBS = sorted(rel for rel in RAY if DOCS[rel]["kind"] == "RayJob")
SITE = render.Site()


def _load_schemas(shared: Path, vendored: Path, ci: bool) -> dict:
    """kind -> openAPIV3Schema: the official CRDs, else the vendored copy; with neither the
    test fails under CI and is skipped elsewhere."""
    if shared.is_dir():
        return vendor.extract(shared)["schemas"]
    if vendored.is_file():
        return vendor.load(vendored)["schemas"]
    message = f"KubeRay CRD schemas missing: neither {shared} nor {vendored}"
    if ci:
        pytest.fail(message)
    pytest.skip(message)


@functools.cache
def _schemas() -> dict:
    return _load_schemas(SHARED_CRDS, vendor.VENDORED, os.environ.get("CI", "").lower() in ("1", "true", "yes"))


def _unknown_fields(obj, schema, path="") -> list[str]:
    """Strict check of our own: keys not declared in the schema (jsonschema ignores them)."""
    out = []
    if isinstance(obj, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        if props is None or schema.get("x-kubernetes-preserve-unknown-fields"):
            return out
        for k, v in obj.items():
            if k not in props:
                out.append(f"{path}.{k}")
            else:
                out += _unknown_fields(v, props[k], f"{path}.{k}")
    elif isinstance(obj, list) and "items" in schema:
        for i, v in enumerate(obj):
            out += _unknown_fields(v, schema["items"], f"{path}[{i}]")
    return out


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _ray_pods(doc: dict) -> list[tuple[str, dict]]:
    """(role, pod template) of the head and every worker group."""
    spec = _cluster_spec(doc)
    return [("head", spec["headGroupSpec"]["template"])] + [
        (f"worker {g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]


def _all_pods(doc: dict) -> list[tuple[str, dict]]:
    pods = _ray_pods(doc)
    if doc["kind"] == "RayJob":
        pods.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    return pods


def _commands(job: dict) -> list[list[str]]:
    return [shlex.split(c) for c in job["spec"]["entrypoint"].split(" && ")]


def _overrides(words: list[str]) -> list[str]:
    return [w for w in words if "=" in w and not w.startswith("-")]


def _option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


# ----------------------------------------------------------------------------- one source


def test_checked_in_manifests_are_the_rendered_ones():
    on_disk = {str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*.yaml")}
    assert on_disk == set(FILES), "run `python cluster/render.py` (and delete files it no longer writes)"
    stale = [rel for rel, text in FILES.items() if (CLUSTER / rel).read_text() != text]
    assert stale == [], f"stale manifests {stale}: run `python cluster/render.py`"


def test_render_check_command(tmp_path):
    run = [sys.executable, str(CLUSTER / "render.py")]
    assert subprocess.run([*run, "--check"], capture_output=True, text=True).returncode == 0
    subprocess.run([*run, "--out", str(tmp_path)], check=True, capture_output=True)
    (tmp_path / "jobs" / "sde.yaml").write_text("tampered\n")
    result = subprocess.run([*run, "--check", "--out", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 1 and "sde.yaml" in result.stderr


def test_another_bucket_moves_every_path(tmp_path):
    files = render.render(render.Site(bucket="s3://team-bucket", image="registry.example/sdeseg:1"))
    assert set(files) == set(FILES)
    text = "".join(files.values())
    assert "my-bucket" not in text and "s3://team-bucket/sdeseg-runs" in text
    assert "ghcr.io" not in text


# ----------------------------------------------------------------------------- CRDs


@pytest.mark.parametrize("rel", RAY)
def test_manifest_matches_crd(rel):
    jsonschema = pytest.importorskip("jsonschema")
    doc = DOCS[rel]
    schema = _schemas()[doc["kind"]]
    jsonschema.validate(doc, schema)
    assert _unknown_fields({k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")},
                           {"type": "object", "properties": schema["properties"]}) == []


def test_strict_check_catches_a_typo():
    jsonschema = pytest.importorskip("jsonschema")
    doc = yaml.safe_load(FILES["jobs/sde.yaml"])
    doc["spec"]["shutdownAfterJobFinish"] = True  # missing trailing 's'
    schema = _schemas()["RayJob"]
    assert _unknown_fields(doc["spec"], schema["properties"]["spec"], ".spec") == [".spec.shutdownAfterJobFinish"]
    doc["spec"]["backoffLimit"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)


@pytest.mark.skipif(not SHARED_CRDS.is_dir(), reason="no ../shared/kuberay-crds to compare with")
def test_vendored_crds_equal_the_official_ones():
    assert vendor.load() == vendor.extract(SHARED_CRDS), "run `python tests/data/vendor_kuberay_crds.py`"


def test_missing_crds_fail_under_ci_and_skip_elsewhere(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="CRD schemas missing"):
        _load_schemas(tmp_path / "none", tmp_path / "none.json.gz", ci=True)
    with pytest.raises(pytest.skip.Exception):
        _load_schemas(tmp_path / "none", tmp_path / "none.json.gz", ci=False)
    assert set(_load_schemas(tmp_path / "none", vendor.VENDORED, ci=True)) == {"RayCluster", "RayJob"}


def test_vendored_crds_name_their_source():
    source = vendor.load()["source"]
    assert "KubeRay" in source["project"] and "Apache-2.0" in source["project"]
    assert all(source["controller-gen"].values())
    assert vendor.VENDORED.stat().st_size < 100_000


# ----------------------------------------------------------------------------- security


@pytest.mark.parametrize("rel", RAY)
def test_token_auth_and_non_root_pods(rel):
    doc = DOCS[rel]
    spec = _cluster_spec(doc)
    assert spec["authOptions"]["mode"] == "token"
    assert spec["authOptions"]["secretName"] == render.AUTH_SECRET
    host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host", "127.0.0.1")
    assert host == "127.0.0.1" or spec["authOptions"]["mode"] == "token"
    for role, pod in _all_pods(doc):
        ctx = pod["spec"]["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == render.UID, role
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, role
        for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (role, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (role, c["name"])
            assert sc.get("runAsNonRoot", True) is True and sc.get("runAsUser", render.UID) == render.UID
            assert "privileged" not in sc
    if spec.get("enableInTreeAutoscaling"):  # KubeRay adds the autoscaler container to the head pod
        sc = spec["autoscalerOptions"]["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]


def test_nothing_turns_ray_auth_off():
    for path in CLUSTER.rglob("*"):
        if path.is_file() and path.suffix != ".pyc":
            text = path.read_text()
            assert not re.search(r"RAY_AUTH_MODE\W+disabled", text), path
            assert not re.search(r"mode:\s*disabled", text), path


# ----------------------------------------------------------------------------- pods


@pytest.mark.parametrize("rel", RAY)
def test_gpu_workers_tolerate_gpu_nodes(rel):
    for group in _cluster_spec(DOCS[rel])["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        res = pod["containers"][0]["resources"]
        assert res["requests"] == res["limits"]
        if "nvidia.com/gpu" in res["limits"]:
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


@pytest.mark.parametrize("rel", RAY)
def test_storage_credentials_come_from_the_environment(rel):
    for role, pod in _ray_pods(DOCS[rel]):
        assert pod["spec"]["serviceAccountName"] == render.SERVICE_ACCOUNT, role
        for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
            assert {"secretRef": {"name": render.STORAGE_SECRET, "optional": True}} in c["envFrom"], (role, c["name"])


@pytest.mark.parametrize("rel", RAY)
def test_metrics_port_is_rays(rel):
    monitor = DOCS["podmonitor.yaml"]["spec"]
    assert [e["port"] for e in monitor["podMetricsEndpoints"]] == ["metrics"]
    assert monitor["selector"]["matchExpressions"][0]["values"] == ["head", "worker"]
    spec = _cluster_spec(DOCS[rel])
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        assert group["rayStartParams"]["metrics-export-port"] == str(render.METRICS_PORT)
        ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == render.METRICS_PORT
        labels = group["template"]["metadata"]["labels"]
        assert monitor["selector"]["matchLabels"].items() <= labels.items()


def test_weights_init_container_fetches_and_checks(tmp_path):
    pod = DOCS["jobs/sde.yaml"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    command = pod["initContainers"][0]["command"]
    assert command[-1] == render.WEIGHTS_FILE and command[-2] == SITE.weights_url
    payload = os.urandom(3000)
    good = tmp_path / f"resnet-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    good.write_bytes(payload)
    dest = tmp_path / "out.pth"
    subprocess.run([sys.executable, *command[1:-2], good.as_uri(), str(dest)], check=True, capture_output=True)
    assert dest.read_bytes() == payload
    bad = tmp_path / "resnet-00000000.pth"
    bad.write_bytes(payload)
    result = subprocess.run([sys.executable, *command[1:-2], bad.as_uri(), str(tmp_path / "bad.pth")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "sha256" in result.stderr and not (tmp_path / "bad.pth").exists()


# ----------------------------------------------------------------------------- jobs vs presets


def _configs(job: dict) -> list:
    """The config of every training run a job starts (each trial of a grid search)."""
    from sdeseg.search import grid_points, load_search

    configs = []
    for words in _commands(job):
        if words[:2] == ["sdeseg", "train"]:
            configs.append(load_config(words[2], _overrides(words)))
        elif words[:2] == ["sdeseg", "tune"]:
            spec = load_search(words[2], _overrides(words))
            configs += [spec.trial_config(p) for p in grid_points(spec)]
    return configs


@pytest.mark.parametrize("rel", JOBS)
def test_entrypoints_parse_and_load(rel):
    from sdeseg.cli import build_parser

    parser = build_parser()
    for words in _commands(DOCS[rel]):
        if words[0] == "sdeseg":
            args, extra = parser.parse_known_args(words[1:])
            assert all("=" in w for w in extra), extra
            if args.command == "prep":
                assert args.ray and args.root.startswith(SITE.bucket) and args.out.startswith(SITE.bucket)
        else:
            raise AssertionError(f"not an sdeseg command: {words}")
    for cfg in _configs(DOCS[rel]):
        assert cfg.runtime.storage_path == SITE.runs


@pytest.mark.parametrize("rel", JOBS)
def test_workers_hold_what_the_runs_ask_for(rel):
    """As Ray counts them (CPUs from the pod limits, GPUs from nvidia.com/gpu, none on the head)."""
    spec = DOCS[rel]["spec"]["rayClusterSpec"]
    nodes = [{"CPU": float(spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])}]
    for g in spec["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        nodes += [{"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}] * g["replicas"]
    for cfg in _configs(DOCS[rel]):
        rt = cfg.runtime
        bundle = {"CPU": rt.cpus_per_worker} | ({"GPU": rt.gpus_per_worker} if rt.use_gpu else {})
        assert capacity(bundle, nodes) >= rt.num_workers, (rel, bundle, rt.num_workers)


def test_the_long_lived_cluster_can_grow_to_every_job():
    spec = DOCS["raycluster.yaml"]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = []
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] == 0
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        groups.append(NodeGroup(g["groupName"], {"CPU": float(limits["cpu"]),
                                                 "GPU": float(limits.get("nvidia.com/gpu", 0))}, g["maxReplicas"]))
    for rel in JOBS:
        for cfg in _configs(DOCS[rel]):
            rt = cfg.runtime
            if rt.use_gpu:
                assert capacity_at_limits({"CPU": rt.cpus_per_worker, "GPU": rt.gpus_per_worker}, groups) \
                    >= rt.num_workers


@pytest.mark.parametrize("rel", [*JOBS, "raycluster.yaml"])
def test_pretrained_weights_are_mounted_where_the_runs_read_them(rel):
    configs = _configs(DOCS[rel]) if rel in JOBS else []
    needs = {cfg.model.pretrained for cfg in configs} - {None}
    assert needs <= {render.WEIGHTS_FILE}
    if needs or rel == "raycluster.yaml":
        for role, pod in _ray_pods(DOCS[rel]):  # the driver's preflight (head) and every worker read it
            mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
            assert mounts.get(render.WEIGHTS_DIR) == "models", role
            init = pod["spec"]["initContainers"][0]
            assert init["command"][-1] == render.WEIGHTS_FILE
            assert {"name": "models", "mountPath": render.WEIGHTS_DIR} in init["volumeMounts"]
            assert {"name": "models", "emptyDir": {"sizeLimit": "1Gi"}} in pod["spec"]["volumes"]


def test_presets_point_at_no_missing_file():
    """model.pretrained is optional in the presets: the jobs pass the path they mount."""
    for preset in ("cityscapes_sde", "cityscapes_semiseg"):
        assert load_config(preset).model.pretrained is None


def test_stages_chain_through_the_bucket():
    """prep writes what sde reads; sde exports where semiseg and the search read (the run's
    files live under <runtime.storage_path>/<runtime.run_name>/run/, see sdeseg.storage)."""
    from sdeseg.storage import RunStore

    prep_out = {_option(w, "--frames"): _option(w, "--out") for w in _commands(DOCS["jobs/prep.yaml"])}
    (sde,) = _configs(DOCS["jobs/sde.yaml"])
    (semiseg,) = _configs(DOCS["jobs/semiseg.yaml"])
    assert sde.data.root == prep_out["all"] and semiseg.data.root == prep_out["labeled"]
    export = RunStore.for_run(sde.runtime.storage_path, sde.runtime.run_name).uri("export/best.pt")
    assert semiseg.semiseg.sde_checkpoint == export
    assert {cfg.semiseg.sde_checkpoint for cfg in _configs(DOCS["jobs/component-study.yaml"])} == {export}
    assert {cfg.data.root for cfg in _configs(DOCS["jobs/component-study.yaml"])} == {prep_out["labeled"]}


# ----------------------------------------------------------------------------- the walkthrough


def _readme_commands() -> list[str]:
    text = (CLUSTER / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:sh|bash)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _check_readme_command(cmd: str, tmp_path: Path) -> None:
    words = shlex.split(cmd.split(" | ")[0])
    secrets = {render.STORAGE_SECRET, render.AUTH_SECRET}
    job_names = {DOCS[rel]["metadata"]["name"] for rel in JOBS}
    cluster_names = job_names | {DOCS["raycluster.yaml"]["metadata"]["name"]}
    if words[:3] == ["kubectl", "apply", "-f"]:
        rel = str(Path(words[3]).relative_to("cluster"))
        assert rel in FILES and (CLUSTER / rel).is_file(), cmd  # and validated by the tests above
    elif words[:2] == ["python", "cluster/render.py"]:
        args = words[2:]
        if "--out" in args:
            args[args.index("--out") + 1] = str(tmp_path / "rendered")
        result = subprocess.run([sys.executable, str(CLUSTER / "render.py"), *args], capture_output=True, text=True,
                                cwd=ROOT)
        assert result.returncode == 0, (cmd, result.stderr)
    elif words[:4] == ["kubectl", "create", "secret", "generic"]:
        assert words[4] in secrets, cmd
        if words[4] == render.AUTH_SECRET:
            assert "--from-literal=auth_token=$(openssl" in cmd
    elif words[:3] == ["kubectl", "annotate", "serviceaccount"]:
        assert words[3] == render.SERVICE_ACCOUNT, cmd
    elif words[:2] == ["kubectl", "get"]:
        kind, _, name = words[2].partition("/")
        if not name and len(words) > 3 and not words[3].startswith("-"):
            name = words[3]
        assert kind in ("rayjobs", "rayjob", "secret"), cmd
        assert not name or name in (secrets if kind == "secret" else job_names), cmd
    elif words[:2] == ["kubectl", "logs"]:
        target = next(w for w in words[2:] if "/" in w)
        kind, name = target.split("/")
        assert kind == "job" and name in job_names, cmd
    elif words[:2] == ["kubectl", "port-forward"]:
        assert words[2].startswith("svc/") and words[2][4:].removesuffix("-head-svc") in cluster_names, cmd
        assert words[3] == "8265:8265", cmd
    elif words[:2] == ["kubectl", "delete"]:
        assert words[2] == "rayjob" and words[3] in job_names, cmd
    elif words[:2] == ["helm", "repo"]:
        assert words[2:] == ["add", "kuberay", "https://ray-project.github.io/kuberay-helm/"], cmd
    elif words[:2] == ["helm", "install"]:
        assert words[2:4] == ["kuberay-operator", "kuberay/kuberay-operator"], cmd
        assert _option(words, "--version") == render.KUBERAY_VERSION, cmd
    elif words[0] == "docker":
        assert words[1] in ("build", "push") and SITE.image in words, cmd
    elif words[:2] == ["aws", "s3"]:
        assert words[-1].rstrip("/") in {SITE.bucket, SITE.raw}, cmd
    elif words[0] == "export":
        assert words[1].split("=")[0] in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"), cmd
        assert "disabled" not in cmd
    elif words[:3] == ["ray", "job", "submit"]:  # the SDE stage on the long-lived cluster: as its RayJob
        entry = words[words.index("--") + 1:]
        assert entry[:2] == ["sdeseg", "train"], cmd
        (job_cfg,) = _configs(DOCS["jobs/sde.yaml"])
        assert load_config(entry[2], _overrides(entry)).to_dict() == job_cfg.to_dict(), cmd
    else:
        raise AssertionError(f"cluster/README.md: no check for `{cmd}`; add one to {__file__}")


def test_readme_commands_are_checked(tmp_path):
    commands = _readme_commands()
    assert any(c.startswith("kubectl apply -f cluster/jobs/") for c in commands)
    for cmd in commands:
        _check_readme_command(cmd, tmp_path)
    applied = {c.split()[-1] for c in commands if c.startswith("kubectl apply -f")}
    assert {f"cluster/{rel}" for rel in JOBS if "component-study" not in rel} <= applied


def test_the_head_offers_a_driver_slot_per_concurrent_trial():
    """`sdeseg tune` trial drivers hold one TRAIN_DRIVER each (sdeseg.tuning) and no CPU."""
    from sdeseg.search import load_search
    from sdeseg.tuning import DRIVER_RESOURCE

    for rel in ["raycluster.yaml", *JOBS]:
        doc = DOCS[rel]
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        offered = json.loads(json.loads(spec["headGroupSpec"]["rayStartParams"]["resources"]))
        assert offered[DRIVER_RESOURCE] >= load_search("cityscapes_component_study").max_concurrent
