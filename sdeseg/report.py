"""The demo's report: ``report.md`` with PNG figures, and a one-screen summary table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from sdeseg.config import Config
from sdeseg.data.classes import class_names, colorize
from sdeseg.data.reader import ValLoader
from sdeseg.models import DepthRange


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _img(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy()


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _val_batch(data_root: Path, cfg: Config, n: int):
    loader = ValLoader(str(data_root), cfg.data.val_split, batch_size=n, frames=(-1, 0, 1), max_batches=1,
                       domain=cfg.data.domain)
    return next(iter(loader))


def _image_grid(rows: list[list[tuple]], path: Path, colorbar: str | None = None) -> None:
    """Save a grid of image panels; each panel is (array, title) or (array, title, imshow kwargs).

    ``colorbar``: label of one colour bar per row, for the last panel drawn in the row (the
    panels of a row that share it must share its colormap, vmin and vmax).
    """
    plt = _plt()
    cols = max(len(r) for r in rows)
    width = 3 * cols + (0.8 if colorbar else 0.0)
    fig, axes = plt.subplots(len(rows), cols, figsize=(width, 1.6 * len(rows) + 0.4), squeeze=False,
                             layout="constrained")
    for r, panels in enumerate(rows):
        shown = None
        for c, (im, title, *kw) in enumerate(panels):
            if im is not None:
                shown = axes[r, c].imshow(im, **(kw[0] if kw else {"cmap": "gray" if im.ndim == 2 else None}))
            axes[r, c].set_title(title, fontsize=8)
            axes[r, c].axis("off")
        if colorbar and shown is not None:
            fig.colorbar(shown, ax=axes[r, :].tolist(), label=colorbar, shrink=0.9, extend="max")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _labels(label: torch.Tensor) -> np.ndarray:
    return colorize(label.numpy().astype(np.uint8))


def fig_inputs(batch, path: Path) -> None:
    names = ((-1, "frame t-1"), (0, "frame t"), (1, "frame t+1"))
    _image_grid([[(_img(batch.images[f][r]), name) for f, name in names] for r in range(min(2, len(batch)))], path)


def _predict_depth(depth_model, depth_range: DepthRange, images: torch.Tensor) -> torch.Tensor:
    """(B,1,H,W) depth in metres the SDE model predicts for images (B,3,H,W)."""
    return depth_range.depth(depth_model(images)[("disp", 0)])


# near is bright; pixels without ground truth (sky, ego-vehicle) are grey, not "near"
DEPTH_CMAP = "magma_r"
NO_DEPTH_COLOUR = "0.6"
DEPTH_QUANTILE = 0.95  # of the valid ground truth: the top of the shared colour scale


def depth_display_range(gt: torch.Tensor, pred: torch.Tensor) -> tuple[float, float]:
    """(vmin, vmax) in metres of the one colour scale a row's ground-truth and predicted
    depth (H,W) share: 0 .. the :data:`DEPTH_QUANTILE` of the valid (> 0) ground truth, or of
    the prediction where no ground truth is valid."""
    valid = gt > 0
    ref = gt[valid] if valid.any() else pred.flatten()
    return 0.0, float(ref.float().quantile(DEPTH_QUANTILE))


def depth_panels(gt: torch.Tensor, pred: torch.Tensor) -> list[tuple]:
    """The ground-truth and predicted depth panels (array, title, imshow kwargs) of one row.

    Args:
        gt: (H,W) ground-truth depth in metres, 0 = invalid.
        pred: (H,W) predicted depth in metres; median-scaled to the valid ground truth.

    Both panels get the same kwargs (colormap, vmin, vmax from :func:`depth_display_range`);
    invalid ground truth is masked and drawn in :data:`NO_DEPTH_COLOUR`.
    """
    from matplotlib import colormaps

    valid = gt > 0
    if valid.any():
        pred = pred * (gt[valid].median() / pred[valid].median())
    vmin, vmax = depth_display_range(gt, pred)
    style = {"cmap": colormaps[DEPTH_CMAP].with_extremes(bad=NO_DEPTH_COLOUR), "vmin": vmin, "vmax": vmax}
    gt_shown = np.ma.masked_array(gt.cpu().numpy(), mask=~valid.cpu().numpy())
    return [(gt_shown, "ground-truth depth (grey: no depth)", style),
            (pred.cpu().numpy(), "predicted depth (median-scaled)", style)]


@torch.no_grad()
def fig_depth(batch, depth_model, depth_range: DepthRange, path: Path) -> None:
    """Image, ground-truth and predicted depth of up to 3 images; one colour scale per row."""
    pred = _predict_depth(depth_model, depth_range, batch.images[0])[:, 0]
    rows = []
    for r in range(min(3, len(batch))):
        gt = batch.depth[r, 0] if batch.depth is not None else torch.zeros_like(pred[r])
        rows.append([(_img(batch.images[0][r]), "image"), *depth_panels(gt, pred[r])])
    _image_grid(rows, path, colorbar="depth [m]")


@torch.no_grad()
def fig_segmentation(batch, seg_model, path: Path) -> None:
    pred = seg_model(batch.images[0])[("seg", 0)].argmax(1)
    _image_grid([[(_img(batch.images[0][r]), "image"),
                  (_labels(batch.label[r]) if batch.label is not None else None, "ground truth"),
                  (_labels(pred[r]), "prediction")] for r in range(min(3, len(batch)))], path)


@torch.no_grad()
def fig_depthmix(batch, depth_model, depth_range: DepthRange, seg_model, path: Path) -> None:
    """Two images, the DepthMix mask (closer pixels of image A), mixed image, mixed pseudo-label."""
    from sdeseg.ops import depth_mix

    images = batch.images[0]
    depth = _predict_depth(depth_model, depth_range, images)
    pseudo = seg_model(images)[("seg", 0)].argmax(1)
    mask, (mixed_img, mixed_lab) = depth_mix(depth, images, pseudo)
    rows = [[(_img(images[r]), "image A"), (_img(images[(r + 1) % len(batch)]), "image B"),
             (mask[r, 0].float().numpy(), "mask: A closer"), (_img(mixed_img[r]), "mixed image"),
             (_labels(mixed_lab[r]), "mixed pseudo-label")] for r in range(min(2, len(batch)))]
    _image_grid(rows, path)


INSTANCE_PALETTE_SEED = 24  # fixed: an instance id has the same colour in every figure
INSTANCE_COLOURS = 256
STUFF_DIMMING = 0.35  # class colours of non-instance pixels, dimmed so the instances stand out


def colorize_instances(ids: torch.Tensor | np.ndarray) -> np.ndarray:
    """(H,W) Cityscapes instanceIds -> (H,W,3) uint8: every thing instance (id >= 1000) in its own
    colour (a seeded random palette indexed by the id), every other pixel in its class colour,
    dimmed; void is black."""
    from sdeseg.data.classes import INSTANCE_DIVISOR, instance_ids_to_train_ids

    ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    ids = ids.astype(np.int64)
    out = (colorize(instance_ids_to_train_ids(ids).astype(np.uint8)) * STUFF_DIMMING).astype(np.uint8)
    values = np.unique(ids[ids >= INSTANCE_DIVISOR])
    if len(values):
        palette = np.random.default_rng(INSTANCE_PALETTE_SEED).integers(64, 256, (INSTANCE_COLOURS, 3))
        for v in values:  # neighbouring indices of one class get unrelated colours
            out[ids == v] = palette[(v // INSTANCE_DIVISOR * 31 + v % INSTANCE_DIVISOR) % INSTANCE_COLOURS]
    return out


@torch.no_grad()
def fig_instances(batch, net, grouping: dict, path: Path) -> None:
    """Image, ground-truth and predicted instances (one colour per instance) of up to 3 images;
    ``net`` is an instance export's network (:func:`sdeseg.exports.load_model`), ``grouping`` its
    ``info["instance"]["grouping"]``."""
    from sdeseg.panoptic import instances_from_outputs

    pred = instances_from_outputs(net(batch.images[0]), **grouping)
    rows = []
    for r in range(min(3, len(batch))):
        gt = colorize_instances(batch.instance[r]) if batch.instance is not None else None
        rows.append([(_img(batch.images[0][r]), "image"), (gt, "ground-truth instances"),
                     (colorize_instances(pred[r][0]), f"predicted instances ({len(pred[r][1])})")])
    _image_grid(rows, path)


def _normalised_depth_panel(depth: torch.Tensor, title: str, vmax: float) -> tuple:
    """(H,W) depth over its own median, as Matching Geometry Sampling compares it (one scale per row)."""
    return ((depth / depth.median()).cpu().numpy(), title, {"cmap": DEPTH_CMAP, "vmin": 0.0, "vmax": vmax})


def ssda_run_files(run_dir: str | Path) -> tuple[Config, Path]:
    """A finished domain-adaptation run's config and export (``best``, else ``last``); a clear
    error naming the file when it is not one."""
    from sdeseg.config import ConfigError, load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir / 'config.yaml'}: not found (--ssda-run takes a run directory)")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.stage != "ssda":
        raise ConfigError(f"{run_dir / 'config.yaml'}: stage {cfg.stage!r}, not a domain-adaptation run (ssda)")
    export = next((run_dir / "export" / f"{x}.pt" for x in ("best", "last")
                   if (run_dir / "export" / f"{x}.pt").exists()), None)
    if export is None:
        raise FileNotFoundError(f"{run_dir / 'export'}: no best.pt or last.pt (has the run finished?)")
    return cfg, export


SSDA_FIGURES = (("geometry", "Matching Geometry Sampling: target, the chosen source candidate and a random other "
                 "one, each with its depth over its median and its criterion (smaller = closer geometry)"),
                ("cross_mix", "Cross-Domain DepthMix: matched source, target, mask (source closer), mixed image, "
                 "mixed label (source ground truth, target pseudo-label)"))


@torch.no_grad()
def ssda_figures(run_dir: Path, report_dir: Path, n: int = 3, seed: int = 0) -> dict:
    """A domain-adaptation run's figures (:data:`SSDA_FIGURES`), from its ``config.yaml`` and export.

    The first ``n`` images of the target's validation split, each with ``ssda.mgs_candidates``
    (at least 2) source candidates: the first ``n * K`` samples of the source split in manifest
    order (a fixed stand-in for the stage's random draw). Depth from both domains' SDE exports
    and the choice rule are the stage's (:func:`sdeseg.stages.ssda.geometry_criterion`);
    pseudo-labels from the run's export (``best``, else ``last``); the mix is
    :func:`sdeseg.mixing.cross_domain_depth_mix` with the run's margin. Writes
    ``geometry.png`` and ``cross_mix.png`` under ``report_dir``; returns ``criterion`` (n,K),
    ``chosen`` and ``random`` (candidate per target) and ``source_share`` (mask mean).
    """
    from contextlib import nullcontext

    from sdeseg.exports import load_seg_model
    from sdeseg.mixing import cross_domain_depth_mix
    from sdeseg.stages.ssda import SourceDepth, frozen_depth_net, geometry_criterion

    cfg, export = ssda_run_files(run_dir)
    s = cfg.ssda
    k = max(s.mgs_candidates, 2)
    source = ValLoader(s.source_root or cfg.data.root, s.source_split, batch_size=n * k, max_batches=1,
                       domain=s.source_domain)
    src = next(iter(source))
    target = ValLoader(cfg.data.root, cfg.data.val_split or "train", batch_size=min(n, len(src) // k), max_batches=1,
                       domain=cfg.data.domain)
    tgt = next(iter(target))
    n = len(tgt)
    target_net = frozen_depth_net(cfg.semiseg.sde_checkpoint, "cpu")
    source_depth = SourceDepth(cfg, "cpu", online=True)
    criterion, s_depth, t_depth = geometry_criterion(tgt.images[0], src, target_net, source_depth, cfg, nullcontext)
    # the stage's choice: the closest of its K candidates (with one candidate, its first)
    chosen = criterion[:, :s.mgs_candidates].argmin(dim=1)
    gen = torch.Generator().manual_seed(seed)
    others = [[j for j in range(k) if j != c] for c in chosen.tolist()]
    random = torch.tensor([o[int(torch.randint(len(o), (1,), generator=gen))] for o in others])
    rows = []
    for i in range(n):
        c, r = i * k + int(chosen[i]), i * k + int(random[i])
        vmax = float(torch.quantile(t_depth[i, 0] / t_depth[i, 0].median(), DEPTH_QUANTILE))
        rows.append([(_img(tgt.images[0][i]), "target"),
                     _normalised_depth_panel(t_depth[i, 0], "target depth / median", vmax),
                     (_img(src.images[0][c]), f"chosen source, {float(criterion[i, chosen[i]]):.3f}"),
                     _normalised_depth_panel(s_depth[c, 0], "its depth / median", vmax),
                     (_img(src.images[0][r]), f"random candidate, {float(criterion[i, random[i]]):.3f}"),
                     _normalised_depth_panel(s_depth[r, 0], "its depth / median", vmax)])
    report_dir.mkdir(parents=True, exist_ok=True)
    _image_grid(rows, report_dir / "geometry.png")

    pick = torch.arange(n) * k + chosen
    probs = torch.softmax(load_seg_model(str(export))(tgt.images[0])[("seg", 0)].float(), dim=1)
    mix = cross_domain_depth_mix(src.images[0][pick], s_depth[pick], src.label[pick], tgt.images[0], t_depth, probs,
                                 eps=s.mix_eps, threshold=cfg.semiseg.pseudo_threshold,
                                 ignore_index=cfg.semiseg.ignore_index, generator=gen)
    _image_grid([[(_img(src.images[0][pick[i]]), "matched source"), (_img(tgt.images[0][i]), "target"),
                  (mix.mask[i, 0].float().numpy(), f"mask: source closer ({float(mix.mask[i].float().mean()):.0%})"),
                  (_img(mix.image[i]), "mixed image"), (_labels(mix.label[i]), "mixed label")]
                 for i in range(n)], report_dir / "cross_mix.png")
    return {"criterion": criterion.tolist(), "chosen": chosen.tolist(), "random": random.tolist(),
            "source_share": float(mix.mask.float().mean())}


def fig_curves(runs: Path, path: Path) -> None:
    plt = _plt()
    panels = [
        ("sde", "train", ["depth/total", "depth/photo"], "SDE training loss"),
        ("sde", "val", ["depth/abs_rel", "depth/abs_rel_baseline"], "SDE validation abs_rel"),
        ("semiseg", "train", ["seg/sup", "seg/unsup"], "segmentation losses"),
        ("semiseg", "val", ["seg/miou"], "validation mIoU"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, (run, kind, keys, title) in zip(axes, panels):
        records = [r for r in _read_jsonl(runs / run / "metrics.jsonl") if r.get("kind") == kind]
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="o" if kind == "val" else None, markersize=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report_dir: Path, data_root: Path, runs: Path, sde_export: str, seg_export: str,
                 summary: dict, cfg: Config, instance_export: str | None = None, ssda_run: str | None = None) -> Path:
    """Figures + report.md under ``report_dir``; returns the path of report.md. With
    ``instance_export`` (an export of the instance stage) also its predicted instances, one
    colour per instance, and its validation metrics; with ``ssda_run`` (a domain-adaptation
    run directory) also its Matching Geometry Sampling and Cross-Domain DepthMix figures
    (:func:`ssda_figures`)."""
    from sdeseg.exports import load_depth_model, load_model, load_seg_model

    report_dir.mkdir(parents=True, exist_ok=True)
    depth_model, depth_range = load_depth_model(sde_export)
    seg_model = load_seg_model(seg_export)
    batch = _val_batch(data_root, cfg, 4)
    fig_inputs(batch, report_dir / "inputs.png")
    fig_depth(batch, depth_model, depth_range, report_dir / "depth.png")
    fig_segmentation(batch, seg_model, report_dir / "segmentation.png")
    fig_depthmix(batch, depth_model, depth_range, seg_model, report_dir / "depthmix.png")
    fig_curves(runs, report_dir / "curves.png")
    instances = load_model(instance_export) if instance_export else None
    if instances is not None:
        instances.require("instance")
        fig_instances(batch, instances.net, instances.info["instance"]["grouping"], report_dir / "instances.png")

    ssda = ssda_figures(Path(ssda_run), report_dir) if ssda_run else None

    lines = ["# sdeseg demo report", "", "## Summary", "", "| metric | value |", "| --- | --- |"]
    for k, v in sorted(summary.items()):
        if "seg/iou/" not in k:
            lines.append(f"| {k} | {_fmt(v)} |")
    lines += ["", "## Per-class IoU", "", "| class | test IoU | val IoU |", "| --- | --- | --- |"]
    for name in class_names():
        test, val = summary.get(f"test/seg/iou/{name}"), summary.get(f"seg/iou/{name}")
        if test is not None or val is not None:
            lines.append(f"| {name} | {_fmt(test)} | {_fmt(val)} |")
    if instances is not None:
        lines += ["", f"## Instance model ({instance_export}, step {instances.info['step']})", "",
                  "| validation metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(instances.info["metrics"].items())
                  if k.startswith(("seg/miou", "inst/")) and "/ap/" not in k]
    lines += ["", "## Figures", ""]
    figures = [("inputs", "Input triplets (t-1, t, t+1)"),
               ("depth", "Ground-truth vs predicted depth (SDE stage)"),
               ("segmentation", "Ground-truth labels vs predictions (semi-supervised stage)"),
               ("depthmix", "DepthMix: image A, image B, mask, mixed image, mixed pseudo-label"),
               ("curves", "Loss and metric curves")]
    if instances is not None:
        figures.append(("instances", "Ground-truth vs predicted instances, one colour per instance (instance stage)"))
    if ssda is not None:
        figures += [(name, f"{caption} ({ssda_run})") for name, caption in SSDA_FIGURES]
    for name, caption in figures:
        lines += [f"### {caption}", "", f"![{caption}]({name}.png)", ""]
    path = report_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def print_summary_table(summary: dict, per_class: bool = False) -> None:
    """The headline metrics of ``summary`` (and, with ``per_class``, every ``.../iou/<class>``)."""
    keys = ["depth/abs_rel", "depth/abs_rel_baseline", "depth/abs_rel_ratio", "depth/a1", "depth/a1_baseline",
            "depth/rmse", "seg/miou", "seg/miou_supervised_baseline", "seg/acc", "test/depth/abs_rel",
            "test/depth/abs_rel_baseline", "test/seg/miou", "test/seg/acc", "inst/ap", "inst/ap50", "inst/pq",
            "test/inst/ap", "test/inst/ap50", "test/inst/pq"]
    if per_class:
        keys += [k for k in summary if "/iou/" in k]
    print("\n" + "=" * 46)
    print(f"{'metric':<32}{'value':>14}")
    print("-" * 46)
    for k in keys:
        if k in summary:
            print(f"{k:<32}{_fmt(summary[k]):>14}")
    for k in sorted(summary):
        if k.startswith("time/"):
            print(f"{k:<32}{_fmt(summary[k]):>14}")
    print("=" * 46)
