"""The depth-guided instance stage in-process (seed 002): instance maps through the reader, losses and
the Depth Controller's maths, training with fusion + controller, exact resume, `sdeseg eval` on its
export, and the preflight's messages."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sdeseg.config import AugmentConfig, ConfigError, InstanceConfig
from sdeseg.data.codec import INSTANCE_MEMBER, SampleError, decode_instance, decode_sample, encode_instance
from sdeseg.data.reader import LabeledPool, ShardStream, ValLoader, random_labeled_keys
from sdeseg.data.shardio import ShardIndex, decode_members, scan_shard
from sdeseg.launch import preflight, run_in_process
from sdeseg.losses.instance import balance_weight, depth_ramp, panoptic_loss
from sdeseg.panoptic import instance_targets, is_thing, pseudo_instances, semantic_of
from tests.conftest import tiny_config

# --------------------------------------------------------------------------- data


def _assert_aligned(batch) -> None:
    """The instance map's class equals the label on every thing pixel of the label."""
    assert batch.instance is not None and batch.instance.dtype == torch.int64
    assert batch.instance.shape == batch.label.shape
    thing = is_thing(batch.label) & (batch.label != 255)
    assert thing.any()
    assert torch.equal(semantic_of(batch.instance)[thing], batch.label[thing])
    assert (batch.instance[thing] >= 1000).float().mean() > 0.5  # mostly real instances, not group regions


def test_reader_batches_carry_instance_maps_aligned_with_the_label(synthetic_root):
    crop, flips = (24, 40), 0
    s = ShardStream(synthetic_root, "train", batch_size=4, crop=crop, augment=AugmentConfig(), frames=(0,),
                    num_workers=0, shuffle_buffer=8, seed=1, epochs=1)
    for batch in s:
        _assert_aligned(batch)
        flips += int(batch.geometry[:, 4].sum())
        assert batch.instance.shape[-2:] == crop
    assert flips > 0  # random crops and flips were exercised
    keys = random_labeled_keys(synthetic_root, "train", 4, seed=0)
    pool = LabeledPool(synthetic_root, keys, batch_size=4, crop=crop, augment=AugmentConfig(), seed=0)
    assert pool.instance_count() == 4
    _assert_aligned(pool.next_batch())
    _assert_aligned(next(iter(ValLoader(synthetic_root, "val", batch_size=4))))
    # an unlabeled stream drops the instance map with the label
    unlabeled = ShardStream(synthetic_root, "train", batch_size=4, crop=crop, frames=(0,), num_workers=0,
                            labels=False)
    batch = next(iter(unlabeled))
    assert batch.label is None and batch.instance is None


def test_a_wrong_shaped_instance_map_is_a_corrupt_sample(synthetic_root):
    index = ShardIndex.load(synthetic_root)
    shard = sorted(index.select("train"))[0]
    _, members = next(scan_shard(synthetic_root, shard, index.shard_keys[shard], [0]))
    ids = decode_instance(members[INSTANCE_MEMBER])
    members[INSTANCE_MEMBER] = encode_instance(ids[:, :-1])
    with pytest.raises(SampleError, match=rf"{members['__key__']}: instance.png is \(32, 63\), frame is \(32, 64\)"):
        decode_sample(members, (0,))
    # unlabeled streams drop the member before decoding it
    assert decode_members(members, (0,), labels=False)["instance"] is None


# --------------------------------------------------------------------------- losses and controller


def test_panoptic_loss_terms_and_the_controller_maths():
    ids = torch.full((1, 16, 16), 7)  # road
    ids[0, 4:10, 3:9] = 26000  # a car
    t = instance_targets(ids, sigma=2.0)
    perfect = {("seg", 0): torch.nn.functional.one_hot(t["semantic"], 19).permute(0, 3, 1, 2).float() * 50,
               ("center", 0): t["center"], ("offset", 0): t["offset"]}
    cfg = InstanceConfig()
    terms = panoptic_loss(perfect, t, cfg, "inst/sup").terms
    assert set(terms) == {"inst/sup/semantic", "inst/sup/center", "inst/sup/offset"}
    assert all(float(v) < 1e-6 for v in terms.values())
    off = dict(perfect)
    off[("offset", 0)] = t["offset"] + 1.0  # 1 px off in y and x on the car's pixels only counts
    assert float(panoptic_loss(off, t, cfg, "x").terms["x/offset"]) == pytest.approx(cfg.offset_weight * 2)

    assert depth_ramp(0, 4) == 0.0 and depth_ramp(2, 4) == 0.5 and depth_ramp(9, 4) == 1.0 and depth_ramp(0, 0) == 1.0
    assert balance_weight(math.nan, 1.0, 0.1) == 0.5 and balance_weight(1.0, 1.0, 0.1) == 0.5
    assert balance_weight(0.9, 1.1, 0.1) == pytest.approx(1 / (1 + math.exp(-2)))  # 20% lower loss: 2 logits
    assert balance_weight(2.0, 1.0, 0.1) < 0.01

    # the teacher's pseudo-instances: confident pixels only, unconfident instances lose their identity
    logits = torch.full((1, 19, 16, 16), -10.0)
    logits[0, 0] = 10.0  # road, confident
    logits[0, 13, 4:10, 3:9], logits[0, 0, 4:10, 3:9] = 10.0, -10.0  # a confident car
    logits[0, :, 12:, :] = 0.0  # unconfident rows
    center = torch.zeros(1, 1, 16, 16)
    center[0, 0, 7, 6] = 0.8
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    offset = torch.stack([7 - ys, 6 - xs])[None]
    out = {("seg", 0): logits, ("center", 0): center, ("offset", 0): offset}
    ids, stats = pseudo_instances(out, class_threshold=0.9, score_threshold=0.5)
    assert set(ids[0, 4:10, 3:9].unique().tolist()) == {26000} and (ids[0, 12:] == 0).all()
    assert stats["confident"] == pytest.approx(12 / 16) and stats["instances"] == 1
    ids, stats = pseudo_instances(out, class_threshold=0.9, score_threshold=0.9)  # score 0.8 x 1.0 < 0.9
    assert set(ids[0, 4:10, 3:9].unique().tolist()) == {26} and stats["instances"] == 0


# --------------------------------------------------------------------------- the stage


def _inst(root, export, *extra):
    return tiny_config("demo_instance", root, f"semiseg.sde_checkpoint={export}", "data.num_labeled=4",
                       "train.ckpt_every=2", "optim.schedule=constant", "instance.depth_ramp_steps=2",
                       "instance.pseudo_threshold=0", "instance.pseudo_score=0", "instance.top_k=20", *extra)


def _state(run_dir, step):
    path = run_dir / "checkpoints" / f"ckpt_{step:06d}" / "state" / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=False)


def test_instance_stage_trains_resumes_exactly_and_eval_reproduces_it(synthetic_root, sde_export, tmp_path):
    from sdeseg.commands.evaluate import evaluate_export

    summary = run_in_process(_inst(synthetic_root, sde_export, "train.steps=3"), tmp_path / "a")
    assert summary["steps"] == 3 and summary["teacher/updates"] == 3
    for key in ("seg/miou", "inst/ap", "inst/ap50", "inst/pq", "teacher/pq", "test/inst/ap50", "test/inst/pq"):
        assert 0.0 <= summary[key] <= 1.0, key
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"]
    assert len(train) == 3
    for r in train:  # supervised, fused and RGB-only pseudo-label terms, all finite
        for k in ("inst/total", "inst/sup/center", "inst/unsup/offset", "inst/unsup_rgb/semantic", "ctrl/w_depth"):
            assert math.isfinite(r[k]), (k, r)
        assert r["inst/confident"] == 1.0  # pseudo_threshold 0: every pixel is a pseudo-label
    assert [r["ctrl/depth_scale"] for r in train] == [0.0, 0.5, 1.0]  # the ramp

    # `sdeseg eval` on the last export (frozen depth net inside) reproduces the run's test numbers
    got = evaluate_export(summary["exports"]["last"], synthetic_root, "test", batch_size=3)
    for k in ("seg/miou", "inst/ap", "inst/ap50", "inst/pq"):
        assert got[k] == pytest.approx(summary[f"test/{k}"], abs=1e-9), k

    # the demo report's figure of an instance export: one colour per instance
    from sdeseg.exports import load_model
    from sdeseg.report import colorize_instances, fig_instances

    model = load_model(summary["exports"]["last"])
    fig_instances(next(iter(ValLoader(synthetic_root, "val", batch_size=2))), model.net,
                  model.info["instance"]["grouping"], tmp_path / "instances.png")
    assert (tmp_path / "instances.png").stat().st_size > 0
    two_cars = torch.tensor([[7, 26000, 26000, 26001, 26001, 0]])
    colours = colorize_instances(two_cars)[0]
    assert (colours[1] == colours[2]).all() and (colours[2] != colours[3]).any() and (colours[5] == 0).all()

    # stopped after 1 step (inside the ramp) and resumed: the same student, teacher and controller at step 3
    run_in_process(_inst(synthetic_root, sde_export, "train.steps=1", "data.test_split=null"), tmp_path / "b")
    resumed = run_in_process(_inst(synthetic_root, sde_export, "train.steps=3", "data.test_split=null"),
                             tmp_path / "b")
    assert resumed["steps_this_run"] == 2
    a, b = _state(tmp_path / "a", 3), _state(tmp_path / "b", 3)
    assert a["sdeseg"]["controller"] == b["sdeseg"]["controller"]
    assert not math.isnan(a["sdeseg"]["controller"]["loss_depth"])
    for part in (a["module"], a["sdeseg"]["teacher"]["model"]):
        other = b["module"] if part is a["module"] else b["sdeseg"]["teacher"]["model"]
        for k in part:
            assert torch.allclose(part[k].float(), other[k].float(), atol=1e-6), k
    assert resumed["inst/pq"] == pytest.approx(summary["inst/pq"], abs=1e-9)


def test_supervised_row_needs_no_sde_export(synthetic_root, tmp_path):
    summary = run_in_process(tiny_config("demo_instance", synthetic_root, "data.num_labeled=4", "train.steps=1",
                                         "semiseg.transfer=false", "semiseg.sde_checkpoint=null",
                                         "instance.mean_teacher=false", "instance.fusion_stages=[]",
                                         "instance.controller=false", "instance.top_k=20", "data.test_split=null"),
                             tmp_path / "sup")
    assert summary["steps"] == 1 and "teacher/updates" not in summary and "inst/pq" in summary


@pytest.mark.parametrize("overrides, message", [
    (["semiseg.sde_checkpoint=null", "semiseg.transfer=false"], r"instance.fusion_stages: Depth Feature Fusion needs"),
    (["semiseg.mix=depthmix"], r"semiseg.mix=depthmix: the instance stage does not mix"),
    (["model.multitask=true"], r"model.multitask: the instance stage"),
])
def test_preflight_names_the_problem(synthetic_root, sde_export, overrides, message):
    with pytest.raises(ConfigError, match=message):
        preflight(_inst(synthetic_root, sde_export, *overrides))


def test_controller_without_fusion_or_teacher_is_refused_at_load(synthetic_root):
    with pytest.raises(ConfigError, match="instance.controller: .* needs instance.fusion_stages"):
        tiny_config("demo_instance", synthetic_root, "instance.fusion_stages=[]")
    with pytest.raises(ConfigError, match="instance.controller: .* needs instance.mean_teacher=true"):
        tiny_config("demo_instance", synthetic_root, "instance.mean_teacher=false")
