"""Depth-region copy-paste contrastive pretraining (seed 003: Zeng et al., CPCDR) on our depth.

No labels are used in training. Per optimizer step (``runtime.grad_accum`` micro-batches, each):
an unlabeled batch of the training split is one *group*. Its coherent depth regions and SDE
depth, computed once per image as a derived dataset (``contrastive.regions_root``, made by
``sdeseg infer --model <SDE export> --outputs depth,regions``), are joined by key by the reader,
cropped and flipped as it cropped and flipped the images (``Batch.derived``). In the data path,
on the CPU, two views are built from the group (:func:`sdeseg.copy_paste.copy_paste_views`):
every region pasted ``copies[0]`` times into the group's images for view 1 and ``copies[1]``
times for view 2, with distance scaling, depth ordering, soft edges and per-paste colour jitter,
then each view gets its own colour jitter. The network (encoder, the segmentation decoder's body,
a projection head, learnable prototypes; :class:`sdeseg.models.ContrastiveModel`) projects both
views in one pass and the SwAV swapped-prediction loss with Sinkhorn codes averaged per region
and per source pixel is minimised (:func:`sdeseg.losses.contrastive.copy_paste_contrastive_loss`).

Validation is the unsupervised segmentation evaluation (:mod:`sdeseg.unsup_eval`): the
prototypes are clustered into ``model.num_classes`` clusters, each pixel takes its nearest
prototype's cluster, and clusters are matched to classes by the Hungarian method on the
evaluated split (``unsup/miou``, ``unsup/acc``, ``unsup/iou/<class>``); the labels are read
there only. The best export (by ``unsup/miou`` on ``val``) and the last one (kind
``"contrastive"``) hold the whole network; its encoder and decoder body initialise the
semi-supervised stage (``semiseg.init_from=contrastive``). ``contrastive.init_checkpoint``
starts the network itself from an SDE export ("contrastive started from SDE").
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from sdeseg.config import Config, ConfigError
from sdeseg.copy_paste import copy_paste_views
from sdeseg.data.classes import class_names
from sdeseg.data.derived import DerivedDataset
from sdeseg.data.manifest import DatasetError
from sdeseg.data.shardio import ShardIndex
from sdeseg.evaluate import seg_summary
from sdeseg.exports import read_export, read_init_export
from sdeseg.infer import DEPTH_MEMBER, REGIONS_MEMBER
from sdeseg.losses.contrastive import copy_paste_contrastive_loss
from sdeseg.mixing import strong_augment
from sdeseg.models import build_contrastive_model, transfer_from_sde
from sdeseg.optim import param_groups
from sdeseg.runtime import Progress, StageContext, StageResult, StepMeter, TrainState
from sdeseg.unsup_eval import ClusterMatchMetric, assign_clusters, cluster_prototypes

# ----------------------------------------------------------------------------- checks before workers start


def preflight(cfg: Config) -> None:
    """Everything this stage can check before a worker starts (the launcher calls it): the class
    count, the region dataset (kind, members, every training key at the images' size) and the
    SDE export it may start from."""
    c, d = cfg.contrastive, cfg.data
    n = len(class_names())
    if cfg.model.num_classes != n:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the evaluation uses the {n} Cityscapes "
                          "train ids")
    if cfg.model.multitask:
        raise ConfigError("model.multitask: the contrastive stage trains one encoder-decoder (set it false)")
    if not c.regions_root:
        raise ConfigError("contrastive.regions_root: set it to a derived dataset of regions and depth "
                          "(sdeseg infer --model <SDE export> --data DATA --out DIR --outputs depth,regions)")
    try:
        regions = DerivedDataset(c.regions_root)
    except (DatasetError, FileNotFoundError) as e:
        raise ConfigError(f"contrastive.regions_root: {e}") from e
    settings = regions.info.get("settings", {})
    outputs = settings.get("outputs", [])
    if "regions" not in outputs or "depth" not in outputs:
        raise ConfigError(f"contrastive.regions_root: {c.regions_root} holds {outputs}; the stage needs depth and "
                          "regions (sdeseg infer ... --outputs depth,regions)")
    if settings.get("regions") != c.regions:
        raise ConfigError(f"contrastive.regions: {c.regions!r} but {c.regions_root} holds {settings.get('regions')!r} "
                          f"regions (make it with --regions {c.regions}, or set contrastive.regions)")
    index = ShardIndex.load(d.root)
    selected = index.select(d.train_split, d.domain)
    train = [index.rows[index.shard_keys[shard][i]] for shard, pos in selected.items() for i in pos]
    try:
        regions.check_covers(train, "regions", of="training samples")
    except DatasetError as e:
        raise ConfigError(f"contrastive.regions_root: {e}") from e
    if c.init_checkpoint:
        read_init_export(c.init_checkpoint, "sde", cfg.model, "contrastive.init_checkpoint")


# ----------------------------------------------------------------------------- the pieces of a step


def build_model(cfg: Config, ctx: StageContext):
    """The network, equal on every rank; encoder and decoder body from the SDE export when
    ``contrastive.init_checkpoint`` is set."""
    c = cfg.contrastive
    torch.manual_seed(cfg.train.seed)  # identical initial weights (and prototypes) on every rank
    model = build_contrastive_model(cfg.model, c.proj_dim, c.head_channels, c.prototypes)
    if c.init_checkpoint:
        report = transfer_from_sde(model, read_export(c.init_checkpoint, "sde")["depth"])
        ctx.log(0, {"transfer/loaded": len(report.loaded), "transfer/initialised": len(report.initialised)},
                kind="event")
    return model


def group_maps(ub) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored SDE depth (B,h,w) float32 and region ids (B,h,w) int64 of an unlabeled batch
    of :func:`group_stream` (joined by its reader, cropped and flipped like its images)."""
    return ub.derived["depth"].float(), ub.derived["regions"].long()


def group_stream(cfg: Config, ctx: StageContext):
    """This rank's endless unlabeled batches with their stored depth and regions joined."""
    root = cfg.contrastive.regions_root
    return ctx.train_stream(frames=(0,), labels=False, as_float=True,  # views are made on the host
                            derived={"depth": (root, DEPTH_MEMBER), "regions": (root, REGIONS_MEMBER)})


def make_views(images: torch.Tensor, depth: torch.Tensor, regions: torch.Tensor, cfg: Config,
               gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The two copy-paste views of one group (B,3,h,w): per view ``(image (B,3,h,w), region ids
    (B,h,w), source-pixel ids (B,h,w))``; ids are shared by the views, so the copies of a region
    or of a source pixel can be matched across them."""
    c = cfg.contrastive
    views = copy_paste_views(images, depth, regions, gen, copies=c.copies, scale_range=c.scale_range,
                             depth_order=c.depth_order)
    return [(strong_augment(v.image, gen, jitter=c.view_jitter, blur=c.view_blur), v.region, v.pixel_ids())
            for v in views]


def train_step(engine, views, cfg: Config, gen: torch.Generator) -> dict:
    """Forward (both views in one batch) and backward of one micro-batch; returns detached loss
    terms and statistics. ``engine.step()`` steps the optimizer only on the last micro-batch of
    ``runtime.grad_accum``. The prototypes are the model's parameter; the loss normalises them."""
    c = cfg.contrastive
    engine.train()
    (img_a, region_a, pixel_a), (img_b, region_b, pixel_b) = views
    proj_a, proj_b = engine(torch.cat([img_a, img_b]))[("proj", 0)].float().chunk(2)
    terms, stats = copy_paste_contrastive_loss(
        proj_a, proj_b, region_a, region_b, pixel_a, pixel_b, engine.module.prototypes, gen,
        pixel_weight=c.pixel_weight, region_weight=c.region_weight, pixel_points=c.pixel_points,
        region_points=c.region_points, temperature=c.temperature, eps=c.sinkhorn_eps,
        iterations=c.sinkhorn_iterations, swapped=c.swapped)
    total = sum(terms.values())
    engine.backward(total)
    engine.step()
    return {k: v.detach() for k, v in terms.items()} | {"contrast/total": total.detach()} | \
        {k: v.float() for k, v in stats.items()}


@torch.no_grad()
def validate(model, cfg: Config, ctx: StageContext, split: str | None = None) -> dict[str, float]:
    """Unsupervised segmentation on ``split`` (default ``data.val_split``) over all ranks (every
    rank must call this): ``unsup/miou``, ``unsup/acc``, ``unsup/iou/<class>`` after matching the
    prototype clusters to the classes on this split."""
    num_classes = cfg.model.num_classes
    protos = model.prototypes.detach().float()
    proto_cluster = cluster_prototypes(protos, num_classes).to(ctx.device)
    metric = ClusterMatchMetric(num_classes, num_classes, cfg.semiseg.ignore_index)
    was_training = model.training
    model.eval()
    for batch in ctx.val_loader(split, max_batches=0 if split else None):
        if batch.label is None:
            continue
        batch = batch.to(ctx.device)
        with ctx.autocast():
            proj = model(batch.images[0])[("proj", 0)]
        clusters = assign_clusters(proj.float(), protos.to(ctx.device), proto_cluster)
        if clusters.shape[-2:] != batch.label.shape[-2:]:
            clusters = F.interpolate(clusters[:, None].float(), size=batch.label.shape[-2:], mode="nearest")[:, 0]
        metric.update(clusters.long(), batch.label)
    model.train(was_training)
    metric.confusion = ctx.all_reduce_sum(metric.confusion)
    return seg_summary(metric, "unsup")


def export_payload(model, cfg: Config, step: int, metrics: dict) -> dict:
    """The whole network (``model``: encoder, decoder body and head, prototypes), its config and
    the pretraining settings; loads with ``weights_only=True``."""
    c = cfg.contrastive
    return {
        "kind": "contrastive",
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": cfg.to_dict()["model"],
        "contrastive": {"proj_dim": c.proj_dim, "head_channels": c.head_channels, "prototypes": c.prototypes,
                        "regions": c.regions, "depth_order": c.depth_order,
                        "init_checkpoint": c.init_checkpoint},
        "step": step,
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


# ----------------------------------------------------------------------------- the loop


def run(cfg: Config, ctx: StageContext) -> StageResult:
    t = cfg.train
    model = build_model(cfg, ctx)
    engine = ctx.build_engine(model, param_groups(model, cfg.optim))
    gen = torch.Generator().manual_seed(t.seed * 1000 + ctx.rank + 1)  # pastes, view jitter, sampled points
    torch.manual_seed(t.seed * 1000 + ctx.rank + 1)
    stream = group_stream(cfg, ctx)

    progress = Progress()
    state = TrainState(engine, shared={"progress": progress}, per_rank={"reader": stream, "generator": gen})
    ctx.restore(state)
    first_step = progress.step
    batches = iter(stream)
    meter = StepMeter()
    start = time.perf_counter()
    while progress.step < t.steps:
        for _ in range(cfg.runtime.grad_accum):
            t0 = time.perf_counter()
            ub = next(batches)
            depth, region_ids = group_maps(ub)
            views = make_views(ub.images[0], depth, region_ids, cfg, gen)  # the CPU builds views, as a data path
            views = [tuple(x.to(ctx.device) for x in view) for view in views]
            data_time = time.perf_counter() - t0
            losses = train_step(engine, views, cfg, gen)
            meter.update(losses, len(ub), data_time)
            if t.log_keys:
                ctx.log(progress.step + 1, {"keys": list(ub.keys)}, kind="keys")
        progress.step += 1
        ctx.end_step(progress.step, meter, engine)

        val_due, ckpt_due = ctx.due(progress.step)
        if not (val_due or ckpt_due):
            continue
        ctx.sync_buffers(engine.module)  # every rank validates, exports and saves one model
        if val_due:
            progress.val = validate(engine.module, cfg, ctx) | {"time/elapsed_s": time.perf_counter() - start}
            ctx.log(progress.step, progress.val, kind="val")
            if progress.improved(progress.val["unsup/miou"], higher_is_better=True):
                ctx.export("best", export_payload(engine.module, cfg, progress.step, progress.val))
        metrics = {k: v for k, v in progress.val.items() if "/iou/" not in k} if val_due else {}
        ctx.report(progress.step, metrics, state if ckpt_due else None)

    wall = time.perf_counter() - start
    test = ctx.test_metrics(lambda split: validate(engine.module, cfg, ctx, split))
    ctx.export("last", export_payload(engine.module, cfg, progress.step, progress.val))
    steps_run = progress.step - first_step
    summary = progress.val | test | {
        "steps": progress.step, "steps_this_run": steps_run, "wall_time_s": wall,
        "samples_per_s": steps_run * cfg.runtime.grad_accum * cfg.data.batch_size * ctx.world_size / max(wall, 1e-9),
    }
    return StageResult(summary=summary, exports=ctx.exports())
