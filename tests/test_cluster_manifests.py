"""KubeRay manifests validate against the official CRD schemas (skipped when the CRDs are absent)."""

import functools
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
MANIFESTS = sorted(p for p in (ROOT / "cluster").glob("*.yaml") if "apiVersion: ray.io/" in p.read_text())


@functools.cache
def _schema(kind: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for crd_file in CRD_DIR.glob(f"ray.io_{kind.lower()}s.yaml"):
        for doc in yaml.load_all(crd_file.read_text(), Loader=loader):
            if doc and doc.get("spec", {}).get("names", {}).get("kind") == kind:
                version = next(v for v in doc["spec"]["versions"] if v["name"] == "v1")
                return version["schema"]["openAPIV3Schema"]
    raise LookupError(kind)


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


@pytest.mark.skipif(not CRD_DIR.is_dir(), reason="official KubeRay CRDs not available")
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_crd(manifest):
    doc = yaml.safe_load(manifest.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    schema = _schema(doc["kind"])
    jsonschema.validate(doc, schema)
    assert _unknown_fields({k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")},
                           {"type": "object", "properties": schema["properties"]}) == []


@pytest.mark.skipif(not CRD_DIR.is_dir(), reason="official KubeRay CRDs not available")
def test_strict_check_catches_a_typo():
    doc = yaml.safe_load((ROOT / "cluster" / "rayjob-sde.yaml").read_text())
    doc["spec"]["shutdownAfterJobFinish"] = True  # missing trailing 's'
    schema = _schema("RayJob")
    assert _unknown_fields(doc["spec"], schema["properties"]["spec"], ".spec") == [".spec.shutdownAfterJobFinish"]
    doc["spec"]["backoffLimit"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)


def test_entrypoints_name_existing_presets():
    from sdeseg.config import load_config

    for manifest in MANIFESTS:
        doc = yaml.safe_load(manifest.read_text())
        entry = doc["spec"].get("entrypoint")
        if entry:
            words = entry.split()
            assert words[:2] == ["sdeseg", "train"]
            overrides = [w for w in words[3:] if "=" in w and not w.startswith("--")]
            load_config(words[2], overrides)
