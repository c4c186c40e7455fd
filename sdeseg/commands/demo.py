"""``sdeseg demo``: the whole method on the embedded synthetic dataset, on a local Ray cluster.

synthetic data (generated if absent) -> SDE stage -> semi-supervised stage with DepthMix
(initialised from the SDE model, DepthMix masks from its pseudo-depth) -> evaluation ->
``<out>/report/report.md`` with figures, and ``<out>/summary.json`` with flat keys.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output directory (data, runs, report, summary.json)")
    p.add_argument("--data", default=None, help="synthetic shard directory (default <out>/data/synthetic)")
    p.add_argument("--num-train", type=int, default=600, help="synthetic training triplets to generate")
    p.add_argument("--num-val", type=int, default=100, help="synthetic validation samples to generate")
    p.add_argument("--num-test", type=int, default=100, help="synthetic held-out test samples to generate")
    p.add_argument("--sde-steps", type=int, default=None, help="override the SDE stage's steps")
    p.add_argument("--seg-steps", type=int, default=None, help="override the semi-supervised stage's steps")
    p.add_argument("--baseline", action="store_true",
                   help="also train the supervised-only baseline (adds its time) for seg/miou_supervised_baseline")
    p.add_argument("--in-process", action="store_true", help="run stages in this process instead of on Ray")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to both stages, e.g. runtime.num_workers=1")


def _stage_overrides(args, data_root: str, extra: list[str]) -> list[str]:
    out = [f"data.root={data_root}"] + list(extra)
    if args.in_process:
        out += ["runtime.in_process=true", "runtime.num_workers=1"]
    return out + list(args.overrides)


def run(args: argparse.Namespace) -> int:
    from data_prep.synthetic import generate
    from sdeseg.config import load_config
    from sdeseg.data.manifest import MANIFEST_NAME
    from sdeseg.launch import run_stage
    from sdeseg.report import print_summary_table, write_report

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data).resolve() if args.data else out / "data" / "synthetic"
    times: dict[str, float] = {}
    start = time.perf_counter()

    t0 = time.perf_counter()
    if not (data_root / MANIFEST_NAME).exists():
        print(f"[demo] generating the synthetic dataset into {data_root}")
        generate(str(data_root), num_train=args.num_train, num_val=args.num_val, num_test=args.num_test)
    times["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sde_over = [f"train.steps={args.sde_steps}"] if args.sde_steps else []
    sde_cfg = load_config("demo_pipeline_sde", _stage_overrides(args, str(data_root), sde_over))
    print("[demo] stage 1/2: self-supervised depth")
    sde = run_stage(sde_cfg, out / "runs" / "sde")
    times["sde"] = time.perf_counter() - t0
    sde_export = sde["exports"].get("best") or sde["exports"]["last"]

    t0 = time.perf_counter()
    seg_over = [f"semiseg.sde_checkpoint={sde_export}"]
    seg_over += [f"train.steps={args.seg_steps}"] if args.seg_steps else []
    seg_cfg = load_config("demo_pipeline_semiseg", _stage_overrides(args, str(data_root), seg_over))
    print("[demo] stage 2/2: semi-supervised segmentation with DepthMix")
    seg = run_stage(seg_cfg, out / "runs" / "semiseg")
    times["semiseg"] = time.perf_counter() - t0

    baseline = None
    if args.baseline:
        t0 = time.perf_counter()
        base_over = seg_over + ["semiseg.pseudo_label=false", "semiseg.transfer=false", "semiseg.mix=none"]
        base_cfg = load_config("demo_pipeline_semiseg", _stage_overrides(args, str(data_root), base_over))
        print("[demo] baseline: supervised only")
        baseline = run_stage(base_cfg, out / "runs" / "supervised")
        times["baseline"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    summary = {k: v for k, v in sde.items() if k.startswith(("depth/", "test/depth/"))}
    summary.update({k: v for k, v in seg.items() if k.startswith(("seg/", "test/seg/"))})
    if baseline is not None:
        summary["seg/miou_supervised_baseline"] = baseline["seg/miou"]
    report_path = write_report(out / "report", data_root, out / "runs", sde_export,
                               seg["exports"].get("best") or seg["exports"]["last"], summary, seg_cfg)
    times["report"] = time.perf_counter() - t0
    summary.update({f"time/{k}_s": v for k, v in times.items()})
    summary["time/total_s"] = time.perf_counter() - start
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
    tmp.replace(out / "summary.json")
    print_summary_table(summary)
    print(f"report: {report_path}\nsummary: {out / 'summary.json'}")
    return 0
