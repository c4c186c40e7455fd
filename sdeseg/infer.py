"""Inference with an exported model: images of any size, and whole datasets on a Ray cluster.

**Any image size.** sdeseg networks need height and width in multiples of 32 (the encoder's
stride). :func:`predict_images` pads an image at the bottom and right by repeating its last
row / column up to the next multiple of 32 and crops the outputs back (no resampling), or,
with ``size=(h, w)``, resizes the image to that working size (bilinear, antialiased) and the
outputs back to the image's own size (logits and depth bilinear). Outputs always have the
input's height and width.

**Datasets.** :func:`infer_dataset` runs a model over every sample (centre frame) of a shard
dataset and writes a *derived dataset*: one tar shard per source shard (same file name),
each sample keyed by its source key and holding the requested predictions, plus its own
``manifest.parquet`` (the source shard and position of every key are in its ``source``
column) and ``derived.json``. :class:`sdeseg.data.derived.DerivedDataset` reads it back by
key. Shards are independent jobs: with ``actors > 0`` a Ray Data ``map_batches`` pool of
model actors (a GPU each when the cluster has them) processes them; with ``actors=0`` this
process does. A shard is written under a temporary name and renamed, then its sidecar
``<shard>.json`` records its rows and settings; a re-run skips the shards whose sidecar
matches, so an interrupted run resumes and nothing half-written is ever read.

Members of a derived sample (``outputs``):

- ``depth``: ``pseudo_depth.npy`` float32 (H,W) metres, the model's raw (scale-ambiguous) depth;
- ``seg``: ``pseudo_label.png`` uint8 train ids (argmax) and ``confidence.npy`` float16 (H,W),
  the maximum softmax probability;
- ``probs``: ``probs.npy`` float16 (C,H,W) softmax probabilities;
- ``features``: ``features.npy`` float32 (C,4,8), the decoder's level-3 features averaged to a
  4x8 grid (the diversity features of automatic data selection);
- ``regions``: ``regions.png`` 16-bit (H,W) region ids of the image for copy-paste contrastive
  pretraining, :func:`sdeseg.regions.depth_regions` of the image, the model's depth and the
  sample's ``K`` (``regions="depth"``), or :func:`sdeseg.regions.colour_regions` (``"colour"``,
  the ablation). Needs a model that predicts depth (an SDE export); computed on the CPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sdeseg.exports import ExportError, LoadedModel, load_model

SIZE_MULTIPLE = 32
OUTPUTS = ("depth", "seg", "probs", "features", "regions")
REGION_KINDS = ("depth", "colour")
REGIONS_MEMBER = "regions.png"
FEATURE_GRID = (4, 8)
DERIVED_INFO = "derived.json"
DEPTH_MEMBER = "pseudo_depth.npy"


# ----------------------------------------------------------------------------- images of any size


def _to_multiple(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad (B,C,H,W) at the bottom/right to multiples of 32; returns (padded, (H, W))."""
    h, w = x.shape[-2:]
    ph, pw = -h % SIZE_MULTIPLE, -w % SIZE_MULTIPLE
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


@torch.no_grad()
def predict_images(model: LoadedModel, images: torch.Tensor, size: tuple[int, int] | None = None,
                   features: bool = False) -> dict[str, torch.Tensor]:
    """Predictions for a batch (B,3,H,W) RGB in [0, 1] of one size, at that size.

    Returns ``logits`` (B,C,H,W) and/or ``depth`` (B,1,H,W) (the model's tasks), float32; with
    ``features``, also ``features`` (B,C,4,8) (see the module doc).
    """
    h, w = images.shape[-2:]
    x = images if size is None else F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                                  antialias=True)
    x, (xh, xw) = _to_multiple(x)
    out = model.net(x)
    res = {}
    if "seg" in model.tasks:
        res["logits"] = out[("seg", 0)][..., :xh, :xw].float()
    if "depth" in model.tasks:
        res["depth"] = model.depth_range.depth(out[("disp", 0)][..., :xh, :xw])
    if size is not None:
        res = {k: F.interpolate(v, size=(h, w), mode="bilinear", align_corners=False) for k, v in res.items()}
    if features:
        if ("feat", 3) not in out:
            raise ExportError(f"{model.path}: a {model.kind!r} network has no decoder features to export")
        res["features"] = F.adaptive_avg_pool2d(out[("feat", 3)].float(), FEATURE_GRID)
    return res


# ----------------------------------------------------------------------------- files for people


def depth_colour(depth: np.ndarray) -> np.ndarray:
    """(H,W) depth -> (H,W,3) uint8, colormap ``magma_r`` (near = bright) over [0, 95th percentile]."""
    from matplotlib import colormaps

    top = float(np.percentile(depth, 95)) if depth.size else 1.0
    norm = np.clip(depth / max(top, 1e-6), 0.0, 1.0)
    return (colormaps["magma_r"](norm)[..., :3] * 255.0 + 0.5).astype(np.uint8)


def depth_png_mm(depth: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """(H,W) depth in metres × ``scale`` -> uint16 millimetres, clipped to [1, 65535] (0 is "invalid")."""
    return np.clip(np.rint(depth * scale * 1000.0), 1, 65535).astype(np.uint16)


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)


def write_prediction(out_dir: Path, name: str, image: np.ndarray, pred: dict[str, torch.Tensor],
                     depth_scale: float = 1.0) -> list[str]:
    """Write one image's outputs (``pred`` entries (1,C,H,W)); returns the file names written.

    Segmentation: ``<name>_trainid.png`` (uint8 train ids), ``<name>_color.png`` (Cityscapes
    palette) and ``<name>_overlay.png`` (half image, half colours). Depth: ``<name>_depth.png``
    (uint16 millimetres of the raw prediction × ``depth_scale``; 1..65535 mm) and
    ``<name>_depth_color.png``.
    """
    from sdeseg.data.classes import colorize

    written = []
    if "logits" in pred:
        label = pred["logits"][0].argmax(0).to(torch.uint8).cpu().numpy()
        colour = colorize(label)
        overlay = ((image.astype(np.uint16) + colour) // 2).astype(np.uint8)
        for suffix, arr in (("trainid", label), ("color", colour), ("overlay", overlay)):
            _save_png(out_dir / f"{name}_{suffix}.png", arr)
            written.append(f"{name}_{suffix}.png")
    if "depth" in pred:
        depth = pred["depth"][0, 0].cpu().numpy()
        _save_png(out_dir / f"{name}_depth.png", depth_png_mm(depth, depth_scale))
        _save_png(out_dir / f"{name}_depth_color.png", depth_colour(depth * depth_scale))
        written += [f"{name}_depth.png", f"{name}_depth_color.png"]
    return written


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_images(spec: str) -> list[str]:
    """Image files named by ``spec``: a directory (its image files, sorted), a glob pattern, or
    one file; local paths or fsspec URLs. Raises FileNotFoundError naming ``spec`` when empty."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(spec)
    protocol = "" if "://" not in spec else spec.split("://", 1)[0] + "://"
    if any(c in path for c in "*?["):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = [p for p in fs.find(path, maxdepth=1) if not fs.isdir(p)]
    elif fs.exists(path):
        found = [path]
    else:
        raise FileNotFoundError(f"{spec}: no such file or directory")
    images = sorted(p for p in found if p.lower().endswith(IMAGE_SUFFIXES))
    if not images:
        raise FileNotFoundError(f"{spec}: no image files ({', '.join(IMAGE_SUFFIXES)}) there")
    return [protocol + p if protocol and "://" not in p else p for p in images]


def read_image(url: str) -> np.ndarray:
    """(H,W,3) uint8 RGB of an image file (path or URL); raises ValueError naming it when unreadable."""
    import fsspec
    from PIL import Image

    try:
        with fsspec.open(url, "rb") as f, Image.open(io.BytesIO(f.read())) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as e:  # PIL raises many types on corrupt data
        raise ValueError(f"{url}: cannot read the image ({type(e).__name__}: {e})") from e


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H,W,3) uint8 -> (1,3,H,W) float32 in [0, 1]."""
    # decoded images are read-only numpy views (PIL buffers): torch needs a writable copy then
    return torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)[None].float().div_(255.0)


# ----------------------------------------------------------------------------- derived datasets


@dataclass(frozen=True)
class InferJob:
    """What a derived dataset is made of (recorded in ``derived.json`` and every sidecar)."""

    model: str  # export path
    model_digest: str  # sha256 of the export file: a changed model is a new dataset
    source: str  # source dataset root
    out: str  # derived dataset root
    outputs: tuple[str, ...]
    split: str | None
    size: tuple[int, int] | None
    batch_size: int
    regions: str | None = None  # the region kind, with the regions output only

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("out")
        if self.regions is None:  # datasets written before region outputs existed keep their settings
            d.pop("regions")
        d["outputs"], d["size"] = list(self.outputs), None if self.size is None else list(self.size)
        return d


def file_digest(path: str) -> str:
    import fsspec

    h = hashlib.sha256()
    with fsspec.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_samples(job: InferJob, shard: str, keys: list[str], positions: list[int]) -> Iterator[tuple]:
    """(position, key, (H,W,3) uint8 centre frame, (3,3) intrinsics K) of one source shard."""
    from sdeseg.data.codec import decode_sample
    from sdeseg.data.shardio import scan_shard

    for pos, members in scan_shard(job.source, shard, keys, positions):
        sample = decode_sample(members, frames=(0,))
        yield pos, members["__key__"], sample["frames"][0], np.asarray(sample["meta"]["K"], dtype=np.float64)


def _encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def image_regions(image: np.ndarray, depth: torch.Tensor, K: np.ndarray, kind: str) -> np.ndarray:
    """(H,W) int64 region ids of one image (H,W,3) uint8 from its depth (H,W) and intrinsics K
    (3,3) at the image's size: :func:`sdeseg.regions.depth_regions` or, ``kind="colour"``,
    :func:`sdeseg.regions.colour_regions` (depth unused)."""
    from sdeseg.regions import colour_regions, depth_regions

    rgb = to_tensor(image)[0]
    if kind == "colour":
        return colour_regions(rgb).numpy()
    return depth_regions(rgb, depth.float().cpu(), torch.from_numpy(K)).numpy()


def _derived_members(key: str, pred: dict[str, torch.Tensor], i: int, outputs: tuple[str, ...]) -> dict:
    from sdeseg.data.codec import encode_image, encode_instance

    m: dict[str, Any] = {"__key__": key}
    if "depth" in outputs:
        m[DEPTH_MEMBER] = _encode_npy(pred["depth"][i, 0].cpu().numpy().astype(np.float32))
    if "seg" in outputs or "probs" in outputs:
        probs = pred["logits"][i].softmax(0)
        if "seg" in outputs:
            conf, label = probs.max(0)
            m["pseudo_label.png"] = encode_image(label.to(torch.uint8).cpu().numpy(), "png")
            m["confidence.npy"] = _encode_npy(conf.cpu().numpy().astype(np.float16))
        if "probs" in outputs:
            m["probs.npy"] = _encode_npy(probs.cpu().numpy().astype(np.float16))
    if "features" in outputs:
        m["features.npy"] = _encode_npy(pred["features"][i].cpu().numpy().astype(np.float32))
    if "regions" in outputs:
        m[REGIONS_MEMBER] = encode_instance(pred["regions"][i])  # a 16-bit grayscale PNG, as instance maps
    return m


def infer_shard(model: LoadedModel, job: InferJob, shard: str, keys: list[str], positions: list[int],
                rows: dict[str, dict], device: torch.device) -> list[dict]:
    """Predict every listed sample of one source shard and write its derived shard and sidecar.

    ``rows`` holds the source manifest rows by key. Returns the derived manifest rows.
    """
    import tarfile

    import fsspec

    from data_prep.shards import atomic_write_bytes, tmp_name, write_tar_sample
    from sdeseg.data.manifest import join

    fs, root = fsspec.core.url_to_fs(job.out)
    final = join(root, shard)
    tmp = tmp_name(final)
    out_rows: list[dict] = []
    pending: list[tuple[int, str, np.ndarray, np.ndarray]] = []
    features = "features" in job.outputs

    def flush(tar) -> None:
        by_size: dict[tuple, list] = {}
        for item in pending:  # batches need one size
            by_size.setdefault(item[2].shape, []).append(item)
        for items in by_size.values():
            images = torch.cat([to_tensor(img) for _, _, img, _ in items]).to(device)
            pred = predict_images(model, images, job.size, features=features)
            if "regions" in job.outputs:  # per image, on the CPU (superpixels and a graph merge)
                pred["regions"] = [image_regions(img, pred["depth"][i, 0], K, job.regions)
                                   for i, (_, _, img, K) in enumerate(items)]
            for i, (pos, key, img, _) in enumerate(items):
                write_tar_sample(tar, _derived_members(key, pred, i, job.outputs))
                src = rows[key]
                out_rows.append({
                    "key": key, "shard": shard, "index": len(out_rows), "split": src["split"], "domain": src["domain"],
                    "has_label": False, "height": int(img.shape[0]), "width": int(img.shape[1]),
                    "source": json.dumps({"root": job.source, "shard": shard, "index": pos}),
                })
        pending.clear()

    try:
        with fs.open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
            for item in _source_samples(job, shard, keys, positions):
                pending.append(item)
                if len(pending) == job.batch_size:
                    flush(tar)
            flush(tar)
        fs.mv(tmp, final)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    sidecar = {"settings": job.settings(), "rows": out_rows}
    atomic_write_bytes(fs, join(root, _sidecar(shard)), json.dumps(sidecar).encode())
    return out_rows


def _sidecar(shard: str) -> str:
    return shard[: -len(".tar")] + ".json" if shard.endswith(".tar") else shard + ".json"


def _finished(fs, root: str, shard: str, job: InferJob, keys: list[str]) -> list[dict] | None:
    """The rows of an already written derived shard whose settings and keys match, else None."""
    from sdeseg.data.manifest import join

    path = join(root, _sidecar(shard))
    if not fs.exists(path) or not fs.exists(join(root, shard)):
        return None
    try:
        record = json.loads(fs.cat(path))
    except ValueError:
        return None
    if record.get("settings") != job.settings() or [r["key"] for r in record.get("rows", [])] != keys:
        return None
    return record["rows"]


class _ShardActor:
    """A Ray Data actor: loads the model once, then writes the derived shard of each shard name it gets."""

    def __init__(self, job: InferJob, plan: dict[str, tuple[list[str], list[int]]], rows: dict[str, dict]):
        self.job, self.plan, self.rows = job, plan, rows
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.model = load_model(job.model)
        self.model.net.to(self.device)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out = []
        for shard in batch["shard"]:
            keys, positions = self.plan[str(shard)]
            out += infer_shard(self.model, self.job, str(shard), keys, positions, self.rows, self.device)
        return {"row": [json.dumps(r) for r in out]}


def infer_dataset(model_path: str, source: str, out: str, *, outputs: Iterable[str] = ("depth",),
                  split: str | None = None, size: tuple[int, int] | None = None, batch_size: int = 8,
                  actors: int = 0, use_gpu: bool | None = None, regions: str = "depth") -> dict[str, Any]:
    """Write the derived dataset of ``model_path``'s predictions on ``source`` at ``out``.

    ``actors=0`` runs in this process; ``actors=N`` uses a Ray Data pool of N model actors on
    the connected (or a new local) Ray cluster, one GPU each when ``use_gpu`` (default: when the
    cluster has GPUs). ``regions`` is the kind of the ``regions`` output (``"depth"`` or
    ``"colour"``). Returns a report: shards written and skipped, samples, seconds.
    """
    import time

    import fsspec

    from sdeseg.data.manifest import join, write_manifest
    from sdeseg.data.shardio import ShardIndex

    start = time.perf_counter()
    outputs = tuple(dict.fromkeys(outputs))
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown or not outputs:
        raise ValueError(f"outputs must be among {list(OUTPUTS)}, got {list(outputs)}")
    if regions not in REGION_KINDS:
        raise ValueError(f"regions must be one of {list(REGION_KINDS)}, got {regions!r}")
    model = load_model(model_path)  # checks the file and the tasks before any work
    for o in outputs:
        if o != "features":
            model.require({"depth": "depth", "seg": "seg", "probs": "seg", "regions": "depth"}[o])
    index = ShardIndex.load(source)
    selection = index.select(split, None)
    if not selection:
        raise ValueError(f"{join(source, 'manifest.parquet')} has no samples of split {split!r}")
    job = InferJob(str(model_path), file_digest(str(model_path)), source, out, outputs, split, size, batch_size,
                   regions if "regions" in outputs else None)
    plan = {s: ([index.shard_keys[s][i] for i in pos], list(pos)) for s, pos in sorted(selection.items())}
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    done = {s: r for s in plan if (r := _finished(fs, root, s, job, plan[s][0])) is not None}
    todo = [s for s in plan if s not in done]
    rows_by_key = {k: index.rows[k] for keys, _ in plan.values() for k in keys}
    new_rows: dict[str, list[dict]] = {}
    if todo and actors > 0:
        new_rows = _run_on_ray(job, {s: plan[s] for s in todo}, rows_by_key, actors, use_gpu)
    elif todo:
        device = torch.device("cuda") if (use_gpu or (use_gpu is None and torch.cuda.is_available())) else \
            torch.device("cpu")
        model.net.to(device)
        for s in todo:
            new_rows[s] = infer_shard(model, job, s, *plan[s], rows_by_key, device)
    all_rows = [r for s in plan for r in (done.get(s) or new_rows[s])]
    write_manifest(out, all_rows)
    info = {"settings": job.settings(), "shards": len(plan), "samples": len(all_rows)}
    with fs.open(join(root, DERIVED_INFO), "w") as f:
        json.dump(info, f, indent=2)
    return {"shards_written": len(todo), "shards_skipped": len(done), "samples": len(all_rows),
            "seconds": time.perf_counter() - start, "out": out}


def _run_on_ray(job: InferJob, plan: dict, rows: dict, actors: int, use_gpu: bool | None) -> dict[str, list]:
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"])
        else:  # a local cluster as the training stages start one (loopback only, its address in its workers)
            from sdeseg.runtime.cluster import start_local_cluster

            start_local_cluster(os.cpu_count() or 1)
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    ds = ray.data.from_items([{"shard": s} for s in plan])
    ds = ds.map_batches(_ShardActor, fn_constructor_args=(job, plan, rows), batch_size=1, concurrency=actors,
                        num_cpus=0 if use_gpu else 1, num_gpus=1 if use_gpu else 0)
    by_shard: dict[str, list[dict]] = {s: [] for s in plan}
    for item in ds.iter_rows():
        row = json.loads(item["row"])
        by_shard[row["shard"]].append(row)
    return by_shard
