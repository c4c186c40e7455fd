"""Instance ground truth (Cityscapes instanceIds) from the synthetic renderer and the Cityscapes converter."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_prep.bench_prep import CAR, fake_label_ids, make_fake_cityscapes
from data_prep.synth.geometry import Camera, trace
from data_prep.synth.layout import CAR as CAR_TRAIN
from data_prep.synth.layout import ROAD, SceneBuilder
from data_prep.synth.render import instance_map, render_sample
from data_prep.synth.styles import get_style
from data_prep.synthetic import convert, make_jobs
from sdeseg.cli import main
from sdeseg.data.classes import (
    INSTANCE_DIVISOR,
    instance_ids_to_train_ids,
    label_ids_to_train_ids,
    thing_train_ids,
    train_ids_to_label_ids,
)
from sdeseg.data.codec import SampleError, decode_instance, encode_instance
from sdeseg.data.manifest import read_manifest

THINGS = list(thing_train_ids())


def test_class_tables_follow_cityscapesscripts():
    assert THINGS == list(range(11, 19))  # person, rider, car, truck, bus, train, motorcycle, bicycle
    # label ids, not train ids: car is train id 13, label id 26; train 16 is label id 31
    np.testing.assert_array_equal(train_ids_to_label_ids(np.array(THINGS)), [24, 25, 26, 27, 28, 31, 32, 33])
    np.testing.assert_array_equal(
        instance_ids_to_train_ids(np.array([26000, 26003, 26, 7, 23, 0, 29001, 33000])),
        [13, 13, 13, 0, 10, 255, 255, 18],
    )


def test_instance_png_round_trip_and_errors():
    ids = np.array([[0, 7, 26000, 26001], [24000, 33999, 23, 11]], dtype=np.int64)
    back = decode_instance(encode_instance(ids))
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, ids)
    with Image.open(io.BytesIO(encode_instance(ids))) as img:
        assert img.mode in ("I;16", "I")  # a 16-bit PNG, as the Cityscapes files
    with pytest.raises(SampleError, match="65535"):
        encode_instance(np.array([[70000]]))
    with pytest.raises(SampleError, match="mode RGB"):
        rgb = io.BytesIO()
        Image.new("RGB", (2, 2)).save(rgb, format="PNG")
        decode_instance(rgb.getvalue())


def test_rendered_instances_match_the_label():
    seen = set()
    for index in range(3):
        s = render_sample(index, "train", (48, 96), "city", 0)
        ids, label = s["instance"].astype(np.int64), s["label"]
        assert s["instance"].dtype == np.uint16 and ids.shape == label.shape
        # the class in every id (id // 1000 on instances) is the label's class, on every pixel
        np.testing.assert_array_equal(instance_ids_to_train_ids(ids), label)
        # every thing pixel belongs to an instance; stuff pixels hold their plain label id
        thing = np.isin(label, THINGS)
        np.testing.assert_array_equal(ids >= INSTANCE_DIVISOR, thing)
        np.testing.assert_array_equal(ids[~thing], train_ids_to_label_ids(label[~thing]))
        # per class, instances are numbered 0, 1, ... with no gaps
        inst = np.unique(ids[thing])
        for cls in np.unique(inst // INSTANCE_DIVISOR):
            idx = np.sort(inst[inst // INSTANCE_DIVISOR == cls] % INSTANCE_DIVISOR)
            np.testing.assert_array_equal(idx, np.arange(len(idx)))
        seen |= set((inst // INSTANCE_DIVISOR).tolist())
    assert {24, 26} <= seen  # persons and cars


def test_shards_carry_the_instance_member_and_old_members_unchanged():
    job = make_jobs(1, 0, 0, (32, 64), "city", 0)[0]
    members = convert(job)
    s = render_sample(0, "train", (32, 64), "city", 0)
    np.testing.assert_array_equal(decode_instance(members["instance.png"]), s["instance"])
    meta = json.loads(members["json"])
    assert meta["has_instance"] is True and meta["has_label"] is True
    assert sorted(members) == ["__key__", "cur.png", "depth.npy", "instance.png", "json", "label.png", "next.png",
                               "prev.png"]


def _street_camera(height: int = 60, width: int = 120) -> Camera:
    f = 1.1 * width
    K = np.array([[f, 0.0, (width - 1) / 2], [0.0, f, (height - 1) / 2], [0.0, 0.0, 1.0]])
    # camera x right, y down, z forward = world X right, -Y, Z along the street; 1.5 m up
    return Camera(K=K, R=np.diag([1.0, -1.0, 1.0]), position=np.array([0.0, 1.5, 0.0]), height=height, width=width)


def test_overlapping_cars_get_distinct_ids():
    """Two cars, one partly behind the other, are two instances although the label cannot tell them apart;
    a cyclist is a rider and a bicycle instance."""
    b = SceneBuilder(np.random.default_rng(0), get_style("city"))
    b.add(0, (0, 0, 0), (0, 0, 0), ROAD, (80, 80, 80))  # the ground plane (primitive 0)
    b.car(-0.6, 9.0, 0.0)
    b.car(0.9, 13.0, 0.0)  # behind the first, shifted right: partly hidden
    b.bicycle(-3.0, 8.0, 0.0, rider=True)
    scene = b.build({})
    tr = trace(scene, _street_camera(), 0)
    ids = instance_map(scene, tr).astype(np.int64)
    label = np.where(tr.pid < 0, 10, scene.cls[np.maximum(tr.pid, 0)])
    near, far = ids == 26000, ids == 26001  # numbered in the order the layout made them
    assert near.sum() > 50 and far.sum() > 20
    assert (label[near | far] == CAR_TRAIN).all()
    # the cars touch in the image: some pixel of one has a 4-neighbour of the other
    across = (near[:, :-1] & far[:, 1:]) | (far[:, :-1] & near[:, 1:])
    above = (near[:-1] & far[1:]) | (far[:-1] & near[1:])
    assert across.any() or above.any()
    # every car primitive (body, cabin, wheels) of one car carries one object id
    cars = np.nonzero(scene.cls == CAR_TRAIN)[0]
    assert len(set(scene.instance[cars].tolist())) == 2 and len(cars) == 8
    assert set(np.unique(ids[ids >= INSTANCE_DIVISOR]).tolist()) == {25000, 26000, 26001, 33000}
    np.testing.assert_array_equal(instance_ids_to_train_ids(ids), label)


# ------------------------------------------------------------------------- Cityscapes


RAW, STORED = (32, 64), (16, 32)


def fake_instance_ids(height: int, width: int) -> np.ndarray:
    """``fake_label_ids`` with its car block split into two car instances (26000 left, 26001 right)."""
    ids = fake_label_ids(height, width).astype(np.uint16)
    car = ids == CAR
    cols = np.nonzero(car.any(0))[0]
    split = cols[len(cols) // 2]
    ids[car & (np.arange(width)[None] < split)] = CAR * 1000
    ids[car & (np.arange(width)[None] >= split)] = CAR * 1000 + 1
    return ids


def _samples(out) -> dict[str, dict]:
    rows = read_manifest(str(out))
    members: dict[str, dict] = {}
    for shard in sorted({r["shard"] for r in rows}):
        with tarfile.open(out / shard) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return members


def test_cityscapes_instance_ids_are_converted(tmp_path):
    root = tmp_path / "cityscapes"
    info = make_fake_cityscapes(root, size=RAW, snippet="neighbours")
    gt = fake_instance_ids(*RAW)
    names = info["annotated"]["train"]
    for name in names[:2]:  # the third train frame has no instance file: the member is optional
        city = name.split("_")[0]
        Image.fromarray(gt).save(root / "gtFine" / "train" / city / f"{name}_gtFine_instanceIds.png")
    bad = fake_instance_ids(*RAW)
    bad[0, 5] = 7000  # road has no instances
    val = info["annotated"]["val"][0]
    Image.fromarray(bad).save(root / "gtFine" / "val" / "frankfurt" / f"{val}_gtFine_instanceIds.png")
    out = tmp_path / "out"
    assert main(["prep", "cityscapes", "--root", str(root), "--out", str(out), "--size", f"{STORED[0]}x{STORED[1]}",
                 "--procs", "1", "--no-progress", "--max-skip-fraction", "0.5"]) == 0
    samples = _samples(out)
    expected = np.asarray(Image.fromarray(gt).resize(STORED[::-1], Image.Resampling.NEAREST)).astype(np.int64)
    for name in names[:2]:
        m = samples[f"cityscapes/train/{name}"]
        ids = decode_instance(m["instance.png"])
        np.testing.assert_array_equal(ids, expected)
        assert set(np.unique(ids).tolist()) >= {26000, 26001}
        # resized on the label's grid: the classes agree pixel for pixel
        label = np.asarray(Image.open(io.BytesIO(m["label.png"])))
        np.testing.assert_array_equal(instance_ids_to_train_ids(ids), label)
        np.testing.assert_array_equal(label_ids_to_train_ids(np.array([CAR])), [13])
        assert json.loads(m["json"])["has_instance"] is True
    third = samples[f"cityscapes/train/{names[2]}"]
    assert "instance.png" not in third and "has_instance" not in json.loads(third["json"])
    report = json.loads((out / "prep_report.json").read_text())
    assert [s["key"] for s in report["skipped"]] == [f"cityscapes/val/{val}"]
    assert "7000" in report["skipped"][0]["reason"] and "instanceIds" in report["skipped"][0]["reason"]
