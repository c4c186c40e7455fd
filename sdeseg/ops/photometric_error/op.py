"""Photometric error as a PyTorch custom op backed by the Triton kernels in ``kernel.py``.

``sdeseg::photometric_error`` has a fake (meta) implementation for torch.compile and an
autograd formula through ``sdeseg::photometric_error_backward`` (coefficient + adjoint-stencil
kernels) giving gradients for pred and target.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdeseg.ops.photometric_error import kernel

_CPU_HINT = (
    "the Triton kernels were imported without TRITON_INTERPRET=1, so they run on CUDA tensors only; "
    "use the reference backend on CPU or set TRITON_INTERPRET=1 before sdeseg.ops.*.op is imported"
)


def _check_device(t: Tensor) -> None:
    if not t.is_cuda and not kernel.INTERPRETED:
        raise RuntimeError(f"sdeseg.ops.photometric_error: tensor on {t.device}: {_CPU_HINT}")


@torch.library.custom_op("sdeseg::photometric_error", mutates_args=())
def photometric_error_op(pred: Tensor, target: Tensor, alpha: float) -> Tensor:
    """Fused photometric error on validated arguments: see :func:`photometric_error`."""
    _check_device(pred)
    return kernel.photometric_error_forward(pred.contiguous(), target.contiguous(), alpha)


@photometric_error_op.register_fake
def _(pred, target, alpha):
    b, _, h, w = pred.shape
    return pred.new_empty((b, 1, h, w))


@torch.library.custom_op("sdeseg::photometric_error_backward", mutates_args=())
def photometric_error_backward_op(
    grad: Tensor, pred: Tensor, target: Tensor, alpha: float, need_pred: bool, need_target: bool
) -> tuple[Tensor, Tensor]:
    """(grad_pred, grad_target), each (B,C,H,W) in pred's dtype; one not asked for is an empty tensor."""
    _check_device(pred)
    g_pred, g_target = kernel.photometric_error_backward(
        grad.contiguous(), pred.contiguous(), target.contiguous(), alpha, need_pred, need_target
    )
    # A custom op returns tensors, never None: an empty tensor stands for "not computed".
    return (
        g_pred if g_pred is not None else pred.new_empty(0),
        g_target if g_target is not None else target.new_empty(0),
    )


@photometric_error_backward_op.register_fake
def _(grad, pred, target, alpha, need_pred, need_target):
    return (
        pred.new_empty(pred.shape if need_pred else (0,)),
        target.new_empty(target.shape if need_target else (0,)),
    )


def _setup_context(ctx, inputs, output):
    pred, target, alpha = inputs
    ctx.save_for_backward(pred, target)
    ctx.alpha = alpha


def _backward(ctx, grad):
    pred, target = ctx.saved_tensors
    need_pred, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_pred or need_target):
        return None, None, None
    g_pred, g_target = photometric_error_backward_op(grad, pred, target, ctx.alpha, need_pred, need_target)
    return (g_pred if need_pred else None, g_target if need_target else None, None)


photometric_error_op.register_autograd(_backward, setup_context=_setup_context)


def photometric_error(pred: Tensor, target: Tensor, alpha: float = 0.85) -> Tensor:
    """Fused ``alpha * (1 - SSIM)/2 + (1 - alpha) * |pred - target|``, both averaged over channels.

    Same semantics as :func:`~sdeseg.ops.photometric_error.reference.photometric_error_reference`:
    SSIM from 3x3 means of reflection-padded inputs, C1 = 0.01^2, C2 = 0.03^2, (1 - SSIM)/2
    clamped to [0, 1]; statistics in fp32 whatever the input dtype.

    Args:
        pred, target: (B,C,H,W) images (H, W >= 2 for the reflection padding).
        alpha: SSIM weight.

    Returns:
        (B,1,H,W) per-pixel error in the inputs' (promoted) dtype.
    """
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(
            f"photometric_error: pred and target must be equal (B,C,H,W), got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if alpha != 0 and (pred.shape[2] < 2 or pred.shape[3] < 2):
        raise ValueError(
            f"photometric_error: H and W must be >= 2 for reflection padding, got {tuple(pred.shape)}"
        )
    if pred.dtype != target.dtype:  # the reference promotes; the kernel reads one dtype
        dtype = torch.promote_types(pred.dtype, target.dtype)
        pred, target = pred.to(dtype), target.to(dtype)
    return photometric_error_op(pred, target, float(alpha))
