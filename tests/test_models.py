"""Models: torchvision-compatible ResNet, decoders, pose convention, transfer, multi-task, EMA."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sdeseg.config import ModelConfig
from sdeseg.models import (
    DepthDecoder,
    DepthModel,
    DepthRange,
    EMATeacher,
    MultiTaskModel,
    PretrainedMismatchError,
    ResNet,
    ResNetEncoder,
    SegModel,
    build_multitask_model,
    build_sde_model,
    build_seg_model,
    ema_alpha,
    load_pretrained,
    transfer_from_sde,
    transformation_from_parameters,
)
from sdeseg.models.pose import rot_from_axisangle
from sdeseg.ops import inverse_warp

H, W = 32, 64
SMALL = dict(width=16, pose_width=16, decoder_channels=(8, 8, 16, 16, 32), num_classes=5)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def frames(b: int = 2, h: int = H, w: int = W) -> dict[int, torch.Tensor]:
    return {f: torch.rand(b, 3, h, w) for f in (-1, 0, 1)}


# ----------------------------------------------------------------------------- ResNet / weights

# (number of entries of torchvision's resnetXX().state_dict(), a few torchvision shapes)
TORCHVISION = {
    18: (
        122,
        {
            "conv1.weight": (64, 3, 7, 7),
            "layer2.0.downsample.0.weight": (128, 64, 1, 1),
            "layer4.1.conv2.weight": (512, 512, 3, 3),
            "layer4.1.bn2.running_var": (512,),
            "fc.weight": (1000, 512),
        },
    ),
    50: (
        320,
        {
            "layer1.0.conv1.weight": (64, 64, 1, 1),
            "layer1.0.downsample.0.weight": (256, 64, 1, 1),
            "layer3.5.conv2.weight": (256, 256, 3, 3),
            "layer4.2.conv3.weight": (2048, 512, 1, 1),
            "layer4.2.bn3.num_batches_tracked": (),
            "fc.weight": (1000, 2048),
        },
    ),
}


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_format_state_dict_loads_strict(depth, tmp_path):
    count, shapes = TORCHVISION[depth]
    donor = ResNet(depth, num_classes=1000)  # the full torchvision classification model
    state = donor.state_dict()
    assert len(state) == count
    for name, shape in shapes.items():
        assert tuple(state[name].shape) == shape, name
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(state, path)

    enc = ResNetEncoder(depth)  # no fc: fc.* is stripped, everything else strict
    load_pretrained(enc, path)
    own = enc.net.state_dict()
    assert set(own) == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(own[k], state[k]) for k in own)

    with_fc = ResNet(depth, num_classes=1000)
    load_pretrained(with_fc, path)  # a net with a head takes the head too
    assert torch.equal(with_fc.fc.weight, state["fc.weight"])


def test_other_architecture_fails_naming_keys(tmp_path):
    path34 = tmp_path / "r34.pth"
    torch.save(ResNet(34, width=16).state_dict(), path34)
    with pytest.raises(PretrainedMismatchError, match=r"unexpected keys .*layer1\.2\.conv1\.weight"):
        load_pretrained(ResNetEncoder(18, width=16), path34)

    path50 = tmp_path / "r50.pth"
    torch.save(ResNet(50, width=16).state_dict(), path50)
    with pytest.raises(PretrainedMismatchError) as err:
        load_pretrained(ResNetEncoder(18, width=16), path50)
    msg = str(err.value)
    assert "resnet18" in msg and "layer1.0.conv3.weight" in msg and "shape mismatches" in msg
    assert "layer1.0.conv1.weight: checkpoint (16, 16, 1, 1) vs model (16, 16, 3, 3)" in msg

    with pytest.raises(FileNotFoundError):
        load_pretrained(ResNetEncoder(18, width=16), tmp_path / "missing.pth")


def test_pair_input_loads_averaged_conv1(tmp_path):
    state = ResNet(18, width=16).state_dict()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    pose_enc = ResNetEncoder(18, width=16, in_channels=6)
    load_pretrained(pose_enc, path)
    w = state["conv1.weight"]
    assert torch.allclose(pose_enc.net.conv1.weight, torch.cat([w, w], 1) / 2)
    # identical frames give the single-frame ImageNet response of conv1
    x = torch.rand(1, 3, 16, 16)
    single = nn.functional.conv2d(x, w, stride=2, padding=3)
    pair = pose_enc.net.conv1(torch.cat([x, x], 1))
    assert torch.allclose(single, pair, atol=1e-5)


@pytest.mark.parametrize("depth,width", [(18, 16), (50, 8)])
def test_encoder_shapes_and_dilation(depth, width):
    x = torch.rand(2, 3, H, W)
    enc = ResNetEncoder(depth, width=width)
    feats = enc(x)
    e = 1 if depth == 18 else 4
    assert enc.num_ch_enc == [width, width * e, 2 * width * e, 4 * width * e, 8 * width * e]
    for k, f in enumerate(feats):
        assert f.shape == (2, enc.num_ch_enc[k], H >> (k + 1), W >> (k + 1))

    dil = ResNetEncoder(depth, width=width, dilate_last=True)
    f4 = dil(x)[-1]
    assert dil.output_stride == 16
    assert f4.shape == (2, dil.num_ch_enc[4], H // 16, W // 16)


# ----------------------------------------------------------------------------- output shapes


def test_sde_model_outputs():
    model = build_sde_model(ModelConfig(**SMALL))
    out = model(frames())
    for s in range(4):
        disp = out[("disp", s)]
        assert disp.shape == (2, 1, H >> s, W >> s)
        assert (disp > 0).all() and (disp < 1).all()
    for f in (-1, 1):
        T = out[("T", f)]
        assert T.shape == (2, 4, 4)
        assert torch.allclose(T[:, 3], torch.tensor([0.0, 0, 0, 1]).expand(2, 4))
    # a bare tensor is frame 0 alone: depth, no pose
    assert not any(k[0] == "T" for k in model(torch.rand(2, 3, H, W)))


def test_depth_model_aspp_dilated_at_96x192():
    cfg = ModelConfig(width=16, decoder_channels=(8, 8, 16, 16, 32), aspp=True, dilate_last=True)
    model = build_sde_model(cfg).depth.eval()
    assert isinstance(model, DepthModel)
    out = model(torch.rand(1, 3, 96, 192))
    assert out[("enc", 4)].shape[-2:] == (6, 12)  # output stride 16
    for s in range(4):
        assert out[("disp", s)].shape == (1, 1, 96 >> s, 192 >> s)
    for i in range(5):
        assert out[("feat", i)].shape == (1, cfg.decoder_channels[i], 96 >> i, 192 >> i)


def test_seg_and_multitask_outputs():
    cfg = ModelConfig(**SMALL)
    seg = build_seg_model(cfg)
    assert isinstance(seg, SegModel)
    assert seg(torch.rand(2, 3, H, W))[("seg", 0)].shape == (2, 5, H, W)

    mt = build_seg_model(ModelConfig(**SMALL, multitask=True, exchange_level=2))
    assert isinstance(mt, MultiTaskModel)
    out = mt(frames())
    assert out[("seg", 0)].shape == out[("seg_aux", 0)].shape == (2, 5, H, W)
    assert all(out[("disp", s)].shape == (2, 1, H >> s, W >> s) for s in range(4))
    assert out[("T", 1)].shape == (2, 4, 4)


def test_depth_range_inverse_mapping_and_its_inverse():
    r = DepthRange(0.1, 100.0, "inverse")
    disp = torch.tensor([0.0, 0.5, 1.0])
    depth = r.depth(disp)
    assert torch.allclose(depth[[0, 2]], torch.tensor([100.0, 0.1]))
    assert torch.allclose(1 / depth[1], torch.tensor((0.01 + 10.0) / 2))  # linear in inverse depth
    assert torch.allclose(r.sigmoid(depth), disp, atol=1e-6)


def test_depth_range_log_mapping_is_geometric():
    r = DepthRange(0.1, 100.0, "log")
    disp = torch.tensor([0.0, 0.5, 1.0])
    depth = r.depth(disp)
    # ends at the range limits, the middle at their geometric mean (sqrt(0.1 * 100))
    assert torch.allclose(depth, torch.tensor([100.0, 10.0**0.5, 0.1]), rtol=1e-5)
    assert torch.allclose(r.sigmoid(depth), disp, atol=1e-6)
    # a bf16 network output is read in float32
    assert r.depth(disp.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="mapping"):
        DepthRange(0.1, 100.0, "linear")
    with pytest.raises(ValueError, match="min_depth"):
        DepthRange(10.0, 1.0)


def test_depth_range_round_trips_through_exports_and_reads_old_ones():
    r = DepthRange(0.5, 80.0, "log")
    assert DepthRange.from_dict(r.to_dict()) == r
    assert DepthRange.from_dict([0.1, 100.0]) == DepthRange(0.1, 100.0, "inverse")  # exports before the mapping
    assert DepthRange.from_dict([0.5, 80.0, "log"]) == r


# ----------------------------------------------------------------------------- pose convention


def test_transformation_from_parameters_inverse():
    aa, t = torch.randn(3, 3) * 0.3, torch.randn(3, 3)
    T = transformation_from_parameters(aa, t)
    R = rot_from_axisangle(aa)
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand(3, 3, 3), atol=1e-5)
    assert torch.allclose(T[:, :3, 3], t)
    assert torch.allclose(
        transformation_from_parameters(aa, t, invert=True) @ T, torch.eye(4).expand(3, 4, 4), atol=1e-5
    )
    # rotation about y by a: x axis goes to (cos a, 0, -sin a)
    a = 0.3
    Ry = rot_from_axisangle(torch.tensor([[0.0, a, 0.0]]))[0]
    assert torch.allclose(
        Ry[:, 0], torch.tensor([torch.cos(torch.tensor(a)), 0.0, -torch.sin(torch.tensor(a))])
    )


class _KnownMotion(nn.Module):
    """Pose decoder stand-in: predicts the true motion of one step forward in time."""

    def __init__(self, translation):
        super().__init__()
        self.t = torch.tensor(translation)

    def forward(self, feat):
        b = feat.shape[0]
        return torch.zeros(b, 3), self.t.expand(b, 3).clone()


def test_pose_convention_matches_inverse_warp():
    """Camera moving +b along x each frame, fronto-parallel plane at depth Z.

    Frame f's camera sits at x = f*b, so a pixel of frame 0 appears d = fx*b/Z pixels
    further left in frame +1: I_f(u) = I_0(u + f*d). The ordered pairs (-1, 0) and
    (0, 1) have the same motion, X_later = X_earlier - (b, 0, 0); with the network
    predicting exactly that, the PoseNet's ("T", f) must warp frame f onto frame 0.
    """
    fx, Z, b = 32.0, 4.0, 0.25
    d = int(fx * b / Z)  # 2 pixels
    texture = torch.rand(1, 3, H, W + 2 * d)
    crop = {f: texture[..., d + f * d : d + f * d + W] for f in (-1, 0, 1)}
    K = torch.tensor([[[fx, 0, (W - 1) / 2], [0, fx, (H - 1) / 2], [0, 0, 1]]])
    depth = torch.full((1, 1, H, W), Z)

    pose = build_sde_model(ModelConfig(**SMALL)).pose
    pose.decoder = _KnownMotion([-b, 0.0, 0.0])
    out = pose(crop)
    assert torch.allclose(out[("T", 1)][0, :3, 3], torch.tensor([-b, 0, 0]))
    assert torch.allclose(out[("T", -1)][0, :3, 3], torch.tensor([b, 0, 0]))
    inner = slice(d + 1, W - d - 1)
    for f in (-1, 1):
        warped = inverse_warp(crop[f], depth, out[("T", f)], K)
        assert torch.allclose(warped[..., inner], crop[0][..., inner], atol=1e-4), f
        # the opposite convention would move pixels the wrong way
        wrong = inverse_warp(crop[f], depth, torch.linalg.inv(out[("T", f)]), K)
        assert (wrong[..., inner] - crop[0][..., inner]).abs().mean() > 0.05


# ----------------------------------------------------------------------------- transfer / multi-task


def test_transfer_from_sde():
    cfg = ModelConfig(**SMALL)
    sde = build_sde_model(cfg)
    seg = build_seg_model(cfg)
    report = transfer_from_sde(seg, {f"module.{k}": v for k, v in sde.state_dict().items()})
    sde_sd, seg_sd = sde.state_dict(), seg.state_dict()
    assert all(
        torch.equal(seg_sd[k], sde_sd["depth." + k])
        for k in seg_sd
        if k.startswith(("encoder.", "decoder.body."))
    )
    assert report.initialised and all(k.startswith("decoder.head.") for k in report.initialised)
    assert any(k.startswith("decoder.disp_heads.") for k in report.unused)
    assert any(k.startswith("pose.") for k in report.unused)
    assert "transferred" in report.summary()

    mt = build_multitask_model(ModelConfig(**SMALL, multitask=True))
    report = transfer_from_sde(mt, sde.depth.state_dict())  # an exported DepthModel state_dict
    mt_sd = mt.state_dict()
    assert not report.unused and any(k.startswith("to_seg.") for k in report.initialised)
    assert torch.equal(
        mt_sd["depth_decoder.disp_heads.0.conv.weight"], sde_sd["depth.decoder.disp_heads.0.conv.weight"]
    )
    assert torch.equal(
        mt_sd["seg_decoder.body.levels.0.conv1.conv.conv.weight"],
        sde_sd["depth.decoder.body.levels.0.conv1.conv.conv.weight"],
    )

    other = build_sde_model(ModelConfig(**{**SMALL, "width": 24}))
    with pytest.raises(ValueError, match="shape mismatches"):
        transfer_from_sde(seg, other.state_dict())


@pytest.mark.parametrize("level", [0, 2, 4])
def test_multitask_exchange_starts_as_two_branches(level):
    model = build_multitask_model(ModelConfig(**SMALL, multitask=True, exchange_level=level), with_pose=False)
    model.eval()
    x = torch.rand(2, 3, H, W)
    out = model(x)
    feats = model.encoder(x)
    depth_alone = model.depth_decoder(feats)
    seg_alone = model.seg_decoder(feats)
    assert torch.allclose(out[("seg", 0)], seg_alone[("seg", 0)], atol=1e-6)
    for s in range(4):
        assert torch.allclose(out[("disp", s)], depth_alone[("disp", s)], atol=1e-6)
    assert out[("seg_aux", 0)].shape == out[("seg", 0)].shape

    # the zero-initialised conv still receives gradient, so the exchange can be learned
    model.train()
    out = model(x)
    (out[("seg", 0)].sum() + out[("disp", 0)].sum()).backward()
    assert model.to_seg.conv.weight.grad.abs().sum() > 0
    assert model.to_depth.conv.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- EMA


def test_ema_matches_hand_computation():
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    teacher = EMATeacher(student, alpha_max=0.6)
    expected = {k: v.clone() for k, v in student.named_parameters()}
    for step in range(5):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        student.train()
        student(torch.randn(8, 4))  # moves the BatchNorm running statistics
        alpha = teacher.update(student, step)
        assert alpha == min(1 - 1 / (step + 1), 0.6) == ema_alpha(step, 0.6)
        for k, p in student.named_parameters():
            expected[k] = alpha * expected[k] + (1 - alpha) * p.detach()
    t_params = dict(teacher.model.named_parameters())
    for k, v in expected.items():
        assert torch.allclose(t_params[k], v, atol=1e-6), k
    for (k, b), (_, tb) in zip(student.named_buffers(), teacher.model.named_buffers()):
        assert torch.equal(b, tb), k  # buffers are copied, not averaged
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())

    restored = EMATeacher(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))
    restored.load_state_dict(teacher.state_dict())
    assert restored.alpha_max == 0.6
    x = torch.randn(2, 4)
    assert torch.equal(restored(x), teacher(x))


def test_ema_first_step_copies_student():
    student = DepthDecoder([8, 8, 16, 32, 64], (8, 8, 8, 8, 8))
    teacher = EMATeacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(2)
    teacher.update(student, 0)  # alpha = 0 at step 0
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), teacher.model.parameters()))
