"""Using trained models: eval (the stages' numbers), predict (files of any size), derived datasets
(Ray Data actors, joined back by key), safetensors and ONNX exports, and their bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdeseg.cli import main as cli_main
from sdeseg.commands.evaluate import evaluate_export
from sdeseg.exports import ExportError, export_onnx, export_safetensors, load_model, read_export, run_onnx
from sdeseg.launch import run_in_process
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def runs(synthetic_root, tmp_path_factory):
    """A 2-step SDE run and a 2-step DepthMix run (validated on val at the end, tested on test)."""
    root = tmp_path_factory.mktemp("runs")
    sde = run_in_process(tiny_config("demo_sde", synthetic_root, "train.steps=2"), root / "sde")
    seg = run_in_process(tiny_config("demo_semiseg", synthetic_root, "train.steps=2", "data.num_labeled=4",
                                     f"semiseg.sde_checkpoint={sde['exports']['last']}"), root / "seg")
    return {"sde": sde, "seg": seg}


# ----------------------------------------------------------------------------- eval


def test_eval_reproduces_the_stage_validation_exactly(runs, synthetic_root):
    seg, sde = runs["seg"], runs["sde"]
    for split, prefix in (("val", ""), ("test", "test/")):
        got = evaluate_export(seg["exports"]["last"], synthetic_root, split, batch_size=4)
        for k, v in got.items():
            if k.startswith("seg/"):
                assert v == pytest.approx(seg[prefix + k], abs=0, nan_ok=True), (split, k)
        got = evaluate_export(sde["exports"]["last"], synthetic_root, split, batch_size=4)
        for k in ("abs_rel", "a1", "rmse", "abs_rel_baseline"):
            assert got[f"depth/{k}"] == pytest.approx(sde[f"{prefix}depth/{k}"], rel=1e-12), (split, k)


def test_eval_cli_writes_json_and_names_bad_input(runs, synthetic_root, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert cli_main(["eval", "--model", runs["seg"]["exports"]["last"], "--data", synthetic_root, "--split", "test",
                     "--out", str(out), "--batch-size", "4"]) == 0
    saved = json.loads(out.read_text())
    assert saved["split"] == "test" and saved["seg/miou"] == pytest.approx(runs["seg"]["test/seg/miou"], abs=0)
    assert "seg/iou/road" in capsys.readouterr().out
    assert "confusion" not in saved
    # --confusion: the matrix in the JSON (its diagonal gives the same IoU) and where each class goes
    assert cli_main(["eval", "--model", runs["seg"]["exports"]["last"], "--data", synthetic_root, "--split", "test",
                     "--out", str(out), "--batch-size", "4", "--confusion"]) == 0
    saved = json.loads(out.read_text())
    names, cm = saved["confusion"]["classes"], torch.tensor(saved["confusion"]["gt_by_pred"], dtype=torch.float64)
    assert names[0] == "road" and cm.shape == (19, 19)
    road = cm[0, 0] / (cm[0].sum() + cm[:, 0].sum() - cm[0, 0])
    assert float(road) == pytest.approx(saved["seg/iou/road"], abs=1e-12)
    printed = capsys.readouterr().out
    assert "mostly mistaken for" in printed and f"{100 * float(cm[0, 0] / cm[0].sum()):.1f}%" in printed
    # segmentation metrics asked of a depth-only export
    sde = runs["sde"]["exports"]["last"]
    assert cli_main(["eval", "--model", sde, "--data", synthetic_root, "--task", "seg"]) == 2
    err = capsys.readouterr().err
    assert sde in err and "not segmentation" in err
    missing = str(tmp_path / "none.pt")
    assert cli_main(["eval", "--model", missing, "--data", synthetic_root]) == 2
    assert f"{missing}: no such export" in capsys.readouterr().err


# ----------------------------------------------------------------------------- predict


def test_predict_writes_outputs_at_the_input_sizes_and_skips_a_corrupt_file(runs, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"small": (37, 53), "large": (64, 96)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{name}.png")
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    for export in (runs["seg"]["exports"]["last"], runs["sde"]["exports"]["last"]):
        assert cli_main(["predict", "--model", export, "--input", str(images), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "broken.png" in printed
    report = json.loads((out / "predict_report.json").read_text())
    assert report["written"] == 2 and report["skipped"] == 1 and "broken" in report["skipped_inputs"][0]["input"]
    for name, (h, w) in sizes.items():
        trainid = np.asarray(Image.open(out / f"{name}_trainid.png"))
        assert trainid.shape == (h, w) and trainid.max() < 19
        for suffix in ("color", "overlay", "depth_color"):
            assert np.asarray(Image.open(out / f"{name}_{suffix}.png")).shape == (h, w, 3), suffix
        depth = np.asarray(Image.open(out / f"{name}_depth.png"))
        assert depth.shape == (h, w) and depth.dtype == np.uint16 and depth.min() >= 1
    # the padding policy: the small image's prediction is the crop of its padded prediction
    from sdeseg.infer import predict_images, to_tensor

    model = load_model(runs["seg"]["exports"]["last"])
    small = np.asarray(Image.open(images / "small.png"))
    logits = predict_images(model, to_tensor(small))["logits"]
    assert logits.shape[-2:] == (37, 53)
    assert np.array_equal(logits[0].argmax(0).numpy(), np.asarray(Image.open(out / "small_trainid.png")))
    resized = predict_images(model, to_tensor(small), size=(64, 96))["logits"]
    assert resized.shape[-2:] == (37, 53)


def test_predict_needs_images(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = cli_main(["predict", "--model", runs["seg"]["exports"]["last"], "--input", str(empty),
                     "--out", str(tmp_path / "o")])
    assert code == 2 and f"{empty}: no image files" in capsys.readouterr().err


# ----------------------------------------------------------------------------- derived datasets


def test_derived_dataset_resumes_and_joins_back_to_the_source_by_key(runs, synthetic_root, tmp_path):
    from sdeseg.data.derived import DerivedDataset
    from sdeseg.data.reader import ValLoader
    from sdeseg.infer import infer_dataset, predict_images

    export = runs["seg"]["exports"]["last"]
    out = str(tmp_path / "derived")
    first = infer_dataset(export, synthetic_root, out, outputs=["seg", "features"], split="val", batch_size=3)
    assert first["shards_written"] >= 2 and first["shards_skipped"] == 0 and first["samples"] == 8
    again = infer_dataset(export, synthetic_root, out, outputs=["seg", "features"], split="val", batch_size=3)
    assert again["shards_written"] == 0 and again["shards_skipped"] == first["shards_written"]
    derived = DerivedDataset(out)
    model = load_model(export)
    batch = next(iter(ValLoader(synthetic_root, "val", batch_size=8)))
    pred = predict_images(model, batch.images[0], features=True)
    probs = pred["logits"].softmax(1)
    assert torch.equal(derived.join(batch.keys, "pseudo_label.png").long(), probs.argmax(1))
    conf = derived.join(batch.keys, "confidence.npy").float()
    assert torch.allclose(conf, probs.max(1).values, atol=1e-3)  # stored as float16
    assert torch.allclose(derived.join(batch.keys, "features.npy"), pred["features"], atol=1e-5)
    source = json.loads(derived.index.rows[batch.keys[0]]["source"])
    assert source["root"] == synthetic_root
    with pytest.raises(Exception, match="no derived sample"):
        derived.read(["synth-city/train/nope"])


@pytest.mark.slow
def test_derived_dataset_from_two_ray_actors_equals_the_in_process_one(runs, synthetic_root, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from sdeseg.data.derived import DerivedDataset
    from sdeseg.infer import infer_dataset

    export = runs["sde"]["exports"]["last"]
    local = infer_dataset(export, synthetic_root, str(tmp_path / "local"), outputs=["depth"])
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:  # no RAY_ADDRESS: infer_dataset starts a local cluster as the training stages do
        remote = infer_dataset(export, synthetic_root, str(tmp_path / "ray"), outputs=["depth"], actors=2)
        assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
    finally:
        ray.shutdown()
    assert remote["shards_written"] == local["shards_written"] and remote["samples"] == local["samples"] == 40
    a, b = DerivedDataset(str(tmp_path / "local")), DerivedDataset(str(tmp_path / "ray"))
    keys = sorted(a.index.rows)
    assert keys == sorted(b.index.rows)
    da, db = a.read(keys), b.read(keys)
    for k in keys:
        assert np.array_equal(da[k]["pseudo_depth.npy"], db[k]["pseudo_depth.npy"]), k


# ----------------------------------------------------------------------------- export formats


@pytest.mark.parametrize("which", ["seg", "sde"])
def test_safetensors_round_trip_is_exact_and_needs_no_pickle(which, runs, tmp_path):
    pt = runs[which]["exports"]["last"]
    st = export_safetensors(pt, tmp_path / "model.safetensors")
    a, b = read_export(pt), read_export(st)
    groups = ("depth", "pose") if which == "sde" else ("model",)
    for g in groups:
        assert a[g].keys() == b[g].keys()
        assert all(torch.equal(a[g][k], b[g][k]) and a[g][k].dtype == b[g][k].dtype for k in a[g]), g
    for k in ("kind", "model_config", "depth_range", "step"):
        assert a[k] == b[k], k
    assert b["input"]["range"] == [0.0, 1.0] and len(b["class_names"]) == 19
    from safetensors import safe_open

    with safe_open(str(st), framework="pt") as f:  # the plain safetensors reader sees the header
        assert json.loads(f.metadata()["sdeseg"])["kind"] == a["kind"]
    x = torch.rand(1, 3, 64, 96)
    pa, pb = load_model(pt).predict(x), load_model(st).predict(x)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("which", ["seg", "sde"])
def test_onnx_matches_torch_on_random_inputs(which, runs, tmp_path):
    pt = runs[which]["exports"]["last"]
    onnx_path = export_onnx(pt, tmp_path / "model.onnx", size=(64, 96))
    model = load_model(pt)
    for shape in ((1, 3, 64, 96), (3, 3, 96, 128)):  # another batch and size than the export's example
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        got = run_onnx(onnx_path, x)
        want = model.predict(x)
        names = ["logits", "depth"] if which == "seg" and "depth" in want else list(want)
        assert len(got) == len(names)
        for arr, name in zip(got, names):
            assert arr.shape == tuple(want[name].shape)
            assert float(np.abs(arr - want[name].numpy()).max()) <= 1e-4, name


def test_bad_exports_are_named(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"hello": 1}, bad)
    with pytest.raises(ExportError, match="bad.pt: not an sdeseg export"):
        load_model(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ExportError, match="junk.safetensors"):
        load_model(junk)
    with pytest.raises(ExportError, match="none.safetensors: no such export"):
        load_model(Path(tmp_path / "none.safetensors"))


def test_predict_over_a_shard_dataset_names_outputs_by_key(runs, synthetic_root, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["predict", "--model", runs["sde"]["exports"]["last"], "--input", synthetic_root,
                     "--split", "test", "--out", str(out)]) == 0
    depth = sorted(p.name for p in out.glob("*_depth.png"))
    assert len(depth) == 8 and all(name.startswith("synth-city__test__") for name in depth)
    assert json.loads((out / "predict_report.json").read_text())["written"] == 8
