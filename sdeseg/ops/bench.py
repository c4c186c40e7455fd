"""Benchmark the fused ops against the PyTorch references.

    python -m sdeseg.ops.bench                 # on a CUDA machine: the full table
    python -m sdeseg.ops.bench --cpu           # no GPU: reference timings on CPU only
    python -m sdeseg.ops.bench --compile-check # no GPU needed: compile every kernel for sm_90

For every op and shape (the demo preset, and the paper's settings: batch 8 at 3x512x512 for
semi-supervised segmentation, batch 2 at 3x512x1024 for SDE; DepthMix mixes image, label and
19-class probabilities) it prints the reference time, the fused time and the speed-up, forward
and forward+backward, plus the fused op's achieved bandwidth: the bytes it must move at least
(every input read once, every output written once) over its time, next to the device's copy
bandwidth (a large device-to-device ``copy_``). Times are medians of CUDA-event timings after
warm-up (``triton.testing.do_bench``, which also flushes L2 between runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdeseg.ops.depth_mix.reference import depth_mix_reference
from sdeseg.ops.inverse_warp.reference import inverse_warp_reference
from sdeseg.ops.photometric_error.reference import photometric_error_reference

NUM_CLASSES = 19  # Cityscapes train classes: the probabilities DepthMix mixes
SHAPES = {  # name -> (batch, height, width); images have 3 channels
    "demo 8x96x192": (8, 96, 192),
    "semiseg 8x512x512": (8, 512, 512),
    "sde 2x512x1024": (2, 512, 1024),
}
COPY_BYTES = 1 << 30  # 1 GiB source for the copy-bandwidth measurement


@dataclass
class Case:
    """One op at one shape: its inputs, the tensors that want gradients and the bytes it must move."""

    op: str
    shape: str
    args: tuple
    leaves: list[torch.Tensor]  # inputs the backward differentiates
    bytes_fwd: int  # minimal bytes moved by the forward: inputs read once, outputs written once
    bytes_fwd_bwd: int  # ... by forward + backward

    def fwd(self, fn: Callable) -> Callable[[], object]:
        def run():
            with torch.no_grad():  # forward-only timing: no graph, nothing saved for backward
                return fn(*self.args)

        return run

    def fwd_bwd(self, fn: Callable) -> Callable[[], object]:
        # Dense random output gradients, drawn once, as a loss hands them back: seeding with
        # ``o.sum()`` would give stride-0 expanded ones, which an op that needs contiguous
        # gradients first materialises (a full extra copy that training never makes).
        seeds: list[torch.Tensor] = []

        def run():
            outs = [t for t in _flatten(fn(*self.args)) if t.is_floating_point()]
            if not seeds:
                seeds.extend(torch.randn_like(o) for o in outs)
            return torch.autograd.grad(outs, self.leaves, grad_outputs=seeds)

        return run


REFERENCE = {
    "depth_mix": depth_mix_reference,
    "inverse_warp": inverse_warp_reference,
    "photometric_error": photometric_error_reference,
}


def fused_ops() -> dict[str, Callable]:
    """The fused ops (imported here: Triton is only needed when they are benchmarked)."""
    from sdeseg.ops.depth_mix.op import depth_mix
    from sdeseg.ops.inverse_warp.op import inverse_warp
    from sdeseg.ops.photometric_error.op import photometric_error

    return {"depth_mix": depth_mix, "inverse_warp": inverse_warp, "photometric_error": photometric_error}


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _flatten(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for item in x for t in _flatten(item)]


def _pose(batch: int, device: torch.device) -> torch.Tensor:
    """Small random rigid motions (a few degrees, tens of centimetres): a typical frame pair."""
    g = torch.Generator().manual_seed(0)
    angles = (torch.rand(batch, 3, generator=g) - 0.5) * 0.1
    t = torch.eye(4).repeat(batch, 1, 1)
    for b in range(batch):
        (cx, cy, cz), (sx, sy, sz) = torch.cos(angles[b]).tolist(), torch.sin(angles[b]).tolist()
        r_x = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        r_y = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        r_z = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        t[b, :3, :3] = r_z @ r_y @ r_x
    t[:, :3, 3] = (torch.rand(batch, 3, generator=g) - 0.5) * 0.5
    return t.to(device)


def _intrinsics(batch: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    k = torch.tensor([[0.58 * w, 0.0, 0.5 * w], [0.0, 1.92 * h, 0.5 * h], [0.0, 0.0, 1.0]])  # KITTI-like
    return k.repeat(batch, 1, 1).to(device)


def build_cases(device: torch.device) -> list[Case]:
    """Inputs for every op and shape, set up the way training uses the op."""
    torch.manual_seed(0)
    cases = []
    for name, (b, h, w) in SHAPES.items():
        pixels = b * h * w
        # DepthMix: image, label and teacher probabilities mixed by one mask (semi-supervised step).
        depth = torch.rand(b, 1, h, w, device=device) * 80 + 1
        image = torch.rand(b, 3, h, w, device=device, requires_grad=True)
        label = torch.randint(0, NUM_CLASSES, (b, h, w), device=device)
        probs = torch.rand(b, NUM_CLASSES, h, w, device=device).softmax(1).requires_grad_()
        mix_fwd = _nbytes(depth, image, label, probs) + pixels + _nbytes(image, label, probs)  # + bool mask
        mix_bwd = pixels + 2 * _nbytes(image, probs)  # mask, grads in, grads out
        cases.append(
            Case("depth_mix", name, (depth, image, label, probs), [image, probs], mix_fwd, mix_fwd + mix_bwd)
        )
        # Inverse warp as in SDE training: gradients to depth and pose; the source frame is data.
        src = torch.rand(b, 3, h, w, device=device)
        warp_depth = (torch.rand(b, 1, h, w, device=device) * 20 + 1).requires_grad_()
        pose = _pose(b, device).requires_grad_()
        k = _intrinsics(b, h, w, device)
        warp_fwd = _nbytes(src, warp_depth, src)  # src and depth in, warped out
        warp_bwd = _nbytes(src, src, warp_depth, warp_depth)  # grad in, src and depth re-read, grad depth out
        cases.append(Case("inverse_warp", name, (src, warp_depth, pose, k), [warp_depth, pose], warp_fwd,
                          warp_fwd + warp_bwd))  # fmt: skip
        # Photometric error of a warped prediction against the target frame (gradient to pred).
        target = torch.rand(b, 3, h, w, device=device)
        pred = (target + 0.1 * torch.randn_like(target)).clamp(0, 1).requires_grad_()
        pe_fwd = _nbytes(pred, target) + pixels * 4
        pe_bwd = pixels * 4 + _nbytes(pred, target, pred)  # grad in, inputs, grad pred out
        cases.append(Case("photometric_error", name, (pred, target), [pred], pe_fwd, pe_fwd + pe_bwd))
    return cases


def _time_cuda(fn: Callable[[], object]) -> float:
    """Median milliseconds over CUDA events after warm-up."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def _time_cpu(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    src = torch.empty(COPY_BYTES // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_cuda(lambda: dst.copy_(src))
    return 2 * COPY_BYTES / (ms * 1e-3) / 1e9


def run_cuda() -> None:
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    copy_bw = copy_bandwidth_gbs()
    print(f"copy bandwidth (1 GiB device-to-device copy_, read + write): {copy_bw:.0f} GB/s\n")
    print("| op | shape | pass | reference ms | fused ms | speed-up | fused GB/s | % of copy |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    fused = fused_ops()
    for case in build_cases(device):
        ref, fast = REFERENCE[case.op], fused[case.op]
        for label, nbytes, wrap in (
            ("fwd", case.bytes_fwd, case.fwd),
            ("fwd+bwd", case.bytes_fwd_bwd, case.fwd_bwd),
        ):
            t_ref = _time_cuda(wrap(ref))
            t_fused = _time_cuda(wrap(fast))
            gbs = nbytes / (t_fused * 1e-3) / 1e9
            print(
                f"| {case.op} | {case.shape} | {label} | {t_ref:.3f} | {t_fused:.3f} | "
                f"{t_ref / t_fused:.2f}x | {gbs:.0f} | {100 * gbs / copy_bw:.0f}% |"
            )


def run_cpu(reps: int) -> None:
    print(f"CPU, reference only ({torch.get_num_threads()} threads), median of {reps} runs\n")
    print("| op | shape | pass | reference ms |\n|---|---|---|---:|")
    for case in build_cases(torch.device("cpu")):
        ref = REFERENCE[case.op]
        for label, wrap in (("fwd", case.fwd), ("fwd+bwd", case.fwd_bwd)):
            print(f"| {case.op} | {case.shape} | {label} | {_time_cpu(wrap(ref), reps):.1f} |")


# Representative specialisations of every kernel for --compile-check: argument types by name
# (pointers "*dtype", scalars "i32"/"fp32"); everything not listed is an i32 scalar.
_PTR32 = "*fp32"


def _compile_specs():
    from sdeseg.ops.depth_mix import kernel as dm
    from sdeseg.ops.inverse_warp import kernel as iw
    from sdeseg.ops.photometric_error import kernel as pe

    mix_types = {"depth_ptr": "*bf16", "perm_ptr": "*i64", "eps_ptr": "*fp32", "mask_ptr": "*i1"}
    for k, ty in enumerate(("*fp32", "*i64", "*bf16", "*u8")):
        mix_types.update({f"t{k}": ty, f"o{k}": ty})
    grad_types = {"mask_ptr": "*i1", "start_ptr": "*i32", "src_ptr": "*i32"}
    for k, ty in enumerate(("*fp32", "*bf16", "*fp16", "*fp32")):
        grad_types.update({f"g{k}": ty, f"r{k}": ty})
    warp_types = {
        n: _PTR32 for n in ("src_ptr", "depth_ptr", "t_ptr", "k_ptr", "out_ptr", "grad_ptr", "gsrc_ptr",
                            "gdepth_ptr", "gt_part_ptr")
    }  # fmt: skip
    pe_types = {n: _PTR32 for n in ("x_ptr", "y_ptr", "out_ptr", "g_ptr", "coef_ptr", "gx_ptr", "gy_ptr")}
    pe_types.update(alpha="fp32", one_minus_alpha="fp32")
    ssim = {"C1": pe.SSIM_C1, "C2": pe.SSIM_C2}
    tile = {"BLOCK_H": pe.BLOCK_H, "BLOCK_W": pe.BLOCK_W}
    return [
        (dm.depth_mix_fwd_kernel, mix_types, {"NUM_TENSORS": 4, "WRITE_MASK": True, "BLOCK": dm.BLOCK}),
        (dm.depth_mix_fwd_kernel, mix_types, {"NUM_TENSORS": 1, "WRITE_MASK": False, "BLOCK": dm.BLOCK}),
        (dm.depth_mix_bwd_kernel, grad_types, {"NUM_TENSORS": 4, "BLOCK": dm.BLOCK}),
        (iw.inverse_warp_fwd_kernel, warp_types, {"BLOCK": iw.BLOCK_FWD}),
        (
            iw.inverse_warp_bwd_kernel,
            warp_types,
            {"NEED_SRC": True, "NEED_GEOM": True, "BLOCK": iw.BLOCK_BWD},
        ),
        (
            iw.inverse_warp_bwd_kernel,
            warp_types,
            {"NEED_SRC": False, "NEED_GEOM": True, "BLOCK": iw.BLOCK_BWD},
        ),
        (
            iw.inverse_warp_bwd_kernel,
            warp_types,
            {"NEED_SRC": True, "NEED_GEOM": False, "BLOCK": iw.BLOCK_BWD},
        ),
        (pe.photometric_fwd_kernel, pe_types, {**ssim, "HAS_SSIM": True, **tile}),
        (pe.photometric_fwd_kernel, pe_types, {**ssim, "HAS_SSIM": False, **tile}),
        (pe.photometric_coef_kernel, pe_types, {**ssim, **tile}),
        (pe.photometric_grad_kernel, pe_types, {"HAS_SSIM": True, "NEED_X": True, "NEED_Y": True, **tile}),
        (pe.photometric_grad_kernel, pe_types, {"HAS_SSIM": False, "NEED_X": True, "NEED_Y": False, **tile}),
        # Triton turns integer arguments equal to 1 into constants: single-channel and
        # one-pixel-wide inputs compile to different code.
        (dm.depth_mix_bwd_kernel, grad_types, {"NUM_TENSORS": 1, "BLOCK": dm.BLOCK, "c0": 1, "HW": 1}),
        (iw.inverse_warp_fwd_kernel, warp_types, {"BLOCK": iw.BLOCK_FWD, "C": 1, "W": 1}),
        (
            iw.inverse_warp_bwd_kernel,
            warp_types,
            {"NEED_SRC": True, "NEED_GEOM": True, "BLOCK": iw.BLOCK_BWD, "C": 1, "H": 1},
        ),  # fmt: skip
        (pe.photometric_coef_kernel, pe_types, {**ssim, **tile, "C": 1}),
        (
            pe.photometric_grad_kernel,
            pe_types,
            {"HAS_SSIM": True, "NEED_X": True, "NEED_Y": True, **tile, "C": 1},
        ),
    ]


def compile_check(arch: int = 90) -> int:
    """Compile every kernel to a cubin for ``sm_<arch>`` without a GPU; returns the failure count.

    Proves the compiled (non-interpreter) path type-checks and lowers: the interpreter accepts
    things the compiler rejects (non-constexpr globals, dynamic shapes, Python semantics).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = 0
    for fn, types, constexprs in _compile_specs():
        if not isinstance(fn, triton.runtime.JITFunction):
            print(
                "kernels were imported in interpreter mode (TRITON_INTERPRET=1); unset it for --compile-check"
            )
            return 1
        signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
        what = f"{fn.__name__} {constexprs}"
        try:
            compiled = triton.compile(
                ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32)
            )
            print(f"ok    {what}: cubin {len(compiled.asm['cubin'])} bytes")
        except Exception as exc:  # report every kernel, not just the first failure
            failures += 1
            print(f"FAIL  {what}: {type(exc).__name__}: {exc}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="time the references on CPU (no GPU needed)")
    parser.add_argument("--reps", type=int, default=5, help="CPU repetitions (median)")
    parser.add_argument(
        "--compile-check", action="store_true", help="compile all kernels for sm_90, no GPU needed"
    )
    args = parser.parse_args(argv)
    if args.compile_check:
        return 1 if compile_check() else 0
    if args.cpu:
        run_cpu(args.reps)
        return 0
    if not torch.cuda.is_available():
        print(
            "sdeseg.ops.bench: no CUDA device, nothing to benchmark. The fused ops need a GPU; "
            "use --cpu for reference timings on CPU or --compile-check to compile the kernels."
        )
        return 0
    run_cuda()
    return 0


if __name__ == "__main__":
    sys.exit(main())
