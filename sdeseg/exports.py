"""Loading the models a stage exported (``<run_dir>/export/{best,last}.pt``).

Exports hold only tensors and plain types, so they load with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdeseg.config import ModelConfig, _build
from sdeseg.models import DepthRange, build_depth_model, build_seg_model


class ExportError(ValueError):
    """An export file is missing or of the wrong kind; names the file."""


def read_export(path: str | Path, kind: str | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such export (run the stage that writes it first)")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if kind is not None and payload.get("kind") != kind:
        raise ExportError(f"{path}: expected a {kind!r} export, found {payload.get('kind')!r}")
    return payload


def export_model_config(payload: dict) -> ModelConfig:
    return _build(ModelConfig, dict(payload["model_config"]), "model")


def load_depth_model(export: str | Path | dict):
    """(DepthModel in eval mode, its :class:`DepthRange`) from an SDE export's path, or from
    its payload when the caller has already read it (:func:`read_export`)."""
    payload = export if isinstance(export, dict) else read_export(export, "sde")
    cfg = export_model_config(payload)
    cfg.pretrained = None  # the export already holds trained weights
    model = build_depth_model(cfg)
    model.load_state_dict(payload["depth"], strict=True)
    return model.eval(), DepthRange.from_dict(payload["depth_range"])


def load_seg_model(path: str | Path):
    """Segmentation (or multi-task) model in eval mode from a semi-supervised export."""
    payload = read_export(path, "seg")
    cfg = export_model_config(payload)
    cfg.pretrained = None
    model = build_seg_model(cfg)
    model.load_state_dict(payload["model"], strict=True)
    return model.eval()
