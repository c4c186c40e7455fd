"""Fused-able ops with one public API.

``depth_mix``, ``inverse_warp`` and ``photometric_error`` dispatch to a backend:
``reference`` (plain PyTorch, any device) or ``triton`` (fused kernels; on CPU
tensors only under ``TRITON_INTERPRET=1``). ``auto`` (default) picks ``triton`` for CUDA
tensors when Triton is importable (``api.AUTO_USES_TRITON_ON_CUDA``, set since the kernels
passed ``make gpu-check`` on a real GPU) and ``reference`` otherwise. The environment variable
``SDESEG_OPS_BACKEND`` or :func:`set_backend` (driven by ``runtime.ops_backend``)
forces one.
"""

from sdeseg.ops.api import depth_mix, get_backend, inverse_warp, photometric_error, set_backend

__all__ = ["depth_mix", "inverse_warp", "photometric_error", "get_backend", "set_backend"]
