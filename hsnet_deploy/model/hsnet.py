"""HSNet: backbone hypercolumns -> masked support -> hypercorrelation pyramid -> 4D learner -> K-shot vote."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hsnet_deploy.errors import UserError
from hsnet_deploy.model.backbones import BACKBONES, build_backbone, feature_sizes
from hsnet_deploy.model.center_pivot import CenterPivotConv4d, HaloInput
from hsnet_deploy.model.correlation import (
    hypercorrelation,
    hypercorrelation_for_export,
    mask_support_features,
)
from hsnet_deploy.model.layout import ExportLayout
from hsnet_deploy.model.learner import GroupNorm6d, HPNLearner
from hsnet_deploy.model.resize import Resizer

# Support strides of each squeeze block (C2, C3, C4): their product is what the support dims shrink by.
SUPPORT_SHRINK = {"c2": 4 * 4 * 2, "c3": 4 * 2 * 2, "c4": 2 * 2 * 2}


def squeezed_support_side(backbone: str, side: int) -> tuple[int, int, int]:
    """Support side of the squeezed C2, C3, C4 tensors for an input side (stride-s convs round up)."""
    f2, f3, f4 = feature_sizes(backbone, side)
    return (-(-f2 // SUPPORT_SHRINK["c2"]), -(-f3 // SUPPORT_SHRINK["c3"]), -(-f4 // SUPPORT_SHRINK["c4"]))


def check_image_size(backbone: str, height: int, width: int) -> None:
    """The mixing step adds squeezed C4 to C3 and C3 to C2, so their support dims must agree."""
    for name, side in (("height", height), ("width", width)):
        if side < 32 or min(feature_sizes(backbone, side)) < 1:
            raise UserError(f"image {name} {side}: too small for {backbone} (at least 32)")
        dims = squeezed_support_side(backbone, side)
        if len(set(dims)) != 1:
            raise UserError(
                f"image {name} {side}: {backbone} cannot take it; the squeezed support sides of C2, C3, C4 "
                f"would be {dims} and must agree (400 and 384 work; see `valid_image_sizes`)"
            )


def valid_image_sizes(backbone: str, lo: int = 32, hi: int = 1024) -> list[int]:
    return [s for s in range(lo, hi + 1) if len(set(squeezed_support_side(backbone, s))) == 1]


def _no_mark(stage: str) -> None:
    return None


class HSNet(nn.Module):
    """The authors' HSNet with their state_dict keys (`backbone.*`, `hpn_learner.*`, no `module.`).

    forward(query_img (B,3,H,W), support_imgs (B,K,3,H,W), support_masks (B,K,H,W))
      -> logits (B,K,2,H,W) per shot, mask (B,H,W) float32 {0,1}: the authors' K-shot vote.
    The query backbone runs once per call and the K shots go through the learner as one batch.
    `mask_support=False` is for the released checkpoint trained without support-feature masking.
    """

    def __init__(self, backbone: str = "resnet50", mask_support: bool = True):
        super().__init__()
        if backbone not in BACKBONES:
            raise UserError(f"unknown backbone {backbone!r}; expected one of {', '.join(BACKBONES)}")
        self.backbone_name = backbone
        self.mask_support = mask_support
        self.backbone = build_backbone(backbone)
        self.hpn_learner = HPNLearner(self.backbone.stage_sizes)
        self.mask_resize = Resizer()  # support masks to each feature size (the exactness-critical one)
        self.output_resize = Resizer()  # learner logits to the input size
        self.export_layout = False
        self.layout = ExportLayout()
        self.eval()

    def prepare_export(self, height: int, width: int, layout: ExportLayout | None = None) -> HSNet:
        """Switch to the export-exact numerics for one fixed input size (see resize.py, learner.py).

        Every bilinear resize becomes a MatMul with constant matrices read off PyTorch's kernel, and
        GroupNorm reduces in two stages, and the correlation and center-pivot convs switch to layouts
        that need fewer copies (center_pivot.py, correlation.py). The eager model is unchanged until
        this is called. `layout` switches single layouts off (ExportLayout); all are on by default.
        """
        layout = layout or ExportLayout()
        check_image_size(self.backbone_name, height, width)
        fh, fw = feature_sizes(self.backbone_name, height), feature_sizes(self.backbone_name, width)
        self.mask_resize.prepare({(height, s) for s in fh} | {(width, s) for s in fw})
        learner_pairs = {(fh[2], fh[1]), (fh[1], fh[0]), (fw[2], fw[1]), (fw[1], fw[0]),
                         (fh[0], 2 * fh[0]), (fw[0], 2 * fw[0])}
        self.hpn_learner.resize.prepare(learner_pairs)
        self.output_resize.prepare({(2 * fh[0], height), (2 * fw[0], width)})
        for module in self.modules():
            if isinstance(module, GroupNorm6d):
                module.two_stage = True
            if isinstance(module, CenterPivotConv4d):
                module.export_layout = True
                module.dilated_query = layout.dilated_query_conv
                module.prepare_single_bias(layout.single_bias)
        if layout.support_major_mixing:  # after single_bias: the dense conv2 takes the block's one bias
            self.hpn_learner.prepare_support_major(squeezed_support_side(self.backbone_name, height)[0],
                                                   squeezed_support_side(self.backbone_name, width)[0])
        self.export_layout = True
        self.layout = layout
        return self

    def support_logits(
        self,
        query_img: torch.Tensor,
        support_imgs: torch.Tensor,
        support_masks: torch.Tensor,
        mark: Callable[[str], None] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-shot logits (B*K, 2, H, W), shot-major within each batch item, and the pyramid [C4, C3, C2].

        `mark(stage)` is called as each stage (backbone, correlation, learner, decoder) finishes, so a
        profiler can time them without a second copy of this method.
        """
        mark = mark or _no_mark
        b, k = support_imgs.shape[:2]
        h, w = query_img.shape[-2:]
        check_image_size(self.backbone_name, int(h), int(w))
        # One backbone pass over the B queries and the B*K supports together: the query features are
        # computed once whatever K is, and an exported graph holds one copy of the backbone's weights
        # (two passes would get separate BatchNorm-folded copies from graph simplifiers).
        images = torch.cat([query_img, support_imgs.reshape(b * k, *support_imgs.shape[2:])], dim=0)
        feats = self.backbone.hypercolumns(images)
        if self.export_layout:
            mark("backbone")
            masks = support_masks.reshape(b * k, h, w) if self.mask_support else None
            stages = hypercorrelation_for_export(feats, b, k, masks, self.mask_resize, self.backbone.stage_sizes,
                                                 self.hpn_learner.first_blocks(), use_halo=self.layout.halo)
            pyramid = [p.plain if isinstance(p, HaloInput) else p for p in stages]
        else:
            # split, not f[:b] / f[b:]: with B and K dynamic, torch.export (2.11) gives a slice an unbacked
            # size it cannot relate to B, and the learner's reshapes then fail; split's sizes sum to the
            # known length.
            query_feats, support_feats = map(list, zip(*(torch.split(f, [b, b * k]) for f in feats)))
            mark("backbone")
            if self.mask_support:
                masks = support_masks.reshape(b * k, h, w)
                support_feats = mask_support_features(support_feats, masks, self.mask_resize)
            stages = pyramid = hypercorrelation(query_feats, support_feats, k, self.backbone.stage_sizes)
        mark("correlation")
        encoded = self.hpn_learner.encode(stages)
        mark("learner")
        logits = self.output_resize(self.hpn_learner.decode(encoded), (int(h), int(w)))
        mark("decoder")
        return logits, pyramid

    def forward(
        self, query_img: torch.Tensor, support_imgs: torch.Tensor, support_masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, k = support_imgs.shape[:2]
        h, w = query_img.shape[-2:]
        logits, _ = self.support_logits(query_img, support_imgs, support_masks)
        logits = logits.reshape(b, k, 2, h, w)
        return logits, kshot_vote(logits)


def kshot_vote(logits: torch.Tensor) -> torch.Tensor:
    """The authors' K-shot rule on (B, K, 2, H, W) logits -> (B, H, W) float {0, 1}.

    Sum the per-shot argmax masks, divide by max(largest vote in the image, 1), keep >= 0.5.
    `fg > bg` equals argmax == 1 (argmax takes the first index on ties). With K = 1 this is the argmax.
    """
    return _majority((logits[:, :, 1] > logits[:, :, 0]).to(logits.dtype).sum(dim=1))


def _majority(votes: torch.Tensor) -> torch.Tensor:
    """(B, H, W) foreground votes -> {0, 1}: votes / max(largest vote in the image, 1) >= 0.5.

    The largest vote is taken per row, then over the rows: the same maximum, but ONNX Runtime's CUDA
    ReduceMax (cuDNN) spent 9.5 ms on the single (B, H*W) -> (B) reduction at B = 8 (docs/benchmarks.md)."""
    top = votes.amax(dim=2).amax(dim=1).clamp(min=1.0).reshape(-1, 1, 1)
    return (votes / top >= 0.5).to(torch.float32)


def mask_at_size(shot_logits, height: int, width: int) -> torch.Tensor:
    """(K, 2, h, w) logits of one episode -> (height, width) float {0, 1}: the authors'
    --use_original_imgsize, bilinear (align_corners) upsampling of the logits before the argmax, then
    the K-shot vote (as `kshot_vote`). One shot is upsampled at a time, so memory does not grow with K.
    Exact when the logits are the decoder's output size; from full-size logits it is two bilinear steps
    instead of one (close, not identical)."""
    logits = torch.as_tensor(shot_logits, dtype=torch.float32)
    votes = torch.zeros((height, width), dtype=torch.float32)
    for shot in logits:
        up = nn.functional.interpolate(shot[None], size=(height, width), mode="bilinear", align_corners=True)[0]
        votes += (up[1] > up[0]).to(torch.float32)
        del up
    return _majority(votes[None])[0]
