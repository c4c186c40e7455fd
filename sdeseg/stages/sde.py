"""Stage 1: self-supervised monocular depth (Monodepth2-style) from frame triplets.

Per step: the depth network predicts multi-scale disparity of frame t, the pose
network the motion t -> t±1; the neighbours are inverse-warped into frame t and the
photometric error (SSIM + L1, per-pixel minimum over sources, auto-masking) plus
edge-aware smoothness is minimised. Validation compares median-scaled depth with
the ground truth where the data has it (synthetic), next to the constant
per-image-median baseline. The depth model is exported as ``export/last.pt`` and
``export/best.pt`` for the later stages (transfer, pseudo-depth for DepthMix,
data selection).
"""

from __future__ import annotations

import math
import time

import torch

from sdeseg.config import Config
from sdeseg.data.reader import ShardStream, ValLoader
from sdeseg.losses.depth import sde_loss
from sdeseg.metrics import DepthMetric
from sdeseg.models.depth_decoder import disp_to_depth
from sdeseg.models.sde import build_sde_model
from sdeseg.optim import param_groups
from sdeseg.runtime.checkpoint import rng_state, set_rng_state
from sdeseg.runtime.context import StageContext, StageResult
from sdeseg.runtime.telemetry import StepMeter

SOURCE_FRAMES = (-1, 1)


def train_step(engine, batch, cfg: Config) -> dict[str, torch.Tensor]:
    """One optimizer step on one batch; returns detached losses. No I/O here."""
    engine.train()
    outputs = engine(batch.images_aug)
    losses = sde_loss(batch.images, outputs, batch.K, batch.inv_K, cfg.depth_loss, frame_ids=SOURCE_FRAMES)
    engine.backward(losses["depth/total"])
    engine.step()
    return {k: v.detach() for k, v in losses.items()}


@torch.no_grad()
def predict_depth(model, image: torch.Tensor, cfg: Config) -> torch.Tensor:
    """(B,3,H,W) image in [0,1] -> (B,1,H,W) depth (scale-ambiguous, from the finest disparity)."""
    disp = model.depth(image)[("disp", 0)]
    dl = cfg.depth_loss
    return disp_to_depth(disp, dl.min_depth, dl.max_depth, dl.disp_mapping)[1]


@torch.no_grad()
def validate(model, cfg: Config, ctx: StageContext) -> dict[str, float]:
    """Median-scaled depth errors of the model and of a constant prediction, over all ranks."""
    loader = ValLoader(cfg.data.root, cfg.data.val_split, batch_size=cfg.data.val_batch_size, rank=ctx.rank,
                       world_size=ctx.world_size, domain=cfg.data.domain, max_batches=cfg.train.val_batches)
    was_training = model.training
    model.eval()
    ours, const = DepthMetric(), DepthMetric()
    for batch in loader:
        if batch.depth is None:
            continue
        batch = batch.to(ctx.device)
        pred = predict_depth(model, batch.images[0], cfg)
        ours.update(pred.cpu(), batch.depth.cpu())
        const.update(torch.ones_like(batch.depth).cpu(), batch.depth.cpu())
    model.train(was_training)
    ours.sums = ctx.all_reduce_sum(ours.state())  # one all-reduce per metric per validation
    const.sums = ctx.all_reduce_sum(const.state())
    metrics = {f"depth/{k}": v for k, v in ours.compute().items()}
    base = const.compute()
    metrics["depth/abs_rel_baseline"] = base["abs_rel"]
    metrics["depth/a1_baseline"] = base["a1"]
    metrics["depth/rmse_baseline"] = base["rmse"]
    if not math.isnan(metrics["depth/abs_rel"]):
        metrics["depth/abs_rel_ratio"] = metrics["depth/abs_rel"] / base["abs_rel"]
    return metrics


def export_payload(model, cfg: Config, step: int, metrics: dict) -> dict:
    """What later stages load (with weights_only=True): the depth network and its config."""
    return {
        "kind": "sde",
        "depth": {k: v.detach().cpu() for k, v in model.depth.state_dict().items()},
        "model_config": cfg.to_dict()["model"],
        "depth_range": [cfg.depth_loss.min_depth, cfg.depth_loss.max_depth, cfg.depth_loss.disp_mapping],
        "step": step,
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


def run(cfg: Config, ctx: StageContext) -> StageResult:
    # identical initial weights on every rank; per-rank randomness is seeded after
    torch.manual_seed(cfg.train.seed)
    model = build_sde_model(cfg.model)  # loads ImageNet weights when model.pretrained is set
    engine = ctx.build_engine(model, param_groups(model, cfg.optim))
    torch.manual_seed(cfg.train.seed * 1000 + ctx.rank + 1)

    stream = ShardStream(
        cfg.data.root, cfg.data.train_split, domain=cfg.data.domain, batch_size=cfg.data.batch_size,
        crop=cfg.data.size, augment=cfg.data.augment, rank=ctx.rank, world_size=ctx.world_size,
        num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.train.seed,
        frames=(-1, 0, 1), max_corrupt_fraction=cfg.data.max_corrupt_fraction,
    )
    step, best, val = 0, math.inf, {}
    restored = ctx.restore(engine)
    if restored is not None:
        client, rank_state = restored
        step, best, val = client["step"], client["best"], client["val"]
        stream.load_state_dict(rank_state["reader"])
        set_rng_state(rank_state["rng"])
        ctx.log(step, {"event/resumed": 1.0}, kind="event")

    batches = iter(stream)
    meter = StepMeter()
    start = time.perf_counter()
    steps_run = 0
    t = cfg.train
    while step < t.steps:
        for _ in range(cfg.runtime.grad_accum):  # DeepSpeed steps the optimizer on the last one
            t0 = time.perf_counter()
            batch = next(batches).to(ctx.device)
            data_time = time.perf_counter() - t0
            losses = train_step(engine, batch, cfg)
            meter.update(losses, len(batch), data_time)
            if t.log_keys:
                ctx.log(step + 1, {"keys": list(batch.keys)}, kind="keys")
        step += 1
        steps_run += 1
        ctx.maybe_inject_fault(step)

        ctx.log_progress(step, meter, engine)
        val_due, ckpt_due = ctx.due(step)
        if val_due:
            val = validate(engine.module, cfg, ctx)
            val["time/elapsed_s"] = time.perf_counter() - start
            ctx.log(step, val, kind="val")
            score = val.get(t.export_best, math.nan)
            if not math.isnan(score) and score < best:
                best = score
                ctx.export("best", export_payload(engine.module, cfg, step, val))
        if val_due or ckpt_due:
            ckpt = None
            if ckpt_due:
                client = {"step": step, "best": best, "val": val}
                rank_state = {"reader": stream.state_dict(), "rng": rng_state()}
                ckpt = (engine, client, rank_state)
            ctx.report(step, val if val_due else {}, ckpt)

    last = ctx.export("last", export_payload(engine.module, cfg, step, val))
    wall = time.perf_counter() - start
    summary = dict(val)
    summary.update({"steps": step, "steps_this_run": steps_run, "wall_time_s": wall,
                    "samples_per_s": steps_run * cfg.runtime.grad_accum * cfg.data.batch_size * ctx.world_size
                    / max(wall, 1e-9)})
    exports = {"last": last}
    if not math.isinf(best):
        exports["best"] = str(ctx.run_dir / "export" / "best.pt")
    return StageResult(summary=summary, exports=exports)
