#!/usr/bin/env python3
"""Vendor the v1 openAPIV3Schema of KubeRay's RayCluster and RayJob CRDs for the manifest tests.

    python tests/data/vendor_kuberay_crds.py [CRD_DIR]    # default: ../shared/kuberay-crds

Writes ``tests/data/kuberay-crds-v1.json.gz``: ``{"source": ..., "schemas": {kind: schema}}``,
compact JSON, gzip without a timestamp (the same CRDs always give the same bytes).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VENDORED = HERE / "kuberay-crds-v1.json.gz"
SHARED = ROOT.parent / "shared" / "kuberay-crds"
KINDS = ("RayCluster", "RayJob")


def extract(crd_dir: Path) -> dict:
    """The vendored document from the official CRD files in ``crd_dir``."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    schemas, generators = {}, {}
    for kind in KINDS:
        path = crd_dir / f"ray.io_{kind.lower()}s.yaml"
        for doc in yaml.load_all(path.read_text(), Loader=loader):
            if doc and doc.get("spec", {}).get("names", {}).get("kind") == kind:
                version = next(v for v in doc["spec"]["versions"] if v["name"] == "v1")
                schemas[kind] = version["schema"]["openAPIV3Schema"]
                generators[kind] = doc["metadata"].get("annotations", {}).get("controller-gen.kubebuilder.io/version")
    missing = [k for k in KINDS if k not in schemas]
    if missing:
        raise LookupError(f"{crd_dir}: no CRD for {missing}")
    source = {"project": "KubeRay (https://github.com/ray-project/kuberay), Apache-2.0",
              "files": [f"ray.io_{k.lower()}s.yaml" for k in KINDS], "controller-gen": generators}
    return {"source": source, "schemas": schemas}


def load(path: Path = VENDORED) -> dict:
    with gzip.open(path, "rt") as f:
        return json.load(f)


def write(doc: dict, path: Path = VENDORED) -> None:
    data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(data)


if __name__ == "__main__":
    crd_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else SHARED
    write(extract(crd_dir))
    print(f"{VENDORED}: {VENDORED.stat().st_size} bytes from {crd_dir}")
