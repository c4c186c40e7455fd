"""What a teacher's pseudo-labels teach each class under each ``semiseg.pseudo_weighting``.

    python -m tune.pseudo_probe --model RUN/export/last.pt --data D --split train

Runs a segmentation export over a labeled split in batches of ``--batch`` (the stages'
unlabeled batch per rank: the class-balanced floors are the batch's) and, per true class c,
weighs each pixel's pseudo-label (the argmax) as :func:`sdeseg.losses.pseudo_label_weight`
does in training. It prints the share of c's pixels the teacher labels right (recall) and,
per weighting, the weight that teaches c's pixels their own class ("right") and another
class ("wrong"), each over c's pixel count; the last row gives the weighted share of
right labels over all pixels. The paper's "fraction" weight is one number per batch, so it
keeps every class's right/wrong ratio; "pixel" and "class" drop unconfident pixels, which
helps a class where its wrong labels are the unconfident ones. Ground truth of the split
is read only to score; no training, seconds on one thread.
"""

from __future__ import annotations

import argparse

import torch

from sdeseg.data.reader import ValLoader
from sdeseg.exports import load_model
from sdeseg.losses import pseudo_label_weight


class TeachStats:
    """Per true class (``names``): pixels, pixels the argmax gets right, and per weighting the
    weight on right and on wrong pseudo-labels."""

    def __init__(self, names: list[str], weightings: list[tuple[str, float]]):
        self.names, self.num_classes, self.weightings = names, len(names), weightings
        num_classes = self.num_classes
        self.pixels = torch.zeros(num_classes, dtype=torch.float64)
        self.right = torch.zeros(num_classes, dtype=torch.float64)
        self.taught = torch.zeros(len(weightings), 2, num_classes, dtype=torch.float64)  # [w][right, wrong][c]

    def update(self, probs: torch.Tensor, label: torch.Tensor, threshold: float) -> None:
        """probs (B,C,H,W) teacher probabilities, label (B,H,W) train ids (others ignored)."""
        valid = (label >= 0) & (label < self.num_classes)
        lab, hit = label[valid], (probs.argmax(1) == label)[valid]
        self.pixels += torch.bincount(lab, minlength=self.num_classes).double()
        self.right += torch.bincount(lab[hit], minlength=self.num_classes).double()
        for i, (weighting, share) in enumerate(self.weightings):
            weight = pseudo_label_weight(probs, threshold, weighting, share)[0][valid].double()
            self.taught[i, 0] += torch.bincount(lab[hit], weight[hit], minlength=self.num_classes)
            self.taught[i, 1] += torch.bincount(lab[~hit], weight[~hit], minlength=self.num_classes)

    def table(self) -> str:
        heads = [w if w != "class" else f"class {s:g}" for w, s in self.weightings]
        lines = ["| class | share of pixels | recall | " + " | ".join(f"{h}: right / wrong" for h in heads) + " |",
                 "|---|---|---|" + "---|" * len(heads)]
        for c in range(self.num_classes):
            n = self.pixels[c]
            if n == 0:
                continue
            cells = " | ".join(f"{self.taught[i, 0, c] / n:.2f} / {self.taught[i, 1, c] / n:.2f}"
                               for i in range(len(heads)))
            share = 100 * n / self.pixels.sum()
            lines.append(f"| {self.names[c]} | {share:.2f}% | {self.right[c] / n:.2f} | {cells} |")
        right, wrong = self.taught[:, 0].sum(1), self.taught[:, 1].sum(1)
        lines.append(f"| all: right share of the weight | 100% | {self.right.sum() / self.pixels.sum():.2f} | "
                     + " | ".join(f"{right[i] / (right[i] + wrong[i]):.3f}" for i in range(len(heads))) + " |")
        return "\n".join(lines)


@torch.no_grad()
def probe(model_path: str, root: str, split: str = "train", images: int | None = None, batch: int = 4,
          threshold: float = 0.968, shares: tuple[float, ...] = (0.5,)) -> TeachStats:
    """Run the probe over the first ``images`` labeled images of ``split`` (all when None)."""
    model = load_model(model_path)
    model.require("seg")
    weightings = [("fraction", 1.0), ("pixel", 1.0)] + [("class", s) for s in shares]
    stats = TeachStats(list(model.class_names), weightings)
    loader = ValLoader(root, split, batch_size=batch, max_batches=0 if images is None else -(-images // batch))
    seen = 0
    for b in loader:
        if b.label is None:
            raise ValueError(f"{root}: split {split!r} has images without labels; the probe scores against them")
        probs = torch.softmax(model.predict(b.images[0])["logits"], dim=1)
        stats.update(probs, b.label, threshold)
        seen += len(b)
    if not seen:
        raise ValueError(f"{root}: split {split!r} has no samples")
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a segmentation export (RUN/export/last.pt)")
    p.add_argument("--data", required=True, help="dataset root with labels on --split")
    p.add_argument("--split", default="train")
    p.add_argument("--images", type=int, default=None, help="the first N images (default: all)")
    p.add_argument("--batch", type=int, default=4, help="images per batch (data.batch_size of the stage)")
    p.add_argument("--threshold", type=float, default=0.968, help="semiseg.pseudo_threshold")
    p.add_argument("--class-share", type=float, nargs="+", default=[0.5], help="semiseg.pseudo_class_share values")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    stats = probe(args.model, args.data, args.split, args.images, args.batch, args.threshold,
                  tuple(args.class_share))
    print(f"{args.model} on {args.data} ({args.split}): per true class, the weight its pseudo-labels get, "
          "right and wrong, over its pixels\n")
    print(stats.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
