"""Inverse warping as a PyTorch custom op backed by the Triton kernels in ``kernel.py``.

``sdeseg::inverse_warp`` has a fake (meta) implementation for torch.compile and an autograd
formula through ``sdeseg::inverse_warp_backward`` (one fused kernel) giving gradients for
src, depth and T; K is treated as a constant (calibration).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdeseg.ops.inverse_warp import kernel
from sdeseg.ops.inverse_warp.reference import check_warp_args

_CPU_HINT = (
    "the Triton kernels were imported without TRITON_INTERPRET=1, so they run on CUDA tensors only; "
    "use the reference backend on CPU or set TRITON_INTERPRET=1 before sdeseg.ops.*.op is imported"
)


def _check_device(t: Tensor) -> None:
    if not t.is_cuda and not kernel.INTERPRETED:
        raise RuntimeError(f"sdeseg.ops.inverse_warp: tensor on {t.device}: {_CPU_HINT}")


@torch.library.custom_op("sdeseg::inverse_warp", mutates_args=())
def inverse_warp_op(src: Tensor, depth: Tensor, T: Tensor, K: Tensor) -> Tensor:
    """Fused warp on validated arguments: see :func:`inverse_warp`."""
    _check_device(src)
    return kernel.inverse_warp_forward(src.contiguous(), depth.contiguous(), T.contiguous(), K.contiguous())


@inverse_warp_op.register_fake
def _(src, depth, T, K):
    return src.new_empty(src.shape)


@torch.library.custom_op("sdeseg::inverse_warp_backward", mutates_args=())
def inverse_warp_backward_op(
    grad: Tensor, src: Tensor, depth: Tensor, T: Tensor, K: Tensor, need_src: bool, need_geom: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_src, grad_depth, grad_T); a gradient not asked for comes back as an empty tensor."""
    _check_device(src)
    g_src, g_depth, g_t = kernel.inverse_warp_backward(
        grad.contiguous(),
        src.contiguous(),
        depth.contiguous(),
        T.contiguous(),
        K.contiguous(),
        need_src,
        need_geom,
    )
    # A custom op returns tensors, never None: an empty tensor stands for "not computed".
    return (
        g_src if g_src is not None else src.new_empty(0),
        g_depth if g_depth is not None else depth.new_empty(0),
        g_t if g_t is not None else T.new_empty(0),
    )


@inverse_warp_backward_op.register_fake
def _(grad, src, depth, T, K, need_src, need_geom):
    return (
        src.new_empty(src.shape if need_src else (0,)),
        depth.new_empty(depth.shape if need_geom else (0,)),
        T.new_empty(T.shape if need_geom else (0,)),
    )


def _setup_context(ctx, inputs, output):
    src, depth, T, K = inputs
    ctx.save_for_backward(src, depth, T, K)


def _backward(ctx, grad):
    src, depth, T, K = ctx.saved_tensors
    need_src = ctx.needs_input_grad[0]
    need_geom = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    if not (need_src or need_geom):
        return None, None, None, None
    g_src, g_depth, g_t = inverse_warp_backward_op(grad, src, depth, T, K, need_src, need_geom)
    return (
        g_src if need_src else None,
        g_depth if ctx.needs_input_grad[1] else None,
        g_t if ctx.needs_input_grad[2] else None,
        None,
    )


inverse_warp_op.register_autograd(_backward, setup_context=_setup_context)


def inverse_warp(src: Tensor, depth: Tensor, T: Tensor, K: Tensor) -> Tensor:
    """Fused inverse warp, same semantics as :func:`~sdeseg.ops.inverse_warp.reference.inverse_warp_reference`
    with ``padding_mode="border"``.

    Args:
        src: (B,C,H,W) source image (fp32, fp16 or bf16; sampled in fp32).
        depth: (B,1,H,W) target-frame depth.
        T: (B,4,4) target->source camera transform.
        K: (B,3,3) pixel intrinsics (integer coordinates are pixel centres); not differentiated.

    Returns:
        (B,C,H,W) src sampled bilinearly (border padding) at the projections of the target
        pixels, in src's dtype. Geometry and sampling are computed in fp32 (so does the reference,
        or in float64 for float64 inputs).
    """
    check_warp_args(src, depth, T, K)
    return inverse_warp_op(src, depth, T, K)
