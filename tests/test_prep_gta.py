"""``sdeseg prep gta`` on a fake GTA5 tree (images/NNNNN.png, labels/NNNNN.png)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep.bench_prep import fake_label_ids
from data_prep.gta import DEFAULT_VFOV_DEG
from sdeseg.cli import main
from sdeseg.data.classes import class_colors, label_ids_to_train_ids
from sdeseg.data.codec import decode_sample
from sdeseg.data.manifest import read_manifest

RAW = (26, 48)  # (H, W): GTA's 1052x1914 aspect, tiny
STORED = (16, 32)
IDS = ["00001", "00002", "00003", "00004"]


def write_pair(root: Path, sid: str, label_hw=RAW, colour=None) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    img = np.zeros((*RAW, 3), np.uint8)
    img[:] = colour or (int(sid) * 20, 100, 50)
    Image.fromarray(img).save(root / "images" / f"{sid}.png")
    label = Image.fromarray(fake_label_ids(*label_hw))
    label.putpalette(class_colors().ravel().tolist())  # released GTA5 labels are palette PNGs
    label.save(root / "labels" / f"{sid}.png")


@pytest.fixture
def gta(tmp_path):
    root = tmp_path / "gta5"
    for sid in IDS:
        write_pair(root, sid)
    return root


def prep(root, out, *extra) -> int:
    return main(["prep", "gta", "--root", str(root), "--out", str(out), "--size", f"{STORED[0]}x{STORED[1]}",
                 "--procs", "1", "--no-progress", *extra])


def read_back(out) -> dict[str, dict]:
    rows = read_manifest(str(out))
    urls = sorted({f"{out}/{r['shard']}" for r in rows})
    stream = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return {s["key"]: s for s in map(decode_sample, stream)}


def report(out) -> dict:
    return json.loads((Path(out) / "prep_report.json").read_text())


def scaled(K, raw=RAW, stored=STORED):
    sy, sx = stored[0] / raw[0], stored[1] / raw[1]
    return [[K[0][0] * sx, 0, (K[0][2] + 0.5) * sx - 0.5],
            [0, K[1][1] * sy, (K[1][2] + 0.5) * sy - 0.5],
            [0, 0, 1]]


def test_round_trip(gta, tmp_path):
    out = tmp_path / "out"
    assert prep(gta, out) == 0
    samples = read_back(out)
    assert sorted(samples) == [f"gta/train/{sid}" for sid in IDS]
    s = samples["gta/train/00001"]
    assert set(s["frames"]) == {0} and s["frames"][0].shape == (*STORED, 3)
    assert (s["frames"][0] == (20, 100, 50)).all()
    train = label_ids_to_train_ids(fake_label_ids(*RAW))
    expected = np.asarray(Image.fromarray(train).resize(STORED[::-1], Image.Resampling.NEAREST))
    np.testing.assert_array_equal(s["label"], expected)
    f = (RAW[0] / 2) / math.tan(math.radians(DEFAULT_VFOV_DEG) / 2)
    K_raw = [[f, 0, (RAW[1] - 1) / 2], [0, f, (RAW[0] - 1) / 2], [0, 0, 1]]
    np.testing.assert_allclose(s["meta"]["K"], scaled(K_raw))
    assert s["meta"]["domain"] == "gta" and s["meta"]["split"] == "train" and s["meta"]["id"] == "00001"
    rep = report(out)
    assert rep["per_split"] == {"gta/train": {"samples": 4, "labeled": 4, "skipped": 0}}
    assert "assumed vertical field of view" in rep["intrinsics"]


def test_given_intrinsics_and_split(gta, tmp_path):
    out = tmp_path / "out"
    assert prep(gta, out, "--intrinsics", "40,41,23.5,12.5", "--split", "source") == 0
    s = read_back(out)["gta/source/00002"]
    np.testing.assert_allclose(s["meta"]["K"], scaled([[40, 0, 23.5], [0, 41, 12.5], [0, 0, 1]]))


def test_size_mismatch_is_resized_and_reported(gta, tmp_path, capsys):
    write_pair(gta, "00003", label_hw=(RAW[0] - 4, RAW[1]))
    out = tmp_path / "out"
    assert prep(gta, out) == 0
    samples = read_back(out)
    assert "gta/train/00003" in samples and samples["gta/train/00003"]["label"].shape == STORED
    rep = report(out)
    assert rep["num_skipped"] == 0 and [w["key"] for w in rep["warnings"]] == ["gta/train/00003"]
    assert "label labels/00003.png is 48x22, image is 48x26: label resized" in rep["warnings"][0]["message"]
    assert "warnings (1)" in capsys.readouterr().out


def _corrupt(root):
    (root / "images" / "00002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")


def _missing_label(root):
    (root / "labels" / "00002.png").unlink()


def _missing_image(root):
    (root / "images" / "00002.png").unlink()


def _unknown_ids(root):
    ids = fake_label_ids(*RAW)
    ids[0, 0] = 77
    Image.fromarray(ids).save(root / "labels" / "00002.png")


def _rgb_label(root):
    Image.fromarray(np.zeros((*RAW, 3), np.uint8)).save(root / "labels" / "00002.png")


@pytest.mark.parametrize("damage, words", [
    (_corrupt, ["corrupt image", "images/00002.png"]),
    (_missing_label, ["missing label", "labels/00002.png"]),
    (_missing_image, ["missing image", "images/00002.png"]),
    (_unknown_ids, ["77", "not Cityscapes label ids"]),
    (_rgb_label, ["mode RGB", "labels/00002.png"]),
], ids=["corrupt", "missing_label", "missing_image", "unknown_ids", "rgb_label"])
def test_bad_pair_is_skipped(gta, tmp_path, damage, words):
    damage(gta)
    out = tmp_path / "out"
    assert prep(gta, out, "--max-skip-fraction", "0.3") == 0
    assert sorted(read_back(out)) == ["gta/train/00001", "gta/train/00003", "gta/train/00004"]
    (skip,) = report(out)["skipped"]
    assert skip["key"] == "gta/train/00002"
    for w in words:
        assert w in skip["reason"], skip["reason"]


def test_wrong_root(gta, tmp_path, capsys):
    assert prep(tmp_path, tmp_path / "out") == 1
    assert f"no images/ under {tmp_path}; did you mean {gta}?" in capsys.readouterr().err


def test_empty_root(tmp_path, capsys):
    (tmp_path / "gta5").mkdir()
    assert prep(tmp_path / "gta5", tmp_path / "out") == 1
    assert "is empty" in capsys.readouterr().err


def test_no_labels_folder(tmp_path, capsys):
    (tmp_path / "gta5" / "images").mkdir(parents=True)
    assert prep(tmp_path / "gta5", tmp_path / "out") == 1
    assert "no labels/ under" in capsys.readouterr().err


def test_shares_an_output_folder_with_cityscapes(gta, tmp_path):
    from data_prep.bench_prep import make_fake_cityscapes

    make_fake_cityscapes(tmp_path / "cityscapes", size=(32, 64))
    out = tmp_path / "out"
    assert main(["prep", "cityscapes", "--root", str(tmp_path / "cityscapes"), "--out", str(out),
                 "--size", "16x32", "--procs", "1", "--no-progress"]) == 0
    assert prep(gta, out) == 0
    keys = {r["key"].split("/")[0] for r in read_manifest(str(out))}
    assert keys == {"cityscapes", "gta"} and len(read_back(out)) == 8
    assert report(out)["manifest_rows_kept"] == 4


def test_object_storage_urls_in_and_out(gta):
    """Root and output as fsspec URLs (the in-memory filesystem stands in for s3:// / gs://)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    try:
        fs.put(str(gta), "/bucket/gta5", recursive=True)
        assert prep("memory://bucket/gta5", "memory://bucket/shards") == 0
        rows = read_manifest("memory://bucket/shards")
        assert sorted(r["key"] for r in rows) == [f"gta/train/{sid}" for sid in IDS]
        assert fs.exists("/bucket/shards/gta-train-00000.tar")
        assert json.loads(fs.cat("/bucket/shards/prep_report.json"))["samples"] == 4
    finally:
        fs.rm("/bucket", recursive=True)
