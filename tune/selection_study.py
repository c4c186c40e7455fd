"""Data selection compared with random choice and entropy active learning (issue 19's study).

    python -m tune.selection_study --data /tmp/data1000 --sde-export /tmp/sde700/export/best.pt \
        --out runs/selection --methods depth random entropy --seeds 0 1 2 --budget 33

For each (method, seed): the selection stage (``demo_select``, budgets up to ``--budget``),
then supervised-only training on the chosen images (``demo_semiseg`` with
``semiseg.pseudo_label=false``, transfer from the SDE export, ``--steps`` steps, in-process),
then ``sdeseg eval`` of its ``export/last.pt`` on ``test`` and ``val``. Finished parts are reused,
so an interrupted study resumes. Writes ``<out>/selection.md`` (test mIoU per method and seed,
val for development, class coverage, per-class IoU differences against ``random``) and
``<out>/selection.png`` (:func:`sdeseg.selection_report.selection_figure`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from sdeseg.data.classes import class_names


def selection_dir(out: Path, method: str, seed: int) -> Path:
    return out / "select" / f"{method}_s{seed}"


def train_dir(out: Path, method: str, seed: int) -> Path:
    return out / "train" / f"{method}_s{seed}"


def run_one(args: argparse.Namespace, method: str, seed: int) -> dict[str, dict]:
    """Select, train, evaluate one (method, seed); each part is skipped when its output exists."""
    from sdeseg.config import load_config
    from sdeseg.launch import run_stage

    out = Path(args.out)
    sel = selection_dir(out, method, seed)
    keyfile = sel / "selection" / f"labeled_keys_{args.budget}.json"
    if not keyfile.exists():
        cfg = load_config(args.select_preset, [
            f"data.root={args.data}", f"select.sde_checkpoint={args.sde_export}", f"select.method={method}",
            f"select.budgets={args.budgets}", f"select.student_steps={args.student_steps}", f"train.seed={seed}",
            *args.select_overrides])
        run_stage(cfg, sel)
    run = train_dir(out, method, seed)
    if not (run / "export" / "last.pt").exists():
        cfg = load_config(args.train_preset, [
            f"data.root={args.data}", f"data.labeled_keys={keyfile}", "semiseg.pseudo_label=false",
            "semiseg.transfer=true", f"semiseg.sde_checkpoint={args.sde_export}", f"train.steps={args.steps}",
            "train.val_every=0", f"train.seed={seed}", "runtime.in_process=true", "runtime.num_workers=1",
            *args.train_overrides])
        run_stage(cfg, run)
    scores = {}
    for split in ("test", "val"):
        path = run / f"eval_{split}.json"
        if not path.exists():
            from sdeseg.cli import main

            code = main(["eval", "--model", str(run / "export" / "last.pt"), "--data", args.data, "--split", split,
                         "--out", str(path)])
            if code:
                raise SystemExit(f"sdeseg eval failed for {run} ({split})")
        scores[split] = json.loads(path.read_text())
    return scores


def write_table(args: argparse.Namespace, results: dict[str, dict[int, dict]]) -> str:
    from sdeseg.selection_report import read_keyfile
    from sdeseg.stats import paired_difference

    out = Path(args.out)
    lines = ["| method | test mIoU (mean) | per seed (test) | val mIoU (mean) | classes present | "
             "class-share L1 to the split |", "| --- | --- | --- | --- | --- | --- |"]
    means = {}
    for method, by_seed in results.items():
        test = [100 * r["test"]["seg/miou"] for r in by_seed.values()]
        val = [100 * r["val"]["seg/miou"] for r in by_seed.values()]
        cover = [read_keyfile(selection_dir(out, method, s), args.budget)["coverage"] for s in by_seed]
        means[method] = statistics.mean(test)
        lines.append(f"| {method} | {means[method]:.2f} | {', '.join(f'{v:.2f}' for v in test)} | "
                     f"{statistics.mean(val):.2f} | {', '.join(str(c['classes_present']) for c in cover)} | "
                     f"{', '.join(format(c['class_share_l1'], '.2f') for c in cover)} |")
    pairs = [(a, b) for a in results for b in ("random", "entropy") if b in results and a != b
             and not (a == "random" and b == "entropy")]
    if pairs:
        lines += ["", "Paired test mIoU differences over the common seeds (95% Student-t interval; an interval that "
                  "excludes 0 says these seeds resolve the difference):", ""]
    for a, b in pairs:
        iv, per = paired_difference({s: 100 * r["test"]["seg/miou"] for s, r in results[a].items()},
                                    {s: 100 * r["test"]["seg/miou"] for s, r in results[b].items()})
        lines.append(f"- {a} − {b}: **{iv.mean:+.2f}** {iv.bounds()} ({iv.resolves()}; per seed "
                     f"{', '.join(f'{d:+.2f}' for d in per.values())})")
    if "random" in results:
        lines += ["", "Per-class test IoU, mean over seeds, minus `random`'s (classes where any method differs "
                  "by 1 or more):", ""]
        others = [m for m in results if m != "random"]
        lines += [f"| class | random | {' | '.join(others)} |", "| --- | --- |" + " --- |" * len(others)]
        for name in class_names():
            per = {m: statistics.mean(100 * r["test"][f"seg/iou/{name}"] for r in results[m].values())
                   for m in results}
            if any(abs(per[m] - per["random"]) >= 1.0 for m in others):
                lines.append(f"| {name} | {per['random']:.1f} | "
                             + " | ".join(f"{per[m] - per['random']:+.1f}" for m in others) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--sde-export", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--methods", nargs="+", default=["depth", "random", "entropy"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget", type=int, default=33, help="the set size trained on (the last budget)")
    p.add_argument("--budgets", default="[8,16,33]")
    p.add_argument("--student-steps", default="[100,200]")
    p.add_argument("--steps", type=int, default=600, help="supervised training steps on each set")
    p.add_argument("--select-preset", default="demo_select")
    p.add_argument("--train-preset", default="demo_semiseg")
    p.add_argument("--select-overrides", nargs="*", default=[])
    p.add_argument("--train-overrides", nargs="*", default=[])
    p.add_argument("--report-only", action="store_true", help="only tabulate finished runs")
    args = p.parse_args(argv)
    out = Path(args.out)
    results: dict[str, dict[int, dict]] = {}
    for method in args.methods:
        for seed in args.seeds:
            if args.report_only and not (train_dir(out, method, seed) / "eval_val.json").exists():
                continue
            results.setdefault(method, {})[seed] = run_one(args, method, seed)
    table = write_table(args, results)
    (out / "selection.md").write_text(table)
    from sdeseg.selection_report import selection_figure

    seed = args.seeds[0]
    runs = {m: selection_dir(out, m, seed) for m in results if seed in results[m]}
    selection_figure(runs, args.data, args.budget, out / "selection.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
