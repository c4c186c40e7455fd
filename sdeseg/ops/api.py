"""Backend dispatch for the public ops (see ``sdeseg.ops``)."""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from sdeseg.ops.depth_mix.reference import depth_mix_reference
from sdeseg.ops.inverse_warp.reference import inverse_warp_reference
from sdeseg.ops.photometric_error.reference import photometric_error_reference

BACKENDS = ("auto", "reference", "triton")
# Whether "auto" runs the fused Triton kernels on CUDA tensors. True since the kernels passed
# `make gpu-check` on a real GPU (2026-12-04, one H200, torch 2.11 + Triton 3.6: the CUDA kernel
# tests, and SDE / semi-supervised bf16 runs that match the reference ops; table in BENCHMARKS.md).
# "reference" (runtime.ops_backend / SDESEG_OPS_BACKEND) still forces the plain PyTorch ops.
AUTO_USES_TRITON_ON_CUDA = True
_forced: str | None = None


def set_backend(name: str | None) -> None:
    """Force a backend for this process (None: back to the environment / auto)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"ops backend must be one of {BACKENDS}, got {name!r}")
    global _forced
    _forced = name


def get_backend() -> str:
    name = _forced or os.environ.get("SDESEG_OPS_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"SDESEG_OPS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def _fused_module(op: str):
    """The fused implementation module, or None when the reference must be used."""
    backend = get_backend()
    if backend == "reference":
        return None
    return importlib.import_module(f"sdeseg.ops.{op}.op") if _fused_available(op, backend) else None


def _fused_available(op: str, backend: str) -> bool:
    has_impl = importlib.util.find_spec(f"sdeseg.ops.{op}.op") is not None
    if backend == "triton":
        if not has_impl:
            raise RuntimeError(f"ops backend 'triton' requested but sdeseg.ops.{op} has no fused kernel")
        return True
    return (AUTO_USES_TRITON_ON_CUDA and has_impl and torch.cuda.is_available()
            and importlib.util.find_spec("triton") is not None)


def _on_cuda(*tensors: torch.Tensor) -> bool:
    return all(t.is_cuda for t in tensors)


def depth_mix(depth, *tensors, perm=None, eps: float = 0.0):
    """DepthMix: ``mask[i] = depth[i] < depth[perm[i]] + eps``; mix every tensor with it.

    depth (B,1,H,W); tensors (B,C,H,W) of any dtype or (B,H,W); perm (B,) (default (i+1)%B).
    Returns ``(mask (B,1,H,W) bool, tuple of mixed tensors)``.
    """
    mod = _fused_module("depth_mix")
    if mod is not None and (get_backend() == "triton" or _on_cuda(depth, *tensors)):
        return mod.depth_mix(depth, *tensors, perm=perm, eps=eps)
    return depth_mix_reference(depth, *tensors, perm=perm, eps=eps)


def inverse_warp(src, depth, T, K, padding_mode: str = "border"):
    """Warp src (B,C,H,W) into the target frame with target depth (B,1,H,W), T (B,4,4), K (B,3,3)."""
    mod = _fused_module("inverse_warp")
    if mod is not None and padding_mode == "border" and (get_backend() == "triton" or _on_cuda(src, depth)):
        return mod.inverse_warp(src, depth, T, K)
    return inverse_warp_reference(src, depth, T, K, padding_mode=padding_mode)


def photometric_error(pred, target, alpha: float = 0.85):
    """(B,1,H,W) = alpha*(1-SSIM)/2 + (1-alpha)*mean_c|pred-target| (3x3 SSIM, reflection padding)."""
    mod = _fused_module("photometric_error")
    if mod is not None and (get_backend() == "triton" or _on_cuda(pred, target)):
        return mod.photometric_error(pred, target, alpha=alpha)
    return photometric_error_reference(pred, target, alpha=alpha)
