"""The pseudo-label probe: right and wrong teaching per class by hand, and a run on the fixture."""

import torch

from sdeseg.data.classes import class_names
from tune import pseudo_probe


def test_teach_stats_by_hand():
    # one image of 4 pixels, 2 classes; truth 0, 0, 1, 1. The teacher: pixel 0 class 0 at 0.99
    # (right), pixel 1 class 1 at 0.6 (wrong), pixel 2 class 1 at 0.7 (right), pixel 3 class 0 at
    # 0.98 (wrong, confident). Confident (>= 0.968): pixels 0 and 3, q = 0.5.
    p0 = torch.tensor([0.99, 0.4, 0.3, 0.98])
    probs = torch.stack([p0, 1 - p0]).reshape(1, 2, 1, 4)
    label = torch.tensor([[[0, 0, 1, 1]]])
    stats = pseudo_probe.TeachStats(["a", "b"], [("fraction", 1.0), ("pixel", 1.0), ("class", 0.5)])
    stats.update(probs, label, threshold=0.968)
    assert stats.pixels.tolist() == [2, 2] and stats.right.tolist() == [1, 1]
    # taught[w] = [[right of class 0, of class 1], [wrong of class 0, of class 1]]; fraction: 0.5 everywhere
    assert stats.taught[0].tolist() == [[0.5, 0.5], [0.5, 0.5]]
    # pixel: pixel 0 right (class 0), pixel 3 wrong (class 1's pixel labelled 0)
    assert stats.taught[1].tolist() == [[1, 0], [0, 1]]
    # class 0.5: class 0's predictions 0.99, 0.98 -> floor min(0.968, 0.99) keeps both; class 1's
    # 0.6, 0.7 -> floor 0.7 keeps pixel 2 (right), not pixel 1
    assert stats.taught[2].tolist() == [[1, 1], [0, 1]]
    table = stats.table().splitlines()
    assert table[2] == "| a | 50.00% | 0.50 | 0.25 / 0.25 | 0.50 / 0.00 | 0.50 / 0.00 |"
    assert table[-1].endswith("| 0.500 | 0.500 | 0.667 |")


def test_probe_on_the_fixture_with_an_untrained_export(synthetic_root, tmp_path, capsys):
    from sdeseg.models import build_seg_model
    from sdeseg.stages.semiseg import export_payload
    from tests.conftest import tiny_config

    cfg = tiny_config("demo_semiseg", synthetic_root)
    torch.manual_seed(0)
    path = tmp_path / "seg.pt"
    torch.save(export_payload(build_seg_model(cfg.model), cfg, 0, {}), path)
    args = ["--model", str(path), "--data", synthetic_root, "--images", "8", "--class-share", "0.25", "1"]
    assert pseudo_probe.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in lines[4:-1]}
    assert set(rows) <= set(class_names()) and rows
    assert abs(sum(float(v[0].strip(" %")) for v in rows.values()) - 100) < 0.1
    for cells in rows.values():
        recall = float(cells[1])
        taught = [[float(x) for x in c.split("/")] for c in cells[2:]]
        assert len(taught) == 4 and all(0 <= x <= 1 for pair in taught for x in pair)
        # class share 1 keeps every pixel with a pseudo-label: right = recall, right + wrong = 1
        assert abs(taught[3][0] - recall) < 0.011 and abs(sum(taught[3]) - 1) < 0.011
