"""``sdeseg demo`` end to end at test scale: SDE stage, DepthMix stage, supervised baseline,
report with figures, and summary.json with the flat keys the issue names."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from sdeseg.cli import main
from sdeseg.commands.demo import demo_precision
from sdeseg.runtime.engine import cpu_has_bf16
from tests.conftest import TINY

FIGURES = ("inputs", "depth", "segmentation", "depthmix", "curves")


def test_demo_runs_both_stages_and_writes_report_and_summary(synthetic_root, tmp_path, capsys):
    out = tmp_path / "demo"
    manifest = Path(synthetic_root) / "manifest.parquet"
    manifest_mtime = manifest.stat().st_mtime_ns
    rc = main(["demo", "--out", str(out), "--data", synthetic_root, "--sde-steps", "3", "--seg-steps", "2",
               "--baseline", *TINY, "data.num_labeled=4"])
    assert rc == 0
    assert manifest.stat().st_mtime_ns == manifest_mtime  # existing data is reused, not regenerated

    summary = json.loads((out / "summary.json").read_text())
    for key in ("depth/abs_rel", "depth/abs_rel_baseline", "depth/a1", "seg/miou", "seg/miou_supervised_baseline",
                "seg/iou/road", "seg/iou/sky", "test/depth/abs_rel", "test/depth/abs_rel_baseline", "test/seg/miou",
                "test/seg/iou/road"):
        assert key in summary, key
    assert summary["depth/abs_rel"] > 0 and summary["depth/abs_rel_baseline"] > 0
    assert 0.0 <= summary["seg/miou"] <= 1.0 and 0.0 <= summary["seg/miou_supervised_baseline"] <= 1.0
    parts = [summary[f"time/{k}_s"] for k in ("data", "sde", "semiseg", "baseline", "report")]
    assert all(t >= 0 for t in parts) and summary["time/total_s"] >= sum(parts)

    # each stage ran the requested steps with the components the demo promises
    runs = out / "runs"
    assert json.loads((runs / "sde" / "summary.json").read_text())["steps"] == 3
    seg_cfg = yaml.safe_load((runs / "semiseg" / "config.yaml").read_text())
    base_cfg = yaml.safe_load((runs / "supervised" / "config.yaml").read_text())
    assert seg_cfg["train"]["steps"] == base_cfg["train"]["steps"] == 2
    assert (seg_cfg["semiseg"]["mix"], seg_cfg["semiseg"]["transfer"], seg_cfg["semiseg"]["pseudo_label"]) == (
        "depthmix", True, True)
    assert (base_cfg["semiseg"]["mix"], base_cfg["semiseg"]["transfer"], base_cfg["semiseg"]["pseudo_label"]) == (
        "none", False, False)
    assert Path(seg_cfg["semiseg"]["sde_checkpoint"]).parent == runs / "sde" / "export"
    # --precision auto: bf16 on a CPU with bf16 units, else fp32, in both stages and the summary
    sde_cfg = yaml.safe_load((runs / "sde" / "config.yaml").read_text())
    assert sde_cfg["runtime"]["precision"] == seg_cfg["runtime"]["precision"] == summary["precision"]
    assert summary["precision"] == demo_precision("auto") in ("fp32", "bf16")

    report = out / "report" / "report.md"
    text = report.read_text()
    for name in FIGURES:
        png = out / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000, name
        assert f"({name}.png)" in text
    assert "| seg/miou | " in text and "| road | " in text
    printed = capsys.readouterr().out
    assert f"report: {report}" in printed and "depth/abs_rel" in printed


def test_auto_precision_is_bf16_exactly_where_the_cpu_has_bf16_units():
    """Checked against the kernel's CPU flags (Linux): AVX512-BF16 or AMX tiles mean bf16 units."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "flags" in cpuinfo.read_text():
        flags = {f for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for f in line.split()}
        assert cpu_has_bf16() == bool(flags & {"avx512_bf16", "amx_tile", "amx_bf16"})
    assert demo_precision("auto") == ("bf16" if cpu_has_bf16() else "fp32")
    assert demo_precision("fp32") == "fp32" and demo_precision("bf16") == "bf16"
