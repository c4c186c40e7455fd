"""Three-stage self-training (``stage: threestage``; Ke, Aviles-Rivero et al. 2020, our design
where the paper could not be retrieved — see docs/methods.md).

1. The semi-supervised stage as a supervised baseline (no pseudo-labels, no mixing) on the
   labeled keys, from the SDE export; its last export predicts pseudo-masks (class, confidence)
   for every training image: a derived dataset ``<run>/pseudo1`` (``sdeseg.infer``).
2. ``selftrain`` with the two-branch (multi-task: segmentation + self-supervised depth) model on
   labels + ``pseudo1``; its last export predicts the refined masks ``<run>/pseudo2``.
3. ``selftrain`` again, a fresh two-branch model on labels + ``pseudo2``: the final model.

Runs go to ``<run>/stage1..3``. A stage whose run ended with the same config is not run again
and inference skips shards it already wrote, so the same command resumes at the first
unfinished stage (and inside it, from its checkpoint). Because the synthetic data has labels
for every image, each pseudo-mask set is also scored against the true labels of the
unlabeled training images (``pseudo1/*``, ``pseudo2/*`` in ``<run>/summary.json``).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdeseg.config import Config, ConfigError, from_dict, save_config
from sdeseg.data.derived import DerivedDataset
from sdeseg.data.labeled import labeled_keys_for
from sdeseg.data.shardio import ShardIndex, decode_members, scan_shard
from sdeseg.evaluate import seg_summary
from sdeseg.metrics import SegmentationMetric
from sdeseg.pseudo import class_thresholds, kept_pixels

log = logging.getLogger("sdeseg")
STAGES = ("stage1", "stage2", "stage3")


def stage_configs(cfg: Config, run_dir: Path) -> list[Config]:
    """The three runs' configs, derived from the pipeline's (each validated as a whole config)."""
    t = cfg.threestage
    out = []
    for i, steps in enumerate((t.supervised_steps, t.refine_steps, t.final_steps)):
        c = copy.deepcopy(cfg)
        c.train.steps = steps
        c.semiseg.mix = "none"
        if i == 0:
            c.stage, c.model.multitask, c.semiseg.pseudo_label = "semiseg", False, False
        else:
            c.stage, c.model.multitask = "selftrain", t.two_branch
            c.selftrain.pseudo_root = str(run_dir / f"pseudo{i}")
        try:
            out.append(from_dict(c.to_dict()))
        except ConfigError as e:
            raise ConfigError(f"threestage, {STAGES[i]}: {e}") from e
    return out


def run_pipeline(cfg: Config, run_dir: str | Path, run=None) -> dict[str, Any]:
    """Run (or resume) the pipeline into ``run_dir``; returns and writes ``summary.json``.
    ``run(cfg, dir)`` runs one stage (default :func:`sdeseg.launch.run_stage`)."""
    from sdeseg.infer import infer_dataset
    from sdeseg.launch import _write_summary, finished_run, run_stage
    from sdeseg.stages import semiseg

    run = run or run_stage
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    configs = stage_configs(cfg, run_dir)
    for c in configs:  # what can be checked before anything runs (the masks do not exist yet)
        semiseg.preflight(c)
    t, start = cfg.threestage, time.time()
    summary: dict[str, Any] = {}
    labeled = set(labeled_keys_for(cfg.data))
    for i, (name, c) in enumerate(zip(STAGES, configs)):
        t0 = time.time()
        done = finished_run(c, run_dir / name)
        if done is None:
            log.info("three-stage: %s (%s, %d steps)", name, c.stage, c.train.steps)
            done = run(c, run_dir / name)
        else:
            log.info("three-stage: %s finished before, not run again", name)
        summary |= {f"{name}/{k}": v for k, v in done.items() if isinstance(v, (int, float)) and "/iou/" not in k}
        summary[f"{name}/wall_s"] = time.time() - t0
        if i == len(STAGES) - 1:
            break
        t0 = time.time()
        masks = str(run_dir / f"pseudo{i + 1}")
        report = infer_dataset(str(run_dir / name / "export" / "last.pt"), c.data.root, masks, outputs=("seg",),
                               split=c.data.train_split, batch_size=t.infer_batch_size, actors=t.infer_actors)
        summary[f"pseudo{i + 1}/infer_s"] = report["seconds"]
        quality = pseudo_mask_quality(masks, configs[i + 1], exclude=labeled)
        summary |= {f"pseudo{i + 1}/{k}": v for k, v in quality.items()}
        summary[f"pseudo{i + 1}/wall_s"] = time.time() - t0
    summary |= {"steps": sum(c.train.steps for c in configs), "wall_time_s": time.time() - start,
                "labeled_samples": len(labeled)}
    _write_summary(run_dir, summary)
    return summary


def pseudo_mask_quality(masks_root: str, cfg: Config, exclude: set[str]) -> dict[str, float]:
    """Pseudo-masks scored against the true labels of the training images not in ``exclude``
    (the labeled keys): ``all/miou`` and per-class IoU over every pixel, ``kept/miou`` over the
    pixels that pass the per-class thresholds ``cfg.selftrain`` sets from these masks, and
    ``kept_fraction``. Needs a dataset with labels for those images (the synthetic one has them)."""
    from sdeseg.stages.selftrain import CONFIDENCE, MASK, pseudo_statistics

    st, d = cfg.selftrain, cfg.data
    c, ignore = cfg.model.num_classes, cfg.semiseg.ignore_index
    thresholds = class_thresholds(pseudo_statistics(masks_root, c, st.histogram_bins, ignore),
                                  st.threshold_quantile, st.threshold_max)
    masks = DerivedDataset(masks_root)
    index = ShardIndex.load(d.root)
    every, kept = SegmentationMetric(c, ignore), SegmentationMetric(c, ignore)
    kept_pixels_n = total = 0
    for shard, positions in index.select(d.train_split, d.domain, exclude_keys=exclude).items():
        keys = [index.shard_keys[shard][p] for p in positions]
        stored = masks.read(keys)
        for _, members in scan_shard(d.root, shard, index.shard_keys[shard], positions):
            key = members["__key__"]
            label = decode_members(members, (0,), labels=True)["label"]
            if label is None:
                raise ConfigError(f"{d.root}: {key} has no label: pseudo-mask quality needs labels for every "
                                  "training image (the synthetic dataset has them)")
            truth = torch.from_numpy(np.asarray(label, dtype=np.int64))
            pred = torch.from_numpy(stored[key][MASK].astype(np.int64))
            conf = torch.from_numpy(stored[key][CONFIDENCE].astype(np.float32))
            every.update(pred, truth)
            keep = kept_pixels(pred, conf, thresholds, ignore)
            kept.update(pred[keep], truth[keep])
            kept_pixels_n += int(keep.sum())
            total += keep.numel()
    out = seg_summary(every, "all") | {k: v for k, v in seg_summary(kept, "kept").items() if "/iou/" not in k}
    return out | {"kept_fraction": kept_pixels_n / max(total, 1), "thresholds": json.dumps(thresholds.tolist())}
