"""Training stages: each module has ``run(cfg, ctx) -> StageResult`` and may have
``preflight(cfg)``, the checks the launcher runs before any worker starts."""

from __future__ import annotations

import importlib
from types import ModuleType

STAGES = {
    "sde": "sdeseg.stages.sde",
    "semiseg": "sdeseg.stages.semiseg",
    "select": "sdeseg.stages.select",
    "ssda": "sdeseg.stages.ssda",
    "selftrain": "sdeseg.stages.selftrain",
    "contrastive": "sdeseg.stages.contrastive",
    "instance": "sdeseg.stages.instance",
}


def stage_module(name: str) -> ModuleType:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
    return importlib.import_module(STAGES[name])
