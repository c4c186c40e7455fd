"""``sdeseg demo``: the whole method on the embedded synthetic dataset, on a local Ray cluster.

synthetic data (generated if absent) -> SDE stage -> semi-supervised stage with DepthMix
(initialised from the SDE model, DepthMix masks from its pseudo-depth) -> evaluation ->
``<out>/report/report.md`` with figures, and ``<out>/summary.json`` with flat keys.
Each stage shows a progress bar, fed from its run's metrics.jsonl (the stages' progress
lines are off).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output directory (data, runs, report, summary.json)")
    p.add_argument("--data", default=None, help="synthetic shard directory (default <out>/data/synthetic)")
    p.add_argument("--num-train", type=int, default=200,
                   help="synthetic training triplets to generate (the SDE stage sees each of 200 eight times)")
    p.add_argument("--num-val", type=int, default=100, help="synthetic validation samples to generate")
    p.add_argument("--num-test", type=int, default=100, help="synthetic held-out test samples to generate")
    p.add_argument("--sde-steps", type=int, default=None, help="override the SDE stage's steps")
    p.add_argument("--seg-steps", type=int, default=None, help="override the semi-supervised stage's steps")
    p.add_argument("--baseline", action="store_true",
                   help="also train the supervised-only baseline (adds its time) for seg/miou_supervised_baseline")
    p.add_argument("--in-process", action="store_true", help="run stages in this process instead of on Ray")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="runtime.precision of both stages; auto: bf16 where the CPU has bf16 units "
                   "(AVX512-BF16, AMX), where it is faster (BENCHMARKS.md), else fp32")
    p.add_argument("--instance-model", default=None,
                   help="an instance export (sdeseg train demo_instance ...): the report also shows its instances")
    p.add_argument("--ssda-run", default=None,
                   help="a domain-adaptation run directory (sdeseg train demo_ssda --run-dir ...): the report also "
                   "shows its Matching Geometry Sampling choices and Cross-Domain DepthMix mixes")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to both stages, e.g. runtime.num_workers=1")


def demo_precision(choice: str) -> str:
    """``--precision``: auto is bf16 on a CPU with bf16 units, else fp32 (the demo runs on CPUs)."""
    from sdeseg.runtime.engine import cpu_has_bf16

    if choice != "auto":
        return choice
    return "bf16" if cpu_has_bf16() else "fp32"


def _stage_overrides(args, data_root: str, extra: list[str]) -> list[str]:
    out = [f"data.root={data_root}", "runtime.progress=false", f"runtime.precision={args.precision}"]
    out += list(extra)  # (a bar per stage instead of progress lines)
    if getattr(args, "verbose", False):
        out.append("runtime.verbose=true")
    if args.in_process:
        out += ["runtime.in_process=true", "runtime.num_workers=1"]
    return out + list(args.overrides)


def _follow(path: Path, bar, stop: threading.Event) -> None:
    """Move ``bar`` to the step of each train record (or restart) appended to ``path`` until
    ``stop``, then read what is left. A restart rewrites the file (a new inode): read it anew."""
    from sdeseg.runtime.telemetry import PROGRESS_LOSSES, read_records

    offset, inode = 0, None
    while True:
        done = stop.is_set()
        try:
            ino = os.stat(path).st_ino
        except FileNotFoundError:
            ino = None
        if ino != inode:
            offset, inode = 0, ino
        records, offset = read_records(path, offset)
        for r in records:
            if r.get("kind") == "train" or "event/resumed" in r:
                bar.n = min(r["step"], bar.total)
            if r.get("kind") == "train":
                loss = next((k for k in PROGRESS_LOSSES if r.get(k) is not None), None)  # the total
                shown = [f"{loss} {r[loss]:.4g}"] if loss else []
                shown += [f"{r['perf/samples_per_s']:.1f} samples/s"] if r.get("perf/samples_per_s") else []
                bar.set_postfix_str(", ".join(shown), refresh=False)
        if records:  # redraw on news only: a log file gets one line per record, not per poll
            bar.refresh()
        if done:
            return
        stop.wait(0.5)


def _run_with_bar(cfg, run_dir: Path, desc: str) -> dict:
    """``run_stage`` with a progress bar. Rank 0 writes ``<run_dir>/metrics.jsonl`` on this
    machine (in process, or a local Ray cluster), so a thread here follows it; with the run's
    files in object storage the bar jumps to the end when the results come back."""
    from tqdm import tqdm

    from sdeseg.launch import run_stage
    from sdeseg.runtime.telemetry import METRICS_FILE

    run_dir = Path(run_dir).resolve()
    stop = threading.Event()
    with tqdm(total=cfg.train.steps, desc=desc, unit="step", dynamic_ncols=True) as bar:
        follower = threading.Thread(target=_follow, args=(run_dir / METRICS_FILE, bar, stop), daemon=True)
        follower.start()
        try:
            return run_stage(cfg, run_dir)
        finally:
            stop.set()
            follower.join()


def run(args: argparse.Namespace) -> int:
    from data_prep.synthetic import generate
    from sdeseg.config import load_config
    from sdeseg.data.manifest import MANIFEST_NAME
    from sdeseg.report import print_summary_table, write_report

    if args.ssda_run:  # before minutes of training, not after
        from sdeseg.report import ssda_run_files

        ssda_run_files(args.ssda_run)
    if args.instance_model:
        from sdeseg.exports import load_model

        load_model(args.instance_model).require("instance")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data).resolve() if args.data else out / "data" / "synthetic"
    times: dict[str, float] = {}
    start = time.perf_counter()
    args.precision = demo_precision(args.precision)
    print(f"[demo] precision {args.precision}")

    t0 = time.perf_counter()
    if not (data_root / MANIFEST_NAME).exists():
        print(f"[demo] generating the synthetic dataset into {data_root}")
        generate(str(data_root), num_train=args.num_train, num_val=args.num_val, num_test=args.num_test)
    times["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sde_over = [f"train.steps={args.sde_steps}"] if args.sde_steps else []
    sde_cfg = load_config("demo_pipeline_sde", _stage_overrides(args, str(data_root), sde_over))
    print("[demo] stage 1/2: self-supervised depth")
    sde = _run_with_bar(sde_cfg, out / "runs" / "sde", "sde")
    times["sde"] = time.perf_counter() - t0
    sde_export = sde["exports"].get("best") or sde["exports"]["last"]

    t0 = time.perf_counter()
    seg_over = [f"semiseg.sde_checkpoint={sde_export}"]
    seg_over += [f"train.steps={args.seg_steps}"] if args.seg_steps else []
    seg_cfg = load_config("demo_pipeline_semiseg", _stage_overrides(args, str(data_root), seg_over))
    print("[demo] stage 2/2: semi-supervised segmentation with DepthMix")
    seg = _run_with_bar(seg_cfg, out / "runs" / "semiseg", "semiseg")
    times["semiseg"] = time.perf_counter() - t0

    baseline = None
    if args.baseline:
        t0 = time.perf_counter()
        base_over = seg_over + ["semiseg.pseudo_label=false", "semiseg.transfer=false", "semiseg.mix=none"]
        base_cfg = load_config("demo_pipeline_semiseg", _stage_overrides(args, str(data_root), base_over))
        print("[demo] baseline: supervised only")
        baseline = _run_with_bar(base_cfg, out / "runs" / "supervised", "supervised")
        times["baseline"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    summary = {k: v for k, v in sde.items() if k.startswith(("depth/", "test/depth/"))}
    summary.update({k: v for k, v in seg.items() if k.startswith(("seg/", "test/seg/"))})
    if baseline is not None:
        summary["seg/miou_supervised_baseline"] = baseline["seg/miou"]
    report_path = write_report(out / "report", data_root, out / "runs", sde_export,
                               seg["exports"].get("best") or seg["exports"]["last"], summary, seg_cfg,
                               instance_export=args.instance_model, ssda_run=args.ssda_run)
    times["report"] = time.perf_counter() - t0
    summary.update({f"time/{k}_s": v for k, v in times.items()})
    summary["precision"] = args.precision
    summary["time/total_s"] = time.perf_counter() - start
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
    tmp.replace(out / "summary.json")
    print_summary_table(summary)
    print(f"report: {report_path}\nsummary: {out / 'summary.json'}")
    return 0
