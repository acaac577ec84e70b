"""The PyTorch HSNet, numerically equal to the authors' code (spec: shared/docs/hsnet-architecture.md)."""

from hsnet_deploy.model.backbones import BACKBONES, feature_sizes
from hsnet_deploy.model.center_pivot import CenterPivotConv4d
from hsnet_deploy.model.checkpoint import describe_checkpoint, load_checkpoint, save_checkpoint, seeded_model
from hsnet_deploy.model.hsnet import HSNet, check_image_size, kshot_vote, mask_at_size, valid_image_sizes
from hsnet_deploy.model.layout import ExportLayout

__all__ = [
    "BACKBONES",
    "CenterPivotConv4d",
    "ExportLayout",
    "HSNet",
    "check_image_size",
    "describe_checkpoint",
    "feature_sizes",
    "kshot_vote",
    "load_checkpoint",
    "mask_at_size",
    "save_checkpoint",
    "seeded_model",
    "valid_image_sizes",
]
