"""Switching the ops backend changes nothing else: the SDE stage trains a few steps with the
reference ops and with the Triton kernels (interpreter on CPU) and logs the same losses."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import TINY

pytest.importorskip("triton")


def _losses(run_dir):
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["depth/total"], r["depth/photo"]) for r in recs if r["kind"] == "train"]


@pytest.mark.slow
def test_sde_losses_equal_with_reference_and_triton_backends(synthetic_root, tmp_path):
    results = {}
    for backend in ("reference", "triton"):
        env = dict(os.environ, SDESEG_OPS_BACKEND=backend, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "sdeseg.cli", "train", "demo_sde", "--run-dir", str(tmp_path / backend),
               f"data.root={synthetic_root}", *TINY, "train.steps=2", "data.batch_size=1"]
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
        results[backend] = _losses(tmp_path / backend)
    assert len(results["reference"]) == 2
    for (s1, t1, p1), (s2, t2, p2) in zip(results["reference"], results["triton"]):
        assert s1 == s2
        # Step 1 sees the same weights: only the ops' float rounding differs. Adam's first
        # updates (~lr * sign(g) where g is tiny) amplify that rounding in the following steps
        # (1e-4 relative at step 3 on this data), still far below what a change in data, RNG or
        # loss between the backends would cause (> 1e-2).
        rel = 1e-5 if s1 == 1 else 1e-3
        assert t2 == pytest.approx(t1, rel=rel) and p2 == pytest.approx(p1, rel=rel)
