"""The semi-supervised stage in-process: DepthMix training, exact resume with the teacher, bad input."""

import json

import pytest
import torch

from sdeseg.config import ConfigError
from sdeseg.data.manifest import DatasetError
from sdeseg.launch import run_in_process
from tests.conftest import tiny_config


def _seg(root, export, *extra):
    return tiny_config("demo_semiseg", root, f"semiseg.sde_checkpoint={export}", "data.num_labeled=4",
                       "train.ckpt_every=3", "train.log_keys=true", "optim.schedule=constant", *extra)


def _teacher(run_dir, step):
    path = run_dir / "checkpoints" / f"ckpt_{step:06d}" / "state" / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=False)["sdeseg"]["teacher"]["model"]


def test_semiseg_depthmix_trains_and_reports_miou(synthetic_root, sde_export, tmp_path):
    summary = run_in_process(_seg(synthetic_root, sde_export, "train.steps=3"), tmp_path / "run")
    assert summary["steps"] == 3 and summary["labeled_samples"] == 4
    assert 0.0 <= summary["seg/miou"] <= 1.0
    assert "seg/iou/road" in summary and "teacher/miou" in summary


def test_semiseg_resume_continues_with_the_same_teacher(synthetic_root, sde_export, tmp_path):
    run_in_process(_seg(synthetic_root, sde_export, "train.steps=6"), tmp_path / "a")
    run_in_process(_seg(synthetic_root, sde_export, "train.steps=3"), tmp_path / "b")
    resumed = run_in_process(_seg(synthetic_root, sde_export, "train.steps=6"), tmp_path / "b")
    assert resumed["steps_this_run"] == 3
    ta, tb = _teacher(tmp_path / "a", 6), _teacher(tmp_path / "b", 6)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k].float(), tb[k].float(), atol=1e-6), k
    # and the teacher moved away from its step-3 state
    t3 = _teacher(tmp_path / "b", 3)
    assert any(not torch.equal(t3[k], tb[k]) for k in t3 if t3[k].is_floating_point())


def test_unknown_labeled_keys_are_listed(synthetic_root, sde_export, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("synth-city/train/nope_1\nsynth-city/train/nope_2\n")
    with pytest.raises(DatasetError, match="nope_1"):
        run_in_process(_seg(synthetic_root, sde_export, "train.steps=1", f"data.labeled_keys={keys}"), tmp_path / "r")


def test_class_count_mismatch_is_a_config_error(synthetic_root, sde_export, tmp_path):
    with pytest.raises(ConfigError, match="num_classes"):
        run_in_process(_seg(synthetic_root, sde_export, "train.steps=1", "model.num_classes=5"), tmp_path / "r")


def test_multitask_depth_mapping_must_match_the_export(synthetic_root, sde_export, tmp_path):
    # demo_sde trains with the log mapping; reading its disparity heads as inverse depth is refused
    with pytest.raises(ConfigError, match="disp_mapping"):
        run_in_process(_seg(synthetic_root, sde_export, "train.steps=1", "model.multitask=true",
                            "depth_loss.disp_mapping=inverse"), tmp_path / "r")


def _student_after_one_step(root, export, run_dir, *extra):
    # no pseudo-label gradient; only the content of the mixed images varies between calls
    run_in_process(_seg(root, export, "train.steps=1", "semiseg.unsup_weight=0", *extra), run_dir)
    state = torch.load(run_dir / "export" / "last.pt", weights_only=False)["model"]
    return {k: v for k, v in state.items() if "running" not in k and "num_batches" not in k}


@pytest.mark.parametrize("separate", [True, False])
def test_separate_passes_keep_mixed_images_out_of_the_labeled_batchnorm(synthetic_root, sde_export, tmp_path,
                                                                       separate):
    runs = [_student_after_one_step(synthetic_root, sde_export, tmp_path / f"j{jitter}",
                                    f"semiseg.separate_passes={str(separate).lower()}",
                                    f"semiseg.color_jitter={jitter}")
            for jitter in (0.0, 0.5)]
    same = all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    # joint pass: the mixed images set the BatchNorm statistics of the labeled forward, so
    # the supervised gradient depends on them; separate passes: it does not
    assert same is separate


def _first_unsup_loss(root, export, run_dir, *extra):
    run_in_process(_seg(root, export, "train.steps=1", "train.log_every=1", *extra), run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["seg/unsup"] for r in rows if r.get("kind") == "train")


def test_mix_rebalance_reweights_the_pseudo_label_loss(synthetic_root, sde_export, tmp_path):
    # same seed, same batch, same mix: only the per-class weights of the pseudo-label loss differ
    plain = _first_unsup_loss(synthetic_root, sde_export, tmp_path / "plain", "semiseg.pseudo_threshold=0")
    again = _first_unsup_loss(synthetic_root, sde_export, tmp_path / "again", "semiseg.pseudo_threshold=0")
    rebal = _first_unsup_loss(synthetic_root, sde_export, tmp_path / "rebal", "semiseg.pseudo_threshold=0",
                              "semiseg.mix_rebalance=true")
    assert plain == pytest.approx(again, rel=1e-6) and plain > 0
    assert rebal != pytest.approx(plain, rel=1e-4)


def test_depthmix_with_ground_truth_depth(synthetic_root, sde_export, tmp_path):
    from types import SimpleNamespace

    from sdeseg.stages.semiseg import ground_truth_depth

    summary = run_in_process(_seg(synthetic_root, sde_export, "train.steps=2", "semiseg.mix_depth=ground_truth"),
                             tmp_path / "gt")
    assert summary["steps"] == 2 and 0.0 <= summary["seg/miou"] <= 1.0

    depth = torch.tensor([[[[2.0, 0.0]]], [[[0.0, 0.0]]]])  # sample b has no valid depth at all
    with pytest.raises(ConfigError, match=r"mix_depth=ground_truth.*\['b'\]"):
        ground_truth_depth([SimpleNamespace(keys=["a", "b"], depth=depth)])
    ok = ground_truth_depth([SimpleNamespace(keys=["a"], depth=depth[:1])])
    assert ok[0, 0, 0, 0] == 2.0 and ok[0, 0, 0, 1] == float("inf")  # invalid depth is far
