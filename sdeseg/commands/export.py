"""``sdeseg export --model EXPORT --format safetensors|onnx --out PATH``: hand a model to other tools.

safetensors: the weights and one JSON header (architecture, class names, input convention,
depth range) that ``sdeseg.load_model`` reads without pickle. ONNX: the inference graph (image
in [0, 1] -> logits and/or depth in metres), dynamic batch, height and width (multiples of 32),
checked against PyTorch with onnxruntime (max abs difference <= 1e-4).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from data_prep.shards import size_arg

    p.add_argument("--model", required=True, help="export to convert (<run>/export/best.pt or a .safetensors)")
    p.add_argument("--format", required=True, choices=["safetensors", "onnx"])
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--size", type=size_arg, default=(96, 192), help="ONNX example/check size HxW (default 96x192)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")


def run(args: argparse.Namespace) -> int:
    from sdeseg.exports import export_onnx, export_safetensors

    if args.format == "safetensors":
        out = export_safetensors(args.model, args.out)
    else:
        out = export_onnx(args.model, args.out, opset=args.opset, size=args.size, check=not args.no_check)
    print(f"wrote {out}")
    return 0
