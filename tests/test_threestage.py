"""Three-stage self-training: pseudo-mask statistics (hand-built tables), the geometric alignment
of stored masks with augmented batches, and the pipeline end to end in-process (three stages,
masks joined back by key, resume at stage 3)."""

import json

import numpy as np
import pytest
import torch

from sdeseg.config import ConfigError
from sdeseg.data.augment import apply_geometry
from sdeseg.data.derived import DerivedDataset
from sdeseg.data.shardio import ShardIndex, decode_members, scan_shard
from sdeseg.losses.selftrain import pseudo_mask_loss, softmax_consistency
from sdeseg.pseudo import class_thresholds, class_weights, confidence_histogram, kept_pixels
from tests.conftest import tiny_config


def _table():
    """Class 0: confidences 0.55, 0.58, 0.92, 0.97; class 1: 0.31, 0.33, 0.35, 0.72, 0.75, 0.99;
    class 2: none; 10 bins."""
    label = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 255])
    conf = torch.tensor([0.55, 0.58, 0.92, 0.97, 0.31, 0.33, 0.35, 0.72, 0.75, 0.99, 0.1])
    return label, conf, confidence_histogram(label, conf, num_classes=3, bins=10)


def test_histogram_and_per_class_thresholds_from_a_hand_built_table():
    label, conf, hist = _table()
    assert hist[0].tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2] and hist[1, 3] == 3 and hist[1, 9] == 1
    assert hist.sum() == 10  # the ignored pixel is not counted
    # the bin of the median: class 0 (4 values, 2 below 0.6) -> [0.9, 1.0), class 1 -> [0.7, 0.8);
    # absent class 2 -> the cap
    assert class_thresholds(hist, 0.5, 0.95).tolist() == pytest.approx([0.9, 0.7, 0.95])
    assert class_thresholds(hist, 0.5, 0.8).tolist() == pytest.approx([0.8, 0.7, 0.8])
    assert class_thresholds(hist, 0.25, 0.95).tolist() == pytest.approx([0.5, 0.3, 0.95])
    assert class_thresholds(hist, 0.0, 0.95).tolist() == pytest.approx([0.5, 0.3, 0.95])  # lowest occupied bin
    keep = kept_pixels(label, conf, class_thresholds(hist, 0.5, 0.95))
    assert keep.tolist() == [False, False, True, True, False, False, False, True, True, True, False]


def test_class_weights_favour_the_rare_class_with_mean_one_over_pixels():
    _, _, hist = _table()
    w = class_weights(hist, power=0.5, max_weight=10.0)
    share = torch.tensor([0.4, 0.6])
    expected = share.pow(-0.5) / (share * share.pow(-0.5)).sum()
    assert w[:2].tolist() == pytest.approx(expected.tolist()) and w[2] == 1.0
    assert w[0] > w[1] and float((share * w[:2]).sum()) == pytest.approx(1.0)
    assert class_weights(hist, power=0.0, max_weight=10.0)[:2].tolist() == pytest.approx([1.0, 1.0])
    assert class_weights(hist, power=4.0, max_weight=1.5).max() == pytest.approx(1.5)


def test_pseudo_mask_loss_counts_only_pixels_that_pass_their_class_threshold():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 3, requires_grad=True)
    target = torch.tensor([[[0, 1, 2], [1, 1, 0]]])
    conf = torch.tensor([[[0.9, 0.2, 0.9], [0.8, 0.6, 0.1]]])
    thresholds, weights = torch.tensor([0.5, 0.7, 0.95]), torch.tensor([2.0, 1.0, 1.0])
    loss, kept = pseudo_mask_loss(logits, target, conf, thresholds, weights)
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")[0]
    assert float(loss.detach()) == pytest.approx(float((2.0 * ce[0, 0] + 1.0 * ce[1, 0]).detach() / 2))
    assert float(kept) == pytest.approx(2 / 6)
    loss.backward()
    assert logits.grad[0, :, 0, 1].abs().sum() == 0 and logits.grad[0, :, 0, 0].abs().sum() > 0
    assert float(softmax_consistency(logits, logits).detach()) == 0.0
    assert float(softmax_consistency(logits, -logits).detach()) > 0.0


def _full_labels(root, keys):
    index = ShardIndex.load(root)
    out = {}
    for shard, skeys in index.shard_keys.items():
        for _, m in scan_shard(root, shard, skeys, range(len(skeys))):
            if m["__key__"] in keys:
                out[m["__key__"]] = torch.from_numpy(np.asarray(decode_members(m, (0,))["label"], dtype=np.int64))
    return out


def test_maps_of_the_full_image_align_with_a_cropped_flipped_batch(synthetic_root):
    from sdeseg.data.reader import make_loader

    cfg = tiny_config("demo_semiseg", synthetic_root, "data.size=24x40").data
    cfg.augment.hflip = True
    stream = make_loader(cfg, frames=(0,), labels=True, seed=4, num_workers=0)
    flips = set()
    for batch, _ in zip(stream, range(3)):
        full = _full_labels(synthetic_root, set(batch.keys))
        aligned = apply_geometry(torch.stack([full[k] for k in batch.keys]), batch.geometry)
        assert torch.equal(aligned, batch.label)
        flips |= set(batch.geometry[:, 4].tolist())
    assert flips == {0, 1}  # both cases seen


@pytest.fixture(scope="module")
def pipeline_run(synthetic_root, sde_export, tmp_path_factory):
    """The pipeline with 2 steps per stage; the first attempt dies when stage 3 starts."""
    from sdeseg.launch import run_stage
    from sdeseg.pipelines.threestage import run_pipeline

    cfg = tiny_config("demo_threestage", synthetic_root, f"semiseg.sde_checkpoint={sde_export}",
                      "data.num_labeled=4", "threestage.supervised_steps=2", "threestage.refine_steps=2",
                      "threestage.final_steps=2", "train.ckpt_every=1")
    run_dir = tmp_path_factory.mktemp("threestage")

    def dies_at_stage3(c, d):
        if d.name == "stage3":
            raise RuntimeError("killed")
        return run_stage(c, d)

    with pytest.raises(RuntimeError, match="killed"):
        run_pipeline(cfg, run_dir, run=dies_at_stage3)
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and "stage3" not in str(p)}
    ran = []

    def records(c, d):
        ran.append(d.name)
        return run_stage(c, d)

    summary = run_pipeline(cfg, run_dir, run=records)
    return cfg, run_dir, summary, ran, mtimes


def test_the_pipeline_resumes_at_stage_3_when_stages_1_and_2_are_done(pipeline_run):
    cfg, run_dir, summary, ran, mtimes = pipeline_run
    assert ran == ["stage3"]
    for stage in ("stage1", "stage2"):  # not trained again
        assert mtimes[run_dir / stage / "summary.json"] == (run_dir / stage / "summary.json").stat().st_mtime_ns
    for name in ("pseudo1", "pseudo2"):  # masks not predicted again
        shards = sorted((run_dir / name).glob("*.tar"))
        assert shards and all(mtimes[p] == p.stat().st_mtime_ns for p in shards)
    assert summary["steps"] == 6 and json.loads((run_dir / "summary.json").read_text())["steps"] == 6
    for stage in ("stage1", "stage2", "stage3"):
        assert summary[f"{stage}/steps"] == 2 and 0.0 <= summary[f"{stage}/test/seg/miou"] <= 1.0


def test_the_stages_are_what_the_pipeline_says(pipeline_run):
    import yaml

    cfg, run_dir, summary, _, _ = pipeline_run
    configs = [yaml.safe_load((run_dir / s / "config.yaml").read_text()) for s in ("stage1", "stage2", "stage3")]
    assert [c["stage"] for c in configs] == ["semiseg", "selftrain", "selftrain"]
    assert [c["model"]["multitask"] for c in configs] == [False, True, True]
    assert configs[0]["semiseg"]["pseudo_label"] is False
    assert configs[1]["selftrain"]["pseudo_root"] == str(run_dir / "pseudo1")
    assert configs[2]["selftrain"]["pseudo_root"] == str(run_dir / "pseudo2")
    records = [json.loads(x) for x in (run_dir / "stage2" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and all(np.isfinite(r["seg/pseudo"]) and r["seg/branch_consistency"] >= 0
                         and r["seg/view_consistency"] >= 0 and r["depth/total"] > 0 for r in train)


def test_pseudo_masks_join_back_by_key_and_are_scored_against_the_true_labels(pipeline_run, synthetic_root):
    cfg, run_dir, summary, _, _ = pipeline_run
    index = ShardIndex.load(synthetic_root)
    train = {k for k, r in index.rows.items() if r["split"] == "train"}
    for name in ("pseudo1", "pseudo2"):
        masks = DerivedDataset(str(run_dir / name))
        assert set(masks.index.rows) == train
        some = sorted(train)[:3]
        stored = masks.read(some)
        full = _full_labels(synthetic_root, set(some))
        for k in some:
            assert stored[k]["pseudo_label.png"].shape == tuple(full[k].shape)
            assert stored[k]["confidence.npy"].min() >= 1 / 19 - 1e-3
        assert 0.0 <= summary[f"{name}/all/miou"] <= 1.0 and 0.0 < summary[f"{name}/kept_fraction"] <= 1.0
        thresholds = json.loads(summary[f"{name}/thresholds"])
        assert len(thresholds) == 19 and all(0 <= t <= 0.95 for t in thresholds)


def test_bad_pipeline_input_is_refused_before_anything_runs(synthetic_root, tmp_path):
    from sdeseg.launch import preflight, run_stage

    cfg = tiny_config("demo_threestage", synthetic_root, "data.num_labeled=4")  # no SDE export
    with pytest.raises(ConfigError, match="semiseg.sde_checkpoint"):
        run_stage(cfg, tmp_path)
    assert not (tmp_path / "stage1").exists()
    with pytest.raises(ConfigError, match="pipeline"):
        preflight(cfg)
    selftrain = tiny_config("demo_semiseg", synthetic_root, "stage=selftrain", "semiseg.mix=none",
                            "semiseg.transfer=false", "data.num_labeled=4")
    with pytest.raises(ConfigError, match="selftrain.pseudo_root"):
        preflight(selftrain)
