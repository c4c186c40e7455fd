"""One typed configuration tree for every stage.

Presets live in ``sdeseg/configs/*.yaml``. A preset may name another preset it
extends (``base: demo_sde.yaml``); command-line overrides are dotted
``key=value`` pairs (``data.size=128x256``, ``optim.lr=2e-4``). Unknown keys and
values of the wrong type are errors that name the key; impossible combinations
are rejected in ``__post_init__``. The resolved config is saved with every run
(``save_config``) and reloads to an equal object.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


Size = tuple[int, int]


def parse_size(value: Any, key: str = "size") -> Size:
    """``"96x192"``, ``[96, 192]`` or ``(96, 192)`` -> ``(96, 192)`` (height, width)."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
        if not m:
            raise ConfigError(f"{key}: expected HxW such as 96x192, got {value!r}")
        value = (int(m.group(1)), int(m.group(2)))
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ConfigError(f"{key}: expected HxW such as 96x192, got {value!r}")
    if value[0] <= 0 or value[1] <= 0:
        raise ConfigError(f"{key}: height and width must be positive, got {value!r}")
    return (int(value[0]), int(value[1]))


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# ----------------------------------------------------------------------------- sections


@dataclass(kw_only=True)
class AugmentConfig:
    """Augmentations applied by the reader (training split only)."""

    crop: bool = True  # random crop to data.size (otherwise resize-free centre crop)
    hflip: bool = True  # horizontal flip; K is flipped consistently
    brightness: float = 0.2  # colour jitter magnitudes for the photometric branch
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            _check(0.0 <= getattr(self, name) < 1.0, f"data.augment.{name}", "must be in [0, 1)")
        _check(0.0 <= self.hue <= 0.5, "data.augment.hue", "must be in [0, 0.5]")


@dataclass(kw_only=True)
class DataConfig:
    """Where the shards are and how batches are formed."""

    root: str = "data/synthetic"  # directory or fsspec URL with *.tar shards and manifest.parquet
    train_split: str = "train"
    val_split: str = "val"  # development and model selection (best export)
    # held out: the final model is evaluated on it at the end of a run (summary keys test/...);
    # None, or a dataset without this split, skips that evaluation
    test_split: str | None = "test"
    domain: str | None = None  # keep only samples of this domain (None: all)
    size: Size = (96, 192)  # training crop, height x width
    batch_size: int = 8  # per rank: sequence/unlabeled batch (DeepSpeed micro-batch)
    labeled_batch_size: int = 4  # per rank: labeled batch in semi-supervised stages
    val_batch_size: int = 8
    num_workers: int = 1  # DataLoader worker processes per rank
    shuffle_buffer: int = 64  # samples held for shuffling per DataLoader worker
    max_corrupt_fraction: float = 0.01  # fail when more than this fraction of samples is undecodable
    # a key file: text, one key per line, or a selection stage's labeled_keys_<n>.json (None: draw
    # num_labeled at random); the selection stage grows its budgets from this set when given
    labeled_keys: str | None = None
    num_labeled: int = 0  # size of the random labeled subset when labeled_keys is None
    labeled_seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        self.size = parse_size(self.size, "data.size")
        for name in ("batch_size", "labeled_batch_size", "val_batch_size"):
            _check(getattr(self, name) >= 1, f"data.{name}", "must be >= 1")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
        _check(0.0 <= self.max_corrupt_fraction <= 1.0, "data.max_corrupt_fraction", "must be in [0, 1]")
        _check(self.num_labeled >= 0, "data.num_labeled", "must be >= 0")


@dataclass(kw_only=True)
class ModelConfig:
    """Encoder / decoders of the depth, pose and segmentation networks."""

    encoder: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet18"
    width: int = 64  # channels of the ResNet stem (64 = standard, published weights need 64)
    pretrained: str | None = None  # path to a torchvision-format ImageNet state_dict (no download)
    dilate_last: bool = False  # dilate the last stage: output stride 16
    aspp: bool = False  # ASPP as the first decoder block (as in the paper's code)
    decoder_channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    num_classes: int = 19
    seg_head_channels: int = 64  # 3x3 conv of the segmentation head at input resolution
    # initial output of the sigmoid disparity heads; 0.01 is ~10 m with the default 0.1-100 m
    # depth range (None: sigmoid(0) = 0.5, ~0.2 m, from which the disparity can collapse)
    init_disp: float | None = None
    pose_encoder: Literal["resnet18", "resnet34"] = "resnet18"
    pose_width: int = 64
    pose_rot_scale: float = 0.01  # output scale of axis-angle rotation
    pose_trans_scale: float = 1.0  # output scale of translation (0.01 collapsed disparity, see README)
    # initial forward motion per frame of the pose net (scale-free prior, pairs with init_disp;
    # 0: start from no motion as Monodepth2 does)
    pose_init_forward: float = 0.0
    multitask: bool = False  # depth and segmentation decoders side by side, exchanging features
    exchange_level: int = 2  # decoder block after which features are exchanged

    def __post_init__(self) -> None:
        _check(self.width >= 8 and self.width % 8 == 0, "model.width", "must be a multiple of 8, >= 8")
        _check(self.pose_width >= 8 and self.pose_width % 8 == 0, "model.pose_width", "must be a multiple of 8")
        _check(len(self.decoder_channels) == 5, "model.decoder_channels", "needs 5 entries (one per scale)")
        _check(all(c > 0 for c in self.decoder_channels), "model.decoder_channels", "must be positive")
        _check(self.num_classes >= 2, "model.num_classes", "must be >= 2")
        _check(self.seg_head_channels >= 1, "model.seg_head_channels", "must be >= 1")
        _check(0 <= self.exchange_level <= 4, "model.exchange_level", "must be in [0, 4]")
        _check(self.init_disp is None or 0 < self.init_disp < 1, "model.init_disp", "must be in (0, 1)")
        if self.pretrained is not None and self.width != 64:
            raise ConfigError("model.pretrained: published ImageNet weights need model.width=64")


@dataclass(kw_only=True)
class DepthLossConfig:
    """Monodepth2-style self-supervised depth loss."""

    ssim_weight: float = 0.85  # alpha in alpha*(1-SSIM)/2 + (1-alpha)*L1
    smoothness: float = 1e-3  # edge-aware smoothness weight (divided by 2^scale)
    min_depth: float = 0.1
    max_depth: float = 100.0
    num_scales: int = 4  # disparity scales
    # "full": each disparity is upsampled and judged at input resolution (Monodepth2);
    # "pyramid": judged at its own resolution against downsampled frames (Monodepth v1):
    # coarse scales see ego-motion of a few pixels as a fraction of one, which widens the
    # basin the pose net has to find, and the loss costs ~1/3 of "full".
    scale_mode: Literal["full", "pyramid"] = "full"
    # how the sigmoid output s maps to depth: "inverse" = disparity linear in s between
    # 1/max_depth and 1/min_depth (Monodepth2); "log" = log-depth linear in s, which spans
    # street-scene depth ratios (2-80 m) in the sigmoid's linear range instead of its tail
    disp_mapping: Literal["inverse", "log"] = "inverse"
    automask: bool = True  # identity-reprojection auto-masking of static pixels
    feature_distance: float = 0.0  # ImageNet feature-distance weight (needs model.pretrained)
    weight: float = 1.0  # weight of the whole depth loss in multi-task training

    def __post_init__(self) -> None:
        _check(0.0 <= self.ssim_weight <= 1.0, "depth_loss.ssim_weight", "must be in [0, 1]")
        _check(0.0 < self.min_depth < self.max_depth, "depth_loss.min_depth", "need 0 < min_depth < max_depth")
        _check(1 <= self.num_scales <= 4, "depth_loss.num_scales", "must be in [1, 4]")
        _check(self.smoothness >= 0 and self.feature_distance >= 0, "depth_loss", "weights must be >= 0")


@dataclass(kw_only=True)
class SemisegConfig:
    """Mean teacher, mixing and pseudo-label loss of the semi-supervised stage."""

    ignore_index: int = 255
    mix: Literal["none", "classmix", "depthmix"] = "depthmix"
    # SDE-model depth, the multi-task student's, or the dataset's exact depth (an oracle for
    # studies on data that has it, e.g. the synthetic set; invalid depth counts as far)
    mix_depth: Literal["pseudo", "online", "ground_truth"] = "pseudo"
    mix_eps: float = 0.0
    mix_labeled: bool = True  # labeled images join the mixing pool with their ground truth
    # the unlabeled stream (the whole train split) reads the labeled images' ground truth, and
    # the mixes take it instead of the teacher's pseudo-label where they meet one (the official
    # code's mix_use_gt; also under ssda's Cross-Domain DepthMix targets)
    mix_use_gt: bool = False
    # weight the pseudo-label loss so each class keeps its pre-mix pixel share (mixing.rebalance_weights)
    mix_rebalance: bool = False
    pseudo_label: bool = True  # False: supervised-only baseline
    pseudo_threshold: float = 0.968
    # "fraction": CE on all pixels x the confident fraction (the paper); "pixel": CE on confident pixels only;
    # "class": per-class thresholds, each class keeps at least its most confident pseudo_class_share
    # (losses.seg.pseudo_label_weight); also weights the target pixels of ssda's cross-domain mix
    pseudo_weighting: Literal["fraction", "pixel", "class"] = "fraction"
    pseudo_class_share: float = 0.5
    unsup_weight: float = 1.0
    # student forward on the labeled and the mixed images in two passes, as the paper's code does,
    # so the labeled batch is normalised with its own BatchNorm statistics; False: one joint batch
    # (cheaper, but on the demo it cost ~3.5 mIoU at 400 steps even with no pseudo-label loss)
    separate_passes: bool = True
    unsup_rampup_steps: int = 0  # sigmoid ramp-up of the pseudo-label loss over this many steps (0: none)
    aux_weight: float = 0.5  # auxiliary segmentation output of the multi-task model
    ema_alpha_max: float = 0.99
    blur: bool = True  # Gaussian blur on the mixed student input
    color_jitter: float = 0.2  # colour jitter magnitude on the mixed student input
    # its hue step: rotate YIQ's chroma plane (keeps luma) or the HSV hue (kornia/torchvision,
    # the official code); on the demo HSV cost 0.9-1.0 mIoU at 175 steps (BENCHMARKS.md, 2026-11-30)
    hue_space: Literal["yiq", "hsv"] = "yiq"
    sde_checkpoint: str | None = None  # exported SDE model: transfer init and pseudo-depth
    # where the student's encoder + decoder start: the SDE export (sde_checkpoint), a contrastive
    # export (init_checkpoint), ImageNet weights (model.pretrained, decoder random) or nothing
    init_from: Literal["sde", "contrastive", "imagenet", "scratch"] = "sde"
    init_checkpoint: str | None = None  # the `stage: contrastive` export read with init_from=contrastive
    # the older switch, kept: false with init_from=sde means imagenet (model.pretrained set) or
    # scratch; after loading it always equals init_from == "sde" (Config.__post_init__)
    transfer: bool = True

    def __post_init__(self) -> None:
        _check(0.0 <= self.pseudo_threshold <= 1.0, "semiseg.pseudo_threshold", "must be in [0, 1]")
        _check(0.0 < self.pseudo_class_share <= 1.0, "semiseg.pseudo_class_share", "must be in (0, 1]")
        _check(0.0 <= self.ema_alpha_max < 1.0, "semiseg.ema_alpha_max", "must be in [0, 1)")
        _check(self.unsup_weight >= 0 and self.aux_weight >= 0, "semiseg", "loss weights must be >= 0")
        _check(self.unsup_rampup_steps >= 0, "semiseg.unsup_rampup_steps", "must be >= 0")


@dataclass(kw_only=True)
class SsdaConfig:
    """Semi-supervised domain adaptation (``stage: ssda``): a labeled source domain beside the
    few target labels (the semisg section configures the rest)."""

    source_root: str | None = None  # dataset of the source (None: data.root, then name both domains)
    source_domain: str | None = None  # e.g. synth-game
    source_split: str = "train"
    source_sde_checkpoint: str | None = None  # the source's own SDE export (its depth)
    # a derived dataset of that export's depth over the source (`sdeseg infer --outputs depth`):
    # read instead of running the network on every candidate (None: computed online)
    source_depth_root: str | None = None
    # source candidates per target image; the closest geometry wins (1: random pairing)
    mgs_candidates: int = 5
    # "median": each depth map over its own median (two SDE networks, two scales; the presets);
    # "official": the official code's raw-disparity criterion
    match: Literal["median", "official"] = "median"
    ignore_top: float = 0.156  # rows left out of the match: the official 80 and 100 of 512
    ignore_bottom: float = 0.195
    cross_mix: bool = True  # Cross-Domain DepthMix
    mix_eps: float = 0.03  # its margin, with a random sign per image (official)
    source_weight: float = 1.0  # supervised loss on the matched source batch
    cross_weight: float = 1.0  # loss on the cross-domain mix
    # multiplies the mix's target-pixel weights (1: the paper; 0: the mix supervises only its pasted
    # source pixels — a diagnostic that separates the source paste from its target pseudo-labels)
    cross_target_weight: float = 1.0

    def __post_init__(self) -> None:
        _check(self.mgs_candidates >= 1, "ssda.mgs_candidates", "must be >= 1")
        _check(0 <= self.ignore_top and 0 <= self.ignore_bottom and self.ignore_top + self.ignore_bottom < 1,
               "ssda.ignore_top", "ignore_top + ignore_bottom must leave rows (fractions in [0, 1))")
        _check(min(self.mix_eps, self.source_weight, self.cross_weight, self.cross_target_weight) >= 0, "ssda",
               "mix_eps and the weights must be >= 0")


@dataclass(kw_only=True)
class SelfTrainConfig:
    """Training on pseudo-masks (``stage: selftrain``): stages 2 and 3 of the three-stage
    pipeline (``stage: threestage``, :class:`ThreeStageConfig`), our design in the paper's spirit.

    Unlabeled images get a cross-entropy to their stored pseudo-mask where the pixel's
    confidence passes its class's threshold (``threshold_quantile`` of that class's
    confidences over the whole pseudo-mask set, at most ``threshold_max``: every class keeps
    its most confident pixels, so rare, less confident classes are not drowned by frequent
    ones), weighted per class by ``share ** -class_weight_power``; two strong views of each
    image must agree (``view_consistency``), and so must the two segmentation outputs of the
    multi-task model (``branch_consistency``: after and before the depth exchange).
    """

    pseudo_root: str | None = None  # derived dataset of pseudo-masks (`sdeseg infer --outputs seg`)
    threshold_quantile: float = 0.5
    threshold_max: float = 0.95
    class_weight_power: float = 0.5
    class_weight_max: float = 10.0
    pseudo_weight: float = 1.0
    view_consistency: float = 1.0  # weight of the two views' agreement (softmax MSE)
    branch_consistency: float = 0.5  # weight of ("seg", 0) vs ("seg_aux", 0) agreement
    histogram_bins: int = 100  # confidence histogram per class (the pseudo-mask statistics)

    def __post_init__(self) -> None:
        _check(0.0 <= self.threshold_quantile < 1.0, "selftrain.threshold_quantile", "must be in [0, 1)")
        _check(0.0 < self.threshold_max <= 1.0, "selftrain.threshold_max", "must be in (0, 1]")
        _check(self.class_weight_power >= 0 and self.class_weight_max >= 1, "selftrain.class_weight_power",
               "class_weight_power must be >= 0 and class_weight_max >= 1")
        _check(min(self.pseudo_weight, self.view_consistency, self.branch_consistency) >= 0, "selftrain",
               "loss weights must be >= 0")
        _check(self.histogram_bins >= 10, "selftrain.histogram_bins", "must be >= 10")


@dataclass(kw_only=True)
class ContrastiveConfig:
    """Depth-region copy-paste contrastive pretraining (``stage: contrastive``, seed 003, CPCDR).

    Defaults are the official code's (``../shared/METHODS.md``). Each rank's unlabeled batch is
    one group: its regions (a derived dataset, ``sdeseg infer --outputs depth,regions``, looked up
    by key and cropped/flipped like the images) are pasted ``copies[0]`` times into the group's
    images for view 1 and ``copies[1]`` times for view 2, and the SwAV loss asks every region's and
    every source pixel's copies to agree on their prototype codes.
    """

    regions_root: str | None = None  # derived dataset with regions.png and pseudo_depth.npy per key
    regions: Literal["depth", "colour"] = "depth"  # the kind the dataset must hold (colour: ablation)
    depth_order: bool = True  # a pasted pixel shows only where it is closer (False: ablation)
    copies: tuple[int, ...] = (2, 4)  # pastes per region in view 1 and view 2
    scale_range: tuple[float, float] = (0.2, 2.0)  # paste distance scale s (1/s uniform)
    view_jitter: float = 0.2  # colour jitter of each whole view after pasting (0: off; ours)
    view_blur: bool = False  # Gaussian blur of each whole view after pasting (ours)
    proj_dim: int = 128
    head_channels: int = 256  # hidden channels of the projection head
    prototypes: int = 1000
    temperature: float = 0.1
    sinkhorn_eps: float = 0.05
    sinkhorn_iterations: int = 3
    pixel_weight: float = 0.5
    region_weight: float = 0.5
    pixel_points: int = 4000  # sampled points per image and view
    region_points: int = 7200
    # a point's target is its group's code in the other view (SwAV); False: pooled over both views
    # (the official code)
    swapped: bool = True
    # an SDE export to start encoder + decoder body from (None: model.pretrained, or random weights)
    init_checkpoint: str | None = None

    def __post_init__(self) -> None:
        _check(len(self.copies) == 2 and min(self.copies) >= 1, "contrastive.copies",
               f"need two paste counts >= 1 (view 1, view 2), got {list(self.copies)}")
        lo, hi = self.scale_range
        _check(0 < lo <= hi, "contrastive.scale_range", f"need 0 < min <= max, got {list(self.scale_range)}")
        _check(self.view_jitter >= 0, "contrastive.view_jitter", "must be >= 0")
        _check(self.proj_dim >= 1 and self.head_channels >= 1, "contrastive.proj_dim",
               "proj_dim and head_channels must be >= 1")
        _check(self.prototypes >= 2, "contrastive.prototypes", "must be >= 2")
        _check(self.temperature > 0 and self.sinkhorn_eps > 0, "contrastive.temperature",
               "temperature and sinkhorn_eps must be > 0")
        _check(self.sinkhorn_iterations >= 1, "contrastive.sinkhorn_iterations", "must be >= 1")
        _check(min(self.pixel_weight, self.region_weight) >= 0 and self.pixel_weight + self.region_weight > 0,
               "contrastive.pixel_weight", "pixel_weight and region_weight must be >= 0, not both 0")
        _check(self.pixel_points >= 1 and self.region_points >= 1, "contrastive.pixel_points",
               "pixel_points and region_points must be >= 1")


@dataclass(kw_only=True)
class ThreeStageConfig:
    """The three-stage self-training pipeline (``stage: threestage``, ``sdeseg.pipelines.threestage``):
    (1) the supervised stage on the labeled keys, then pseudo-masks for the training split;
    (2) a two-branch model on labels + those masks (``selftrain``), then refined masks;
    (3) the final two-branch model on labels + the refined masks. Steps are optimizer steps."""

    supervised_steps: int = 400
    refine_steps: int = 400
    final_steps: int = 400
    two_branch: bool = True  # stages 2 and 3 use the multi-task model (segmentation + SDE)
    infer_actors: int = 0  # pseudo-masks: 0 in the driver's process, N Ray Data actors
    infer_batch_size: int = 8

    def __post_init__(self) -> None:
        _check(min(self.supervised_steps, self.refine_steps, self.final_steps) >= 1, "threestage",
               "supervised_steps, refine_steps and final_steps must be >= 1")
        _check(self.infer_actors >= 0 and self.infer_batch_size >= 1, "threestage.infer_actors",
               "infer_actors must be >= 0 and infer_batch_size >= 1")


@dataclass(kw_only=True)
class SelectConfig:
    """Automatic data selection (``stage: select``): which training images to label.

    Rounds of growing budgets: the first set is one seeded random image grown by diversity
    only; before each later growth step a fresh student learns the SDE teacher's disparity
    on the images chosen so far (``student_steps``), and candidates are ranked by diversity
    (teacher decoder features) plus ``difficulty_weight`` × the student's error there.
    """

    # depth: diversity + difficulty (the paper); depth_diversity / depth_difficulty: one term
    # each (ablations); entropy: a segmentation student's mean normalised entropy, top ones
    # (active-learning baseline); random: a seeded random draw
    method: Literal["depth", "depth_diversity", "depth_difficulty", "entropy", "random"] = "depth"
    budgets: tuple[int, ...] = (8, 16, 33, 100)  # label budgets, increasing; one key file each
    # student optimizer steps before each growth step: one value for all, or len(budgets) - 1
    student_steps: tuple[int, ...] = (200,)
    difficulty_weight: float = 1000.0  # the official code's weight of the difficulty term
    feature_level: int = 3  # teacher decoder level whose activation measures diversity ("upconv", 3)
    feature_pool: Size = (4, 8)  # adaptive average pooling of that activation
    far_disp: float = 0.07  # teacher disparities below this (dilated) do not count as errors
    far_dilate: int = 7
    ignore_bottom: float = 0.13  # bottom rows left out of the difficulty (ego car)
    loss_ignore_bottom: float = 0.10  # bottom rows left out of the student's BerHu loss
    berhu_c: float = 0.2  # BerHu threshold = berhu_c x the largest residual of the batch
    sde_checkpoint: str | None = None  # the frozen SDE teacher (an `sde` export)
    # the entropy baseline's segmentation student starts from sde_checkpoint (as the
    # semi-supervised stage does) instead of model.pretrained
    entropy_transfer: bool = True

    def __post_init__(self) -> None:
        b = self.budgets
        _check(len(b) >= 1 and all(x >= 1 for x in b), "select.budgets",
               f"need one or more budgets >= 1, got {list(b)}")
        _check(all(x < y for x, y in zip(b, b[1:])), "select.budgets", f"must increase, got {list(b)}")
        n = len(self.student_steps)
        _check(n >= 1 and all(s >= 0 for s in self.student_steps), "select.student_steps",
               f"need one or more step counts >= 0, got {list(self.student_steps)}")
        _check(n == 1 or n == len(b) - 1, "select.student_steps",
               f"one value, or one per growth step ({len(b) - 1} for {len(b)} budgets), got {n}")
        _check(self.difficulty_weight >= 0, "select.difficulty_weight", "must be >= 0")
        _check(0 <= self.feature_level <= 4, "select.feature_level", "must be a decoder level in 0..4")
        _check(self.far_dilate >= 1 and self.far_dilate % 2 == 1, "select.far_dilate", "must be an odd size >= 1")
        for name in ("ignore_bottom", "loss_ignore_bottom"):
            _check(0.0 <= getattr(self, name) < 1.0, f"select.{name}", "must be in [0, 1)")
        _check(self.berhu_c > 0, "select.berhu_c", "must be > 0")

    @property
    def uses_student(self) -> bool:
        """Whether later rounds train a student (depth or segmentation) before growing."""
        return self.method in ("depth", "depth_difficulty", "entropy")

    def loop_steps(self) -> int:
        """What the stage's loop counts: student optimizer steps plus one per selection round."""
        students = sum(self.steps_before(r) for r in range(1, len(self.budgets))) if self.uses_student else 0
        return students + len(self.budgets)

    def steps_before(self, round_index: int) -> int:
        """Student steps before growing to ``budgets[round_index]`` (round_index >= 1)."""
        return self.student_steps[0] if len(self.student_steps) == 1 else self.student_steps[round_index - 1]


@dataclass(kw_only=True)
class InstanceConfig:
    """Depth-guided semi-supervised instance segmentation (``stage: instance``, seed 002; where the
    paper is silent, our design: docs/architecture.md).

    A Panoptic-DeepLab-style model (semantic logits, centre heatmap, offsets) learns from the
    labeled keys (``label.png`` and ``instance.png``). With ``mean_teacher`` an EMA teacher
    pseudo-labels the unlabeled images: the semantic argmax where its class confidence reaches
    ``pseudo_threshold``, and the centres and offsets of the instances it groups whose score
    (centre value x class probability) reaches ``pseudo_score``. With ``fusion_stages`` the
    frozen SDE depth network's encoder maps (``semiseg.sde_checkpoint``) are fused into those
    stages of the student's encoder (Depth Feature Fusion), and the teacher sees them too. The
    Depth Controller (``controller``) ramps the depth features from 0 to 1 over
    ``depth_ramp_steps`` and weighs the pseudo-label losses of a depth-fused and an RGB-only
    (depth input 0) student pass by how well each agreed with the teacher lately:
    ``w_depth = sigmoid((L_rgb - L_depth) / (controller_temperature * mean(L)))`` on running
    means (``controller_momentum``) of the two losses, ``w_rgb = 1 - w_depth``.

    The semiseg section gives the rest: sde_checkpoint, transfer, ema_alpha_max, the student's
    strong augmentation (color_jitter, blur, hue_space) and ignore_index.
    """

    mean_teacher: bool = True  # False: supervised only (the ablation's first row)
    fusion_stages: tuple[int, ...] = ()  # student encoder maps (0 stem .. 4 layer4) fused with depth; (): off
    controller: bool = False  # the Depth Controller (needs fusion_stages and mean_teacher)
    depth_ramp_steps: int = 0  # the controller's linear ramp of the depth input 0 -> 1 (0: always 1)
    controller_momentum: float = 0.9  # running mean of each branch's pseudo-label loss
    controller_temperature: float = 0.1  # relative loss difference that moves the weight by one logit
    # Panoptic-DeepLab's loss weights: semantic CE 1, centre MSE 200, offset L1 0.01 (offsets in
    # pixels; at full-resolution Cityscapes)
    semantic_weight: float = 1.0
    center_weight: float = 200.0
    offset_weight: float = 0.01
    unsup_weight: float = 1.0  # the teacher's pseudo-label terms
    pseudo_threshold: float = 0.9  # teacher class confidence of a pseudo-semantic pixel
    pseudo_score: float = 0.5  # teacher instance score of a pseudo-instance (centre and offsets)
    # centre heatmap sigma in pixels; None: Panoptic-DeepLab's 8 px at 1024 rows, scaled to the
    # stored image height (sdeseg.panoptic.center_sigma)
    center_sigma: float | None = None
    # grouping (sdeseg.panoptic.group_instances), also written into exports for `sdeseg eval`
    center_threshold: float = 0.1
    nms_kernel: int = 7
    top_k: int = 200
    export_best: Literal["pq", "ap", "ap50", "miou"] = "pq"  # validation metric of the best export

    def __post_init__(self) -> None:
        self.fusion_stages = tuple(sorted(set(self.fusion_stages)))
        _check(all(0 <= k <= 4 for k in self.fusion_stages), "instance.fusion_stages",
               f"encoder maps are 0..4, got {list(self.fusion_stages)}")
        _check(self.depth_ramp_steps >= 0, "instance.depth_ramp_steps", "must be >= 0")
        _check(0.0 <= self.controller_momentum < 1.0, "instance.controller_momentum", "must be in [0, 1)")
        _check(self.controller_temperature > 0, "instance.controller_temperature", "must be > 0")
        _check(min(self.semantic_weight, self.center_weight, self.offset_weight, self.unsup_weight) >= 0,
               "instance", "loss weights must be >= 0")
        _check(0.0 <= self.pseudo_threshold <= 1.0, "instance.pseudo_threshold", "must be in [0, 1]")
        _check(self.pseudo_score >= 0, "instance.pseudo_score", "must be >= 0")
        _check(self.center_sigma is None or self.center_sigma > 0, "instance.center_sigma", "must be > 0 (or null)")
        _check(self.nms_kernel >= 1 and self.nms_kernel % 2 == 1, "instance.nms_kernel", "must be odd and >= 1")
        _check(self.top_k >= 1, "instance.top_k", "must be >= 1")
        if self.controller and not self.fusion_stages:
            raise ConfigError("instance.controller: the Depth Controller balances the depth-fused and the RGB "
                              "terms; it needs instance.fusion_stages (e.g. [1, 2, 3])")
        if self.controller and not self.mean_teacher:
            raise ConfigError("instance.controller: the Depth Controller weighs the pseudo-label terms by their "
                              "agreement with the teacher; it needs instance.mean_teacher=true")


@dataclass(kw_only=True)
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-4  # heads / decoders
    encoder_lr: float | None = None  # None: same as lr
    pose_lr: float | None = None  # pose network's own rate (multi-task); None: it follows encoder_lr / lr
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "step", "poly", "cosine"] = "constant"
    step_size: int = 1000  # step schedule: multiply by gamma every step_size steps
    gamma: float = 0.1
    poly_power: float = 0.9
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(self.encoder_lr is None or self.encoder_lr > 0, "optim.encoder_lr", "must be > 0")
        _check(self.pose_lr is None or self.pose_lr > 0, "optim.pose_lr", "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.step_size >= 1, "optim.step_size", "must be >= 1")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps
    log_every: int = 10
    val_every: int = 250  # 0: only at the end
    val_batches: int = 0  # 0: the whole validation split
    ckpt_every: int = 200  # 0: only at the end
    seed: int = 0
    export_best: str = "depth/abs_rel"  # SDE: metric that selects the best export (lower is better)
    log_keys: bool = False  # write the sample keys of every step to metrics.jsonl (kind "keys")

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "train.steps", "must be >= 1")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        for name in ("val_every", "val_batches", "ckpt_every"):
            _check(getattr(self, name) >= 0, f"train.{name}", "must be >= 0")


@dataclass(kw_only=True)
class RuntimeConfig:
    """How a stage is run: Ray Train scaling, DeepSpeed engine, fault tolerance."""

    num_workers: int = 2  # Ray Train workers (one DeepSpeed rank each)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only with use_gpu
    torch_threads: int = 1  # intra-op threads per worker (CPU)
    zero_stage: int = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float = 0.0  # 0: off
    grad_accum: int = 1
    max_failures: int = 1  # Ray Train restarts from the latest checkpoint this many times
    run_name: str | None = None  # same name + storage -> resume; None: derived from the run dir
    storage_path: str | None = None  # Ray Train storage (local dir or URL); None: <run_dir>/ray
    # BatchNorm over the global batch on CUDA ranks (SyncBatchNorm, NCCL); CPU ranks (gloo) keep
    # per-rank statistics and average the buffers before validation, export and checkpoints
    sync_batchnorm: bool = True
    ops_backend: Literal["auto", "reference", "triton"] = "auto"
    in_process: bool = False  # run the stage in this process without Ray (tests, debugging)
    # Prometheus (sdeseg.runtime.telemetry): in-process runs serve the metrics at this port (0: off);
    # on Ray they always go to each node's Ray metrics-export port (names prefixed ray_)
    metrics_port: int = 0
    progress: bool = True  # rank 0 logs a progress line at every train.log_every (step, losses, ETA)
    verbose: bool = False  # keep Ray Train's INFO logs and the libraries' known-noise warnings (sdeseg -v)

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "runtime.num_workers", "must be >= 1")
        _check(self.cpus_per_worker > 0, "runtime.cpus_per_worker", "must be > 0")
        _check(self.gpus_per_worker > 0, "runtime.gpus_per_worker", "must be > 0")
        _check(self.torch_threads >= 1, "runtime.torch_threads", "must be >= 1")
        _check(self.zero_stage in (0, 1, 2), "runtime.zero_stage", "must be 0, 1 or 2")
        _check(self.grad_accum >= 1, "runtime.grad_accum", "must be >= 1")
        _check(self.max_failures >= 0, "runtime.max_failures", "must be >= 0")
        _check(0 <= self.metrics_port <= 65535, "runtime.metrics_port", "must be a port number (0: off)")
        if self.precision == "fp16" and not self.use_gpu:
            raise ConfigError("runtime.precision: fp16 needs runtime.use_gpu=true (use bf16 or fp32 on CPU)")


@dataclass(kw_only=True)
class Config:
    """The whole run. ``stage`` picks the training stage."""

    stage: Literal["sde", "semiseg", "select", "ssda", "selftrain", "threestage", "contrastive", "instance"] = "sde"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    depth_loss: DepthLossConfig = field(default_factory=DepthLossConfig)
    semiseg: SemisegConfig = field(default_factory=SemisegConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    ssda: SsdaConfig = field(default_factory=SsdaConfig)
    selftrain: SelfTrainConfig = field(default_factory=SelfTrainConfig)
    threestage: ThreeStageConfig = field(default_factory=ThreeStageConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    instance: InstanceConfig = field(default_factory=InstanceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if self.stage == "semiseg" and self.semiseg.mix_depth == "online" and not self.model.multitask:
            raise ConfigError("semiseg.mix_depth: 'online' needs model.multitask=true")
        if self.depth_loss.feature_distance > 0 and self.model.pretrained is None:
            raise ConfigError(
                "depth_loss.feature_distance: needs model.pretrained (an ImageNet state_dict file path)"
            )
        s = self.semiseg
        if s.init_from == "sde" and not s.transfer:  # the older spelling of "not from the SDE export"
            s.init_from = "imagenet" if self.model.pretrained is not None else "scratch"
        s.transfer = s.init_from == "sde"  # one meaning, whichever key was set
        if s.init_from == "imagenet" and self.model.pretrained is None:
            raise ConfigError("semiseg.init_from: 'imagenet' needs model.pretrained (a torchvision state_dict file)")
        if s.init_from == "scratch" and self.model.pretrained is not None:
            raise ConfigError("semiseg.init_from: 'scratch' but model.pretrained is set (use init_from=imagenet, "
                              "or model.pretrained=null)")
        if self.stage == "contrastive" and self.contrastive.prototypes < self.model.num_classes:
            raise ConfigError(f"contrastive.prototypes: {self.contrastive.prototypes} prototypes cannot be clustered "
                              f"into model.num_classes={self.model.num_classes} classes for the evaluation")

    def loop_steps(self) -> int:
        """The steps a stage's loop makes (progress lines, ETA): ``train.steps``; the selection
        stage counts its students' optimizer steps and its rounds (``SelectConfig.loop_steps``), the
        three-stage pipeline its three runs."""
        if self.stage == "threestage":
            t = self.threestage
            return t.supervised_steps + t.refine_steps + t.final_steps
        return self.select.loop_steps() if self.stage == "select" else self.train.steps

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


# ----------------------------------------------------------------------------- loading


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if tp == Size:  # tuple[int, int] aliases are equal, not identical: compare with ==
        return parse_size(value, key)
    if origin is tuple:
        return _coerce_tuple(value, args, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-3" as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _coerce_tuple(value: Any, args: tuple, key: str) -> tuple:
    if isinstance(value, str) and args and args[0] is int:
        parts = [v for v in re.split(r"[x,\s]+", value.strip()) if v]
        if not all(re.fullmatch(r"[+-]?\d+", v) for v in parts):
            raise ConfigError(f"{key}: expected integers such as 16,32,64, got {value!r}")
        value = [int(v) for v in parts]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]} (known keys of {prefix or 'the config'}: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - all fields have defaults
        raise ConfigError(f"{prefix}: {e}") from e


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_named_file(path: str | Path, directory: Path, what: str) -> Path:
    """A file path, or the name (with or without ``.yaml``) of a file shipped in ``directory``."""
    p = Path(path)
    if p.is_file():
        return p
    for cand in (directory / p.name, directory / f"{p.name}.yaml"):
        if cand.is_file():
            return cand
    shipped = ", ".join(sorted(q.stem for q in directory.glob("*.yaml")))
    raise ConfigError(f"{what} {path} does not exist (shipped: {shipped})")


def resolve_preset(path: str | Path) -> Path:
    """A preset name (``demo_sde``), file name (``demo_sde.yaml``) or path -> existing path."""
    return resolve_named_file(path, CONFIG_DIR, "config file")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = resolve_preset(path)
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is not None:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        data = _deep_merge(_read_yaml(base_path, seen + (path.resolve(),)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"data.size=128x256"`` -> (["data", "size"], "128x256"); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = dict(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {p} is not a section")
            node[p] = dict(child)
            node = node[p]
        node[parts[-1]] = value
    return data


def from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a preset or YAML file, apply dotted overrides, validate, return the config."""
    data = _read_yaml(Path(path)) if path is not None else {}
    try:
        return from_dict(apply_overrides(data, overrides or []))
    except ConfigError as e:
        where = f"{resolve_preset(path)}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from e


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)
