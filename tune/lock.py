"""The pin list (``requirements/lock.txt``) and the image's requirement set.

    python -m tune.lock                          # rewrite requirements/lock.txt (what `make lock` runs)
    python tune/lock.py requirements s3,gcs      # the image's requirements: pyproject deps + those extras

``requirements/lock.txt`` is a pip constraints file: it pins every package sdeseg can install
(runtime dependencies direct and transitive, the extras, the dev tools) and installs nothing by
itself. ``make install`` (``PIP_CONSTRAINT``) and the Dockerfile both install under it.

Regenerating writes the versions installed in this virtual environment (torch without its local
``+cpu`` label: on Linux x86_64 the normal index serves the CUDA build under the same version),
then asks pip's resolver what the image installs beyond them (torch's CUDA libraries, the
``gcs`` extra), for this interpreter's platform, which must be Linux x86_64 / Python 3.11 like the
image's. pip only reads package metadata for that (``--dry-run``; ``fast-deps`` reads a wheel's
metadata with HTTP range requests where the index serves no separate metadata file), except for
source-only packages (deepspeed), whose metadata pip builds from the sdist.

Stdlib only: the Dockerfile runs this file before the rest of the source is in the image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
PYPROJECT = ROOT / "pyproject.toml"
IMAGE_PLATFORM = ("Linux", "x86_64", "3.11")  # what the image runs: the resolve must match it
# pip settings that point pip at this machine's own wheels, indexes or caps instead of the index
_MACHINE_LOCAL = ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "PIP_BUILD_CONSTRAINT",
                  "PIP_NO_INDEX", "PIP_REQUIREMENT", "PIP_TARGET", "PIP_PREFIX", "PIP_USER")

HEADER = """\
# The one pin list of sdeseg: every runtime dependency (direct and transitive), the extras
# (s3, gcs, export), the dev tools, and what the image's CUDA build of torch pulls in.
# A pip constraints file: it pins whatever gets installed and installs nothing by itself.
# Used by `make install` (PIP_CONSTRAINT) and by the Dockerfile (`pip install -c`);
# tests/test_image.py resolves the image's requirement set against it.
#
# To regenerate (after changing pyproject.toml, or to upgrade a package): install the versions
# you want into .venv under these pins, loosening the lines you change, e.g.
#     grep -v '^ray==' requirements/lock.txt > /tmp/c.txt && .venv/bin/pip install -c /tmp/c.txt 'ray==X'
# then run `make lock` (python -m tune.lock). It writes what .venv has installed (torch without
# its local +cpu label) plus what the image needs beyond it, resolved by pip for Linux x86_64 /
# Python 3.11, and fails with pip's explanation when the two cannot go together.
"""
IMAGE_ONLY = "# --- only in the image: torch's CUDA libraries on Linux x86_64, the gcs extra ---\n"


def normalize(name: str) -> str:
    """PEP 503 project name: ``Flask_Cors`` -> ``flask-cors``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_requirements(extras: list[str], pyproject: Path = PYPROJECT) -> list[str]:
    """The requirement strings the image installs: ``[project] dependencies`` plus ``extras``."""
    import tomllib  # Python >= 3.11, as the image's and the Makefile's

    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"pyproject.toml has no extra {unknown}; it has {sorted(optional)}")
    return list(project["dependencies"]) + [r for e in extras for r in optional[e]]


def read_pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file, by normalized name."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise ValueError(f"{path}: not a pin: {line!r}")
            pins[normalize(name)] = version.strip()
    return pins


def pip_env() -> dict[str, str]:
    """The environment for a pip that sees only the package index: no config files (this machine's
    may add local wheel folders or version caps), none of their environment counterparts."""
    env = {k: v for k, v in os.environ.items() if k not in _MACHINE_LOCAL}
    env["PIP_CONFIG_FILE"] = os.devnull  # pip reads no config file at all
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _pip_output(report: Path) -> Path:
    return report.with_name(f"{report.stem}-pip.out")


def start_resolve(requirements: list[str], constraints: Path, report: Path, log: Path) -> subprocess.Popen:
    """Start pip's resolver in dry-run mode and return at once: what ``pip install -c constraints
    requirements`` would install into an empty environment of this interpreter. pip writes its
    JSON ``report`` and its debug ``log``; the requirement file and pip's console output
    (``<report stem>-pip.out``) go beside ``report``. ``resolve`` waits for it."""
    requirement_file = report.with_name(f"{report.stem}-requirements.txt")
    requirement_file.write_text("\n".join(requirements) + "\n")
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
           "--use-feature=fast-deps", "--report", str(report), "--log", str(log),
           "-c", str(constraints), "-r", str(requirement_file)]
    with open(_pip_output(report), "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=pip_env(), stdout=out, stderr=subprocess.STDOUT)


def finish_resolve(proc: subprocess.Popen, report: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Wait for a ``start_resolve`` process (killed after ``timeout`` seconds: ``TimeoutExpired``);
    the finished process with pip's console output as ``stdout`` (check ``returncode``)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    output = _pip_output(report).read_text()
    return subprocess.CompletedProcess(proc.args, proc.returncode, output, "")


def resolve(requirements: list[str], constraints: Path, report: Path, log: Path,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """``start_resolve`` and wait for it (``finish_resolve``)."""
    return finish_resolve(start_resolve(requirements, constraints, report, log), report, timeout)


def report_pins(report: Path) -> dict[str, str]:
    """What a pip ``--report`` would install: normalized name -> version."""
    data = json.loads(report.read_text())
    return {normalize(i["metadata"]["name"]): i["metadata"]["version"] for i in data["install"]}


def installed_pins(python: str = sys.executable) -> dict[str, str]:
    """The distributions installed for ``python``, editable ones (sdeseg) left out, local version
    labels (``2.13.0+cpu``) dropped."""
    out = subprocess.run([python, "-m", "pip", "list", "--format=json", "--exclude-editable"],
                         env=pip_env(), capture_output=True, text=True, check=True).stdout
    return {normalize(d["name"]): d["version"].split("+", 1)[0] for d in json.loads(out)}


def _pin_lines(pins: dict[str, str]) -> str:
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def regenerate(lock: Path = LOCK, extras: list[str] | None = None) -> int:
    """Rewrite ``lock`` from this environment plus the image's resolve; 1 (lock untouched) when pip
    cannot resolve the image's set under this environment's versions."""
    if (platform.system(), platform.machine(), f"{sys.version_info[0]}.{sys.version_info[1]}") != IMAGE_PLATFORM:
        print(f"tune.lock: run this on {'/'.join(IMAGE_PLATFORM)} (the image's platform)", file=sys.stderr)
        return 1
    local = installed_pins()
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "local.txt"
        constraints.write_text(_pin_lines(local))
        report = Path(tmp) / "report.json"
        proc = resolve(image_requirements(extras or ["s3", "gcs"]), constraints, report, Path(tmp) / "pip.log")
        if proc.returncode != 0:
            print(proc.stdout, file=sys.stderr)
            print("tune.lock: the image's requirements do not resolve under the versions installed here; "
                  "install versions that do (see pip's explanation above)", file=sys.stderr)
            return 1
        image_only = {k: v for k, v in report_pins(report).items() if k not in local}
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(HEADER + _pin_lines(local) + IMAGE_ONLY + _pin_lines(image_only))
    print(f"wrote {lock}: {len(local)} pins from this environment, {len(image_only)} only in the image")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    req = sub.add_parser("requirements", help="print the image's requirements, one a line")
    req.add_argument("extras", nargs="?", default="", help="comma-separated extras, e.g. s3,gcs")
    args = parser.parse_args(argv)
    if args.command == "requirements":
        print("\n".join(image_requirements([e for e in args.extras.split(",") if e])))
        return 0
    return regenerate()


if __name__ == "__main__":
    sys.exit(main())
