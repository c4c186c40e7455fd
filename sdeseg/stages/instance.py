"""Depth-guided semi-supervised instance segmentation (seed 002; where the paper is silent, our
design: docs/architecture.md).

The network is Panoptic-DeepLab's bottom-up design on our decoder (``sdeseg.models.instance``):
semantic logits, an instance-centre heatmap and per-pixel offsets to the centre. Per optimizer
step (``runtime.grad_accum`` micro-batches, each):

* a labeled batch (the key-listed subset, with ``label.png`` and ``instance.png``) gives the
  supervised semantic cross-entropy, centre MSE and offset L1 (``sdeseg.losses.instance``);
* with ``instance.mean_teacher``, an unlabeled batch is pseudo-labelled by the EMA teacher
  (confident semantic pixels; centres and offsets of its confident instances,
  ``sdeseg.panoptic.pseudo_instances``) and the student, on a strong augmentation of the same
  images, learns the same three terms from them;
* with ``instance.fusion_stages`` (Depth Feature Fusion), the frozen SDE depth network's encoder
  maps of the clean images are fused into those stages of the student's encoder, and the teacher
  gets them too;
* with ``instance.controller`` (the Depth Controller), the depth maps are ramped in from 0 to 1
  over ``instance.depth_ramp_steps``, the student makes a second, RGB-only pass (depth maps 0)
  on the unlabeled images, and the two passes' pseudo-label terms are weighted by how well each
  agreed with the teacher lately (:class:`DepthController`).

After the optimizer step the controller's running losses (averaged over ranks) and the EMA
teacher follow once. Validation reports semantic mIoU, mask AP, AP50 and PQ of the student and
the teacher on ``data.val_split`` and exports the best student (kind ``instance``, with the
frozen depth network when it fuses depth, so ``sdeseg eval`` needs nothing else).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from sdeseg.config import Config, ConfigError, InstanceConfig
from sdeseg.data.labeled import labeled_keys_for
from sdeseg.data.manifest import DatasetError
from sdeseg.data.shardio import ShardIndex
from sdeseg.evaluate import accumulate_instances, instance_summary, seg_summary
from sdeseg.exports import load_depth_model, read_export
from sdeseg.losses.instance import balance_weight, depth_ramp, panoptic_loss
from sdeseg.metrics import MaskAP, PanopticQuality, SegmentationMetric
from sdeseg.mixing import strong_augment
from sdeseg.models import (
    DepthGuidedInstanceNet,
    EMATeacher,
    build_instance_model,
    depth_features,
    transfer_from_sde,
)
from sdeseg.optim import param_groups
from sdeseg.panoptic import center_sigma, instance_targets, pseudo_instances
from sdeseg.runtime import Progress, StageContext, StageResult, StepMeter, TrainState
from sdeseg.stages import semiseg
from sdeseg.stages.semiseg import check_labels

BEST_METRIC = {"pq": "inst/pq", "ap": "inst/ap", "ap50": "inst/ap50", "miou": "seg/miou"}


class DepthController:
    """The Depth Controller's state (our design; the paper's formula is not public): running
    means of the pseudo-label losses of the depth-fused and the RGB-only student pass, equal on
    every rank (they are updated with rank averages), and the ramp of the depth input.

    ``scale(step)`` is the factor on the depth maps at optimizer step ``step``
    (:func:`~sdeseg.losses.instance.depth_ramp`); ``weight()`` the depth-fused term's weight
    (:func:`~sdeseg.losses.instance.balance_weight`; the RGB term gets ``1 - weight()``).
    """

    def __init__(self, cfg: InstanceConfig) -> None:
        self.momentum, self.temperature, self.ramp_steps = (cfg.controller_momentum, cfg.controller_temperature,
                                                           cfg.depth_ramp_steps)
        self.loss_depth = self.loss_rgb = math.nan  # no history yet: equal weights

    def scale(self, step: int) -> float:
        return depth_ramp(step, self.ramp_steps)

    def weight(self) -> float:
        return balance_weight(self.loss_depth, self.loss_rgb, self.temperature)

    def update(self, loss_depth: float, loss_rgb: float) -> None:
        """Fold one optimizer step's (rank-averaged) branch losses into the running means."""
        m = self.momentum
        self.loss_depth = loss_depth if math.isnan(self.loss_depth) else m * self.loss_depth + (1 - m) * loss_depth
        self.loss_rgb = loss_rgb if math.isnan(self.loss_rgb) else m * self.loss_rgb + (1 - m) * loss_rgb

    def state_dict(self) -> dict[str, Any]:
        return {"loss_depth": self.loss_depth, "loss_rgb": self.loss_rgb}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_depth, self.loss_rgb = float(state["loss_depth"]), float(state["loss_rgb"])


def grouping(cfg: InstanceConfig) -> dict[str, float | int]:
    """Keyword arguments of :func:`sdeseg.panoptic.instances_from_outputs` (validation and exports)."""
    return {"threshold": cfg.center_threshold, "nms_kernel": cfg.nms_kernel, "top_k": cfg.top_k}


def depth_scale(controller: DepthController | None, step: int) -> float:
    """The factor on the depth maps at optimizer step ``step``: the controller's ramp, else 1."""
    return 1.0 if controller is None else controller.scale(step)


def unsupervised_terms(engine, teacher, images: torch.Tensor, feats, cfg: Config, gen: torch.Generator,
                       sigma: float, w_depth: float | None, autocast) -> tuple[dict, dict]:
    """The pseudo-label terms of one unlabeled micro-batch (images (B,3,H,W), clean) and stats.

    The teacher (RGB and depth maps ``feats``) labels the clean images; the student learns from a
    strong augmentation of them. With ``w_depth`` (the controller on) a second student pass with
    all-zero depth maps (RGB only) learns from the same targets, and the two passes' terms are
    weighted ``w_depth`` and ``1 - w_depth``; their unweighted sums are returned as stats
    ``ctrl/loss_depth`` and ``ctrl/loss_rgb`` for the controller.
    """
    inst, s = cfg.instance, cfg.semiseg
    with autocast():
        t_out = teacher(images, feats)
    ids, pstats = pseudo_instances(t_out, inst.pseudo_threshold, inst.pseudo_score, **grouping(inst))
    targets = instance_targets(ids, sigma)
    student_in = strong_augment(images, gen, jitter=s.color_jitter, blur=s.blur, hue_space=s.hue_space)
    fused = panoptic_loss(engine(student_in, feats), targets, inst, "inst/unsup", s.ignore_index).terms
    stats = {"inst/confident": pstats["confident"], "inst/pseudo_instances": pstats["instances"]}
    if w_depth is None:
        return {k: inst.unsup_weight * v for k, v in fused.items()}, stats
    blind = [torch.zeros_like(f) for f in feats]
    rgb = panoptic_loss(engine(student_in, blind), targets, inst, "inst/unsup_rgb", s.ignore_index).terms
    stats |= {"ctrl/loss_depth": sum(fused.values()).detach(), "ctrl/loss_rgb": sum(rgb.values()).detach(),
              "ctrl/w_depth": torch.tensor(w_depth)}
    terms = {k: inst.unsup_weight * w_depth * v for k, v in fused.items()}
    return terms | {k: inst.unsup_weight * (1.0 - w_depth) * v for k, v in rgb.items()}, stats


def train_step(engine, teacher, depth_net, lb, ub, cfg: Config, gen: torch.Generator, sigma: float, scale: float,
               w_depth: float | None, autocast) -> dict:
    """Forward and backward of one micro-batch; returns detached loss terms and statistics.

    ``scale`` multiplies the depth maps (the controller's ramp; 1 without it); ``w_depth`` is the
    controller's weight (None: no controller). ``engine.step()`` steps the optimizer only on the
    last micro-batch of ``runtime.grad_accum``; the caller updates teacher and controller.
    """
    inst, s = cfg.instance, cfg.semiseg
    engine.train()

    def feats_of(images: torch.Tensor):  # the frozen depth maps of the clean images
        if depth_net is None:
            return None
        with autocast():
            return depth_features(depth_net.encoder, images, scale)

    ids = lb.instance if lb.instance is not None else torch.zeros_like(lb.label)
    targets = instance_targets(ids, sigma) | {"semantic": lb.label}  # label.png is the full semantic truth
    out = engine(lb.images_aug[0], feats_of(lb.images[0]))
    terms = panoptic_loss(out, targets, inst, "inst/sup", s.ignore_index).terms
    stats: dict[str, Any] = {}
    if ub is not None:
        unsup, stats = unsupervised_terms(engine, teacher, ub.images[0], feats_of(ub.images[0]), cfg, gen, sigma,
                                          w_depth, autocast)
        terms |= unsup
    total = sum(terms.values())
    engine.backward(total)
    engine.step()
    return {k: v.detach() for k, v in terms.items()} | {"inst/total": total.detach()} | stats


def preflight(cfg: Config) -> None:
    """Everything this stage can check before a worker starts (the launcher calls it)."""
    inst, s = cfg.instance, cfg.semiseg
    if cfg.model.multitask:
        raise ConfigError("model.multitask: the instance stage trains the instance model (semantic, centre and "
                          "offset heads); set model.multitask=false")
    if s.mix != "none":
        raise ConfigError(f"semiseg.mix={s.mix}: the instance stage does not mix images (its mean teacher is "
                          "instance.mean_teacher); set semiseg.mix=none")
    if s.init_from == "contrastive":
        raise ConfigError("semiseg.init_from=contrastive: the instance stage starts from the SDE export "
                          "(semiseg.transfer), ImageNet weights or scratch")
    if inst.fusion_stages and not s.sde_checkpoint:
        raise ConfigError("instance.fusion_stages: Depth Feature Fusion needs the frozen depth network of an SDE "
                          "export; set semiseg.sde_checkpoint=<sde run dir>/export/best.pt, or "
                          "instance.fusion_stages=[]")
    semiseg.preflight(cfg)  # class count, labeled keys, the SDE export for transfer
    if inst.fusion_stages:
        read_export(s.sde_checkpoint, "sde")


def build_models(cfg: Config, ctx: StageContext):
    """The student (transferred from the SDE export when ``semiseg.transfer``) and, with fusion,
    the frozen depth network whose encoder maps it fuses."""
    s, inst = cfg.semiseg, cfg.instance
    export = read_export(s.sde_checkpoint, "sde") if s.transfer or inst.fusion_stages else None
    depth_net = None
    if inst.fusion_stages:
        depth_net, depth_net.depth_range = load_depth_model(export)
        depth_net.model_config = export["model_config"]  # both go into the exports
        depth_net.requires_grad_(False)
        depth_net.to(ctx.device)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    channels = depth_net.encoder.num_ch_enc if depth_net is not None else None
    model = build_instance_model(cfg.model, channels, inst.fusion_stages)
    if s.transfer:
        report = transfer_from_sde(model, export["depth"])
        ctx.log(0, {"transfer/loaded": len(report.loaded), "transfer/initialised": len(report.initialised)},
                kind="event")
    return model, depth_net


def heatmap_sigma(cfg: Config, keys: list[str]) -> float:
    """``instance.center_sigma``, or Panoptic-DeepLab's 8 px at 1024 rows scaled to the stored
    height of the labeled images (object sizes in pixels follow the stored resolution, not the crop)."""
    if cfg.instance.center_sigma is not None:
        return cfg.instance.center_sigma
    rows = ShardIndex.load(cfg.data.root).rows
    return center_sigma(max(int(rows[k]["height"]) for k in keys))


def run(cfg: Config, ctx: StageContext) -> StageResult:
    inst, t = cfg.instance, cfg.train
    keys = labeled_keys_for(cfg.data)
    pool = ctx.labeled_pool(keys)
    check_labels(cfg, pool)
    if pool.instance_count() == 0:
        raise DatasetError(f"none of the {len(pool)} labeled samples of {cfg.data.root} has an instance map "
                           "(instance.png); prepare the data again with the current data_prep")
    sigma = heatmap_sigma(cfg, keys)
    model, depth_net = build_models(cfg, ctx)
    teacher = EMATeacher(model, cfg.semiseg.ema_alpha_max) if inst.mean_teacher else None
    engine = ctx.build_engine(model, param_groups(model, cfg.optim))
    if teacher is not None:
        teacher.to(ctx.device)
    controller = DepthController(inst) if inst.controller else None
    gen = torch.Generator().manual_seed(t.seed * 1000 + ctx.rank + 1)
    torch.manual_seed(t.seed * 1000 + ctx.rank + 1)
    stream = ctx.train_stream(frames=(0,), labels=False) if inst.mean_teacher else None

    progress = Progress()
    state = TrainState(engine, shared={"progress": progress, "teacher": teacher, "controller": controller},
                       per_rank={"labeled": pool, "reader": stream, "generator": gen})
    ctx.restore(state)
    first_step = progress.step
    labeled_it = iter(pool)
    unlabeled_it = iter(stream) if stream is not None else None
    meter = StepMeter()
    start = time.perf_counter()
    while progress.step < t.steps:
        scale = depth_scale(controller, progress.step)
        w_depth = controller.weight() if controller is not None else None
        branch = torch.zeros(2, dtype=torch.float64)  # the controller's two losses over the micro-batches
        for _ in range(cfg.runtime.grad_accum):
            t0 = time.perf_counter()
            lb = next(labeled_it).to(ctx.device)
            ub = next(unlabeled_it).to(ctx.device) if unlabeled_it is not None else None
            data_time = time.perf_counter() - t0
            losses = train_step(engine, teacher, depth_net, lb, ub, cfg, gen, sigma, scale, w_depth, ctx.autocast)
            meter.update(losses | ({"ctrl/depth_scale": scale} if controller else {}),
                         len(lb) + (len(ub) if ub is not None else 0), data_time)
            if controller is not None:
                branch += torch.tensor([float(losses["ctrl/loss_depth"]), float(losses["ctrl/loss_rgb"])])
        if controller is not None:  # one small all-reduce: every rank's controller stays the same
            mean = ctx.all_reduce_sum(branch) / (ctx.world_size * cfg.runtime.grad_accum)
            controller.update(float(mean[0]), float(mean[1]))
        if teacher is not None:
            teacher.update(engine.module, progress.step)  # once per optimizer step
        progress.step += 1
        ctx.end_step(progress.step, meter, engine)

        validate_and_save(engine, teacher, depth_net, controller, state, cfg, ctx, start)

    return finish(engine, teacher, depth_net, controller, progress, cfg, ctx, first_step, start, len(keys))


@torch.no_grad()
def validate(model, depth_net, scale: float, cfg: Config, ctx: StageContext, prefix: str | None = None,
             split: str | None = None) -> dict[str, float]:
    """Semantic mIoU (``seg/...``), mask AP, AP50 and PQ (``inst/...``) on ``split`` (default
    ``data.val_split``), over all ranks (every rank must call this); with ``prefix`` (the
    teacher's) every key is ``<prefix>/<metric>``."""
    net = DepthGuidedInstanceNet(model, depth_net.encoder if depth_net is not None else None, scale)
    seg = SegmentationMetric(cfg.model.num_classes, cfg.semiseg.ignore_index)
    mask_ap, pq = MaskAP(), PanopticQuality(cfg.model.num_classes)
    accumulate_instances(net, ctx.val_loader(split, max_batches=0 if split else None), ctx.device,
                         grouping(cfg.instance), seg=seg, mask_ap=mask_ap, pq=pq, autocast=ctx.autocast)
    seg.confusion = ctx.all_reduce_sum(seg.confusion)
    pq.stats = ctx.all_reduce_sum(pq.stats)
    mask_ap.images = [im for part in ctx.all_gather_object(mask_ap.state()) for im in part]
    return seg_summary(seg, prefix or "seg") | instance_summary(mask_ap, pq, prefix or "inst")


def _headline(metrics: dict[str, float]) -> dict[str, float]:
    """Without the per-class entries (``.../iou/<class>``, ``.../ap/<class>``)."""
    return {k: v for k, v in metrics.items() if "/iou/" not in k and "/ap/" not in k}


def validate_and_save(engine, teacher, depth_net, controller, state: TrainState, cfg: Config, ctx: StageContext,
                      start: float) -> None:
    """After an optimizer step: when due, the ranks agree on one model, validate student and
    teacher, export the best student, report (with a checkpoint). Every rank calls this."""
    progress = state.shared["progress"]
    val_due, ckpt_due = ctx.due(progress.step)
    if not (val_due or ckpt_due):
        return
    ctx.sync_buffers(engine.module, *([teacher.model] if teacher else []))  # one model on every rank
    if val_due:
        scale = depth_scale(controller, progress.step)
        val = validate(engine.module, depth_net, scale, cfg, ctx)
        if teacher is not None:
            val |= _headline(validate(teacher.model, depth_net, scale, cfg, ctx, "teacher"))
        if controller is not None:
            val |= {"ctrl/depth_scale": scale, "ctrl/w_depth": controller.weight()}
        progress.val = val | {"time/elapsed_s": time.perf_counter() - start}
        ctx.log(progress.step, progress.val, kind="val")
        score = progress.val[BEST_METRIC[cfg.instance.export_best]]
        if progress.improved(score, higher_is_better=True):
            ctx.export("best", export_payload(engine.module, depth_net, scale, cfg, progress.step, progress.val))
    ctx.report(progress.step, _headline(progress.val) if val_due else {}, state if ckpt_due else None)


def export_payload(model, depth_net, scale: float, cfg: Config, step: int, metrics: dict) -> dict:
    """An ``instance`` export: the student, its instance settings and, when it fuses depth, the
    frozen depth network (``sdeseg.exports.load_model`` rebuilds the inference network)."""
    payload = {
        "kind": "instance",
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": cfg.to_dict()["model"],
        "instance": {"fusion_stages": list(cfg.instance.fusion_stages), "depth_scale": scale,
                     "grouping": grouping(cfg.instance)},
        "step": step,
        "metrics": {k: float(v) for k, v in metrics.items()},
    }
    if depth_net is not None:
        payload |= {"depth": {k: v.detach().cpu() for k, v in depth_net.state_dict().items()},
                    "depth_model_config": depth_net.model_config, "depth_range": depth_net.depth_range.to_dict()}
    return payload


def finish(engine, teacher, depth_net, controller, progress: Progress, cfg: Config, ctx: StageContext,
           first_step: int, start: float, labeled: int) -> StageResult:
    """The end of a run: the held-out test split, the last export, the summary."""
    wall = time.perf_counter() - start
    scale = depth_scale(controller, progress.step)
    test = ctx.test_metrics(lambda split: validate(engine.module, depth_net, scale, cfg, ctx, split=split))
    ctx.export("last", export_payload(engine.module, depth_net, scale, cfg, progress.step, progress.val))
    summary = progress.val | test | {
        "steps": progress.step, "steps_this_run": progress.step - first_step, "wall_time_s": wall,
        "labeled_samples": labeled,
    } | ({"teacher/updates": teacher.updates} if teacher is not None else {})
    return StageResult(summary=summary, exports=ctx.exports())
