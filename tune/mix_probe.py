"""How faithfully an SDE model's depth drives DepthMix: per class, measured against true depth.

    python -m tune.mix_probe --data data/synthetic --sde-export runs/sde/export/best.pt

DepthMix keeps a pixel of image i in the mix with its partner j where i is closer
(``M = d_i < d_j + eps``). This probe pairs labeled images as the stage does, builds the
mask twice — from the SDE model's pseudo-depth and from the dataset's ground-truth depth
— and prints, per class, the share of that class's pixels each mask keeps and how often
the two masks agree on them. A class the pseudo-depth keeps much less often than the
true geometry does (thin poles and signs, whose predicted depth is smeared into the
background) is pasted into fewer mixed images than DepthMix intends. The last two
columns give each class's share of the mixed ground-truth labels over its share before
the mix: the class prior the pseudo-label loss sees (``semiseg.mix_rebalance`` weights
by the inverse of this ratio). It needs a split with ground-truth depth (the synthetic
dataset has it); no training, one thread, seconds.

    python -m tune.mix_probe --data TARGET --sde-export E --source SOURCE --source-sde ES

probes Cross-Domain DepthMix instead (the SSDA stage's mask: per target image
``--candidates`` random source images, the one Matching Geometry Sampling picks, pasted
where it is closer): per target class, the share of its pixels the target keeps (on the two
SDE exports' depth and, for the same pairs, on true depth), and the class share of the mixed
ground-truth labels over the target's.
"""

from __future__ import annotations

import argparse

import torch

from sdeseg.config import SsdaConfig
from sdeseg.data.classes import class_names
from sdeseg.data.reader import ValLoader
from sdeseg.exports import load_depth_model
from sdeseg.mixing import (
    cross_domain_depth_mix,
    invalid_depth_as_far,
    labels_to_probs,
    mix_partners,
)
from sdeseg.ops import depth_mix
from sdeseg.stages.ssda import match_criterion


def keep_mask(depth: torch.Tensor, perm: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """(B,H,W) bool DepthMix mask of each image against its partner ``perm[i]``; depth
    (B,1,H,W), invalid (<= 0, e.g. sky in ground truth) counts as infinitely far."""
    return depth_mix(invalid_depth_as_far(depth), perm=perm, eps=eps)[0][:, 0]  # the stage's own mask rule


class KeepStats:
    """Per-class pixel counts: total, kept by the pseudo-depth mask, kept by the true-depth
    mask, pixels where the two masks agree, and the pixels of the mixed labels under
    each mask."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.counts = torch.zeros(6, num_classes, dtype=torch.long)

    def update(self, label: torch.Tensor, pseudo: torch.Tensor, true: torch.Tensor, partner: torch.Tensor) -> None:
        """label (B,H,W) train ids (others ignored); pseudo, true (B,H,W) bool masks of the
        pixels each image keeps against its partner, whose labels are ``partner`` (B,H,W) (for
        DepthMix within one batch ``label[perm]``; for Cross-Domain DepthMix the source's)."""
        valid = (label >= 0) & (label < self.num_classes)
        lab = label[valid]
        for row, m in enumerate((torch.ones_like(pseudo), pseudo, true, pseudo == true)):
            self.counts[row] += torch.bincount(lab[m[valid]], minlength=self.num_classes)
        for row, m in ((4, pseudo), (5, true)):
            mixed = torch.where(m, label, partner)
            ok = (mixed >= 0) & (mixed < self.num_classes)
            self.counts[row] += torch.bincount(mixed[ok], minlength=self.num_classes)

    def rows(self) -> list[tuple[int, float, float, float, float, float, float]]:
        """(class, share of all pixels, kept by pseudo-depth, kept by true depth, agreement,
        mixed/pool share ratio with pseudo-depth, the same with true depth) for every class
        present."""
        total, pseudo, true, agree, mixed_pseudo, mixed_true = self.counts.double()
        share = total / total.sum()
        ratio_pseudo = mixed_pseudo / mixed_pseudo.sum() / share
        ratio_true = mixed_true / mixed_true.sum() / share
        out = []
        for c in range(self.num_classes):
            if total[c] > 0:
                out.append((c, float(share[c]), float(pseudo[c] / total[c]), float(true[c] / total[c]),
                            float(agree[c] / total[c]), float(ratio_pseudo[c]), float(ratio_true[c])))
        return out


@torch.no_grad()
def probe(root: str, sde_export: str, split: str = "train", images: int = 128, batch: int = 8,
          eps: float = 0.0, seed: int = 0) -> KeepStats:
    """Run the probe over the first ``images`` labeled images of ``split`` that have depth."""
    model, depth_range = load_depth_model(sde_export)
    names = class_names()
    stats = KeepStats(len(names))
    gen = torch.Generator().manual_seed(seed)
    loader = ValLoader(root, split, batch_size=batch, max_batches=-(-images // batch))
    for b in loader:
        if b.label is None or b.depth is None:
            raise ValueError(f"{root}: split {split!r} needs labels and ground-truth depth for this probe")
        perm = mix_partners(len(b), gen)
        pseudo = depth_range.depth(model(b.images[0])[("disp", 0)])
        stats.update(b.label, keep_mask(pseudo, perm, eps), keep_mask(b.depth, perm, 0.0), b.label[perm])
    return stats


def load_pool(root: str, split: str, images: int, batch: int, what: str):
    """The first ``images`` samples of ``split`` with labels and ground-truth depth, as
    (images (N,3,H,W), labels (N,H,W), depth (N,1,H,W))."""
    loader = ValLoader(root, split, batch_size=batch, max_batches=-(-images // batch))
    parts = []
    for b in loader:
        if b.label is None or b.depth is None:
            raise ValueError(f"{root}: split {split!r} needs labels and ground-truth depth for this probe ({what})")
        parts.append((b.images[0], b.label, b.depth))
    if not parts:
        raise ValueError(f"{root}: split {split!r} has no samples ({what})")
    return tuple(torch.cat(x)[:images] for x in zip(*parts, strict=True))


@torch.no_grad()
def cross_probe(root: str, sde_export: str, source_root: str, source_export: str, split: str = "train",
                images: int = 128, source_images: int = 256, candidates: int = 5, batch: int = 8,
                seed: int = 0, cfg: SsdaConfig | None = None) -> KeepStats:
    """Cross-Domain DepthMix as the SSDA stage builds it: per target image ``candidates`` random
    source images, the one Matching Geometry Sampling picks on the two SDE exports' depth (with
    one candidate: random pairing), pasted where it is closer (``cfg.mix_eps`` with a random sign
    per image). Counts, per target class, the pixels the target keeps under that mask and under
    the same pairing's true-depth mask, and the mixed ground-truth labels (source's where pasted)."""
    cfg = cfg or SsdaConfig()
    gen = torch.Generator().manual_seed(seed)
    target_net, target_range = load_depth_model(sde_export)
    source_net, source_range = load_depth_model(source_export)
    s_img, s_lab, s_true = load_pool(source_root, "train", source_images, batch, "the source")
    s_depth = torch.cat([source_range.depth(source_net(x)[("disp", 0)]) for x in s_img.split(batch)])
    stats = KeepStats(len(class_names()))
    t_img, t_lab, t_true = load_pool(root, split, images, batch, "the target")
    if t_img.shape[-2:] != s_img.shape[-2:]:
        raise ValueError(f"{root} and {source_root}: images of another size ({tuple(t_img.shape[-2:])} and "
                         f"{tuple(s_img.shape[-2:])})")
    for img, lab, true in zip(t_img.split(batch), t_lab.split(batch), t_true.split(batch), strict=True):
        b = img.shape[0]
        t_depth = target_range.depth(target_net(img)[("disp", 0)])
        cand = torch.randint(len(s_img), (b, candidates), generator=gen)
        c_depth = s_depth[cand.flatten()]
        crit = match_criterion(t_depth, c_depth, cfg, target_range.sigmoid(t_depth), source_range.sigmoid(c_depth))
        pick = cand[torch.arange(b), crit.argmin(dim=1)]
        # the stage's own mix (source pasted where s - m < t, m = ±eps per image) on the SDE depths; the
        # target's "probabilities" are its ground truth, so the mixed label is ground truth everywhere
        mix = cross_domain_depth_mix(s_img[pick], s_depth[pick], s_lab[pick], img, t_depth,
                                     labels_to_probs(lab, stats.num_classes), eps=cfg.mix_eps, generator=gen)
        pasted_true = invalid_depth_as_far(s_true[pick]) < invalid_depth_as_far(true)
        stats.update(lab, ~mix.mask[:, 0], ~pasted_true[:, 0], s_lab[pick])
    return stats


def format_table(stats: KeepStats) -> str:
    names = class_names()
    lines = ["| class | share of pixels | kept, SDE depth | kept, true depth | masks agree "
             "| share mixed/before, SDE depth | share mixed/before, true depth |",
             "|---|---|---|---|---|---|---|"]
    for c, share, pseudo, true, agree, r_pseudo, r_true in stats.rows():
        lines.append(f"| {names[c]} | {100 * share:.2f}% | {pseudo:.2f} | {true:.2f} | {agree:.2f} "
                     f"| {r_pseudo:.2f} | {r_true:.2f} |")
    total = stats.counts.sum(1).double()
    lines.append(f"| all | 100% | {total[1] / total[0]:.2f} | {total[2] / total[0]:.2f} | {total[3] / total[0]:.2f} "
                 "| 1.00 | 1.00 |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset root (shards with labels and depth)")
    p.add_argument("--sde-export", required=True, help="<SDE run dir>/export/best.pt")
    p.add_argument("--split", default="train")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--eps", type=float, default=None,
                   help="semiseg.mix_eps (default 0), with --source ssda.mix_eps (default 0.03)")
    p.add_argument("--seed", type=int, default=0, help="seed of the partner pairing")
    p.add_argument("--threads", type=int, default=1)
    cross = p.add_argument_group("Cross-Domain DepthMix (the SSDA stage's source pasted over --data's images)")
    cross.add_argument("--source", help="source dataset root (its train split, with labels and depth)")
    cross.add_argument("--source-sde", help="the source's own SDE export")
    cross.add_argument("--candidates", type=int, default=5, help="ssda.mgs_candidates (1: random pairing)")
    cross.add_argument("--source-images", type=int, default=256, help="source images the candidates are drawn from")
    cross.add_argument("--match", choices=("median", "official"), default="median", help="ssda.match")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.source:
        if not args.source_sde:
            p.error("--source needs --source-sde (the source's own SDE export)")
        ssda = SsdaConfig(match=args.match, **({} if args.eps is None else {"mix_eps": args.eps}))
        stats = cross_probe(args.data, args.sde_export, args.source, args.source_sde, args.split, args.images,
                            args.source_images, args.candidates, seed=args.seed, cfg=ssda)
        print(f"Cross-Domain DepthMix, {args.candidates} candidate(s), match {args.match}: per class of the "
              "target, the share of its pixels the target keeps, and the mixed labels' class share over the "
              "target's\n")
    else:
        stats = probe(args.data, args.sde_export, args.split, args.images, eps=args.eps or 0.0, seed=args.seed)
    print(format_table(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
