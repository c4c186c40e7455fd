"""Training stages: each module has ``run(cfg, ctx) -> StageResult``."""

from __future__ import annotations

import importlib

STAGES = {
    "sde": "sdeseg.stages.sde",
    "semiseg": "sdeseg.stages.semiseg",
}


def stage_fn(name: str):
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
    return importlib.import_module(STAGES[name]).run
