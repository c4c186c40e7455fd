"""Stage 2: semi-supervised segmentation — transfer, multi-task learning, mean teacher, DepthMix.

Per step: a labeled batch (the small key-listed subset, held in memory) gives the
supervised cross-entropy; an unlabeled batch is pseudo-labelled by the EMA teacher,
mixed (DepthMix by depth from the SDE model or the multi-task network, ClassMix,
or not at all), strongly augmented, and trained against the mixed teacher
probabilities, weighted by the fraction of confident pixels. With the multi-task
model the photometric loss on unlabeled sequences stays on. The student is
initialised from the SDE export (encoder + decoder) when ``semiseg.transfer``.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from sdeseg.config import Config, ConfigError
from sdeseg.data.classes import class_names
from sdeseg.data.labeled import labeled_keys_for
from sdeseg.data.reader import LabeledPool, ShardStream, ValLoader
from sdeseg.exports import export_depth_range, load_depth_model, read_export
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
from sdeseg.models.depth_decoder import disp_to_depth
from sdeseg.models.ema import EMATeacher
from sdeseg.models.seg import build_seg_model, transfer_from_sde
from sdeseg.optim import param_groups
from sdeseg.runtime.checkpoint import rng_state, set_rng_state
from sdeseg.runtime.context import StageContext, StageResult
from sdeseg.runtime.telemetry import StepMeter

SEG_KEYS = (("seg", 0), ("seg_aux", 0))


@torch.no_grad()
def make_mixed_batch(teacher, depth_net, lb, ub, cfg: Config, gen: torch.Generator) -> MixResult:
    """Pseudo-label the unlabeled images with the teacher and mix them (DepthMix / ClassMix / none).

    Labeled images join the mixing pool with their one-hot ground truth when
    ``semiseg.mix_labeled``. Returns the mixed, strongly augmented student input and
    the mixed teacher probabilities.
    """
    s = cfg.semiseg
    images = ub.images[0]
    if s.mix_labeled:
        images = torch.cat([images, lb.images[0]])
    t_out = teacher(images)
    probs = F.softmax(t_out[("seg", 0)], dim=1)
    if s.mix_labeled:
        n = ub.images[0].shape[0]
        probs = torch.cat([probs[:n], labels_to_probs(lb.label, probs.shape[1], s.ignore_index)])
    if s.mix == "depthmix":
        if s.mix_depth == "pseudo":
            disp = depth_net(images)[("disp", 0)]
            depth = disp_to_depth(disp, *depth_net.depth_range)[1]
        elif s.mix_depth == "ground_truth":
            depth = ground_truth_depth([ub, lb] if s.mix_labeled else [ub])
        else:  # the multi-task teacher already predicted depth for the pool
            dl = cfg.depth_loss
            depth = disp_to_depth(t_out[("disp", 0)], dl.min_depth, dl.max_depth, dl.disp_mapping)[1]
        mix = depth_mix_batch(images, depth, probs=probs, eps=s.mix_eps, generator=gen)
    elif s.mix == "classmix":
        mix = classmix_batch(images, probs, generator=gen)
    else:
        mix = MixResult(image=images, mask=None, perm=None, probs=probs, label=None)
    if s.mix_rebalance and mix.mask is not None:
        mix.weight = rebalance_weights(probs, mix.probs)
    mix.image = strong_augment(mix.image, gen, jitter=s.color_jitter, blur=s.blur)
    return mix


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


def train_step(engine, teacher, depth_net, lb, ub, cfg: Config, gen: torch.Generator, step: int) -> dict:
    """One optimizer step; updates the EMA teacher; returns detached losses."""
    s = cfg.semiseg
    engine.train()
    mix = make_mixed_batch(teacher, depth_net, lb, ub, cfg, gen) if (ub is not None and s.pseudo_label) else None
    n_lab = lb.images_aug[0].shape[0]
    if mix is not None and s.separate_passes:  # BatchNorm sees labeled and mixed images apart
        out, mixed_logits = engine(lb.images_aug[0]), engine(mix.image)[("seg", 0)]
    else:
        inputs = lb.images_aug[0] if mix is None else torch.cat([lb.images_aug[0], mix.image])
        out = engine(inputs)
        mixed_logits = out[("seg", 0)][n_lab:]
    losses = supervised_seg_loss({k: out[k][:n_lab] for k in SEG_KEYS if k in out}, lb.label, s)
    extras: dict = {}
    if mix is not None:
        losses.update(pseudo_label_seg_loss({("seg", 0): mixed_logits}, mix.probs, s, extras, step, mix.weight))
    if cfg.model.multitask and ub is not None and -1 in ub.images:
        seq_out = engine(ub.images_aug)
        depth = sde_loss(ub.images, seq_out, ub.K, ub.inv_K, cfg.depth_loss)
        losses["depth/total"] = cfg.depth_loss.weight * depth["depth/total"]
    total = sum(losses.values())
    engine.backward(total)
    engine.step()
    teacher.update(engine.module, step)
    result = {k: v.detach() for k, v in losses.items()}
    result["seg/total"] = total.detach()
    result.update({k: v for k, v in extras.items()})
    return result


@torch.no_grad()
def validate(model, cfg: Config, ctx: StageContext, prefix: str = "seg") -> dict[str, float]:
    """mIoU, per-class IoU and pixel accuracy on the validation split, over all ranks."""
    loader = ValLoader(cfg.data.root, cfg.data.val_split, batch_size=cfg.data.val_batch_size, rank=ctx.rank,
                       world_size=ctx.world_size, domain=cfg.data.domain, max_batches=cfg.train.val_batches)
    was_training = model.training
    model.eval()
    metric = SegmentationMetric(cfg.model.num_classes, cfg.semiseg.ignore_index)
    for batch in loader:
        if batch.label is None:
            continue
        batch = batch.to(ctx.device)
        metric.update(model(batch.images[0])[("seg", 0)].argmax(1), batch.label)
    model.train(was_training)
    metric.confusion = ctx.all_reduce_sum(metric.confusion)
    res = metric.compute()
    out = {f"{prefix}/miou": res["miou"], f"{prefix}/acc": res["acc"]}
    out.update({f"{prefix}/iou/{name}": v for name, v in zip(class_names(), res["iou"])})
    return out


def labeled_keys(cfg: Config) -> list[str]:
    keys = labeled_keys_for(cfg.data)
    if not keys:
        raise ConfigError("data.num_labeled: the semi-supervised stage needs labels (or data.labeled_keys)")
    return keys


def check_classes(cfg: Config, pool: LabeledPool) -> None:
    """The data contract has 19 train ids; a different class count is a config error."""
    n = len(class_names())
    if cfg.model.num_classes != n:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the data uses the {n} Cityscapes train ids")
    top = pool.max_label()
    if top >= cfg.model.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but labeled data holds class id {top}")


def build_models(cfg: Config, ctx: StageContext):
    """Student (transferred from SDE when configured) and the frozen pseudo-depth network."""
    s = cfg.semiseg
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_seg_model(cfg.model)
    depth_net = None
    needs_pseudo_depth = s.pseudo_label and s.mix == "depthmix" and s.mix_depth == "pseudo"
    if (s.transfer or needs_pseudo_depth) and not s.sde_checkpoint:
        raise ConfigError("semiseg.sde_checkpoint: transfer / DepthMix with pseudo depth need an SDE export "
                          "(<sde run dir>/export/best.pt); set semiseg.transfer=false and semiseg.mix to use none")
    export = read_export(s.sde_checkpoint, "sde") if s.transfer or needs_pseudo_depth else None
    if s.transfer:
        mapping = export_depth_range(export)[2]
        if cfg.model.multitask and mapping != cfg.depth_loss.disp_mapping:
            # the transferred disparity heads would be read with the wrong depth mapping
            raise ConfigError(f"depth_loss.disp_mapping is {cfg.depth_loss.disp_mapping!r} but the SDE export "
                              f"{s.sde_checkpoint} was trained with {mapping!r}; set depth_loss.disp_mapping={mapping}")
        report = transfer_from_sde(model, export["depth"])
        ctx.log(0, {"transfer/loaded": len(report.loaded), "transfer/initialised": len(report.initialised)},
                kind="event")
    if needs_pseudo_depth:
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
        "step": step,
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


def run(cfg: Config, ctx: StageContext) -> StageResult:
    s, d, t = cfg.semiseg, cfg.data, cfg.train
    keys = labeled_keys(cfg)
    pool = LabeledPool(d.root, keys, batch_size=d.labeled_batch_size, crop=d.size, augment=d.augment,
                       seed=t.seed, rank=ctx.rank, world_size=ctx.world_size)
    check_classes(cfg, pool)
    model, depth_net = build_models(cfg, ctx)
    teacher = EMATeacher(model, s.ema_alpha_max)
    engine = ctx.build_engine(model, param_groups(model, cfg.optim))
    teacher.to(ctx.device)
    gen = torch.Generator().manual_seed(t.seed * 1000 + ctx.rank + 1)
    torch.manual_seed(t.seed * 1000 + ctx.rank + 1)

    stream = None
    if s.pseudo_label or cfg.model.multitask:
        frames = (-1, 0, 1) if cfg.model.multitask else (0,)
        stream = ShardStream(d.root, d.train_split, domain=d.domain, batch_size=d.batch_size, crop=d.size,
                             augment=d.augment, rank=ctx.rank, world_size=ctx.world_size, num_workers=d.num_workers,
                             shuffle_buffer=d.shuffle_buffer, seed=t.seed, frames=frames,
                             max_corrupt_fraction=d.max_corrupt_fraction, labels=False)

    step, best, val = 0, -math.inf, {}
    restored = ctx.restore(engine)
    if restored is not None:
        client, rank_state = restored
        step, best, val = client["step"], client["best"], client["val"]
        teacher.load_state_dict(client["teacher"])
        pool.load_state_dict(rank_state["labeled"])
        if stream is not None:
            stream.load_state_dict(rank_state["reader"])
        set_rng_state(rank_state["rng"])
        gen.set_state(rank_state["generator"])
        ctx.log(step, {"event/resumed": 1.0}, kind="event")

    labeled_it = iter(pool)
    unlabeled_it = iter(stream) if stream is not None else None
    meter = StepMeter()
    start = time.perf_counter()
    steps_run = 0
    while step < t.steps:
        t0 = time.perf_counter()
        lb = next(labeled_it).to(ctx.device)
        ub = next(unlabeled_it).to(ctx.device) if unlabeled_it is not None else None
        data_time = time.perf_counter() - t0
        losses = train_step(engine, teacher, depth_net, lb, ub, cfg, gen, step)
        if t.log_keys:
            ctx.log(step + 1, {"keys": list(lb.keys) + (list(ub.keys) if ub is not None else [])}, kind="keys")
        step += 1
        steps_run += 1
        meter.update(losses, len(lb) + (len(ub) if ub is not None else 0), data_time)
        ctx.maybe_inject_fault(step)

        ctx.log_progress(step, meter, engine)
        val_due, ckpt_due = ctx.due(step)
        if val_due:
            val = validate(engine.module, cfg, ctx)
            val.update({k: v for k, v in validate(teacher.model, cfg, ctx, "teacher").items() if "/iou/" not in k})
            val["time/elapsed_s"] = time.perf_counter() - start
            ctx.log(step, val, kind="val")
            if val["seg/miou"] > best:
                best = val["seg/miou"]
                ctx.export("best", export_payload(engine.module, cfg, step, val))
        if val_due or ckpt_due:
            ckpt = None
            if ckpt_due:
                client = {"step": step, "best": best, "val": val, "teacher": teacher.state_dict()}
                rank_state = {"labeled": pool.state_dict(), "rng": rng_state(), "generator": gen.get_state(),
                              "reader": stream.state_dict() if stream is not None else {}}
                ckpt = (engine, client, rank_state)
            ctx.report(step, {k: v for k, v in val.items() if "/iou/" not in k} if val_due else {}, ckpt)

    last = ctx.export("last", export_payload(engine.module, cfg, step, val))
    wall = time.perf_counter() - start
    summary = dict(val)
    summary.update({"steps": step, "steps_this_run": steps_run, "wall_time_s": wall,
                    "labeled_samples": len(keys)})
    exports = {"last": last}
    if best > -math.inf:
        exports["best"] = str(ctx.run_dir / "export" / "best.pt")
    return StageResult(summary=summary, exports=exports)
