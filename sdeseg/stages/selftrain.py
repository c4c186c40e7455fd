"""Training on stored pseudo-masks: stages 2 and 3 of three-stage self-training
(``sdeseg.pipelines.threestage``; Ke et al. 2020 give the idea, the losses here are our design).

Per optimizer step (``runtime.grad_accum`` micro-batches, each): a labeled batch gives the
supervised cross-entropy (and the auxiliary head's, on the multi-task model); an unlabeled
batch's masks are joined by key by the reader from the derived dataset of pseudo-masks
(``selftrain.pseudo_root``, made by ``sdeseg infer --outputs seg``), cropped and flipped as it
cropped and flipped the images (``Batch.derived``), and two strong augmentations of it are
trained against the mask on the pixels that pass their class's confidence threshold,
class-weighted (thresholds and weights from the statistics of the whole pseudo-mask set,
:mod:`sdeseg.pseudo`), while the two views must agree with each other and the multi-task
model's two segmentation outputs with each other. The multi-task model's photometric loss on
the unlabeled sequences stays on (its second branch is self-supervised depth). No EMA teacher:
the targets are fixed.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from sdeseg.config import Config, ConfigError
from sdeseg.data.derived import DerivedDataset
from sdeseg.data.labeled import labeled_keys_for
from sdeseg.data.manifest import DatasetError, join
from sdeseg.data.shardio import ShardIndex
from sdeseg.losses.depth import sde_loss
from sdeseg.losses.seg import supervised_seg_loss
from sdeseg.losses.selftrain import pseudo_mask_loss, softmax_consistency
from sdeseg.mixing import strong_augment
from sdeseg.optim import param_groups
from sdeseg.pseudo import class_thresholds, class_weights, confidence_histogram
from sdeseg.runtime import Progress, StageContext, StageResult, StepMeter, TrainState
from sdeseg.stages import semiseg
from sdeseg.stages.semiseg import SEG_KEYS, build_models, check_labels, finish, validate_and_save

MASK, CONFIDENCE = "pseudo_label.png", "confidence.npy"
STATISTICS = "pseudo_statistics.json"


def pseudo_statistics(root: str, num_classes: int, bins: int, ignore_index: int = 255) -> torch.Tensor:
    """The (num_classes, bins) confidence histogram of every pseudo-mask in the derived dataset
    ``root``; computed in one pass the first time and kept in ``<root>/pseudo_statistics.json``
    (recomputed when the bins or the dataset's settings differ)."""
    import fsspec

    from data_prep.shards import atomic_write_bytes

    masks = DerivedDataset(root)
    fs, path = fsspec.core.url_to_fs(root)
    file = join(path, STATISTICS)
    if fs.exists(file):
        record = json.loads(fs.cat(file))
        if record.get("bins") == bins and record.get("settings") == masks.info.get("settings"):
            return torch.tensor(record["histogram"], dtype=torch.int64)
    hist = torch.zeros(num_classes, bins, dtype=torch.int64)
    for key, members in masks.samples():
        if MASK not in members or CONFIDENCE not in members:
            raise DatasetError(f"{root}: sample {key} has no {MASK} / {CONFIDENCE} (make it with outputs=seg)")
        hist += confidence_histogram(torch.from_numpy(members[MASK].astype(np.int64)),
                                     torch.from_numpy(members[CONFIDENCE].astype(np.float32)), num_classes, bins,
                                     ignore_index)
    record = {"bins": bins, "settings": masks.info.get("settings"), "histogram": hist.tolist()}
    atomic_write_bytes(fs, file, json.dumps(record).encode())
    return hist


def preflight(cfg: Config) -> None:
    """The semi-supervised stage's checks, then the pseudo-masks: a derived dataset with masks
    for every training image of ``data.root`` (its statistics are gathered here, once)."""
    st = cfg.selftrain
    semiseg.preflight(cfg)
    if cfg.semiseg.mix != "none":
        raise ConfigError(f"semiseg.mix={cfg.semiseg.mix}: the selftrain stage trains on stored pseudo-masks and "
                          "does not mix; set semiseg.mix=none")
    if not st.pseudo_root:
        raise ConfigError("selftrain.pseudo_root: set it to a derived dataset of pseudo-masks "
                          "(sdeseg infer MODEL --source DATA --out DIR --outputs seg)")
    masks = DerivedDataset(st.pseudo_root)
    outputs = masks.info.get("settings", {}).get("outputs", [])
    if "seg" not in outputs:
        raise ConfigError(f"selftrain.pseudo_root: {st.pseudo_root} holds {outputs}, not pseudo-masks "
                          "(make it with outputs=seg)")
    d = cfg.data
    index = ShardIndex.load(d.root)
    train = [index.shard_keys[s][i] for s, pos in index.select(d.train_split, d.domain).items() for i in pos]
    masks.check_covers([index.rows[k] for k in train], "pseudo-mask", of=f"training samples of {d.root}")
    pseudo_statistics(st.pseudo_root, cfg.model.num_classes, st.histogram_bins, cfg.semiseg.ignore_index)


def pseudo_targets(ub) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored masks (B,h,w) int64 and confidences (B,h,w) float32 of an unlabeled batch of
    the stage's stream (joined by its reader, cropped and flipped like its images)."""
    return ub.derived[MASK].long(), ub.derived[CONFIDENCE].float()


def train_step(engine, lb, ub, target, confidence, thresholds, weights, cfg: Config, gen: torch.Generator) -> dict:
    """Forward and backward of one micro-batch; returns detached loss terms and statistics.
    ``engine.step()`` steps the optimizer only on the last micro-batch of ``runtime.grad_accum``."""
    s, st = cfg.semiseg, cfg.selftrain
    engine.train()
    out = engine(lb.images_aug[0])
    terms, stats = supervised_seg_loss({k: out[k] for k in SEG_KEYS if k in out}, lb.label, s)
    n = ub.images_aug[0].shape[0]
    views = torch.cat([strong_augment(ub.images_aug[0], gen, jitter=s.color_jitter, blur=s.blur,
                                      hue_space=s.hue_space) for _ in range(2)])
    u = engine(views)
    seg = u[("seg", 0)]
    (loss_a, kept), (loss_b, _) = (pseudo_mask_loss(seg[i * n:(i + 1) * n], target, confidence, thresholds, weights,
                                                    s.ignore_index) for i in range(2))
    terms["seg/pseudo"] = st.pseudo_weight * (loss_a + loss_b) / 2
    stats["pseudo/kept"] = kept
    if st.view_consistency > 0:
        terms["seg/view_consistency"] = st.view_consistency * softmax_consistency(seg[:n], seg[n:])
    if st.branch_consistency > 0 and ("seg_aux", 0) in u:
        terms["seg/branch_consistency"] = st.branch_consistency * softmax_consistency(seg, u[("seg_aux", 0)])
    if cfg.model.multitask and -1 in ub.images:
        depth = sde_loss(ub.images, engine(ub.images_aug), ub.K, ub.inv_K, cfg.depth_loss).terms
        terms["depth/total"] = cfg.depth_loss.weight * depth["depth/total"]
    total = sum(terms.values())
    engine.backward(total)
    engine.step()
    return {k: v.detach() for k, v in terms.items()} | {"seg/total": total.detach()} | stats


def run(cfg: Config, ctx: StageContext) -> StageResult:
    st, t = cfg.selftrain, cfg.train
    keys = labeled_keys_for(cfg.data)
    pool = ctx.labeled_pool(keys)
    check_labels(cfg, pool)
    model, _ = build_models(cfg, ctx)
    engine = ctx.build_engine(model, param_groups(model, cfg.optim))
    hist = pseudo_statistics(st.pseudo_root, cfg.model.num_classes, st.histogram_bins, cfg.semiseg.ignore_index)
    thresholds = class_thresholds(hist, st.threshold_quantile, st.threshold_max).to(ctx.device)
    weights = class_weights(hist, st.class_weight_power, st.class_weight_max).to(ctx.device)
    ctx.log(0, {"pseudo/thresholds": thresholds.tolist(), "pseudo/weights": weights.tolist()}, kind="event")
    gen = torch.Generator().manual_seed(t.seed * 1000 + ctx.rank + 1)
    torch.manual_seed(t.seed * 1000 + ctx.rank + 1)
    stream = ctx.train_stream(frames=(-1, 0, 1) if cfg.model.multitask else (0,), labels=False,
                              derived={MASK: (st.pseudo_root, MASK), CONFIDENCE: (st.pseudo_root, CONFIDENCE)})

    progress = Progress()
    state = TrainState(engine, shared={"progress": progress}, per_rank={"labeled": pool, "reader": stream,
                                                                         "generator": gen})
    ctx.restore(state)
    first_step = progress.step
    labeled_it, unlabeled_it = iter(pool), iter(stream)
    meter = StepMeter()
    start = time.perf_counter()
    while progress.step < t.steps:
        for _ in range(cfg.runtime.grad_accum):
            t0 = time.perf_counter()
            lb, ub = next(labeled_it).to(ctx.device), next(unlabeled_it).to(ctx.device)
            target, confidence = pseudo_targets(ub)
            data_time = time.perf_counter() - t0
            losses = train_step(engine, lb, ub, target, confidence, thresholds, weights, cfg, gen)
            meter.update(losses, len(lb) + len(ub), data_time)
        progress.step += 1
        ctx.end_step(progress.step, meter, engine)

        validate_and_save(engine, None, state, cfg, ctx, start)

    return finish(engine, None, progress, cfg, ctx, first_step, start, len(keys))
