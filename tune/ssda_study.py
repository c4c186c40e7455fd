"""Semi-supervised domain adaptation against its ablations (issue 20's study).

    python -m tune.ssda_study --target data/synthetic --target-sde runs/sde/export/best.pt \
        --source data/synthetic-game --source-sde runs/sde-game/export/best.pt \
        --out runs/ssda-study --seeds 0 1 --labels 33 --steps 3200 --overrides runtime.num_workers=1

Runs, for each seed, the rows of the ablation in this order (the acceptance's rows first), each
a stage run ``<out>/<row>_s<seed>`` on the runtime the presets name (Ray unless
``runtime.in_process=true``), every row initialised from the target's SDE export:

- ``full``: ``demo_ssda`` (Cross-Domain DepthMix with Matching Geometry Sampling, within-target
  DepthMix, supervised source loss), ``--labels`` target labels;
- ``within``: the same without the cross-domain mix (``ssda.cross_mix=false``, one candidate);
- ``srctgt``: source + target supervised only (also ``semiseg.pseudo_label=false``);
- ``cdrandom``: Cross-Domain DepthMix with random pairing (``ssda.mgs_candidates=1``);
- ``fullmt``: ``full`` trained multi-task, as the official full setting (``model.multitask=true``:
  the photometric loss on the target's sequences; ``optim.pose_lr=1e-6``);
- ``target``: target-only supervised (``demo_semiseg``, no pseudo-labels, no mix);
- ``upper``: the same with every labeled target training image;
- ``sourceonly``: supervised on every labeled source image from the source's SDE export, then
  scored on the target's ``test`` split by ``sdeseg eval`` (the domain gap).

Every row gets ``train.steps``, ``train.seed`` and ``data.labeled_seed`` from the arguments, then
``--overrides`` (and ``--source-overrides`` for the source-only row: a source such as GTA5 has
no ``val`` split). Finished rows (same config) are reused, unfinished ones resume from their
checkpoints, so an interrupted study continues with the same command. Writes ``<out>/ssda.md``:
target ``test`` mIoU of the final model per row and seed (``val`` in brackets, for development),
the acceptance's differences, full as a share of the upper bound, and per-class IoU where full
differs from srctgt or within by 5 points or more.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

ROWS = ("full", "within", "srctgt", "cdrandom", "target", "upper", "sourceonly", "fullmt")
# rows in the paper's order, for the table
TABLE_ORDER = ("target", "srctgt", "within", "cdrandom", "full", "fullmt", "upper", "sourceonly")
TITLES = {"target": "(1) target-only supervised", "srctgt": "(2) source + target supervised",
          "within": "(3) + within-target DepthMix", "cdrandom": "(4) + Cross-Domain DepthMix, random pairing",
          "full": "(5) full (+ Matching Geometry Sampling)",
          "fullmt": "(6) full, multi-task (the official full setting)", "upper": "(U) all target labels, supervised",
          "sourceonly": "(G) source only, scored on the target"}
SUPERVISED = ["semiseg.pseudo_label=false", "semiseg.mix=none"]


def labeled_train_count(root: str) -> int:
    """Labeled samples of the ``train`` split of a prepared dataset (its manifest)."""
    from sdeseg.data.manifest import DatasetError, read_manifest

    n = sum(1 for r in read_manifest(root) if r["split"] == "train" and r["has_label"])
    if n == 0:
        raise DatasetError(f"{root}: the train split has no labeled samples")
    return n


def row_config(args: argparse.Namespace, row: str) -> tuple[str, list[str]]:
    """(preset, overrides) of one row, without the per-seed and the common overrides."""
    target = [f"data.root={args.target}", f"semiseg.sde_checkpoint={args.target_sde}"]
    source = [f"ssda.source_root={args.source}", f"ssda.source_sde_checkpoint={args.source_sde}"]
    few = [*target, f"data.num_labeled={args.labels}"]
    if row == "upper":  # the only rows that read a manifest: every labeled training image
        return args.semiseg_preset, [*target, f"data.num_labeled={labeled_train_count(args.target)}", *SUPERVISED]
    if row == "sourceonly":
        return args.semiseg_preset, [f"data.root={args.source}", f"semiseg.sde_checkpoint={args.source_sde}",
                                     f"data.num_labeled={labeled_train_count(args.source)}", *SUPERVISED]
    rows = {
        "full": [*few, *source],
        "within": [*few, *source, "ssda.cross_mix=false", "ssda.mgs_candidates=1"],
        "srctgt": [*few, *source, "ssda.cross_mix=false", "ssda.mgs_candidates=1", "semiseg.pseudo_label=false"],
        "cdrandom": [*few, *source, "ssda.mgs_candidates=1"],
        "fullmt": [*few, *source, "model.multitask=true", "optim.pose_lr=1e-6"],
    }
    if row == "target":
        return args.semiseg_preset, [*few, *SUPERVISED]
    return args.ssda_preset, rows[row]


def run_dir(out: Path, row: str, seed: int) -> Path:
    return out / f"{row}_s{seed}"


def run_row(args: argparse.Namespace, row: str, seed: int) -> None:
    """Train one (row, seed) unless an identical finished run is there; score the source-only
    model on the target."""
    from sdeseg.config import load_config
    from sdeseg.launch import finished_run, run_stage

    preset, overrides = row_config(args, row)
    extra = args.source_overrides if row == "sourceonly" else []
    cfg = load_config(preset, [*overrides, f"train.steps={args.steps}", f"train.seed={seed}",
                               f"data.labeled_seed={seed}", *args.overrides, *extra])
    run = run_dir(Path(args.out), row, seed)
    if finished_run(cfg, run) is None:
        print(f"[ssda_study] {row} seed {seed}: training in {run}", flush=True)
        run_stage(cfg, run)
    score = run / "eval_target_test.json"
    if row == "sourceonly" and not score.exists():
        from sdeseg.cli import main

        if main(["eval", "--model", str(run / "export" / "last.pt"), "--data", args.target, "--split", "test",
                 "--task", "seg", "--out", str(score)]):
            raise SystemExit(f"sdeseg eval failed for {run} on {args.target}")


def read_row(out: Path, row: str, seed: int) -> dict[str, float] | None:
    """Target test and val metrics of a finished (row, seed), in percent; None when unfinished.
    ``test/...`` are target-test figures for every row (the source-only model's from its
    ``sdeseg eval`` on the target), ``val/...`` the run's own validation split."""
    run = run_dir(out, row, seed)
    summary_file = run / "summary.json"
    if not summary_file.exists():
        return None
    summary = json.loads(summary_file.read_text())
    if row == "sourceonly":
        score_file = run / "eval_target_test.json"
        if not score_file.exists():
            return None
        test = {k: v for k, v in json.loads(score_file.read_text()).items() if k.startswith("seg/")}
    else:
        test = {k.removeprefix("test/"): v for k, v in summary.items() if k.startswith("test/seg/")}
    val = {k: v for k, v in summary.items() if k.startswith("seg/")}
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    return {**{f"test/{k}": 100 * v for k, v in test.items()}, **{f"val/{k}": 100 * v for k, v in val.items()},
            "steps": cfg["train"]["steps"], "multitask": bool(cfg["model"]["multitask"])}


def row_title(row: str, runs: list[dict]) -> str:
    """The row's title, saying so when its runs trained multi-task though the row is not (the
    study's ``--overrides model.multitask=true``): a table is read without its command line."""
    if row == "fullmt" or not runs or not any(r["multitask"] for r in runs):
        return TITLES[row]
    return TITLES[row] + (", multi-task" if all(r["multitask"] for r in runs) else ", multi-task in some seeds")


def write_table(out: Path, seeds: list[int]) -> str:
    from sdeseg.data.classes import class_names
    from sdeseg.stats import paired_difference

    res = {row: {s: read_row(out, row, s) for s in seeds} for row in TABLE_ORDER}
    mean = {row: statistics.mean(r["test/seg/miou"] for r in by.values()) if all(by.values()) else None
            for row, by in res.items()}
    lines = [f"| row | {' | '.join(f'seed {s}' for s in seeds)} | **mean** |", "| --- |" + " --- |" * (len(seeds) + 1)]
    for row in TABLE_ORDER:
        cells = [f"{r['test/seg/miou']:.2f} ({r['val/seg/miou']:.2f})" if r else "not run"
                 for r in res[row].values()]
        m = f"**{mean[row]:.2f}**" if mean[row] is not None else "–"
        lines.append(f"| {row_title(row, [r for r in res[row].values() if r])} | {' | '.join(cells)} | {m} |")
    steps = sorted({r["steps"] for by in res.values() for r in by.values() if r})
    lines += ["", "Target `test` mIoU of the final model (the run's own `val` in brackets; for (G), "
              f"its source `val`), after {' or '.join(map(str, steps)) or '–'} steps"
              + (" (the rows differ: see each run's config.yaml)." if len(steps) > 1 else ".")]
    facts = []
    for a, b in (("full", "srctgt"), ("full", "within"), ("full", "cdrandom"), ("cdrandom", "within"),
                 ("full", "target"), ("fullmt", "full"), ("fullmt", "srctgt"), ("fullmt", "within")):
        if mean[a] is not None and mean[b] is not None:
            iv, per = paired_difference({s: res[a][s]["test/seg/miou"] for s in seeds},
                                        {s: res[b][s]["test/seg/miou"] for s in seeds})
            facts.append(f"- {a} − {b}: **{iv.mean:+.2f}** (per seed {', '.join(f'{d:+.2f}' for d in per.values())}; "
                         f"95% interval over the seeds {iv.bounds()}: {iv.resolves()})")
    if mean["full"] is not None and mean["upper"]:
        facts.append(f"- full / upper: **{100 * mean['full'] / mean['upper']:.1f}%**")
    if mean["sourceonly"] is not None and mean["upper"] is not None:
        facts.append(f"- domain gap, source-only − upper on the target: **{mean['sourceonly'] - mean['upper']:+.2f}**")
    if facts:
        lines += ["", *facts]
    rows = [r for r in ("srctgt", "within", "full", "fullmt") if all(res[r].values())]
    if "full" in rows and len(rows) > 1:
        per_class = {r: {n: statistics.mean(x[f"test/seg/iou/{n}"] for x in res[r].values()) for n in class_names()}
                     for r in rows}
        diff = [n for n in class_names() if any(abs(per_class["full"][n] - per_class[r][n]) >= 5 for r in rows)]
        if diff:
            lines += ["", "Per-class target test IoU, mean over seeds (classes where full differs by 5 or more):",
                      "", f"| class | {' | '.join(rows)} |", "| --- |" + " --- |" * len(rows)]
            lines += [f"| {n} | {' | '.join(f'{per_class[r][n]:.1f}' for r in rows)} |" for n in diff]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="target dataset (shards)")
    p.add_argument("--target-sde", required=True, help="the target's SDE export")
    p.add_argument("--source", required=True, help="fully labeled source dataset (shards)")
    p.add_argument("--source-sde", required=True, help="the source's SDE export")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--labels", type=int, default=33, help="target labels of the few-label rows")
    p.add_argument("--steps", type=int, default=3200)
    p.add_argument("--ssda-preset", default="demo_ssda")
    p.add_argument("--semiseg-preset", default="demo_semiseg")
    p.add_argument("--overrides", nargs="*", default=[], help="added to every row, e.g. runtime.num_workers=1")
    p.add_argument("--source-overrides", nargs="*", default=[],
                   help="added to the source-only row, e.g. data.val_split=train for a source without val")
    p.add_argument("--report-only", action="store_true", help="only tabulate finished rows")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not args.report_only:
        for seed in args.seeds:
            for row in args.rows:
                run_row(args, row, seed)
    table = write_table(out, args.seeds)
    out.mkdir(parents=True, exist_ok=True)
    full = run_dir(out, "full", args.seeds[0])
    if (full / "summary.json").exists():  # what the full row's pairing and mixing look like
        from sdeseg.report import SSDA_FIGURES, ssda_figures

        share = ssda_figures(full, out)["source_share"]
        table += (f"\nFigures of {full.name} (`sdeseg.report.ssda_figures`; source share of these mixes "
                  f"{share:.0%}):\n\n")
        table += "\n\n".join(f"![{caption}]({name}.png)" for name, caption in SSDA_FIGURES) + "\n"
    (out / "ssda.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
