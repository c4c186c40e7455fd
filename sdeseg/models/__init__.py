"""Networks: ResNet encoder, depth decoder, pose net, segmentation, multi-task and instance
models, and depth feature fusion.

Every model returns a dict keyed by tuples (``("disp", s)``, ``("seg", 0)``, ``("T", f)``)
whose keys do not depend on flags, only on the inputs given. ``build.py`` builds them
from the config; :class:`DepthRange` reads the disparity heads as metric depth.
"""

from sdeseg.models.build import (
    build_contrastive_model,
    build_depth_model,
    build_encoder,
    build_instance_model,
    build_multitask_model,
    build_pose_net,
    build_sde_model,
    build_seg_model,
)
from sdeseg.models.contrastive import ContrastiveModel, ProjectionDecoder, ProjectionHead
from sdeseg.models.depth_decoder import DecoderBody, DepthDecoder, DepthRange
from sdeseg.models.ema import EMATeacher, ema_alpha
from sdeseg.models.fusion import DepthFusion, FeatureFusion
from sdeseg.models.instance import DepthGuidedInstanceNet, InstanceHead, InstanceModel, depth_features
from sdeseg.models.multitask import FeatureExchange, MultiTaskModel
from sdeseg.models.pose import PoseNet, rot_from_axisangle, transformation_from_parameters
from sdeseg.models.resnet import (
    PretrainedMismatchError,
    ResNet,
    ResNetEncoder,
    frozen_imagenet_encoder,
    load_pretrained,
)
from sdeseg.models.sde import DepthModel, SDEModel
from sdeseg.models.seg import SegDecoder, SegModel, TransferReport, transfer_from_sde

__all__ = [
    "ContrastiveModel",
    "DecoderBody",
    "DepthDecoder",
    "DepthFusion",
    "DepthGuidedInstanceNet",
    "DepthModel",
    "DepthRange",
    "EMATeacher",
    "FeatureExchange",
    "FeatureFusion",
    "InstanceHead",
    "InstanceModel",
    "MultiTaskModel",
    "PoseNet",
    "PretrainedMismatchError",
    "ProjectionDecoder",
    "ProjectionHead",
    "ResNet",
    "ResNetEncoder",
    "SDEModel",
    "SegDecoder",
    "SegModel",
    "TransferReport",
    "build_contrastive_model",
    "build_depth_model",
    "build_encoder",
    "build_instance_model",
    "build_multitask_model",
    "build_pose_net",
    "build_sde_model",
    "build_seg_model",
    "depth_features",
    "ema_alpha",
    "frozen_imagenet_encoder",
    "load_pretrained",
    "rot_from_axisangle",
    "transformation_from_parameters",
    "transfer_from_sde",
]
