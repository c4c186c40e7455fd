"""``sdeseg tune SEARCH [--out DIR] [key=value ...]``: a Ray Tune search (``sdeseg.search``).

SEARCH is a search file or the name of a shipped one (``tune/searches/``); the overrides apply
to every trial. Re-running the same command resumes the search.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("search", help="search file or shipped search name (demo_loss_weights, component_study, ...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every trial, e.g. train.steps=200")
    p.add_argument("--out", default=None, help="output directory (default runs/tune/<search name>); "
                   "re-running with the same directory resumes the search")
    p.add_argument("--reuse", action="append", default=[], metavar="DIR",
                   help="a trial whose config (up to run name and storage) a finished run in DIR already "
                   "trained copies that run instead of training: DIR is an earlier search's --out, a run "
                   "directory or a directory of them (repeatable)")


def run(args: argparse.Namespace) -> int:
    from sdeseg.search import load_search
    from sdeseg.tuning import run_search, unfinished_trials

    spec = load_search(args.search, list(args.overrides))  # every error before Ray starts
    out = Path(args.out or Path("runs") / "tune" / spec.name)
    best, rows = run_search(spec.path, out, list(args.overrides), reuse=args.reuse)
    print(json.dumps({k: v for k, v in best.items() if k not in ("steps", "values")}, indent=2, default=str))
    print(f"results: {out.resolve() / 'summary.md'}")
    unfinished = unfinished_trials(spec, rows)
    failed = [r["trial_id"] for r in rows if r["status"] == "error"]
    if failed:
        print(f"sdeseg tune: {len(failed)} trial(s) failed: {', '.join(failed)} (results.parquet has their errors)",
              file=sys.stderr)
    if unfinished:  # interrupted (SIGINT): not done, whatever Tune's own return says
        print(f"sdeseg tune: interrupted with {unfinished} of {spec.num_trials()} trials unfinished; "
              "the same command continues the search", file=sys.stderr)
        return 130
    return 1 if failed else 0
