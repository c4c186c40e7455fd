"""The GPU check: everything the fused ops must pass on a real GPU, in one run, in one table.

    make gpu-check                              # = python -m tune.gpu_check --out gpu_check
    python -m tune.gpu_check --out DIR [--steps 30] [--budget 450]

On a CUDA machine, in this order, each step with its own time budget inside one overall budget
(default 450 s: under 8 minutes on one H200):

1. environment: GPU, driver, torch, CUDA and Triton versions;
2. the CUDA tests (``CUDA_TESTS``: the kernels against the references, forward and backward);
3. ``python -m sdeseg.ops.bench``: reference and fused times (full table in ``bench.md``), and
   ``python -m sdeseg.data.bench --handoff``: what handing the paper size's SDE batch to the GPU
   costs the training process, float32 converted on the host against uint8 converted on the GPU;
4. a small synthetic dataset (``sdeseg prep synthetic``);
5. the SDE stage (``demo_sde``) and the semi-supervised stage (``demo_semiseg``, from the
   reference SDE run's export), ``--steps`` steps each, bf16 on the GPU, once with
   ``runtime.ops_backend=reference`` and once with ``triton``, and a row comparing the two:
   step-1 loss, the mean loss of the last steps, the validation metric, the speed.

A step that fails or runs out of time is recorded and the next one runs: one run on a scarce GPU
yields every figure. Writes ``DIR/gpu_check.md`` (one table: step, result, seconds, figures),
``DIR/gpu_check.json`` (the same with every figure) and ``DIR/logs/`` (each step's output).
Exit code 0 when every step passed, 1 otherwise, 2 (and nothing run) without a CUDA device.

A passing check is what allows ``sdeseg.ops.api.AUTO_USES_TRITON_ON_CUDA = True``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_TESTS = (  # the tests with CUDA-only cases
    "tests/test_ops_fused.py",
    "tests/test_reader.py::test_pinned_uint8_batches_copy_to_the_gpu_and_convert_there",
)
BACKENDS = ("reference", "triton")
DEFAULT_BUDGET_S = 450.0  # the whole check; 8 minutes is the promise
BUDGETS_S = {  # per step; a step also stops at the overall deadline
    "environment": 30, "cuda_tests": 150, "bench": 75, "handoff": 30, "data": 45, "train": 45,
}
DATA = {"num_train": 96, "num_val": 16, "num_test": 16, "size": "96x192"}
# Agreement of a run with the Triton ops and one with the reference ops (same seed, data, weights).
# Step 1 sees the same weights: only the ops' float rounding differs. Adam amplifies that rounding
# in later steps, so those are compared more loosely; a wrong kernel shows up far beyond both.
FIRST_STEP_RTOL = 1e-2
LAST_STEPS = 5  # the mean loss of the last steps of each run is compared
WARMUP_STEPS = 5  # left out of the step time: kernel compilation, allocator and cuDNN warm-up
LAST_STEPS_RTOL = 0.1
METRIC_ATOL = 0.05  # depth/abs_rel, seg/miou after a few dozen steps
OUTPUTS = ("logs", "runs", "data", "bench.md", "gpu_check.md", "gpu_check.json")  # what a check writes in --out
STAGES = {  # stage -> (preset, loss key, metric key)
    "sde": ("demo_sde", "depth/total", "depth/abs_rel"),
    "semiseg": ("demo_semiseg", "seg/total", "seg/miou"),
}


class StepFailed(Exception):
    """A step's check did not hold; the message goes into the table."""


class StepTimeout(Exception):
    pass


@dataclass
class Outcome:
    """One row of the table."""

    step: str
    result: str = "pass"  # pass | FAIL | TIMEOUT | skipped
    seconds: float = 0.0
    summary: str = ""  # the figures, in words, for the table
    figures: dict = field(default_factory=dict)
    log: str | None = None


class GpuCheck:
    """Runs steps against one deadline and keeps every outcome, whatever a step does."""

    def __init__(self, out: Path, budget_s: float = DEFAULT_BUDGET_S):
        self.out = Path(out)
        for name in OUTPUTS:  # a run directory left from an earlier check would be resumed, not rerun
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True)
        self.deadline = time.monotonic() + budget_s
        self.outcomes: list[Outcome] = []
        self.runs: dict[tuple[str, str], dict] = {}  # (stage, backend) -> parsed run figures

    @property
    def passed(self) -> bool:
        return bool(self.outcomes) and all(o.result == "pass" for o in self.outcomes)

    def run(self, step: str, budget_s: float, fn: Callable[[float], tuple[str, dict]]) -> Outcome:
        """Run ``fn(timeout_s) -> (summary, figures)``; any exception becomes this step's failure."""
        outcome = Outcome(step)
        timeout = min(budget_s, self.deadline - time.monotonic())
        if timeout < 1:
            outcome.result, outcome.summary = "skipped", "no time left in the overall budget"
        else:
            start = time.monotonic()
            try:
                outcome.summary, outcome.figures = fn(timeout)
            except StepTimeout as e:
                outcome.result, outcome.summary = "TIMEOUT", str(e)
            except StepFailed as e:
                outcome.result, outcome.summary = "FAIL", str(e)
            except Exception as e:  # a broken step must not cost the other steps their figures
                outcome.result, outcome.summary = "FAIL", f"{type(e).__name__}: {e}"
            outcome.seconds = time.monotonic() - start
        log = self.logs / f"{_slug(step)}.log"
        outcome.log = str(log.relative_to(self.out)) if log.exists() else None
        self.outcomes.append(outcome)
        print(f"[gpu-check] {step}: {outcome.result} ({outcome.seconds:.0f} s) {outcome.summary}", flush=True)
        return outcome

    def command(self, step: str, argv: list[str], timeout: float) -> str:
        """Run ``argv`` from the repository root, output to ``logs/<step>.log``; returns the output.
        Raises StepTimeout (after killing its whole process group) or StepFailed on a non-zero exit."""
        log = self.logs / f"{_slug(step)}.log"
        # a forced backend or interpreted kernels would change what is being checked
        env = {k: v for k, v in os.environ.items() if k not in ("SDESEG_OPS_BACKEND", "TRITON_INTERPRET")}
        env["PYTHONUNBUFFERED"] = "1"
        with log.open("w") as f:
            f.write(f"$ {' '.join(argv)}\n")
            f.flush()
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the children go too
                proc.wait()
                raise StepTimeout(f"stopped after {timeout:.0f} s (log: {log.name})") from None
        output = log.read_text(errors="replace")
        if rc != 0:
            tail = " | ".join(line for line in output.strip().splitlines()[-3:])
            raise StepFailed(f"exit code {rc}: {tail[-300:]}")
        return output

    def write(self) -> Path:
        """``gpu_check.md`` (one table) and ``gpu_check.json``; returns the markdown path."""
        lines = ["# GPU check", "",
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}: **{'PASS' if self.passed else 'FAIL'}** "
                 f"({sum(o.result == 'pass' for o in self.outcomes)}/{len(self.outcomes)} steps passed). "
                 "Logs in `logs/`.", "",
                 "| step | result | seconds | figures |", "|---|---|---:|---|"]
        for o in self.outcomes:
            lines.append(f"| {o.step} | {o.result} | {o.seconds:.1f} | {_cell(o.summary)} |")
        md = self.out / "gpu_check.md"
        md.write_text("\n".join(lines) + "\n")
        data = {"passed": self.passed, "steps": [asdict(o) for o in self.outcomes]}
        (self.out / "gpu_check.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        return md


def _slug(step: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", step.lower()).strip("_")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------- the steps


def environment(timeout: float) -> tuple[str, dict]:
    import torch

    figures = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
               "capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}
    try:
        import triton

        figures["triton"] = triton.__version__
    except ImportError:
        figures["triton"] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=min(timeout, 20))
        figures["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        figures["driver"] = None
    summary = (f"{figures['gpu']} (sm_{figures['capability'].replace('.', '')}), driver {figures['driver']}, "
               f"torch {figures['torch']} (CUDA {figures['cuda']}), triton {figures['triton']}")
    if figures["triton"] is None:
        raise StepFailed(summary + ": Triton is not installed")
    return summary, figures


def parse_junit(path: Path) -> dict:
    """Counts from a pytest JUnit XML file, for all cases and for the ``[cuda...]`` ones."""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "cuda_passed", "cuda_failed")}
    failed_names = []
    for case in ET.parse(path).getroot().iter("testcase"):
        kind = ("failed" if case.find("failure") is not None or case.find("error") is not None
                else "skipped" if case.find("skipped") is not None else "passed")
        counts[kind] += 1
        if "[cuda" in case.get("name", "") and kind != "skipped":
            counts[f"cuda_{kind}"] += 1
        if kind == "failed":
            failed_names.append(case.get("name"))
    counts["failed_names"] = failed_names
    return counts


def cuda_tests(check: GpuCheck, timeout: float) -> tuple[str, dict]:
    junit = check.logs / "cuda_tests.xml"
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *CUDA_TESTS]
    try:
        check.command("CUDA tests", argv, timeout)
        error = None
    except StepFailed as e:  # failures are counted below from the XML
        error = e
    if not junit.exists():
        raise error or StepFailed("pytest wrote no report")
    c = parse_junit(junit)
    summary = (f"{' '.join(CUDA_TESTS)}: {c['passed']} passed ({c['cuda_passed']} on CUDA), {c['failed']} failed, "
               f"{c['skipped']} skipped")
    if c["failed"]:
        summary += "; failed: " + ", ".join(c["failed_names"][:5])
    if error is not None or c["failed"]:
        raise StepFailed(summary)
    if c["cuda_passed"] == 0:
        raise StepFailed(summary + ": no CUDA case ran")
    return summary, c


_BENCH_ROW = re.compile(r"^\|\s*(\w+)\s*\|\s*([^|]+?)\s*\|\s*(fwd\+bwd|fwd)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|"
                        r"\s*([\d.]+)x\s*\|\s*(\d+)\s*\|\s*(\d+)%\s*\|$")


def parse_bench(text: str) -> list[dict]:
    """The rows of ``python -m sdeseg.ops.bench``'s CUDA table."""
    rows = []
    for line in text.splitlines():
        m = _BENCH_ROW.match(line.strip())
        if m:
            op, shape, which, ref, fused, speedup, gbs, pct = m.groups()
            rows.append({"op": op, "shape": shape, "pass": which, "reference_ms": float(ref),
                         "fused_ms": float(fused), "speedup": float(speedup), "fused_gbs": int(gbs),
                         "pct_of_copy": int(pct)})
    return rows


def bench(check: GpuCheck, timeout: float) -> tuple[str, dict]:
    output = check.command("ops benchmark", [sys.executable, "-m", "sdeseg.ops.bench"], timeout)
    rows = parse_bench(output)
    if not rows:
        raise StepFailed("no benchmark rows in the output")
    (check.out / "bench.md").write_text("\n".join(line for line in output.splitlines()
                                                  if line.startswith(("|", "device", "copy"))) + "\n")
    parts = []
    for op in dict.fromkeys(r["op"] for r in rows):
        ups = [r["speedup"] for r in rows if r["op"] == op and r["pass"] == "fwd+bwd"]
        if ups:
            parts.append(f"{op} {min(ups):.2f}-{max(ups):.2f}x")
    return "fused/reference fwd+bwd speed-up " + ", ".join(parts) + " (bench.md)", {"rows": rows}


def make_data(check: GpuCheck, root: Path, timeout: float) -> tuple[str, dict]:
    argv = [sys.executable, "-m", "sdeseg.cli", "prep", "synthetic", "--out", str(root), "--quiet",
            "--num-train", str(DATA["num_train"]), "--num-val", str(DATA["num_val"]),
            "--num-test", str(DATA["num_test"]), "--size", DATA["size"], "--procs", str(min(os.cpu_count() or 1, 16))]
    check.command("synthetic data", argv, timeout)
    return (f"{DATA['num_train']} train / {DATA['num_val']} val / {DATA['num_test']} test at {DATA['size']}",
            dict(DATA))


def train_overrides(data_root: Path, backend: str, steps: int) -> list[str]:
    """What the short GPU runs change in the demo presets (one process, one GPU, bf16)."""
    return [f"data.root={data_root}", "data.num_workers=2", f"train.steps={steps}", "train.log_every=1",
            "train.val_every=0", "train.ckpt_every=0", "runtime.in_process=true", "runtime.num_workers=1",
            "runtime.use_gpu=true", "runtime.precision=bf16", f"runtime.ops_backend={backend}"]


def read_run(run_dir: Path, loss_key: str, metric_key: str) -> dict:
    """Losses per step, the median step time after warm-up, and the final figures of a finished run."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_records = [r for r in records if r.get("kind") == "train"]
    losses = [r[loss_key] for r in train_records if loss_key in r]
    step_s = [r["perf/step_s"] for r in train_records if "perf/step_s" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    exports = summary.get("exports", {})
    return {"losses": losses, "metric": summary.get(metric_key),
            "step_s": statistics.median(step_s[WARMUP_STEPS:] or step_s) if step_s else None,
            "export": exports.get("best") or exports.get("last")}


def train(check: GpuCheck, stage: str, backend: str, data_root: Path, steps: int, timeout: float,
          extra: list[str] = ()) -> tuple[str, dict]:
    preset, loss_key, metric_key = STAGES[stage]
    run_dir = check.out / "runs" / f"{stage}_{backend}"
    argv = [sys.executable, "-m", "sdeseg.cli", "train", preset, "--run-dir", str(run_dir),
            *train_overrides(data_root, backend, steps), *extra]
    check.command(f"{stage}, {backend} ops", argv, timeout)
    run = read_run(run_dir, loss_key, metric_key)
    check.runs[(stage, backend)] = run
    losses = run["losses"]
    if len(losses) != steps or not all(math.isfinite(v) for v in losses):
        raise StepFailed(f"{len(losses)} train losses for {steps} steps, finite: "
                         f"{all(math.isfinite(v) for v in losses)}")
    return (f"{loss_key} {losses[0]:.4f} (step 1) -> {losses[-1]:.4f} (step {steps}); {metric_key} "
            f"{run['metric']:.4f}; {1e3 * run['step_s']:.1f} ms/step (median after step {WARMUP_STEPS})"), run


def compare_runs(reference: dict, triton: dict) -> tuple[bool, str, dict]:
    """Do a Triton run and a reference run agree? (ok, summary, figures)"""
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)
    first = rel(triton["losses"][0], reference["losses"][0])
    last = rel(statistics.fmean(triton["losses"][-LAST_STEPS:]), statistics.fmean(reference["losses"][-LAST_STEPS:]))
    metric = abs(triton["metric"] - reference["metric"])
    speedup = reference["step_s"] / triton["step_s"]
    figures = {"first_step_rel": first, "last_steps_rel": last, "metric_abs": metric, "speedup": speedup}
    ok = first <= FIRST_STEP_RTOL and last <= LAST_STEPS_RTOL and metric <= METRIC_ATOL
    summary = (f"step-1 loss differs {first:.2%} (<= {FIRST_STEP_RTOL:.0%}), last-{LAST_STEPS} mean "
               f"{last:.2%} (<= {LAST_STEPS_RTOL:.0%}), metric {metric:.4f} (<= {METRIC_ATOL}); "
               f"speed-up {speedup:.2f}x (reference ms/step over triton's)")
    return ok, summary, figures


_HANDOFF_ROW = re.compile(r"^\|\s*(host float32|uint8, converted on the device)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|$")


def parse_handoff(text: str) -> dict:
    """``python -m sdeseg.data.bench --handoff``'s two rows: hand-off -> (ms per batch, image MB copied)."""
    rows = {}
    for line in text.splitlines():
        m = _HANDOFF_ROW.match(line.strip())
        if m:
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return rows


def handoff(check: GpuCheck, timeout: float) -> tuple[str, dict]:
    output = check.command("batch hand-off", [sys.executable, "-m", "sdeseg.data.bench", "--handoff"], timeout)
    rows = parse_handoff(output)
    if len(rows) != 2:
        raise StepFailed("no hand-off rows in the output")
    (host_ms, host_mb), (dev_ms, dev_mb) = rows["host float32"], rows["uint8, converted on the device"]
    return (f"SDE batch 2x3 frames 512x1024 to the GPU: float32 converted on the host {host_ms:.1f} ms "
            f"({host_mb:.0f} MB), uint8 converted on the GPU {dev_ms:.1f} ms ({dev_mb:.0f} MB)"), {
        "host_float32_ms": host_ms, "host_float32_mb": host_mb, "uint8_on_device_ms": dev_ms,
        "uint8_on_device_mb": dev_mb}


def compare(check: GpuCheck, stage: str) -> tuple[str, dict]:
    missing = [b for b in BACKENDS if (stage, b) not in check.runs]
    if missing:
        raise StepFailed(f"no finished run with the {', '.join(missing)} ops to compare")
    ok, summary, figures = compare_runs(check.runs[(stage, "reference")], check.runs[(stage, "triton")])
    if not ok:
        raise StepFailed(summary)
    return summary, figures


def run_all(check: GpuCheck, steps: int) -> None:
    """Every step, in order, each recorded whatever the others did."""
    check.run("environment", BUDGETS_S["environment"], environment)
    check.run("CUDA tests", BUDGETS_S["cuda_tests"], lambda t: cuda_tests(check, t))
    check.run("ops benchmark", BUDGETS_S["bench"], lambda t: bench(check, t))
    check.run("batch hand-off", BUDGETS_S["handoff"], lambda t: handoff(check, t))
    data_root = check.out / "data"
    check.run("synthetic data", BUDGETS_S["data"], lambda t: make_data(check, data_root, t))
    for backend in BACKENDS:
        check.run(f"sde, {backend} ops", BUDGETS_S["train"],
                  lambda t, b=backend: train(check, "sde", b, data_root, steps, t))
    check.run("sde: triton vs reference", 5, lambda t: compare(check, "sde"))

    def semiseg(backend: str, timeout: float) -> tuple[str, dict]:
        # both runs start from the same SDE export (the reference run's when there is one)
        exports = [check.runs[("sde", b)]["export"] for b in BACKENDS if ("sde", b) in check.runs]
        if not exports:
            raise StepFailed("no SDE export to start from (both SDE runs failed)")
        return train(check, "semiseg", backend, data_root, steps, timeout, [f"semiseg.sde_checkpoint={exports[0]}"])

    for backend in BACKENDS:
        check.run(f"semiseg, {backend} ops", BUDGETS_S["train"], lambda t, b=backend: semiseg(b, t))
    check.run("semiseg: triton vs reference", 5, lambda t: compare(check, "semiseg"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check", help="output directory (default gpu_check)")
    parser.add_argument("--steps", type=int, default=30, help="training steps of each short run (default 30)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole check (default {DEFAULT_BUDGET_S:.0f})")
    args = parser.parse_args(argv)
    if args.steps <= LAST_STEPS:
        parser.error(f"--steps must be more than {LAST_STEPS}")
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"tune.gpu_check: no CUDA device here (torch {torch.__version__}, {build}); nothing was run. "
              "Run it on a machine with an NVIDIA GPU and the CUDA build of torch.", file=sys.stderr)
        return 2
    check = GpuCheck(Path(args.out).resolve(), args.budget)
    try:
        run_all(check, args.steps)
    finally:  # even when interrupted: the steps done so far still make a table
        md = check.write()
    print(md.read_text())
    print(f"table: {md}\nfigures: {md.with_suffix('.json')}")
    return 0 if check.passed else 1


if __name__ == "__main__":
    sys.exit(main())
