"""``sdeseg train CONFIG [--run-dir DIR] [key=value ...]``.

Rank 0 logs a progress line every ``train.log_every`` steps (``runtime.progress``); on Ray,
Ray forwards it to this console.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="preset name (demo_sde) or YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.size=128x256 optim.lr=2e-4")
    p.add_argument("--run-dir", default=None, help="output directory (default runs/<preset name>); "
                   "re-running with the same directory resumes the run")


def run(args: argparse.Namespace) -> int:
    from sdeseg.config import load_config, resolve_preset
    from sdeseg.launch import run_stage

    verbose = ["runtime.verbose=true"] if getattr(args, "verbose", False) else []  # sdeseg -v
    cfg = load_config(args.config, [*args.overrides, *verbose])
    run_dir = Path(args.run_dir or Path("runs") / resolve_preset(args.config).stem)
    summary = run_stage(cfg, run_dir)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2, sort_keys=True))
    print(f"run directory: {run_dir.resolve()}")
    return 0
