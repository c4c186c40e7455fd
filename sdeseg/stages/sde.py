"""Stage 1: self-supervised monocular depth (Monodepth2-style) from frame triplets.

Per optimizer step (``runtime.grad_accum`` micro-batches): the depth network predicts
multi-scale disparity of frame t, the pose network the motion t -> t±1; the neighbours
are inverse-warped into frame t and the photometric error (SSIM + L1, per-pixel minimum
over sources, auto-masking) plus edge-aware smoothness (plus, optionally, the distance
to a frozen ImageNet encoder's features) is minimised. Validation compares
median-scaled depth with the ground truth where the data has it (synthetic), next to the
constant per-image-median baseline. The depth and pose networks are exported as
``export/last.pt`` and ``export/best.pt`` for the later stages (transfer, the multi-task
pose net, pseudo-depth for DepthMix, data selection).
"""

from __future__ import annotations

import math
import time

import torch

from sdeseg.config import Config
from sdeseg.evaluate import accumulate, depth_summary
from sdeseg.losses.depth import sde_loss
from sdeseg.metrics import DepthMetric
from sdeseg.models import DepthRange, build_sde_model, frozen_imagenet_encoder
from sdeseg.models.resnet import resnet_depth
from sdeseg.optim import param_groups
from sdeseg.runtime import Progress, StageContext, StageResult, StepMeter, TrainState

SOURCE_FRAMES = (-1, 1)


def train_step(engine, batch, cfg: Config, imagenet=None) -> dict[str, torch.Tensor]:
    """Forward and backward of one micro-batch; returns detached loss terms. No I/O here.

    ``engine.step()`` steps the optimizer and LR schedule only on the last micro-batch of
    ``runtime.grad_accum`` (DeepSpeed counts them); the engine's forward runs in
    ``runtime.precision`` (autocast), the loss in float32.
    """
    engine.train()
    outputs = engine(batch.images_aug)
    terms, _ = sde_loss(batch.images, outputs, batch.K, batch.inv_K, cfg.depth_loss, frame_ids=SOURCE_FRAMES,
                        imagenet_encoder=imagenet, encoder_input=batch.images_aug[0])
    engine.backward(terms["depth/total"])
    engine.step()
    return {k: v.detach() for k, v in terms.items()}


@torch.no_grad()
def validate(model, cfg: Config, ctx: StageContext, split: str | None = None) -> dict[str, float]:
    """Median-scaled depth errors of the model and of a constant prediction on ``split``
    (default ``data.val_split``), over all ranks (every rank must call this)."""
    ours, const = DepthMetric(), DepthMetric()
    accumulate(model, ctx.val_loader(split, max_batches=0 if split else None), ctx.device, depth=(ours, const),
               depth_range=DepthRange.from_config(cfg.depth_loss), autocast=ctx.autocast)
    ours.sums = ctx.all_reduce_sum(ours.state())  # one all-reduce per metric per validation
    const.sums = ctx.all_reduce_sum(const.state())
    return depth_summary(ours, const)


def export_payload(model, cfg: Config, step: int, metrics: dict) -> dict:
    """What later stages load (with weights_only=True): depth and pose networks, their config
    and the :class:`DepthRange` the disparity heads were trained with."""
    return {
        "kind": "sde",
        "depth": {k: v.detach().cpu() for k, v in model.depth.state_dict().items()},
        "pose": {k: v.detach().cpu() for k, v in model.pose.state_dict().items()},
        "model_config": cfg.to_dict()["model"],
        "depth_range": DepthRange.from_config(cfg.depth_loss).to_dict(),
        "step": step,
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


def run(cfg: Config, ctx: StageContext) -> StageResult:
    t = cfg.train
    # identical initial weights on every rank; per-rank randomness is seeded after
    torch.manual_seed(t.seed)
    model = build_sde_model(cfg.model)  # loads ImageNet weights when model.pretrained is set
    engine = ctx.build_engine(model, param_groups(model, cfg.optim))
    imagenet = None
    if cfg.depth_loss.feature_distance > 0:  # the paper's second SDE phase: stay close to ImageNet features
        m = cfg.model
        imagenet = frozen_imagenet_encoder(resnet_depth(m.encoder), m.pretrained, m.dilate_last, m.width)
        imagenet.to(ctx.device)
    torch.manual_seed(t.seed * 1000 + ctx.rank + 1)
    stream = ctx.train_stream(frames=(-1, 0, 1))

    progress = Progress()
    state = TrainState(engine, shared={"progress": progress}, per_rank={"reader": stream})
    ctx.restore(state)
    first_step = progress.step
    batches = iter(stream)
    meter = StepMeter()
    start = time.perf_counter()
    while progress.step < t.steps:
        for _ in range(cfg.runtime.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches).to(ctx.device)
            data_time = time.perf_counter() - t0
            losses = train_step(engine, batch, cfg, imagenet)
            meter.update(losses, len(batch), data_time)
            if t.log_keys:
                ctx.log(progress.step + 1, {"keys": list(batch.keys)}, kind="keys")
        progress.step += 1
        ctx.end_step(progress.step, meter, engine)

        val_due, ckpt_due = ctx.due(progress.step)
        if not (val_due or ckpt_due):
            continue
        ctx.sync_buffers(engine.module)  # every rank validates, exports and saves one model
        if val_due:
            progress.val = validate(engine.module, cfg, ctx) | {"time/elapsed_s": time.perf_counter() - start}
            ctx.log(progress.step, progress.val, kind="val")
            if progress.improved(progress.val.get(t.export_best, math.nan), higher_is_better=False):
                ctx.export("best", export_payload(engine.module, cfg, progress.step, progress.val))
        ctx.report(progress.step, progress.val if val_due else {}, state if ckpt_due else None)

    wall = time.perf_counter() - start
    test = ctx.test_metrics(lambda split: validate(engine.module, cfg, ctx, split))
    ctx.export("last", export_payload(engine.module, cfg, progress.step, progress.val))
    steps_run = progress.step - first_step
    summary = progress.val | test | {
        "steps": progress.step, "steps_this_run": steps_run, "wall_time_s": wall,
        "samples_per_s": steps_run * cfg.runtime.grad_accum * cfg.data.batch_size * ctx.world_size / max(wall, 1e-9),
    }
    return StageResult(summary=summary, exports=ctx.exports())
