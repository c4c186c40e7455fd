"""``sdeseg prep cityscapes`` on fake trees in the official layout (tiny PNGs)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep.bench_prep import fake_label_ids, frame_colour, make_fake_cityscapes
from sdeseg.cli import main
from sdeseg.data.classes import label_ids_to_train_ids
from sdeseg.data.codec import decode_sample
from sdeseg.data.manifest import read_manifest

RAW = (32, 64)  # (H, W) of the fake frames
STORED = (16, 32)
CITY_INDEX = {"train": {"aachen": 0, "bochum": 1}, "val": {"frankfurt": 0}}  # sorted order per split


def prep(root, out, *extra: str) -> int:
    size = f"{STORED[0]}x{STORED[1]}"
    return main(["prep", "cityscapes", "--root", str(root), "--out", str(out), "--size", size,
                 "--procs", "1", "--no-progress", "--shard-size", "2", *extra])


def read_back(out) -> dict[str, dict]:
    """key -> decoded sample, read through WebDataset from the shards the manifest names."""
    rows = read_manifest(str(out))
    root = str(out).removeprefix("file://")
    urls = sorted({f"{root}/{r['shard']}" for r in rows})
    samples = {}
    for members in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        s = decode_sample(members)
        samples[s["key"]] = s
    assert sorted(samples) == sorted(r["key"] for r in rows)
    return samples


def report(out) -> dict:
    return json.loads((Path(str(out).removeprefix("file://")) / "prep_report.json").read_text())


def expected_K(K_raw, raw=RAW, stored=STORED) -> np.ndarray:
    # focal lengths scale with the size; principal point maps pixel centres: (c + 0.5) * s - 0.5
    sy, sx = stored[0] / raw[0], stored[1] / raw[1]
    K = np.array(K_raw, dtype=np.float64)
    return np.array([[K[0, 0] * sx, 0, (K[0, 2] + 0.5) * sx - 0.5],
                     [0, K[1, 1] * sy, (K[1, 2] + 0.5) * sy - 0.5], [0, 0, 1]])


def expected_label(stored=STORED) -> np.ndarray:
    train = label_ids_to_train_ids(fake_label_ids(*RAW))
    return np.asarray(Image.fromarray(train).resize(stored[::-1], Image.Resampling.NEAREST))


@pytest.fixture
def tree(tmp_path):
    info = make_fake_cityscapes(tmp_path / "cityscapes", size=RAW)
    return tmp_path / "cityscapes", info


def test_labeled_triplets_round_trip(tree, tmp_path):
    root, info = tree
    out = tmp_path / "out"
    assert prep(root, out) == 0
    samples = read_back(out)
    assert sorted(samples) == [
        "cityscapes/train/aachen_000000_000019",
        "cityscapes/train/aachen_000001_000019",
        "cityscapes/train/bochum_000000_000019",
        "cityscapes/val/frankfurt_000000_000294",
    ]
    for key, s in samples.items():
        _, split, name = key.split("/")
        city, seq, frame = name.rsplit("_", 2)
        seq, frame = int(seq), int(frame)
        assert set(s["frames"]) == {-1, 0, 1}
        for fid, img in s["frames"].items():
            assert img.shape == (*STORED, 3)
            # prev/next are frames t-1 and t+1 of the same sequence (flat colours survive area resize)
            assert (img == frame_colour(CITY_INDEX[split][city], seq, frame + fid)).all(), (key, fid)
        np.testing.assert_array_equal(s["label"], expected_label())
        np.testing.assert_allclose(s["meta"]["K"], expected_K(info["K"]))
        assert s["meta"]["split"] == split and s["meta"]["domain"] == "cityscapes" and s["meta"]["has_label"]
        assert (s["meta"]["city"], s["meta"]["sequence"], s["meta"]["frame"]) == (city, seq, frame)
        assert s["meta"]["source_size"] == list(RAW)
    rows = {r["key"]: r for r in read_manifest(str(out))}
    assert rows["cityscapes/val/frankfurt_000000_000294"]["shard"] == "cityscapes-val-00000.tar"
    assert [rows[k]["shard"] for k in sorted(rows)[:3]] == ["cityscapes-train-00000.tar"] * 2 + [
        "cityscapes-train-00001.tar"]
    rep = report(out)
    assert rep["per_split"] == {"cityscapes/train": {"samples": 3, "labeled": 3, "skipped": 0},
                                "cityscapes/val": {"samples": 1, "labeled": 1, "skipped": 0}}
    assert rep["class_frequency"]["car"] > 0 and rep["class_frequency"]["sky"] > 0
    assert rep["class_frequency"]["person"] == 0 and rep["seconds"] > 0


def test_rerun_resumes_without_rewriting_and_file_url(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "out"
    url = f"file://{out}"
    assert prep(root, url) == 0
    stats = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.glob("*.tar")}
    assert prep(root, url) == 0
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.glob("*.tar")} == stats
    rep = report(url)
    assert rep["shards_resumed"] == 3 and rep["shards_converted_this_run"] == 0 and rep["samples"] == 4
    assert len(read_back(url)) == 4


def test_other_settings_are_refused_then_overwritten(tree, tmp_path, capsys):
    root, _ = tree
    out = tmp_path / "out"
    assert prep(root, out) == 0
    assert prep(root, out, "--image-format", "jpg") == 1
    assert "other settings" in capsys.readouterr().err
    assert prep(root, out, "--image-format", "jpg", "--overwrite") == 0
    with tarfile.open(out / "cityscapes-val-00000.tar") as tf:
        assert any(n.endswith(".cur.jpg") for n in tf.getnames())


def test_parallel_processes_write_identical_shards(tree, tmp_path):
    root, _ = tree
    assert prep(root, tmp_path / "one") == 0
    assert prep(root, tmp_path / "two", "--procs", "2") == 0
    names = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "two").glob("*.tar"))
    for n in names:
        assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes()


def test_all_frames_for_depth_pretraining(tree, tmp_path):
    root, info = tree
    out = tmp_path / "out"
    assert prep(root, out, "--frames", "all") == 0
    samples = read_back(out)
    assert len(samples) == 4 * 28  # 30-frame snippets: every frame but the first and last
    assert "cityscapes/train/aachen_000000_000000" not in samples
    assert "cityscapes/train/aachen_000000_000029" not in samples
    s = samples["cityscapes/val/frankfurt_000000_000276"]
    assert s["label"] is None and not s["meta"]["has_label"]
    assert s["meta"]["camera"] == "camera/val/frankfurt/frankfurt_000000_000294_camera.json"
    for fid in (-1, 0, 1):
        assert (s["frames"][fid] == frame_colour(0, 0, 276 + fid)).all()
    np.testing.assert_allclose(s["meta"]["K"], expected_K(info["K"]))
    assert report(out)["frames_without_both_neighbours"] == 8


def test_without_sequences_single_frames(tmp_path):
    root = tmp_path / "cityscapes"
    make_fake_cityscapes(root, size=RAW, sequences=False)
    assert prep(root, tmp_path / "out") == 0
    samples = read_back(tmp_path / "out")
    assert len(samples) == 4 and all(set(s["frames"]) == {0} for s in samples.values())
    assert report(tmp_path / "out")["neighbours"] == {"train": False, "val": False}


def test_sequences_without_leftimg8bit(tmp_path):
    root = tmp_path / "cityscapes"
    make_fake_cityscapes(root, size=RAW, leftimg8bit=False, snippet="neighbours")
    assert prep(root, tmp_path / "out") == 0
    s = read_back(tmp_path / "out")["cityscapes/train/bochum_000000_000019"]
    assert (s["frames"][0] == frame_colour(1, 0, 19)).all() and set(s["frames"]) == {-1, 0, 1}


# ------------------------------------------------------------------------- bad inputs

BAD = "cityscapes/train/aachen_000001_000019"
A1 = "train/aachen/aachen_000001"


def _corrupt_png(root):
    p = root / f"leftImg8bit/{A1}_000019_leftImg8bit.png"
    p.write_bytes(p.read_bytes()[:40])  # a truncated file: the header survives, the data does not


def _missing_label(root):
    (root / f"gtFine/{A1}_000019_gtFine_labelIds.png").unlink()


def _missing_neighbour(root):
    (root / f"leftImg8bit_sequence/{A1}_000020_leftImg8bit.png").unlink()


def _unknown_ids(root):
    ids = fake_label_ids(*RAW)
    ids[5:9, 5:9] = 200
    Image.fromarray(ids).save(root / f"gtFine/{A1}_000019_gtFine_labelIds.png")


def _size_mismatch(root):
    big = fake_label_ids(RAW[0] * 2, RAW[1] * 2)
    Image.fromarray(big).save(root / f"gtFine/{A1}_000019_gtFine_labelIds.png")


def _bad_camera(root):
    (root / f"camera/{A1}_000019_camera.json").write_text('{"intrinsic": {"fx": 1.0, ')


@pytest.mark.parametrize(
    "damage, words",
    [
        (_corrupt_png, ["corrupt image", "leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png"]),
        (_missing_label, ["missing label", "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png"]),
        (_missing_neighbour, ["missing image", "sequence/train/aachen/aachen_000001_000020", "neighbour"]),
        (_unknown_ids, ["200", "not Cityscapes label ids"]),
        (_size_mismatch, ["label", "is 128x64, image", "is 64x32"]),
        (_bad_camera, ["unreadable camera json", "camera/train/aachen/aachen_000001_000019_camera.json"]),
    ],
    ids=["corrupt_png", "missing_label", "missing_neighbour", "unknown_ids", "size_mismatch", "bad_camera"],
)
def test_bad_file_is_skipped_and_reported(tree, tmp_path, capsys, damage, words):
    root, _ = tree
    damage(root)
    out = tmp_path / "out"
    assert prep(root, out, "--max-skip-fraction", "0.5") == 0
    assert BAD not in read_back(out) and len(read_back(out)) == 3
    rep = report(out)
    assert [s["key"] for s in rep["skipped"]] == [BAD]
    reason = rep["skipped"][0]["reason"]
    for w in words:
        assert w in reason, reason
    assert rep["per_split"]["cityscapes/train"]["skipped"] == 1
    assert BAD in capsys.readouterr().out  # the summary table names it too


def test_too_many_skips_fail_with_report(tree, tmp_path, capsys):
    root, _ = tree
    _missing_label(root)
    out = tmp_path / "out"
    assert prep(root, out) == 1  # 1 of 4 skipped > default limit 5%
    err = capsys.readouterr().err
    assert "skipped 1 of 4 inputs" in err and "--max-skip-fraction" in err and "missing label" in err
    assert report(out)["num_skipped"] == 1
    assert not (out / "manifest.parquet").exists()


def test_nothing_usable_fails(tree, tmp_path, capsys):
    root, _ = tree
    for p in (root / "camera").rglob("*.json"):
        p.write_text("not json")
    assert prep(root, tmp_path / "out", "--max-skip-fraction", "1") == 1
    assert "no usable samples in 4 inputs" in capsys.readouterr().err


def test_empty_root(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert prep(tmp_path / "empty", tmp_path / "out") == 1
    assert "is empty" in capsys.readouterr().err


def test_missing_root(tmp_path, capsys):
    assert prep(tmp_path / "nope", tmp_path / "out") == 1
    assert "does not exist" in capsys.readouterr().err


def test_wrong_root_parent_folder(tree, tmp_path, capsys):
    assert prep(tmp_path, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"no leftImg8bit_sequence/ or leftImg8bit/ under {tmp_path}; " in err
    assert f"did you mean {tmp_path / 'cityscapes'}?" in err


def test_wrong_root_inside_the_tree(tree, tmp_path, capsys):
    root, _ = tree
    assert prep(root / "leftImg8bit", tmp_path / "out") == 1
    assert f"did you mean {root}?" in capsys.readouterr().err


def test_missing_camera_folder(tree, tmp_path, capsys):
    root, _ = tree
    shutil.rmtree(root / "camera")
    assert prep(root, tmp_path / "out") == 1
    assert "no camera/ under" in capsys.readouterr().err


def test_unknown_split(tree, tmp_path, capsys):
    root, _ = tree
    assert prep(root, tmp_path / "out", "--splits", "train,test") == 1
    assert "no annotated frames for split 'test'" in capsys.readouterr().err


# ------------------------------------------------------------------------- kill and resume


def _valid_shard(path: Path) -> int:
    """Number of complete samples in a shard; fails on a truncated tar or sample."""
    groups: dict[str, dict] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            groups.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
    for members in groups.values():
        decode_sample(members)
    return len(groups)


def test_killed_conversion_leaves_no_partial_shard_and_resumes(tmp_path):
    root, out = tmp_path / "cityscapes", tmp_path / "out"
    layout = {"train": {"aachen": [(0, 19), (1, 19)], "bochum": [(0, 19), (1, 19)]}}
    make_fake_cityscapes(root, layout, size=(256, 512), texture=True)
    args = ["prep", "cityscapes", "--root", str(root), "--out", str(out), "--frames", "all",
            "--splits", "train", "--size", "128x256", "--shard-size", "4", "--procs", "1", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "sdeseg.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if len(list(out.glob("cityscapes-train-*.json"))) >= 3:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"converter ended on its own: {proc.stderr.read().decode()}"
    proc.stderr.close()

    finished = {p.with_suffix(".tar").name for p in out.glob("cityscapes-train-*.json")}
    assert 3 <= len(finished) < 28
    for tar in out.glob("*.tar"):  # every file under a final name is a whole shard
        assert _valid_shard(tar) == 4
    assert not (out / "manifest.parquet").exists()
    stats = {n: ((out / n).stat().st_mtime_ns, (out / n).stat().st_ino) for n in finished}

    assert main(args) == 0
    rep = report(out)
    assert rep["shards_resumed"] == len(finished) and rep["samples"] == 112
    assert {n: ((out / n).stat().st_mtime_ns, (out / n).stat().st_ino) for n in finished} == stats
    assert len(read_manifest(str(out))) == 112
    assert sum(_valid_shard(t) for t in out.glob("*.tar")) == 112
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_jpeg_output_decodes(tree, tmp_path):
    root, _ = tree
    assert prep(root, tmp_path / "out", "--image-format", "jpg") == 0
    s = read_back(tmp_path / "out")["cityscapes/train/aachen_000000_000019"]
    assert np.abs(s["frames"][0].astype(int) - frame_colour(0, 0, 19)).max() <= 3  # lossy, flat colour


def test_read_back_through_sdeseg_readers(tree, tmp_path):
    """The training and validation readers accept the converted shards as they are."""
    reader = pytest.importorskip("sdeseg.data.reader")
    root, info = tree
    out = tmp_path / "out"
    assert prep(root, out) == 0
    val = reader.ValLoader(str(out), "train", batch_size=2, frames=(-1, 0, 1))
    batches = list(val)
    assert [k for b in batches for k in b.keys] == val.keys == [
        "cityscapes/train/aachen_000000_000019", "cityscapes/train/aachen_000001_000019",
        "cityscapes/train/bochum_000000_000019"]
    b = batches[0]
    assert b.images[0].shape == (2, 3, *STORED)
    np.testing.assert_allclose(b.images[-1][1, :, 0, 0].numpy() * 255, frame_colour(0, 1, 18), atol=0.5)
    np.testing.assert_allclose(b.images[1][1, :, 0, 0].numpy() * 255, frame_colour(0, 1, 20), atol=0.5)
    np.testing.assert_array_equal(b.label[0].numpy(), expected_label())
    np.testing.assert_allclose(b.K[0].numpy(), expected_K(info["K"]), rtol=1e-5)
    stream = reader.ShardStream(str(out), "train", batch_size=1, crop=None, augment=None, num_workers=0,
                                epochs=1, seed=0)
    keys = sorted(k for batch in stream for k in batch.keys)
    assert keys == sorted(val.keys)
