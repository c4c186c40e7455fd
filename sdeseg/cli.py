"""The ``sdeseg`` command.

Subcommands: ``prep`` (datasets -> shards), ``train`` (one stage from a config), ``tune`` (a
hyper-parameter search, :mod:`sdeseg.tuning`), ``demo``
(the whole pipeline on the embedded synthetic dataset), and for trained models ``eval``,
``predict``, ``infer`` (derived datasets) and ``export`` (safetensors, ONNX). Heavy modules are
imported inside each handler so ``--help`` stays instant. Errors in the input (config,
dataset, export file) end with a message naming the key or file and exit code 2. Ray's and
DeepSpeed's routine output is silenced unless ``-v``/``--verbose`` (before or after the
subcommand; ``sdeseg.runtime.quiet``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# prep targets: name -> module with add_arguments(parser) and run(args) -> int
PREP_TARGETS = {
    "synthetic": "data_prep.synthetic",
    "cityscapes": "data_prep.cityscapes",
    "gta": "data_prep.gta",
}

# other subcommands: name -> (module, help); each module has add_arguments(parser) and run(args) -> int
COMMANDS = {
    "train": ("sdeseg.commands.train", "train one stage from a config file (on a Ray cluster)"),
    "demo": ("sdeseg.commands.demo", "synthetic data -> SDE -> semi-supervised segmentation -> report"),
    "tune": ("sdeseg.commands.tune", "hyper-parameter search with Ray Tune (each trial a Ray Train run)"),
    "eval": ("sdeseg.commands.evaluate", "score an exported model on a split (mIoU, depth errors)"),
    "predict": ("sdeseg.commands.predict", "write an exported model's predictions for images as PNG files"),
    "infer": ("sdeseg.commands.infer", "write a derived dataset of predictions (Ray Data model actors)"),
    "export": ("sdeseg.commands.export", "convert an export to safetensors or ONNX"),
}

PREP_HELP = {
    "synthetic": "render the embedded procedural street-scene dataset",
    "cityscapes": "convert the official Cityscapes layout (sequences, gtFine, camera)",
    "gta": "convert GTA5 (images/, labels/)",
}


VERBOSE_HELP = "also show Ray's and DeepSpeed's routine logs and library warnings (sets runtime.verbose)"


def _add_verbose(p: argparse.ArgumentParser, default) -> None:
    # on the subcommands with default SUPPRESS, so `sdeseg train -v` works and `sdeseg -v train` is kept
    p.add_argument("-v", "--verbose", action="store_true", default=default, help=VERBOSE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdeseg", description=__doc__.split("\n\n")[0])
    _add_verbose(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    prep = sub.add_parser("prep", help="convert a dataset into WebDataset shards + manifest")
    prep_sub = prep.add_subparsers(dest="target", required=True, metavar="DATASET")
    for name, module in PREP_TARGETS.items():
        mod = importlib.import_module(module)
        p = prep_sub.add_parser(name, help=PREP_HELP[name], description=PREP_HELP[name])
        mod.add_arguments(p)
        _add_verbose(p, argparse.SUPPRESS)
        p.set_defaults(handler=mod.run)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        _add_verbose(p, argparse.SUPPRESS)
        p.set_defaults(handler=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides (key=value) may come before or after options such as --run-dir; argparse
    # only collects a trailing positional list, so gather stray key=value words here
    args, extra = parser.parse_known_args(argv)
    stray = [w for w in extra if "=" in w and not w.startswith("-")]
    if len(stray) != len(extra) or (stray and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(w for w in extra if w not in stray) or ' '.join(stray)}")
    if stray:
        args.overrides = list(args.overrides) + stray
    from sdeseg.runtime.quiet import setup_console

    setup_console(args.verbose)
    from sdeseg.config import ConfigError
    from sdeseg.data.manifest import DatasetError
    from sdeseg.exports import ExportError
    from sdeseg.runtime.checkpoint import CheckpointIntegrityError

    try:
        return int(args.handler(args) or 0)
    except (ConfigError, DatasetError, ExportError, FileNotFoundError, CheckpointIntegrityError) as e:
        print(f"sdeseg {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
