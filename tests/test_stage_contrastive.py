"""Depth-region contrastive pretraining on the runtime (seed 003): the regions derived dataset
(written once, skipped on re-run, joined by key), the stage in-process (finite losses, exact
resume), initialisation of the semi-supervised stage and of the stage itself from exports, and
the config errors found before workers start."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sdeseg.config import ConfigError, load_config
from sdeseg.data.derived import DerivedDataset
from sdeseg.data.shardio import ShardIndex, decode_members, scan_shard
from sdeseg.exports import read_export
from sdeseg.infer import image_regions, infer_dataset
from sdeseg.launch import preflight, run_in_process
from sdeseg.optim import lr_factor
from tests.conftest import tiny_config

STAGE = ["contrastive.prototypes=24", "contrastive.proj_dim=16", "contrastive.head_channels=16",
         "contrastive.pixel_points=200", "contrastive.region_points=300", "optim.schedule=constant",
         "optim.warmup_steps=0", "train.ckpt_every=2", "train.log_keys=true"]


def _cfg(root, regions, *extra):
    return tiny_config("demo_contrastive", root, f"contrastive.regions_root={regions}", *STAGE, *extra)


@pytest.fixture(scope="module")
def regions(synthetic_root, sde_export, tmp_path_factory):
    """Depth regions + SDE depth of the 24 training images; the first write's report. (The 2-step
    SDE export's depth is nearly one plane: one region per image.)"""
    out = str(tmp_path_factory.mktemp("regions") / "regions")
    report = infer_dataset(sde_export, synthetic_root, out, outputs=("depth", "regions"), split="train")
    return out, report


@pytest.fixture(scope="module")
def colour_regions(synthetic_root, sde_export, tmp_path_factory):
    """Colour regions (many per image, so pastes happen) + SDE depth of the training images."""
    out = str(tmp_path_factory.mktemp("colour_regions") / "regions")
    infer_dataset(sde_export, synthetic_root, out, outputs=("depth", "regions"), split="train", regions="colour")
    return out


@pytest.fixture(scope="module")
def trained(synthetic_root, colour_regions, tmp_path_factory):
    """A 3-step run, and one stopped after 2 steps then resumed to 3."""
    a, b = tmp_path_factory.mktemp("cpc_a"), tmp_path_factory.mktemp("cpc_b")

    def cfg(*extra):
        return _cfg(synthetic_root, colour_regions, "contrastive.regions=colour", *extra)

    full = run_in_process(cfg("train.steps=3"), a)
    run_in_process(cfg("train.steps=2"), b)
    resumed = run_in_process(cfg("train.steps=3"), b)
    return full, resumed, a, b


def test_regions_are_a_derived_dataset_of_the_sde_depth_joined_by_key(synthetic_root, sde_export, regions):
    root, first = regions
    assert first["shards_written"] == 4 and first["samples"] == 24
    again = infer_dataset(sde_export, synthetic_root, root, outputs=("depth", "regions"), split="train")
    assert again["shards_written"] == 0 and again["shards_skipped"] == 4  # once per image, not per run
    ds = DerivedDataset(root)
    assert ds.info["settings"]["regions"] == "depth"
    index = ShardIndex.load(synthetic_root)
    shard = next(iter(index.select("train", None)))
    _, members = next(iter(scan_shard(synthetic_root, shard, index.shard_keys[shard], [0])))
    sample = decode_members(members, (0,))
    key = members["__key__"]
    stored = ds.read([key])[key]
    ids = stored["regions.png"]
    assert ids.shape == (32, 64) and set(np.unique(ids)) == set(range(int(ids.max()) + 1))
    # exactly the regions of the image, its stored SDE depth and the K of its json
    K = np.asarray(json.loads(members["json"])["K"], dtype=np.float64)
    expected = image_regions(sample["frames"][0], torch.from_numpy(stored["pseudo_depth.npy"]), K, "depth")
    assert np.array_equal(ids, expected)


def test_a_group_is_pasted_into_two_views_of_shared_identities(synthetic_root, colour_regions):
    from sdeseg.data.reader import make_loader
    from sdeseg.infer import DEPTH_MEMBER, REGIONS_MEMBER
    from sdeseg.stages.contrastive import group_maps, make_views

    cfg = _cfg(synthetic_root, colour_regions, "contrastive.regions=colour", "data.batch_size=4")
    derived = {"depth": (colour_regions, DEPTH_MEMBER), "regions": (colour_regions, REGIONS_MEMBER)}
    batch = next(iter(make_loader(cfg.data, frames=(0,), labels=False, seed=1, derived=derived)))
    assert batch.label is None  # the training stream never reads labels
    depth, ids = group_maps(batch)
    assert depth.shape == ids.shape == (4, 32, 64) and bool((depth > 0).all())
    views = make_views(batch.images[0], depth, ids, cfg, torch.Generator().manual_seed(0))
    (img_a, region_a, pixel_a), (img_b, region_b, pixel_b) = views
    assert img_a.shape == img_b.shape == (4, 3, 32, 64)
    copies = [int((torch.unique(p, return_counts=True)[1] > 1).sum()) for p in (pixel_a, pixel_b)]
    assert 0 < copies[0] < copies[1]  # pasted pixels: twice as many pastes in view 2
    assert set(region_b.unique().tolist()) & set(region_a.unique().tolist())


def test_the_stage_trains_without_labels_and_reports_unsupervised_miou(trained):
    full, _, a, _ = trained
    assert full["steps"] == 3 and 0.0 <= full["unsup/miou"] <= 1.0 and "unsup/iou/road" in full
    assert 0.0 <= full["test/unsup/miou"] <= 1.0
    records = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 3
    assert all(np.isfinite(r["contrast/pixel"]) and r["contrast/region"] > 0 and r["contrast/region_groups"] > 0
               for r in train)
    export = read_export(a / "export" / "last.pt", "contrastive")
    assert export["model"]["prototypes"].shape == (24, 16) and export["contrastive"]["regions"] == "colour"


def test_the_stage_resumes_exactly(trained):
    _, resumed, a, b = trained
    assert resumed["steps_this_run"] == 1
    wa, wb = (read_export(d / "export" / "last.pt")["model"] for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    logs = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    keys = [[r["keys"] for r in log if r["kind"] == "keys"] for log in logs]
    assert keys[0] == keys[1] and len(keys[0]) == 3


def _stub_ctx():
    return SimpleNamespace(device=torch.device("cpu"), log=lambda *args, **kwargs: None)


def test_semiseg_starts_from_the_contrastive_export(synthetic_root, sde_export, trained):
    from sdeseg.stages.semiseg import build_models

    export = trained[2] / "export" / "last.pt"
    cfg = preflight(tiny_config("demo_semiseg", synthetic_root, f"semiseg.sde_checkpoint={sde_export}",
                                "data.num_labeled=4", "semiseg.init_from=contrastive",
                                f"semiseg.init_checkpoint={export}"))
    assert cfg.semiseg.transfer is False  # the SDE export is only DepthMix's depth now
    model, _ = build_models(cfg, _stub_ctx())
    weights = read_export(export)["model"]
    own = model.state_dict()
    for name in ("encoder.net.conv1.weight", "decoder.body.levels.0.conv1.conv.conv.weight"):
        assert torch.equal(own[name], weights[name])


def test_the_contrastive_stage_can_start_from_the_sde_export(synthetic_root, sde_export, regions):
    from sdeseg.stages.contrastive import build_model

    cfg = preflight(_cfg(synthetic_root, regions[0], f"contrastive.init_checkpoint={sde_export}"))
    model = build_model(cfg, _stub_ctx())
    depth = read_export(sde_export)["depth"]
    for name in ("encoder.net.conv1.weight", "decoder.body.levels.2.conv0.conv.conv.weight"):
        assert torch.equal(model.state_dict()[name], depth[name])


def test_config_errors_name_the_key_before_workers_start(synthetic_root, sde_export, regions, trained, tmp_path):
    root = regions[0]
    with pytest.raises(ConfigError, match="contrastive.regions_root: set it"):
        preflight(tiny_config("demo_contrastive", synthetic_root, *STAGE))
    with pytest.raises(ConfigError, match="contrastive.regions: 'colour' but .* holds 'depth'"):
        preflight(_cfg(synthetic_root, root, "contrastive.regions=colour"))
    preflight(_cfg(synthetic_root, root))  # the dataset fits
    partial = tmp_path / "partial"
    shutil.copytree(root, partial)
    rows = pq.read_table(partial / "manifest.parquet").to_pylist()
    pq.write_table(pa.Table.from_pylist([r for r in rows if r["shard"] != rows[0]["shard"]]),
                   partial / "manifest.parquet")  # one shard of 6 left out
    with pytest.raises(ConfigError, match="no regions for 6 of the 24 training samples"):
        preflight(_cfg(synthetic_root, partial))
    info = json.loads((partial / "derived.json").read_text())
    info["settings"]["outputs"] = ["depth"]
    (partial / "derived.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match=r"holds \['depth'\]; the stage needs depth and regions"):
        preflight(_cfg(synthetic_root, partial))
    contrastive_export = trained[2] / "export" / "last.pt"
    with pytest.raises(ConfigError, match="contrastive.init_checkpoint: .* expected a 'sde' export"):
        preflight(_cfg(synthetic_root, root, f"contrastive.init_checkpoint={contrastive_export}"))
    seg = ["data.num_labeled=4", f"semiseg.sde_checkpoint={sde_export}", "semiseg.init_from=contrastive"]
    with pytest.raises(ConfigError, match="semiseg.init_checkpoint: init_from=contrastive needs"):
        preflight(tiny_config("demo_semiseg", synthetic_root, *seg))
    with pytest.raises(ConfigError, match="semiseg.init_checkpoint: .* expected a 'contrastive' export"):
        preflight(tiny_config("demo_semiseg", synthetic_root, *seg, f"semiseg.init_checkpoint={sde_export}"))
    with pytest.raises(ConfigError, match="semiseg.init_checkpoint: .*model.width: export 16, config 32"):
        preflight(tiny_config("demo_semiseg", synthetic_root, *seg, f"semiseg.init_checkpoint={contrastive_export}",
                              "model.width=32"))
    with pytest.raises(ConfigError, match="contrastive.prototypes: 5 prototypes"):
        _cfg(synthetic_root, root, "contrastive.prototypes=5")
    with pytest.raises(ConfigError, match="contrastive.copies"):
        _cfg(synthetic_root, root, "contrastive.copies=[2]")
    with pytest.raises(ConfigError, match="semiseg.init_from: 'imagenet' needs model.pretrained"):
        load_config("demo_semiseg", ["semiseg.init_from=imagenet"])


def test_semiseg_transfer_false_still_means_no_sde_init():
    assert load_config("demo_semiseg", ["semiseg.transfer=false"]).semiseg.init_from == "scratch"
    cfg = load_config("demo_semiseg", ["semiseg.init_from=contrastive"])  # the preset's transfer: true defers
    assert cfg.semiseg.init_from == "contrastive" and cfg.semiseg.transfer is False
    assert load_config("demo_semiseg").semiseg.transfer is True


def test_cosine_schedule_warms_up_then_decays_to_zero():
    cfg = SimpleNamespace(schedule="cosine", warmup_steps=10, poly_power=0.9, gamma=0.1, step_size=1)
    assert lr_factor(0, 110, cfg) == pytest.approx(0.1) and lr_factor(9, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg) == pytest.approx(0.5) and lr_factor(110, 110, cfg) == pytest.approx(0.0)
