"""The runtime image: its pinned requirement set resolves, and the Dockerfile keeps its rules.

No Docker engine is needed. The resolve test asks pip's resolver (dry run, metadata only) what the
image's ``pip install`` would install on Linux x86_64 / Python 3.11 from the normal package index
under ``requirements/lock.txt``; the other tests parse the Dockerfile.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import sys
import urllib.request
from pathlib import Path

import pytest

from tune import lock

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
LOCK_PATH = "requirements/lock.txt"  # as the Dockerfile names it (relative to the build context)
TORCH_VERSION = "2.13.0"
MAX_DOWNLOAD_MB = 50  # sdists whose metadata pip must build (deepspeed); never a wheel's GBs
# files the dependency layer may copy before the source: what it needs to know the requirements
DEPENDENCY_INPUTS = {LOCK_PATH, "pyproject.toml", "tune/lock.py"}


# ------------------------------------------------------------------------------------ helpers


def instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments): comments dropped, continuations joined."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment line inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def shell_commands(run_args: str) -> list[list[str]]:
    """The simple commands of a RUN line (split at &&, ||, ;, |), each as its words."""
    return [shlex.split(part) for part in re.split(r"&&|\|\||;|\|", run_args) if part.strip()]


def is_pip_install(words: list[str]) -> bool:
    return any(re.fullmatch(r"pip[\d.]*", Path(w).name) for w in words[:3]) and "install" in words


def arg_defaults(instrs: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for k, a in instrs if k == "ARG" and "=" in a)


def ray_versions_in_manifests() -> set[str]:
    """Every ``rayVersion`` in the KubeRay manifests (cluster/**/*.yaml)."""
    pattern = re.compile(r"^\s*rayVersion:\s*[\"']?([0-9][\w.]*)[\"']?\s*(#.*)?$", re.MULTILINE)
    manifests = sorted((ROOT / "cluster").rglob("*.yaml"))
    return {m.group(1) for path in manifests for m in pattern.finditer(path.read_text())}


def dockerfile_problems(text: str, pins: dict[str, str], ray_versions: set[str]) -> list[str]:
    """Every rule of the image the Dockerfile breaks (empty: none)."""
    problems = []
    instrs = instructions(text)
    runs = [(i, shell_commands(a)) for i, (k, a) in enumerate(instrs) if k == "RUN"]
    pip_installs = [(i, words) for i, cmds in runs for words in cmds if is_pip_install(words)]
    installs = [i for i, cmds in runs for words in cmds
                if is_pip_install(words) or (words[:1] == ["apt-get"] and "install" in words)]

    apt = [w for _, cmds in runs for words in cmds if words[:1] == ["apt-get"] and "install" in words for w in words]
    if "python3.11-dev" not in apt:
        problems.append("python3.11-dev is not installed (Triton compiles its launcher against Python.h)")

    for _, words in pip_installs:
        cmd = " ".join(words)
        constraint = [words[j + 1] for j, w in enumerate(words[:-1]) if w in ("-c", "--constraint")]
        if constraint != [LOCK_PATH]:
            problems.append(f"pip install without -c {LOCK_PATH}: {cmd}")
        if any(w in ("-i", "--index-url", "--extra-index-url") or w.startswith(("--index-url=", "--extra-index-url="))
               for w in words):
            problems.append(f"pip install names an index (torch's CUDA wheel is on the normal one): {cmd}")
        if "." in words and "--no-deps" not in words:
            problems.append(f"the project is installed with its dependencies, not from the pinned layer: {cmd}")
    if not any("." in words for _, words in pip_installs):
        problems.append("sdeseg itself is never installed (pip install --no-deps .)")

    copies = [(i, shlex.split(a)) for i, (k, a) in enumerate(instrs) if k in ("COPY", "ADD")]
    copied = {src for _, words in copies for src in [w for w in words if not w.startswith("--")][:-1]}
    if LOCK_PATH not in copied:
        problems.append(f"the lock file {LOCK_PATH} is never copied into the image")
    source_copies = [i for i, words in copies
                     if set([w for w in words if not w.startswith("--")][:-1]) - DEPENDENCY_INPUTS]
    dep_installs = [i for i, words in pip_installs if "-r" in words or "--requirement" in words]
    if not dep_installs:
        problems.append("no pip install -r of the pinned dependencies")
    elif source_copies and min(dep_installs) > min(source_copies):
        problems.append("the dependencies are installed after the source is copied (every edit reinstalls them)")
    extras = arg_defaults(instrs).get("SDESEG_EXTRAS", "")
    dep_cmds = " ".join(a for k, a in instrs if k == "RUN" and "tune/lock.py requirements" in a)
    if "${SDESEG_EXTRAS}" not in dep_cmds and "$SDESEG_EXTRAS" not in dep_cmds:
        problems.append("the dependency list is not made by tune/lock.py requirements from SDESEG_EXTRAS")
    for extra in ("s3", "gcs"):
        if extra not in extras.split(","):
            problems.append(f"object-storage extra {extra!r} is not in SDESEG_EXTRAS ({extras!r})")
    if "dev" in extras.split(",") or re.search(r"\[[^\]]*\bdev\b[^\]]*\]", " ".join(a for _, a in instrs)):
        problems.append("dev extras are installed in the runtime image")

    if any("RAY_AUTH_MODE" in a for _, a in instrs):
        problems.append("RAY_AUTH_MODE is set in the image (authentication is the cluster's choice)")

    users = [(i, a.split(":")[0]) for i, (k, a) in enumerate(instrs) if k == "USER"]
    if not users or users[-1][1] in ("root", "0"):
        problems.append("the image runs as root (no USER, or USER root last)")
    elif installs and users[-1][0] < max(installs):
        problems.append("the last USER comes before the last install")
    if not re.search(r"useradd\s[^&;]*--uid", " ".join(a for k, a in instrs if k == "RUN")):
        problems.append("the user has no fixed uid (useradd --uid)")

    if pins.get("torch") != TORCH_VERSION:
        problems.append(f"{LOCK_PATH} pins torch {pins.get('torch')}, not {TORCH_VERSION}")
    if not ray_versions:
        problems.append("no rayVersion found in cluster/*.yaml")
    for version in sorted(ray_versions):
        if pins.get("ray") != version:
            problems.append(f"{LOCK_PATH} pins ray {pins.get('ray')}, the manifests' rayVersion is {version}")
    return problems


# ------------------------------------------------------------------------------------ tests


def test_dockerfile_keeps_the_image_rules():
    pins = lock.read_pins(ROOT / LOCK_PATH)
    assert dockerfile_problems(DOCKERFILE.read_text(), pins, ray_versions_in_manifests()) == []


@pytest.mark.parametrize("edit,expected", [
    (lambda t: t.replace("python3.11-dev ", ""), "python3.11-dev"),
    (lambda t: t.replace("\nUSER sdeseg", "\nUSER root"), "runs as root"),
    (lambda t: t.replace("\nUSER sdeseg", "") + "\nUSER sdeseg\nRUN pip install -c requirements/lock.txt x\n",
     "last USER comes before"),
    (lambda t: t + "\nENV RAY_AUTH_MODE=disabled\n", "RAY_AUTH_MODE"),
    (lambda t: t + '\nRUN pip3 install -c requirements/lock.txt ".[dev]"\n', "dev extras"),
    (lambda t: t.replace("ARG SDESEG_EXTRAS=s3,gcs", "ARG SDESEG_EXTRAS=s3,gcs,dev"), "dev extras"),
    (lambda t: t.replace("ARG SDESEG_EXTRAS=s3,gcs", "ARG SDESEG_EXTRAS=s3"), "'gcs'"),
    (lambda t: t.replace("pip install -c requirements/lock.txt pip setuptools", "pip install -U pip setuptools"),
     "without -c"),
    (lambda t: t.replace("-r /tmp/image-requirements.txt",
                         "-r /tmp/image-requirements.txt --extra-index-url https://download.pytorch.org/whl/cu130"),
     "names an index"),
    (lambda t: t.replace("--no-deps --no-build-isolation .", "--no-build-isolation ."), "with its dependencies"),
    # the source copied before the dependency layer
    (lambda t: t.replace("COPY tune/lock.py tune/lock.py", "COPY tune tune"), "installed after the source"),
])
def test_dockerfile_rules_catch_a_broken_dockerfile(edit, expected):
    """Each rule fires on a Dockerfile that breaks it (the edits must apply to today's file)."""
    text = DOCKERFILE.read_text()
    broken = edit(text)
    assert broken != text, "the edit no longer applies to the Dockerfile: update this test"
    pins = lock.read_pins(ROOT / LOCK_PATH)
    problems = dockerfile_problems(broken, pins, ray_versions_in_manifests())
    assert any(expected in p for p in problems), problems


def test_dockerfile_rules_catch_pins_that_disagree_with_the_manifests():
    pins = lock.read_pins(ROOT / LOCK_PATH)
    text = DOCKERFILE.read_text()
    problems = dockerfile_problems(text, pins | {"ray": "2.59.0", "torch": "2.12.0"}, ray_versions_in_manifests())
    assert any("pins ray 2.59.0" in p for p in problems) and any("torch 2.12.0" in p for p in problems)


def test_lock_pins_every_package_exactly_once():
    pins = lock.read_pins(ROOT / LOCK_PATH)  # raises on a line that is not name==version
    names = [lock.normalize(line.split("==")[0]) for line in (ROOT / LOCK_PATH).read_text().splitlines()
             if line and not line.startswith("#")]
    assert len(names) == len(set(names)) == len(pins)
    assert "sdeseg" not in pins and not any("+" in v for v in pins.values())  # no local (+cpu) builds


def _registry_reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=30).close()
        return True
    except OSError:
        return False


def _start_image_resolve(directory: Path):
    """Run by conftest when the session starts (the ``early`` marker): the resolve waits on the
    package index for about two minutes, time that then overlaps the CPU-bound tests before it."""
    if _this_platform() != lock.IMAGE_PLATFORM:
        return None
    extras = arg_defaults(instructions(DOCKERFILE.read_text()))["SDESEG_EXTRAS"].split(",")
    return lock.start_resolve(lock.image_requirements(extras), ROOT / LOCK_PATH, *_resolve_files(directory))


def _resolve_files(directory: Path) -> tuple[Path, Path]:
    """pip's report and debug log in the resolve's directory."""
    return directory / "report.json", directory / "pip.log"


def _this_platform() -> tuple[str, str, str]:
    return platform.system(), platform.machine(), f"{sys.version_info[0]}.{sys.version_info[1]}"


@pytest.mark.early.with_args(_start_image_resolve)  # (a lone function would be taken as the marked one)
def test_image_requirements_resolve_for_linux_x86_64_python311(early):
    """pip resolves what the Dockerfile installs (pyproject's dependencies + SDESEG_EXTRAS under
    the lock) from the normal index: the CUDA build of torch 2.13.0, ray at the manifests'
    rayVersion, and nothing outside the lock. Metadata only: a few MB, not torch's GBs."""
    here = _this_platform()
    if here != lock.IMAGE_PLATFORM:
        pytest.skip(f"resolves for this interpreter's platform {here}, the image's is {lock.IMAGE_PLATFORM}")
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    if not _registry_reachable(f"{index}/torch/"):
        message = f"package index {index} unreachable"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)

    started, directory = early  # pip started when the session did
    report, log = _resolve_files(directory)
    proc = lock.finish_resolve(started, report, timeout=400)
    assert proc.returncode == 0, proc.stdout[-8000:]

    env = json.loads(report.read_text())["environment"]
    assert (env["sys_platform"], env["platform_machine"], env["python_version"]) == ("linux", "x86_64", "3.11")
    resolved = lock.report_pins(report)
    assert resolved["torch"] == TORCH_VERSION
    assert {resolved["ray"]} == ray_versions_in_manifests()
    assert any(name.startswith("nvidia-") for name in resolved), "torch resolved without its CUDA libraries"
    assert {"s3fs", "gcsfs"} <= set(resolved)
    pins = lock.read_pins(ROOT / LOCK_PATH)
    unpinned = {name: version for name, version in resolved.items() if pins.get(name) != version}
    assert not unpinned, f"the image would install versions {LOCK_PATH} does not pin: {unpinned}"

    sizes = {"bytes": 1e-6, "kB": 1e-3, "MB": 1.0, "GB": 1e3}
    downloads = re.findall(r"Downloading (\S+) \(([\d.]+) (bytes|kB|MB|GB)\)", log.read_text())
    total_mb = sum(float(n) * sizes[unit] for _, n, unit in downloads)
    assert total_mb < MAX_DOWNLOAD_MB, f"pip downloaded {total_mb:.0f} MB: {downloads}"
