"""The models a run exports, in every format: read, load for inference, convert.

A stage writes ``<run_dir>/export/{best,last}.pt``: a dict of plain types and tensors
(loadable with ``weights_only=True``) — ``kind`` (``"sde"``, ``"seg"`` or ``"instance"``),
``model_config``, ``depth_range``, ``step``, ``metrics`` and tensor groups (``depth`` and
``pose`` for SDE exports, ``model`` for segmentation / multi-task exports; instance exports
hold ``model`` and, when they fuse depth, the frozen ``depth`` network with its
``depth_model_config``, and their ``instance`` settings: fusion stages, depth scale, grouping).

``sdeseg export`` converts one into

- **safetensors**: the tensor groups flattened as ``<group>.<name>``, and everything else as
  one JSON header in the file's metadata (key ``sdeseg``), with the class names and the
  input convention. :func:`load_model` and :func:`read_export` read it without pickle.
- **ONNX**: the network for inference (image in, logits and/or depth out), checked against
  PyTorch with onnxruntime.

:func:`load_model` returns a :class:`LoadedModel` from either a ``.pt`` or a ``.safetensors``
export: the network in eval mode and what a consumer needs to read its outputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from sdeseg.config import ConfigError, ModelConfig, _build
from sdeseg.models import DepthRange, build_depth_model, build_seg_model

HEADER_KEY = "sdeseg"
FORMAT = "sdeseg-export"
FORMAT_VERSION = 1
TENSOR_GROUPS = ("depth", "pose", "model")
# what every sdeseg network takes: the normalisation happens inside the network
INPUT = {
    "layout": "NCHW", "channels": "RGB", "dtype": "float32", "range": [0.0, 1.0],
    "normalisation": "inside the network: (x - 0.45) / 0.225 (Monodepth2)",
    "size_multiple": 32,
}


class ExportError(ValueError):
    """An export file is missing, unreadable or of the wrong kind; names the file."""


# ----------------------------------------------------------------------------- reading


def read_export(path: str | Path, kind: str | None = None) -> dict:
    """The payload of an export (``.pt`` or ``.safetensors``; a local path or a URL such as
    ``s3://bucket/runs/sde/run/export/best.pt``), checked to be of ``kind`` when given."""
    from sdeseg.storage import fetch, is_url

    if is_url(path):
        try:
            path = fetch(str(path))
        except FileNotFoundError as e:
            raise ExportError(f"{e} (run the stage that writes it first)") from e
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such export (run the stage that writes it first)")
    payload = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pt(path)
    if kind is not None and payload.get("kind") != kind:
        raise ExportError(f"{path}: expected a {kind!r} export, found {payload.get('kind')!r}")
    return payload


def _read_pt(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, a pickle of something else, ...
        raise ExportError(f"{path}: not an sdeseg export ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or "kind" not in payload or "model_config" not in payload:
        raise ExportError(f"{path}: not an sdeseg export (no kind / model_config)")
    return payload


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if HEADER_KEY not in meta:
                raise ExportError(f"{path}: a safetensors file without an sdeseg header (metadata key {HEADER_KEY!r})")
            payload = json.loads(meta[HEADER_KEY])
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                group, key = name.split(".", 1)
                payload.setdefault(group, {})[key] = f.get_tensor(name)
    except SafetensorError as e:
        raise ExportError(f"{path}: not a readable safetensors file ({e})") from e
    if payload.get("format") != FORMAT:
        raise ExportError(f"{path}: header format is {payload.get('format')!r}, expected {FORMAT!r}")
    return payload


def export_model_config(payload: dict) -> ModelConfig:
    cfg = _build(ModelConfig, dict(payload["model_config"]), "model")
    cfg.pretrained = None  # the export already holds trained weights
    return cfg


# what must agree for an export's encoder and decoder body to initialise another network
TRANSFER_FIELDS = ("encoder", "width", "dilate_last", "aspp", "decoder_channels")


def transfer_mismatch(payload: dict, cfg: ModelConfig) -> list[str]:
    """``"field: export X, config Y"`` for every :data:`TRANSFER_FIELDS` entry where the export's
    ``model_config`` and ``cfg`` differ (empty: the weights fit)."""
    theirs = export_model_config(payload)
    return [f"model.{f}: export {getattr(theirs, f)!r}, config {getattr(cfg, f)!r}" for f in TRANSFER_FIELDS
            if getattr(theirs, f) != getattr(cfg, f)]


def read_init_export(path: str | Path, kind: str, cfg: ModelConfig, key: str) -> dict:
    """The export at ``path`` a network starts from, checked to be of ``kind`` and to hold an
    encoder and decoder body that fit a network built from ``cfg``; a ConfigError naming the
    config ``key`` otherwise (a stage's preflight)."""
    try:
        payload = read_export(path, kind)
    except ExportError as e:
        raise ConfigError(f"{key}: {e}") from e
    mismatch = transfer_mismatch(payload, cfg)
    if mismatch:
        raise ConfigError(f"{key}: {path} was trained with another network ({'; '.join(mismatch)})")
    return payload


def load_depth_model(export: str | Path | dict):
    """(DepthModel in eval mode, its :class:`DepthRange`) from an SDE export's path, or from
    its payload when the caller has already read it (:func:`read_export`)."""
    payload = export if isinstance(export, dict) else read_export(export, "sde")
    model = build_depth_model(export_model_config(payload))
    model.load_state_dict(payload["depth"], strict=True)
    return model.eval(), DepthRange.from_dict(payload["depth_range"])


def load_seg_model(path: str | Path):
    """Segmentation (or multi-task) model in eval mode from a semi-supervised export."""
    payload = read_export(path, "seg")
    model = build_seg_model(export_model_config(payload))
    model.load_state_dict(payload["model"], strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- inference


@dataclass
class LoadedModel:
    """A trained network ready for inference, and how to read it.

    ``net(image)`` with image (B,3,H,W) RGB in [0, 1] (H, W multiples of 32; see
    ``sdeseg.infer`` for any size) returns ``("seg", 0)`` logits (B,C,H,W) when ``"seg"`` is in
    ``tasks`` and ``("disp", 0)`` (B,1,H,W) sigmoid disparity when ``"depth"`` is; depth in
    metres (up to the scale a self-supervised model cannot know) is ``depth_range.depth(disp)``.
    With ``"instance"`` it also returns ``("center", 0)`` (B,1,H,W) and ``("offset", 0)``
    (B,2,H,W), grouped into instances by ``sdeseg.panoptic.instances_from_outputs`` with the
    export's ``info["instance"]["grouping"]``.
    """

    net: nn.Module
    kind: str
    tasks: tuple[str, ...]
    model_config: ModelConfig
    depth_range: DepthRange | None
    class_names: tuple[str, ...]
    path: str
    info: dict[str, Any] = field(default_factory=dict)  # step, metrics (and instance settings) of the export

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"logits": (B,C,H,W), "depth": (B,1,H,W) metres}`` (those of ``tasks``), float32."""
        out = self.net(image)
        res = {}
        if "seg" in self.tasks:
            res["logits"] = out[("seg", 0)].float()
        if "depth" in self.tasks:
            res["depth"] = self.depth_range.depth(out[("disp", 0)])
        return res

    def require(self, task: str) -> None:
        """ExportError naming the file unless the model predicts ``task`` ("seg", "depth" or
        "instance")."""
        if task not in self.tasks:
            what = {"seg": "segmentation", "depth": "depth", "instance": "instances"}[task]
            raise ExportError(f"{self.path}: a {self.kind!r} export predicts {list(self.tasks)}, not {what}")


def load_model(path: str | Path) -> LoadedModel:
    """The network of any export (``.pt`` of a stage, or ``.safetensors`` of ``sdeseg export``),
    in eval mode on the CPU. SDE exports give the depth network (the pose net is kept in the
    file for transfer, not needed to predict)."""
    from sdeseg.data.classes import class_names

    payload = read_export(path)
    cfg = export_model_config(payload)
    if payload["kind"] == "sde":
        net, tasks = build_depth_model(cfg), ("depth",)
        weights = payload["depth"]
    elif payload["kind"] == "seg":
        net = build_seg_model(cfg)
        tasks = ("seg", "depth") if cfg.multitask and "depth_range" in payload else ("seg",)
        weights = payload["model"]
    elif payload["kind"] == "instance":
        net, tasks = _instance_net(payload, cfg, path), ("seg", "instance")
        weights = payload["model"]
    else:
        raise ExportError(f"{path}: unknown export kind {payload['kind']!r}")
    try:
        (net.model if payload["kind"] == "instance" else net).load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{path}: weights do not fit the recorded model_config ({e})") from e
    depth_range = DepthRange.from_dict(payload["depth_range"]) if "depth" in tasks else None
    names = tuple(payload.get("class_names") or class_names())
    info = {"step": payload.get("step"), "metrics": payload.get("metrics", {})}
    if payload["kind"] == "instance":
        info["instance"] = payload["instance"]
    return LoadedModel(net.eval(), payload["kind"], tasks, cfg, depth_range, names, str(path), info)


def _instance_net(payload: dict, cfg: ModelConfig, path: str | Path) -> nn.Module:
    """The :class:`~sdeseg.models.DepthGuidedInstanceNet` of an instance export, with its frozen
    depth encoder (weights loaded) when it fuses depth; the instance model's weights are not
    loaded yet."""
    from sdeseg.models import DepthGuidedInstanceNet, build_instance_model

    settings = payload["instance"]
    stages = tuple(settings["fusion_stages"])
    depth_encoder = None
    if stages:
        depth = build_depth_model(export_model_config({"model_config": payload["depth_model_config"]}))
        try:
            depth.load_state_dict(payload["depth"], strict=True)
        except RuntimeError as e:
            raise ExportError(f"{path}: depth weights do not fit the recorded depth_model_config ({e})") from e
        depth_encoder = depth.encoder
    model = build_instance_model(cfg, depth_encoder.num_ch_enc if depth_encoder else None, stages)
    return DepthGuidedInstanceNet(model, depth_encoder, settings["depth_scale"])


# ----------------------------------------------------------------------------- converting


def _atomic(out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(f".{out.name}.tmp{os.getpid()}")


def export_safetensors(path: str | Path, out: str | Path) -> Path:
    """Write the export ``path`` as safetensors (tensors + one JSON header) at ``out``, atomically."""
    from safetensors.torch import save_file

    from sdeseg.data.classes import class_names

    payload = read_export(path)
    tensors = {f"{group}.{k}": v.contiguous() for group in TENSOR_GROUPS for k, v in payload.get(group, {}).items()}
    header = {k: v for k, v in payload.items() if k not in TENSOR_GROUPS}
    header.update(format=FORMAT, version=FORMAT_VERSION, input=INPUT,
                  class_names=list(payload.get("class_names") or class_names()))
    out = Path(out)
    tmp = _atomic(out)
    save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header)})
    tmp.replace(out)
    return out


class _OnnxModule(nn.Module):
    """The inference graph: image (B,3,H,W) in [0,1] -> logits (B,C,H,W) and/or depth (B,1,H,W) metres."""

    def __init__(self, model: LoadedModel):
        super().__init__()
        self.net = model.net
        self.tasks = model.tasks
        self.depth_range = model.depth_range

    def forward(self, image: torch.Tensor):
        out = self.net(image)
        res = []
        if "seg" in self.tasks:
            res.append(out[("seg", 0)])
        if "depth" in self.tasks:
            res.append(self.depth_range.depth(out[("disp", 0)]))
        return tuple(res)


def onnx_output_names(model: LoadedModel) -> list[str]:
    return [name for task, name in (("seg", "logits"), ("depth", "depth")) if task in model.tasks]


def export_onnx(path: str | Path, out: str | Path, opset: int = 18, size: tuple[int, int] = (96, 192),
                check: bool = True) -> Path:
    """Write the inference graph of export ``path`` as ONNX at ``out`` (dynamic batch, height and
    width, multiples of 32), atomically; with ``check``, run it in onnxruntime on a random image
    and raise ExportError if it differs from PyTorch by more than 1e-4."""
    import numpy as np

    model = load_model(path)
    module = _OnnxModule(model).eval()
    example = torch.rand(2, 3, *size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    h32 = torch.export.Dim("h32", min=1, max=256)
    w32 = torch.export.Dim("w32", min=1, max=256)
    out = Path(out)
    tmp = _atomic(out).with_suffix(".onnx")
    names = onnx_output_names(model)
    program = torch.onnx.export(
        module, (example,), dynamo=True, opset_version=opset, input_names=["image"], output_names=names,
        dynamic_shapes={"image": {0: batch, 2: 32 * h32, 3: 32 * w32}}, external_data=False,
    )
    program.save(str(tmp))
    tmp.replace(out)
    if check:  # another size than the traced example: the dynamic shapes must hold too
        image = torch.rand(1, 3, size[0] + 32, size[1] + 32)
        with torch.no_grad():
            want = module(image)
        diff = max(float(np.abs(a - b.numpy()).max()) for a, b in zip(run_onnx(out, image), want))
        if diff > 1e-4:
            raise ExportError(f"{out}: onnxruntime differs from PyTorch by {diff:.2e} (> 1e-4)")
    return out


def run_onnx(path: str | Path, image: torch.Tensor) -> list:
    """Outputs (numpy arrays) of the ONNX model at ``path`` on ``image`` (B,3,H,W), with onnxruntime."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": image.numpy().astype("float32")})
