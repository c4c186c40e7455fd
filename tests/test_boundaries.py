"""The pure-PyTorch core never touches the runtime: no ray, deepspeed, webdataset,
torch.distributed (or prometheus_client) imports and no ``.cuda()`` calls.

Checked on the syntax tree, so comments and docstrings that mention these names are
fine, and ``from torch import distributed`` or ``importlib.import_module("ray")`` are
caught.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sdeseg"
PURE = ["models", "losses", "ops", "metrics.py", "mixing.py", "selection.py", "panoptic.py", "pseudo.py", "regions.py",
        "copy_paste.py", "unsup_eval.py"]
FORBIDDEN = ("ray", "deepspeed", "webdataset", "torch.distributed", "prometheus_client")


def pure_files() -> list[Path]:
    files: list[Path] = []
    for part in PURE:
        p = ROOT / part
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return files


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def violations(path: Path) -> list[str]:
    """Every forbidden import or ``.cuda()`` call in ``path``, as "file:line what"."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if _forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # "from torch import distributed" names the module only together with the alias
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(_forbidden(n) for n in names):
                found.append(f"{where} from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "cuda":
                found.append(f"{where} .cuda() call")
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _forbidden(arg.value):
                    found.append(f"{where} dynamic import of {arg.value}")
    return found


def test_scanned_files_exist():
    files = pure_files()
    assert (ROOT / "mixing.py") in files and (ROOT / "metrics.py") in files and (ROOT / "selection.py") in files
    assert any(f.parent.name == "models" for f in files) and any(f.parent.name == "losses" for f in files)


@pytest.mark.parametrize("path", pure_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_core_has_no_runtime_dependencies(path):
    assert violations(path) == []


def test_checker_catches_violations(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import ray.train\n"
        "from torch import distributed\n"
        "from torch.distributed import all_reduce\n"
        "import importlib\n"
        "importlib.import_module('deepspeed')\n"
        "x = y.cuda()\n"
        "# import webdataset  (a comment is fine)\n"
        "import torch.nn\n"
    )
    found = violations(bad)
    assert len(found) == 5, found
