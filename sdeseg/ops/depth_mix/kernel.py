"""Triton kernels for DepthMix: mask and mixing of every tensor in one pass over the pixels.

Layout: every tensor is viewed as contiguous ``(B, C, H*W)`` (labels ``(B,H,W)`` are ``C = 1``).
A program owns ``BLOCK`` pixels of one image ``i`` (grid axis 1 = batch, axis 0 = pixel
blocks). It reads depth[i] and depth[j], ``j = perm[i]``, once, and reuses the resulting
mask for all channels of all tensors, so depth is never re-read per tensor and the mask
never makes a round trip through memory.

A Triton kernel has a fixed argument list, so one launch serves up to
``MAX_TENSORS_PER_LAUNCH`` tensors (image, label and probabilities — the DepthMix call —
fit in one). More tensors take further launches that recompute the (cheap) mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TENSORS_PER_LAUNCH = 4
BLOCK = 1024  # pixels per program: 8 per thread with 4 warps, enough loads in flight to stream


@triton.jit
def _mix_tensor(t_ptr, out_ptr, C, HW, i, j, offs, inb, keep):
    """Write ``out[i, c] = where(keep, t[i, c], t[j, c])`` for every channel c of one tensor."""
    # int64 image offsets: B*C*H*W of a batch of probabilities can pass 2**31.
    src_i = t_ptr + i.to(tl.int64) * C * HW + offs
    src_j = t_ptr + j.to(tl.int64) * C * HW + offs
    dst = out_ptr + i.to(tl.int64) * C * HW + offs
    partner = ~keep
    for _ in range(C):
        # Each pixel needs only one of the two values: masked loads halve the read traffic
        # where the mask is coherent (whole sectors skipped).
        a = tl.load(src_i, mask=inb & keep)
        b = tl.load(src_j, mask=inb & partner)
        tl.store(dst, tl.where(keep, a, b), mask=inb)
        src_i += HW
        src_j += HW
        dst += HW


@triton.jit
def depth_mix_fwd_kernel(
    depth_ptr, perm_ptr, eps_ptr, mask_ptr, HW,
    t0, o0, c0, t1, o1, c1, t2, o2, c2, t3, o3, c3,
    NUM_TENSORS: tl.constexpr, WRITE_MASK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """mask[i] = depth[i] < depth[perm[i]] + eps; mix up to 4 tensors (t_k -> o_k, c_k channels)."""
    i = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < HW
    j = tl.load(perm_ptr + i)
    d_i = tl.load(depth_ptr + i.to(tl.int64) * HW + offs, mask=inb)
    d_j = tl.load(depth_ptr + j.to(tl.int64) * HW + offs, mask=inb)
    # Same rounding as torch's ``depth[j] + eps``: the sum is formed in the op-math type
    # (eps_ptr holds eps in it: fp32, or fp64 for fp64 depth) and rounded to depth's dtype.
    eps = tl.load(eps_ptr)
    thr = (d_j.to(eps.dtype) + eps).to(d_j.dtype)
    keep = d_i.to(eps.dtype) < thr.to(eps.dtype)
    if WRITE_MASK:
        tl.store(mask_ptr + i.to(tl.int64) * HW + offs, keep, mask=inb)
    if NUM_TENSORS > 0:
        _mix_tensor(t0, o0, c0, HW, i, j, offs, inb, keep)
    if NUM_TENSORS > 1:
        _mix_tensor(t1, o1, c1, HW, i, j, offs, inb, keep)
    if NUM_TENSORS > 2:
        _mix_tensor(t2, o2, c2, HW, i, j, offs, inb, keep)
    if NUM_TENSORS > 3:
        _mix_tensor(t3, o3, c3, HW, i, j, offs, inb, keep)


@triton.jit
def _mix_grad(g_ptr, r_ptr, C, HW, t, start, end, src_ptr, mask_ptr, offs, inb, keep_t):
    """grad_in[t, c] = where(mask[t], g[t, c], 0) + sum_{i: perm[i] = t} where(~mask[i], g[i, c], 0)."""
    img = C * HW
    g_t = g_ptr + t.to(tl.int64) * img + offs
    dst = r_ptr + t.to(tl.int64) * img + offs
    for c in range(C):
        acc = tl.load(g_t, mask=inb & keep_t, other=0.0).to(tl.float32)
        for k in range(start, end):
            i = tl.load(src_ptr + k).to(tl.int64)
            keep_i = tl.load(mask_ptr + i * HW + offs, mask=inb, other=1) != 0
            g_i = tl.load(g_ptr + i * img + c * HW + offs, mask=inb & ~keep_i, other=0.0)
            acc += g_i.to(tl.float32)
        tl.store(dst, acc.to(r_ptr.dtype.element_ty), mask=inb)
        g_t += HW
        dst += HW


@triton.jit
def depth_mix_bwd_kernel(
    mask_ptr, start_ptr, src_ptr, HW,
    g0, r0, c0, g1, r1, c1, g2, r2, c2, g3, r3, c3,
    NUM_TENSORS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Gradient of the mix for up to 4 tensors; program (pixel block, t) owns grad[t].

    The forward gathers (image i reads its partner perm[i]); its adjoint is a scatter-add
    into perm[i]. Written as a gather instead — image t sums the images whose partner it
    is, listed in CSR form (``src_ptr[start_ptr[t]:start_ptr[t+1]]``) — every output
    element is written once: no atomics, no zero-fill, deterministic, fp32 accumulation.
    """
    t = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < HW
    keep_t = tl.load(mask_ptr + t.to(tl.int64) * HW + offs, mask=inb, other=0) != 0
    start = tl.load(start_ptr + t)
    end = tl.load(start_ptr + t + 1)
    if NUM_TENSORS > 0:
        _mix_grad(g0, r0, c0, HW, t, start, end, src_ptr, mask_ptr, offs, inb, keep_t)
    if NUM_TENSORS > 1:
        _mix_grad(g1, r1, c1, HW, t, start, end, src_ptr, mask_ptr, offs, inb, keep_t)
    if NUM_TENSORS > 2:
        _mix_grad(g2, r2, c2, HW, t, start, end, src_ptr, mask_ptr, offs, inb, keep_t)
    if NUM_TENSORS > 3:
        _mix_grad(g3, r3, c3, HW, t, start, end, src_ptr, mask_ptr, offs, inb, keep_t)


# Kernels built with TRITON_INTERPRET=1 set at import run on CPU tensors (and only then).
INTERPRETED = not isinstance(depth_mix_fwd_kernel, triton.runtime.JITFunction)


def _channels(t: torch.Tensor) -> int:
    return t.shape[1] if t.dim() == 4 else 1


def _slots(pairs: list[tuple[torch.Tensor, torch.Tensor]], dummy: torch.Tensor) -> list:
    """Flatten (input, output) pairs into the kernel's fixed slot arguments, padding unused slots."""
    args = []
    for k in range(MAX_TENSORS_PER_LAUNCH):
        if k < len(pairs):
            src, dst = pairs[k]
            args += [src, dst, _channels(src)]
        else:
            args += [dummy, dummy, 0]
    return args


def depth_mix_forward(
    depth: torch.Tensor,
    tensors: list[torch.Tensor],
    perm: torch.Tensor,
    eps: float,
    *,
    mask_out: torch.Tensor | None = None,
    mixed_out: list[torch.Tensor] | None = None,
    block: int = BLOCK,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Launch the fused DepthMix forward.

    Args:
        depth: (B,1,H,W) floating depth, contiguous.
        tensors: each (B,C,H,W) or (B,H,W), contiguous, any dtype, same B,H,W as depth.
        perm: (B,) int64 partner indices.
        eps: mask tolerance.
        mask_out, mixed_out: optional preallocated outputs (tests pass poisoned buffers to
            prove every element is written).
        block: pixels per program.

    Returns:
        mask (B,1,H,W) bool and one mixed tensor per input (same shape and dtype).
    """
    b, _, h, w = depth.shape
    hw = h * w
    mask = torch.empty((b, 1, h, w), dtype=torch.bool, device=depth.device) if mask_out is None else mask_out
    mixed = [torch.empty_like(t) for t in tensors] if mixed_out is None else mixed_out
    # eps in the type torch uses for ``depth + eps`` (op-math: fp32, fp64 for fp64 depth).
    eps_dtype = torch.float64 if depth.dtype == torch.float64 else torch.float32
    eps_t = torch.full((1,), eps, dtype=eps_dtype, device=depth.device)
    grid = (triton.cdiv(hw, block), b)
    pairs = list(zip(tensors, mixed))
    first = True
    while first or pairs:
        chunk, pairs = pairs[:MAX_TENSORS_PER_LAUNCH], pairs[MAX_TENSORS_PER_LAUNCH:]
        if hw > 0 and b > 0:
            depth_mix_fwd_kernel[grid](
                depth, perm, eps_t, mask, hw, *_slots(chunk, depth),
                NUM_TENSORS=len(chunk), WRITE_MASK=first, BLOCK=block,
            )  # fmt: skip
        first = False
    return mask, mixed


def depth_mix_backward(
    mask: torch.Tensor,
    perm: torch.Tensor,
    grads: list[torch.Tensor],
    *,
    out: list[torch.Tensor] | None = None,
    block: int = BLOCK,
) -> list[torch.Tensor]:
    """Gradients of the mixed tensors w.r.t. their inputs.

    Args:
        mask: (B,1,H,W) bool from the forward.
        perm: (B,) int64 partner indices.
        grads: gradients of mixed outputs, each (B,C,H,W) or (B,H,W) floating, contiguous.
        out: optional preallocated results (same shapes and dtypes as ``grads``).
        block: pixels per program.

    Returns:
        one gradient per entry of ``grads``, same shape and dtype.
    """
    b, _, h, w = mask.shape
    hw = h * w
    res = [torch.empty_like(g) for g in grads] if out is None else out
    # CSR list of "who has t as partner", built on device without a host sync (bincount
    # would sync on CUDA): sources sorted by target, start[t] = first source with target >= t.
    targets, src = torch.sort(perm, stable=True)
    start = torch.searchsorted(targets, torch.arange(b + 1, device=perm.device), out_int32=True)
    src = src.to(torch.int32)
    grid = (triton.cdiv(hw, block), b)
    pairs = list(zip(grads, res))
    while pairs and hw > 0:
        chunk, pairs = pairs[:MAX_TENSORS_PER_LAUNCH], pairs[MAX_TENSORS_PER_LAUNCH:]
        depth_mix_bwd_kernel[grid](
            mask, start, src, hw, *_slots(chunk, mask), NUM_TENSORS=len(chunk), BLOCK=block
        )
    return res
