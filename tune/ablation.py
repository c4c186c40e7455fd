"""Component study of the semi-supervised stage (the paper's ablation), as a grid of runs.

    python -m tune.ablation --data data/synthetic --sde-export runs/sde/export/best.pt \
        --out runs/ablation --seeds 0 1 --steps 3200

Every row trains the same preset (``demo_semiseg`` by default) for the same number of
steps on the same labeled subset size, changing only the components; each run's
``summary.json`` is collected into ``<out>/ablation.md`` (mean and per-seed mIoU on the
held-out test split, the val mIoU for development, and the test IoU of the thin classes the
method should lift). Runs that already finished are reused,
so an interrupted grid resumes. The extra row ``"supervised, every label (upper bound)"``
(only when named in ``--rows``) trains the baseline on every label of the split: at equal
steps, what the unlabeled images could add at most.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROWS: dict[str, list[str]] = {
    "supervised only": ["semiseg.pseudo_label=false", "semiseg.transfer=false", "semiseg.mix=none"],
    "+ transfer from SDE": ["semiseg.pseudo_label=false", "semiseg.transfer=true", "semiseg.mix=none"],
    "+ ClassMix": ["semiseg.pseudo_label=true", "semiseg.transfer=true", "semiseg.mix=classmix"],
    "+ DepthMix": ["semiseg.pseudo_label=true", "semiseg.transfer=true", "semiseg.mix=depthmix"],
    "+ multi-task": ["semiseg.pseudo_label=false", "semiseg.transfer=true", "semiseg.mix=none",
                     "model.multitask=true"],
    "full (multi-task + DepthMix)": ["semiseg.pseudo_label=true", "semiseg.transfer=true", "semiseg.mix=depthmix",
                                     "model.multitask=true"],
}
DEFAULT_ROWS = list(ROWS)
# Not the paper's rows, so only run when named in --rows. The supervised baseline trained on
# every labeled sample of the training split: at equal steps it bounds what any use of the
# unlabeled images can add; its data.num_labeled is set last, over the command line's.
UPPER_BOUND = "supervised, every label (upper bound)"
ROWS[UPPER_BOUND] = ROWS["supervised only"]
# The mixes with the pseudo-label loss reweighted to the classes' pre-mix pixel shares
# (semiseg.mix_rebalance; DepthMix shifts them towards what is near, see tune.mix_probe).
for _mix in ("+ ClassMix", "+ DepthMix", "full (multi-task + DepthMix)"):
    ROWS[f"{_mix}, rebalanced"] = ROWS[_mix] + ["semiseg.mix_rebalance=true"]
THIN = ("pole", "traffic sign", "person")


def run_grid(args: argparse.Namespace) -> dict[str, list[dict]]:
    from sdeseg.launch import run_stage

    out = Path(args.out)
    results: dict[str, list[dict]] = {}
    for row in ROWS:
        if row not in (args.rows or DEFAULT_ROWS):
            continue
        for seed in args.seeds:
            run_dir = out / f"{_slug(row)}_seed{seed}"
            summary_file = run_dir / "summary.json"
            if summary_file.exists():
                summary = json.loads(summary_file.read_text())
            else:
                cfg = row_config(args, row, seed)
                print(f"[ablation] {row} seed {seed} -> {run_dir}", flush=True)
                summary = run_stage(cfg, run_dir)
            results.setdefault(row, []).append(summary)
        write_table(out, results, args)
    return results


def row_config(args: argparse.Namespace, row: str, seed: int):
    """The config of one run: preset, the grid's common settings, the row's components, the
    command line's overrides, and for the upper-bound row every label of its training split."""
    from sdeseg.config import load_config
    from sdeseg.data.labeled import labeled_candidates

    common = [f"data.root={args.data}", f"semiseg.sde_checkpoint={args.sde_export}",
              f"train.seed={seed}", f"data.labeled_seed={seed}", f"train.steps={args.steps}",
              f"train.val_every={args.steps}", f"train.ckpt_every={args.steps}"]
    overrides = common + ROWS[row] + list(args.overrides)
    cfg = load_config(args.preset, overrides)
    if row != UPPER_BOUND:
        return cfg
    d = cfg.data
    n = len(labeled_candidates(d.root, d.train_split, d.domain))
    return load_config(args.preset, overrides + [f"data.num_labeled={n}", "data.labeled_keys=null"])


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def write_table(out: Path, results: dict[str, list[dict]], args: argparse.Namespace) -> Path:
    """The table of a grid: claims on the test split (``test/seg/...``), the val mIoU beside it
    for development. Runs made before the test split existed show "n/a" for test."""

    def pct(runs: list[dict], key: str) -> list[float] | None:
        vals = [r.get(key) for r in runs]
        return None if any(v is None for v in vals) else [100 * v for v in vals]

    def fmt(vals: list[float] | None) -> str:
        return "n/a" if vals is None else f"{statistics.mean(vals):.1f}"

    lines = ["| components | test mIoU (mean) | test per seed | val mIoU (mean) | "
             + " | ".join(f"test IoU {c}" for c in THIN) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in THIN) + " |"]
    for row, runs in results.items():
        test = pct(runs, "test/seg/miou")
        per_seed = "n/a" if test is None else ", ".join(f"{m:.1f}" for m in test)
        thin = [fmt(pct(runs, f"test/seg/iou/{c}")) for c in THIN]
        lines.append(f"| {row} | {fmt(test)} | {per_seed} | {fmt(pct(runs, 'seg/miou'))} | "
                     + " | ".join(thin) + " |")
    path = Path(out) / "ablation.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="shard directory (e.g. data/synthetic)")
    p.add_argument("--sde-export", required=True, help="SDE export (export/best.pt of an SDE run)")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--preset", default="demo_semiseg")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=3200)
    p.add_argument("--rows", nargs="*", default=None,
                   help=f"rows to run (default: the paper's six, {DEFAULT_ROWS}); also "
                        f"{[r for r in ROWS if r not in DEFAULT_ROWS]}")
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = p.parse_args(argv)
    unknown = [r for r in args.rows or [] if r not in ROWS]
    if unknown:  # also catches overrides swallowed by --rows (put them before it)
        p.error(f"--rows: unknown row(s) {unknown}; rows are {list(ROWS)} "
                "(dotted overrides go before --rows)")
    run_grid(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
