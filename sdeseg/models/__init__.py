"""Networks: ResNet encoder, depth decoder, pose net, segmentation and multi-task models.

Every model returns a dict keyed by tuples (``("disp", s)``, ``("seg", 0)``, ``("T", f)``)
whose keys do not depend on flags, only on the inputs given.
"""

from sdeseg.models.depth_decoder import DecoderBody, DepthDecoder, depth_to_disp, disp_to_depth
from sdeseg.models.ema import EMATeacher, ema_alpha
from sdeseg.models.multitask import FeatureExchange, MultiTaskModel, build_multitask_model
from sdeseg.models.pose import PoseNet, rot_from_axisangle, transformation_from_parameters
from sdeseg.models.resnet import (
    PretrainedMismatchError,
    ResNet,
    ResNetEncoder,
    frozen_imagenet_encoder,
    load_pretrained,
)
from sdeseg.models.sde import DepthModel, SDEModel, build_depth_model, build_encoder, build_sde_model
from sdeseg.models.seg import SegDecoder, SegModel, TransferReport, build_seg_model, transfer_from_sde

__all__ = [
    "DecoderBody",
    "DepthDecoder",
    "DepthModel",
    "EMATeacher",
    "FeatureExchange",
    "MultiTaskModel",
    "PoseNet",
    "PretrainedMismatchError",
    "ResNet",
    "ResNetEncoder",
    "SDEModel",
    "SegDecoder",
    "SegModel",
    "TransferReport",
    "build_depth_model",
    "build_encoder",
    "build_multitask_model",
    "build_sde_model",
    "build_seg_model",
    "depth_to_disp",
    "disp_to_depth",
    "ema_alpha",
    "frozen_imagenet_encoder",
    "load_pretrained",
    "rot_from_axisangle",
    "transformation_from_parameters",
    "transfer_from_sde",
]
