"""Single-process probe of how fast the SDE stage learns depth (no Ray, no DeepSpeed).

    python -m tune.sde_probe --steps 600 depth_loss.disp_mapping=inverse

Trains the SDE model of a preset (``demo_sde`` by default, with dotted overrides) with
plain Adam on one thread and prints, every ``--every`` steps, the median-scaled abs_rel
as a fraction of the constant per-image-median baseline, and a1. ``--gt-pose``
substitutes the ground-truth camera motion for the pose net's, which separates "depth
cannot learn" from "pose is not learned yet". This is how the presets' SDE settings
were chosen (BENCHMARKS.md, "What made depth learn"); the stage itself runs on the
distributed runtime.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sdeseg.config import load_config
from sdeseg.losses.depth import sde_loss
from sdeseg.models import build_sde_model
from sdeseg.optim import build_optimizer, param_groups
from sdeseg.runtime import StageContext
from sdeseg.stages.sde import SOURCE_FRAMES, validate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo_sde")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--gt-pose", action="store_true", help="use the ground-truth pose instead of the pose net's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, list(args.overrides))
    torch.manual_seed(cfg.train.seed)
    model = build_sde_model(cfg.model)
    opt = build_optimizer(param_groups(model, cfg.optim), cfg.optim)
    # a world of one without a process group: validate() only reduces when world_size > 1
    ctx = StageContext(cfg, Path(tempfile.mkdtemp(prefix="sde_probe_")), 0, 1, torch.device("cpu"))
    stream = ctx.train_stream(frames=(-1, 0, 1), num_workers=0, as_float=True)
    print("| step | wall s | photometric loss | abs_rel / baseline | a1 (baseline) |\n|---|---|---|---|---|")
    start = time.perf_counter()
    for step, batch in enumerate(stream, 1):
        outputs = model(batch.images_aug)
        if args.gt_pose:
            outputs.update({("T", f): batch.T[f] for f in SOURCE_FRAMES})
        losses = sde_loss(batch.images, outputs, batch.K, batch.inv_K, cfg.depth_loss, frame_ids=SOURCE_FRAMES).terms
        opt.zero_grad()
        losses["depth/total"].backward()
        opt.step()
        if step % args.every == 0 or step == args.steps:
            val = validate(model, cfg, ctx)
            print(f"| {step} | {time.perf_counter() - start:.0f} | {losses['depth/photo'].item():.4f} | "
                  f"{val['depth/abs_rel_ratio']:.3f} | {val['depth/a1']:.3f} ({val['depth/a1_baseline']:.3f}) |",
                  flush=True)
        if step == args.steps:
            return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
