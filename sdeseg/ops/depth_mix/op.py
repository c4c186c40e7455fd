"""DepthMix as a PyTorch custom op backed by the Triton kernels in ``kernel.py``.

``sdeseg::depth_mix`` has a fake (meta) implementation, so it traces under torch.compile,
and an autograd formula: the mask is boolean (no gradient to depth); each floating input
gets ``where(mask, g, 0)`` from its own image plus ``where(~mask, g, 0)`` from every image
that took it as partner (``sdeseg::depth_mix_backward``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdeseg.ops.depth_mix import kernel
from sdeseg.ops.depth_mix.reference import check_depth_mix_args

_CPU_HINT = (
    "the Triton kernels were imported without TRITON_INTERPRET=1, so they run on CUDA tensors only; "
    "use the reference backend on CPU or set TRITON_INTERPRET=1 before sdeseg.ops.*.op is imported"
)


def _check_device(t: Tensor) -> None:
    if not t.is_cuda and not kernel.INTERPRETED:
        raise RuntimeError(f"sdeseg.ops.depth_mix: tensor on {t.device}: {_CPU_HINT}")


@torch.library.custom_op("sdeseg::depth_mix", mutates_args=())
def depth_mix_op(
    depth: Tensor, tensors: list[Tensor], perm: Tensor, eps: float
) -> tuple[Tensor, list[Tensor]]:
    """Fused DepthMix on validated arguments: see :func:`depth_mix`. perm is a (B,) int64 tensor."""
    _check_device(depth)
    mask, mixed = kernel.depth_mix_forward(
        depth.contiguous(), [t.contiguous() for t in tensors], perm.contiguous(), eps
    )
    return mask, mixed


@depth_mix_op.register_fake
def _(depth, tensors, perm, eps):
    b, _, h, w = depth.shape
    mask = depth.new_empty((b, 1, h, w), dtype=torch.bool)
    # The kernel writes contiguous outputs; the fake must report the same strides.
    return mask, [t.new_empty(t.shape) for t in tensors]


@torch.library.custom_op("sdeseg::depth_mix_backward", mutates_args=())
def depth_mix_backward_op(mask: Tensor, perm: Tensor, grads: list[Tensor]) -> list[Tensor]:
    """Gradients w.r.t. the mixed inputs, one per entry of ``grads`` (same shape and dtype)."""
    _check_device(mask)
    return kernel.depth_mix_backward(mask.contiguous(), perm.contiguous(), [g.contiguous() for g in grads])


@depth_mix_backward_op.register_fake
def _(mask, perm, grads):
    return [g.new_empty(g.shape) for g in grads]


def _setup_context(ctx, inputs, output):
    _, tensors, perm, _ = inputs
    ctx.save_for_backward(output[0], perm)
    # Only floating inputs that ask for it get a gradient; integer labels never do.
    ctx.wants_grad = [t.is_floating_point() and t.requires_grad for t in tensors]


def _backward(ctx, grad_mask, grad_mixed):
    mask, perm = ctx.saved_tensors
    idx = [k for k, want in enumerate(ctx.wants_grad) if want and grad_mixed[k] is not None]
    grads_in: list[Tensor | None] = [None] * len(ctx.wants_grad)
    if idx:
        for k, g in zip(idx, depth_mix_backward_op(mask, perm, [grad_mixed[k] for k in idx])):
            grads_in[k] = g
    return None, grads_in, None, None


depth_mix_op.register_autograd(_backward, setup_context=_setup_context)


def depth_mix(
    depth: Tensor, *tensors: Tensor, perm: Tensor | None = None, eps: float = 0.0
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Fused DepthMix with the signature of :func:`~sdeseg.ops.depth_mix.reference.depth_mix_reference`.

    Args:
        depth: (B,1,H,W) floating depth, smaller = closer.
        tensors: each (B,C,H,W) (any dtype) or (B,H,W) (e.g. int64 labels).
        perm: (B,) partner indices; default ``(i + 1) % B``.
        eps: tolerance; ``mask = depth[i] < depth[perm[i]] + eps``.

    Returns:
        mask (B,1,H,W) bool and a tuple of mixed tensors (same shapes and dtypes as inputs).
    """
    perm = check_depth_mix_args(depth, tensors, perm)
    mask, mixed = depth_mix_op(depth, list(tensors), perm, float(eps))
    return mask, tuple(mixed)
