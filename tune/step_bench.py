"""Step time of the SDE and semi-supervised stages in fp32 and bf16, in one process.

    python -m tune.step_bench --data demo_out/data/synthetic --sde-export demo_out/runs/sde/export/best.pt

Builds each stage's model and DeepSpeed engine (in-process world of one, the demo presets,
``runtime.torch_threads`` threads) and times the stage's own ``train_step`` on the same
batches, alternating the two precisions in rounds so that machine noise hits both alike.
Prints a table: median seconds per optimizer step and the bf16/fp32 ratio. This is the
measurement behind the presets' choice of ``runtime.precision`` (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _engines(preset: str, overrides: list[str], run_root: Path, precisions: list[str]):
    """(cfg, ctx, engine, extra) per precision for ``preset``; extra holds the stage's other parts."""
    from sdeseg.config import load_config
    from sdeseg.models import EMATeacher, build_sde_model
    from sdeseg.optim import param_groups
    from sdeseg.runtime import StageContext
    from sdeseg.stages import semiseg

    out = {}
    for precision in precisions:
        cfg = load_config(preset, overrides + [f"runtime.precision={precision}", "runtime.num_workers=1"])
        ctx = StageContext(cfg, run_root / f"{preset}_{precision}", 0, 1, torch.device("cpu"))
        torch.manual_seed(0)
        if cfg.stage == "sde":
            model, extra = build_sde_model(cfg.model), {}
        else:
            model, depth_net = semiseg.build_models(cfg, ctx)
            extra = {"teacher": EMATeacher(model), "depth_net": depth_net}
        engine = ctx.build_engine(model, param_groups(model, cfg.optim))
        out[precision] = (cfg, ctx, engine, extra)
    return out


def bench(preset: str, overrides: list[str], steps: int, rounds: int,
          precisions: list[str] = ("fp32", "bf16")) -> dict[str, float]:
    """Median seconds per optimizer step of ``preset``'s train_step, per precision."""
    from sdeseg.stages import sde, semiseg

    with tempfile.TemporaryDirectory() as tmp:
        engines = _engines(preset, overrides, Path(tmp), list(precisions))
        cfg, ctx, _, _ = engines[precisions[0]]
        stream = iter(ctx.train_stream(frames=(-1, 0, 1) if cfg.stage == "sde" else (0,), num_workers=0, as_float=True))
        batches = [next(stream) for _ in range(steps)]
        labeled = None
        if cfg.stage == "semiseg":
            from sdeseg.data.labeled import labeled_keys_for

            pool = iter(ctx.labeled_pool(labeled_keys_for(cfg.data)))
            labeled = [next(pool) for _ in range(steps)]
        times: dict[str, list[float]] = {p: [] for p in precisions}
        for r in range(rounds + 1):  # round 0 warms up (allocator, first-call overheads)
            for precision, (c, cx, engine, extra) in engines.items():
                gen = torch.Generator().manual_seed(0)
                t0 = time.perf_counter()
                for i in range(steps):
                    if c.stage == "sde":
                        sde.train_step(engine, batches[i], c)
                    else:
                        semiseg.train_step(engine, extra["teacher"], extra["depth_net"], labeled[i], batches[i], c,
                                           gen, i, cx.autocast)
                if r:
                    times[precision].append((time.perf_counter() - t0) / steps)
        for _, cx, _, _ in engines.values():
            cx.close()
    return {p: statistics.median(v) for p, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="synthetic dataset root")
    p.add_argument("--sde-export", required=True, help="SDE export for the semi-supervised stage")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per round and precision")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (runtime.torch_threads)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--stages", nargs="+", default=["sde", "semiseg"], choices=["sde", "semiseg"])
    args = p.parse_args(argv)
    from sdeseg.runtime.engine import init_single_process_group

    torch.set_num_threads(args.threads)
    init_single_process_group()
    rows = {"sde": ("SDE (demo_sde)", "demo_sde", [f"data.root={args.data}"]),
            "semiseg": ("semi-supervised DepthMix (demo_semiseg)", "demo_semiseg",
                        [f"data.root={args.data}", f"semiseg.sde_checkpoint={args.sde_export}"])}
    precisions = args.precisions
    both = len(precisions) == 2
    print("| stage | " + " | ".join(f"{p} s/step" for p in precisions) + (" | bf16 / fp32 |" if both else " |"))
    print("|---" * (len(precisions) + 1 + both) + "|")
    for stage in args.stages:
        name, preset, overrides = rows[stage]
        t = bench(preset, overrides, args.steps, args.rounds, precisions)
        cells = [f"{t[p]:.3f}" for p in precisions] + ([f"{t['bf16'] / t['fp32']:.2f}"] if both else [])
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
