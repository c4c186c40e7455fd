"""Stage 2: semi-supervised segmentation — transfer, multi-task learning, mean teacher, DepthMix.

Per optimizer step (``runtime.grad_accum`` micro-batches, each): a labeled batch (the
small key-listed subset, held in memory) gives the supervised cross-entropy; an
unlabeled batch is pseudo-labelled by the EMA teacher, mixed (DepthMix by depth from the
SDE model or the multi-task network, ClassMix, or not at all), strongly augmented, and
trained against the mixed teacher probabilities, weighted by the fraction of confident
pixels. With the multi-task model the photometric loss on unlabeled sequences stays on.
After the optimizer step the EMA teacher follows the student once. The student is
initialised (``semiseg.init_from``) from the SDE export (encoder + decoder, and the pose net of
a multi-task model; the default), from a contrastive pretraining export (encoder + decoder body,
``semiseg.init_checkpoint``), from ImageNet weights (``model.pretrained``) or from scratch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdeseg.config import Config, ConfigError
from sdeseg.data.classes import class_names
from sdeseg.data.labeled import check_labeled_keys, labeled_keys_for
from sdeseg.data.shardio import ShardIndex
from sdeseg.evaluate import accumulate, seg_summary
from sdeseg.exports import load_depth_model, read_export, read_init_export
from sdeseg.losses.depth import sde_loss
from sdeseg.losses.seg import pseudo_label_seg_loss, supervised_seg_loss
from sdeseg.metrics import SegmentationMetric
from sdeseg.mixing import (
    MixResult,
    classmix_batch,
    depth_mix_batch,
    invalid_depth_as_far,
    labels_to_probs,
    rebalance_weights,
    strong_augment,
)
from sdeseg.models import DepthRange, EMATeacher, build_seg_model, transfer_from_sde
from sdeseg.optim import param_groups
from sdeseg.runtime import Progress, StageContext, StageResult, StepMeter, TrainState

SEG_KEYS = (("seg", 0), ("seg_aux", 0))


@dataclass
class Pool:
    """The mixing pool of one micro-batch as the teacher sees it (P = the unlabeled images, then
    the labeled ones with ``semiseg.mix_labeled``): images (P,3,H,W); probs (P,K,H,W) float32,
    the teacher's for the unlabeled images (their one-hot ground truth for those of the labeled
    keys when ``semiseg.mix_use_gt``) and one-hot ground truth for the labeled; depth
    (P,1,H,W) float32 for DepthMix (the SDE network's, the ground truth or the multi-task
    teacher's, per ``semiseg.mix_depth``), None for the other mixes."""

    images: torch.Tensor
    probs: torch.Tensor
    depth: torch.Tensor | None


def unlabeled_stream(cfg: Config, ctx: StageContext, keys: list[str]):
    """This rank's endless stream of the whole train split (sequences with ``model.multitask``);
    with ``semiseg.mix_use_gt`` it carries the ground truth of the labeled ``keys`` only (other
    rows of ``batch.label`` all ignore), without it no labels at all."""
    labels = frozenset(keys) if cfg.semiseg.mix_use_gt else False
    return ctx.train_stream(frames=(-1, 0, 1) if cfg.model.multitask else (0,), labels=labels)


@torch.no_grad()
def teacher_pool(teacher, depth_net, lb, ub, cfg: Config, autocast) -> Pool:
    """Pseudo-label the unlabeled images with the teacher (and get the pool's depth for DepthMix).

    ``autocast()`` is the run's precision context for the teacher and depth-net forwards.
    """
    s = cfg.semiseg
    n = ub.images[0].shape[0]
    images = torch.cat([ub.images[0], lb.images[0]]) if s.mix_labeled else ub.images[0]
    # the teacher labels only the unlabeled images (labeled ones bring their ground truth),
    # unless its depth is wanted for the whole pool (online DepthMix depth)
    online_depth = s.mix == "depthmix" and s.mix_depth == "online"
    with autocast():
        t_out = teacher(images if online_depth else ub.images[0])
    probs = F.softmax(t_out[("seg", 0)][:n].float(), dim=1)
    if s.mix_use_gt and ub.label is not None:  # labeled images met in the stream: their ground truth
        has_gt = (ub.label != s.ignore_index).flatten(1).any(1).view(-1, 1, 1, 1)
        probs = torch.where(has_gt, labels_to_probs(ub.label, probs.shape[1], s.ignore_index), probs)
    if s.mix_labeled:
        probs = torch.cat([probs, labels_to_probs(lb.label, probs.shape[1], s.ignore_index)])
    depth = None
    if s.mix == "depthmix":
        if s.mix_depth == "pseudo":
            with autocast():
                disp = depth_net(images)[("disp", 0)]
            depth = depth_net.depth_range.depth(disp)
        elif s.mix_depth == "ground_truth":
            depth = ground_truth_depth([ub, lb] if s.mix_labeled else [ub])
        else:  # the multi-task teacher already predicted depth for the pool
            depth = DepthRange.from_config(cfg.depth_loss).depth(t_out[("disp", 0)])
    return Pool(images=images, probs=probs, depth=depth)


@torch.no_grad()
def mix_pool(pool: Pool, cfg: Config, gen: torch.Generator) -> MixResult:
    """Mix the pool (DepthMix / ClassMix / none) and strongly augment it: the student's input
    and the mixed teacher probabilities."""
    s = cfg.semiseg
    if s.mix == "depthmix":
        mix = depth_mix_batch(pool.images, pool.depth, probs=pool.probs, eps=s.mix_eps, generator=gen)
    elif s.mix == "classmix":
        mix = classmix_batch(pool.images, pool.probs, generator=gen)
    else:
        mix = MixResult(image=pool.images, mask=None, perm=None, probs=pool.probs, label=None)
    if s.mix_rebalance and mix.mask is not None:
        mix.weight = rebalance_weights(pool.probs, mix.probs)
    mix.image = strong_augment(mix.image, gen, jitter=s.color_jitter, blur=s.blur, hue_space=s.hue_space)
    return mix


def make_mixed_batch(teacher, depth_net, lb, ub, cfg: Config, gen: torch.Generator, autocast) -> MixResult:
    """Pseudo-label the unlabeled images with the teacher and mix them (:func:`teacher_pool`,
    then :func:`mix_pool`). Labeled images join the mixing pool with their one-hot ground truth
    when ``semiseg.mix_labeled``; probabilities and depth are float32."""
    return mix_pool(teacher_pool(teacher, depth_net, lb, ub, cfg, autocast), cfg, gen)


def ground_truth_depth(batches) -> torch.Tensor:
    """The batches' exact depth (B,1,H,W) for ``semiseg.mix_depth=ground_truth``, invalid
    pixels as far (:func:`sdeseg.mixing.invalid_depth_as_far`); a sample with no valid
    depth is a ConfigError naming it."""
    missing = []
    for b in batches:
        has = [False] * len(b.keys) if b.depth is None else (b.depth > 0).flatten(1).any(1).tolist()
        missing += [k for k, ok in zip(b.keys, has) if not ok]
    if missing:
        raise ConfigError(f"semiseg.mix_depth=ground_truth: samples without ground-truth depth (depth.npy), "
                          f"e.g. {missing[:3]}; use mix_depth=pseudo on this dataset")
    return invalid_depth_as_far(torch.cat([b.depth for b in batches]))


def train_step(engine, teacher, depth_net, lb, ub, cfg: Config, gen: torch.Generator, step: int,
               autocast) -> dict:
    """Forward and backward of one micro-batch; returns detached loss terms and statistics.

    ``engine.step()`` steps the optimizer only on the last micro-batch of ``runtime.grad_accum``;
    the caller updates the EMA teacher once per optimizer step. ``step`` is the optimizer
    step being made (0-based; the pseudo-label ramp reads it).
    """
    s = cfg.semiseg
    engine.train()
    mix = None
    if ub is not None and s.pseudo_label:
        mix = make_mixed_batch(teacher, depth_net, lb, ub, cfg, gen, autocast)
    n_lab = lb.images_aug[0].shape[0]
    if mix is not None and s.separate_passes:  # BatchNorm sees labeled and mixed images apart
        out, mixed_logits = engine(lb.images_aug[0]), engine(mix.image)[("seg", 0)]
    else:
        inputs = lb.images_aug[0] if mix is None else torch.cat([lb.images_aug[0], mix.image])
        out = engine(inputs)
        mixed_logits = out[("seg", 0)][n_lab:]
    terms, stats = supervised_seg_loss({k: out[k][:n_lab] for k in SEG_KEYS if k in out}, lb.label, s)
    if mix is not None:
        unsup = pseudo_label_seg_loss({("seg", 0): mixed_logits}, mix.probs, s, step, mix.weight)
        terms, stats = terms | unsup.terms, stats | unsup.stats
    terms |= photometric_terms(engine, ub, cfg)
    total = sum(terms.values())
    engine.backward(total)
    engine.step()
    return {k: v.detach() for k, v in terms.items()} | {"seg/total": total.detach()} | stats


def photometric_terms(engine, ub, cfg: Config) -> dict:
    """The multi-task model's self-supervised depth loss on the unlabeled sequences (frames
    -1, 0, 1 of ``ub``), as ``{"depth/total": depth_loss.weight * loss}``; ``{}`` without
    ``model.multitask`` or without neighbour frames."""
    if not (cfg.model.multitask and ub is not None and -1 in ub.images):
        return {}
    depth = sde_loss(ub.images, engine(ub.images_aug), ub.K, ub.inv_K, cfg.depth_loss).terms
    return {"depth/total": cfg.depth_loss.weight * depth["depth/total"]}


@torch.no_grad()
def validate(model, cfg: Config, ctx: StageContext, prefix: str = "seg", split: str | None = None) -> dict[str, float]:
    """mIoU, per-class IoU and pixel accuracy on ``split`` (default ``data.val_split``), over all
    ranks (every rank must call this)."""
    metric = SegmentationMetric(cfg.model.num_classes, cfg.semiseg.ignore_index)
    accumulate(model, ctx.val_loader(split, max_batches=0 if split else None), ctx.device, seg=metric,
               autocast=ctx.autocast)
    metric.confusion = ctx.all_reduce_sum(metric.confusion)
    return seg_summary(metric, prefix)


def needs_sde_export(cfg: Config) -> tuple[bool, bool]:
    """(transfer from it, pseudo-depth for DepthMix from it)."""
    s = cfg.semiseg
    return s.transfer, s.pseudo_label and s.mix == "depthmix" and s.mix_depth == "pseudo"


def preflight(cfg: Config) -> None:
    """Everything this stage can check before a worker starts (the launcher calls it)."""
    s, d = cfg.semiseg, cfg.data
    n = len(class_names())
    if cfg.model.num_classes != n:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the data uses the {n} Cityscapes "
                          "train ids")
    if d.labeled_keys is None and d.num_labeled == 0:
        raise ConfigError("data.num_labeled: the semi-supervised stage needs labels: set data.num_labeled > 0 "
                          "or data.labeled_keys (a file with one key per line)")
    check_labeled_keys(ShardIndex.load(d.root), d.root, labeled_keys_for(d))
    transfer, pseudo_depth = needs_sde_export(cfg)
    if (transfer or pseudo_depth) and not s.sde_checkpoint:
        raise ConfigError("semiseg.sde_checkpoint: transfer / DepthMix with pseudo depth need an SDE export "
                          "(<sde run dir>/export/best.pt); or set semiseg.init_from=scratch|imagenet|contrastive "
                          "and semiseg.mix=none (or semiseg.mix_depth=ground_truth)")
    if s.init_from == "contrastive":
        if not s.init_checkpoint:
            raise ConfigError("semiseg.init_checkpoint: init_from=contrastive needs the contrastive stage's export "
                              "(<contrastive run dir>/export/last.pt)")
        read_init_export(s.init_checkpoint, "contrastive", cfg.model, "semiseg.init_checkpoint")
    if transfer or pseudo_depth:
        export = read_export(s.sde_checkpoint, "sde")
        mapping = DepthRange.from_dict(export["depth_range"]).mapping
        if transfer and cfg.model.multitask and mapping != cfg.depth_loss.disp_mapping:
            # the transferred disparity heads would be read with the wrong depth mapping
            raise ConfigError(f"depth_loss.disp_mapping is {cfg.depth_loss.disp_mapping!r} but the SDE export "
                              f"{s.sde_checkpoint} was trained with {mapping!r}; set depth_loss.disp_mapping={mapping}")


def check_labels(cfg: Config, pool) -> None:
    """The labeled data must hold only the model's class ids (read from the labels themselves)."""
    top = pool.max_label()
    if top >= cfg.model.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but labeled data holds class id {top}")


def build_models(cfg: Config, ctx: StageContext):
    """Student (initialised as ``semiseg.init_from`` says) and the frozen pseudo-depth network."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_seg_model(cfg.model)  # ImageNet weights in the encoder when model.pretrained is set
    if cfg.semiseg.init_from == "contrastive":  # encoder + decoder body; heads (and a pose net) start fresh
        report = transfer_from_sde(model, read_export(cfg.semiseg.init_checkpoint, "contrastive")["model"])
        ctx.log(0, {"transfer/loaded": len(report.loaded), "transfer/initialised": len(report.initialised)},
                kind="event")
    transfer, pseudo_depth = needs_sde_export(cfg)
    export = read_export(cfg.semiseg.sde_checkpoint, "sde") if transfer or pseudo_depth else None
    if transfer:
        # depth net (encoder, decoder) and pose net: a multi-task student continues both
        sde_weights = export["depth"] | {f"pose.{k}": v for k, v in export.get("pose", {}).items()}
        report = transfer_from_sde(model, sde_weights)
        ctx.log(0, {"transfer/loaded": len(report.loaded), "transfer/initialised": len(report.initialised)},
                kind="event")
    depth_net = None
    if pseudo_depth:
        depth_net, depth_range = load_depth_model(export)
        depth_net.requires_grad_(False)
        depth_net.depth_range = depth_range
        depth_net.to(ctx.device)
    return model, depth_net


def export_payload(model, cfg: Config, step: int, metrics: dict) -> dict:
    return {
        "kind": "seg",
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": cfg.to_dict()["model"],
        "depth_range": DepthRange.from_config(cfg.depth_loss).to_dict(),
        "step": step,
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


def run(cfg: Config, ctx: StageContext) -> StageResult:
    s, t = cfg.semiseg, cfg.train
    keys = labeled_keys_for(cfg.data)
    pool = ctx.labeled_pool(keys)
    check_labels(cfg, pool)
    model, depth_net = build_models(cfg, ctx)
    teacher = EMATeacher(model, s.ema_alpha_max)
    engine = ctx.build_engine(model, param_groups(model, cfg.optim))
    teacher.to(ctx.device)
    gen = torch.Generator().manual_seed(t.seed * 1000 + ctx.rank + 1)
    torch.manual_seed(t.seed * 1000 + ctx.rank + 1)
    stream = unlabeled_stream(cfg, ctx, keys) if s.pseudo_label or cfg.model.multitask else None

    progress = Progress()
    state = TrainState(engine, shared={"progress": progress, "teacher": teacher},
                       per_rank={"labeled": pool, "reader": stream, "generator": gen})
    ctx.restore(state)
    first_step = progress.step
    labeled_it = iter(pool)
    unlabeled_it = iter(stream) if stream is not None else None
    meter = StepMeter()
    start = time.perf_counter()
    while progress.step < t.steps:
        for _ in range(cfg.runtime.grad_accum):
            t0 = time.perf_counter()
            lb = next(labeled_it).to(ctx.device)
            ub = next(unlabeled_it).to(ctx.device) if unlabeled_it is not None else None
            data_time = time.perf_counter() - t0
            losses = train_step(engine, teacher, depth_net, lb, ub, cfg, gen, progress.step, ctx.autocast)
            meter.update(losses, len(lb) + (len(ub) if ub is not None else 0), data_time)
            if t.log_keys:
                ctx.log(progress.step + 1, {"keys": list(lb.keys) + (list(ub.keys) if ub is not None else [])},
                        kind="keys")
        teacher.update(engine.module, progress.step)  # once per optimizer step
        progress.step += 1
        ctx.end_step(progress.step, meter, engine)

        validate_and_save(engine, teacher, state, cfg, ctx, start)

    return finish(engine, teacher, progress, cfg, ctx, first_step, start, len(keys))


def validate_and_save(engine, teacher, state: TrainState, cfg: Config, ctx: StageContext, start: float) -> None:
    """After an optimizer step: when due, the ranks agree on one model, validate student and
    teacher (a stage without an EMA teacher passes None), export the best student, report (with
    a checkpoint). Every rank calls this."""
    progress = state.shared["progress"]
    val_due, ckpt_due = ctx.due(progress.step)
    if not (val_due or ckpt_due):
        return
    ctx.sync_buffers(engine.module, *([teacher.model] if teacher else []))  # one model on every rank
    if val_due:
        val = validate(engine.module, cfg, ctx)
        if teacher is not None:
            val.update({k: v for k, v in validate(teacher.model, cfg, ctx, "teacher").items() if "/iou/" not in k})
        progress.val = val | {"time/elapsed_s": time.perf_counter() - start}
        ctx.log(progress.step, progress.val, kind="val")
        if progress.improved(progress.val["seg/miou"], higher_is_better=True):
            ctx.export("best", export_payload(engine.module, cfg, progress.step, progress.val))
    metrics = {k: v for k, v in progress.val.items() if "/iou/" not in k} if val_due else {}
    ctx.report(progress.step, metrics, state if ckpt_due else None)


def finish(engine, teacher, progress: Progress, cfg: Config, ctx: StageContext, first_step: int, start: float,
           labeled: int) -> StageResult:
    """The end of a run: the held-out test split, the last export, the summary."""
    wall = time.perf_counter() - start
    test = ctx.test_metrics(lambda split: validate(engine.module, cfg, ctx, split=split))
    ctx.export("last", export_payload(engine.module, cfg, progress.step, progress.val))
    summary = progress.val | test | {
        "steps": progress.step, "steps_this_run": progress.step - first_step, "wall_time_s": wall,
        "labeled_samples": labeled,
    } | ({"teacher/updates": teacher.updates} if teacher is not None else {})
    return StageResult(summary=summary, exports=ctx.exports())
