"""``sdeseg eval --model EXPORT --data URL [--split val|test]``: score an export on a split.

Segmentation: mIoU, per-class IoU and pixel accuracy. Depth (where the split has ground-truth
depth): median-scaled errors and the constant-median baseline. Instances (instance exports, on
splits with instance maps): mask AP and AP50 of the thing classes and PQ, grouped with the
export's own settings. The loop is the stages' own
validation loop (``sdeseg.evaluate``), so ``eval`` on a run's export reproduces the numbers the
run reported for the same split. Prints a table and writes a JSON file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="export: <run>/export/best.pt, or a .safetensors of sdeseg export")
    p.add_argument("--data", required=True, help="shard dataset (directory or URL with manifest.parquet)")
    p.add_argument("--split", default="val", help="split to evaluate (default val; claims: test)")
    p.add_argument("--task", choices=["seg", "depth", "instance"], action="append", default=None,
                   help="evaluate only this task (repeatable; default: every task the export predicts)")
    p.add_argument("--domain", default=None, help="only samples of this domain")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="JSON file (default <export dir>/eval_<export>_<split>.json)")
    p.add_argument("--confusion", action="store_true",
                   help="also print where each class's pixels go and write the confusion matrix into the JSON "
                        "(\"confusion\": classes, rows = ground truth, columns = prediction, pixel counts)")


def evaluate_export(model_path: str, data: str, split: str = "val", tasks=None, domain: str | None = None,
                    batch_size: int = 8) -> dict[str, float]:
    """Flat metrics of an export on a split (``seg/...``, ``depth/...``, ``inst/...``), as the
    stages report them."""
    return score_export(model_path, data, split, tasks, domain, batch_size)[0]


def score_export(model_path: str, data: str, split: str = "val", tasks=None, domain: str | None = None,
                 batch_size: int = 8):
    """(the flat metrics of :func:`evaluate_export`, the segmentation metric with its confusion
    matrix or None when segmentation is not evaluated)."""
    import torch

    from sdeseg.data.classes import IGNORE_INDEX
    from sdeseg.data.manifest import DatasetError
    from sdeseg.data.reader import ValLoader
    from sdeseg.evaluate import accumulate, accumulate_instances, depth_summary, instance_summary, seg_summary
    from sdeseg.exports import load_model
    from sdeseg.metrics import DepthMetric, MaskAP, PanopticQuality, SegmentationMetric

    model = load_model(model_path)
    tasks = list(tasks or model.tasks)
    for task in tasks:
        model.require(task)
    loader = ValLoader(data, split, batch_size=batch_size, domain=domain, frames=(0,))
    seg = SegmentationMetric(model.model_config.num_classes, IGNORE_INDEX) if "seg" in tasks else None
    depth = (DepthMetric(), DepthMetric()) if "depth" in tasks else None
    mask_ap = pq = None
    if "instance" in tasks:  # one pass for the semantic and the instance metrics
        mask_ap, pq = MaskAP(), PanopticQuality(model.model_config.num_classes)
        accumulate_instances(model.net, loader, torch.device("cpu"), model.info["instance"]["grouping"], seg=seg,
                             mask_ap=mask_ap, pq=pq)
    else:
        accumulate(model.net, loader, torch.device("cpu"), seg=seg, depth=depth, depth_range=model.depth_range)
    metrics: dict[str, float] = {}
    if seg is not None:
        if int(seg.confusion.sum()) == 0:
            raise DatasetError(f"{data}: split {split!r} has no labeled pixels to evaluate segmentation on")
        metrics.update(seg_summary(seg))
    if depth is not None:
        if float(depth[0].sums[-1]) == 0:
            raise DatasetError(f"{data}: split {split!r} has no ground-truth depth to evaluate depth on")
        metrics.update(depth_summary(*depth))
    if mask_ap is not None:
        if not mask_ap.images:
            raise DatasetError(f"{data}: split {split!r} has no instance maps (instance.png) to evaluate instances on")
        metrics.update(instance_summary(mask_ap, pq))
    metrics["samples"] = loader.num_samples
    return metrics, seg


def run(args: argparse.Namespace) -> int:
    from sdeseg.report import print_summary_table

    metrics, seg = score_export(args.model, args.data, args.split, args.task, args.domain, args.batch_size)
    payload = {"model": str(args.model), "data": args.data, "split": args.split, **metrics}
    if args.confusion and seg is not None:
        from sdeseg.data.classes import class_names

        payload["confusion"] = {"classes": list(class_names()[:seg.num_classes]), "gt_by_pred": seg.confusion.tolist()}
    out = Path(args.out or Path(args.model).parent / f"eval_{Path(args.model).stem}_{args.split}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(out)
    print_summary_table(metrics, per_class=True)
    if args.confusion and seg is not None:
        print_confusions(seg)
    print(f"metrics: {out}")
    return 0


def print_confusions(seg) -> None:
    """Per ground-truth class: the share of its pixels predicted right and the two classes most
    of the rest goes to."""
    from sdeseg.data.classes import class_names

    names = class_names()
    print(f"\n{'ground truth':<16}{'as itself':>10}  mostly mistaken for")
    for c, right, others in seg.confusions():
        print(f"{names[c]:<16}{100 * right:>9.1f}%  " + ", ".join(f"{names[j]} {100 * v:.1f}%" for j, v in others))
