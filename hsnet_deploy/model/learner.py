"""The 4D learner (authors' HPNLearner): squeeze each correlation stage, mix, decode to 2-class logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hsnet_deploy.model.center_pivot import CenterPivotConv4d, HaloInput
from hsnet_deploy.model.resize import Resizer

GROUPS = 4
GN_EPS = 1e-5
# (out_channels, kernel, support_stride) per building block, from the authors' learner.py.
SQUEEZE_C4 = ((16, 3, 2), (64, 3, 2), (128, 3, 2))
SQUEEZE_C3 = ((16, 5, 4), (64, 3, 2), (128, 3, 2))
SQUEEZE_C2 = ((16, 5, 4), (64, 5, 4), (128, 3, 2))
MIX = ((128, 3, 1),) * 3


class GroupNorm6d(nn.GroupNorm):
    """nn.GroupNorm on (N, C, Hq, Wq, Hs, Ws), with an export form that moves less memory.

    Each group pools ~1.7M values at 400x400; ONNX Runtime's single-stage reductions lose ~6e-4
    relative there. Reducing over the support dims first and then over the rest keeps FP32 exact to
    ~3e-7. Eager mode keeps nn.GroupNorm (the authors' numerics); export switches `two_stage` on.
    The export form reads the tensor twice for E[x] and E[x^2] (no centred copy is written); one
    BatchNormalization node then normalises and applies the affine in one pass, taking the group
    statistics as its mean and variance (`normalise_rows`), so no small ops compute a scale and a shift.
    """

    two_stage = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.two_stage:
            return super().forward(x)
        n, c = x.shape[:2]
        spatial = x.shape[2:]
        groups = self.num_groups
        inner = int(spatial[-2]) * int(spatial[-1])
        # (N, C, Hq, Wq, Hs, Ws) -> (N, G, C/G*Hq*Wq, Hs*Ws)
        # Explicit sizes, no -1: inferring -1 makes torch.export guard on the element count, which fails
        # when N is a data-dependent size (torch 2.11 with B and K dynamic).
        g = x.reshape(n, groups, (c // groups) * spatial[0] * spatial[1], inner)
        mean = g.mean(dim=3).mean(dim=2)  # (N, G)
        # ReduceL2 reads the tensor once; its square is the row's sum of squares.
        mean_sq = torch.linalg.vector_norm(g, dim=3).square().mean(dim=2) / inner
        inner_all = int(spatial[0]) * int(spatial[1]) * inner
        return self.normalise_rows(x.reshape(1, n * c, inner_all), n, 1, mean, mean_sq).reshape(x.shape)

    def forward_support_major(self, x: torch.Tensor) -> torch.Tensor:
        """The export form on the support-major layout (N, Hs, Ws, C, Hq, Wq): the same statistics per
        (sample, group), reduced over the query dims first, then over channels and support positions."""
        n, hs, ws, c, hq, wq = x.shape
        groups = self.num_groups
        inner = int(hq) * int(wq)
        g = x.reshape(n, hs * ws, groups, c // groups, inner)
        mean = g.mean(dim=4).mean(dim=(1, 3))  # (N, G)
        mean_sq = torch.linalg.vector_norm(g, dim=4).square().mean(dim=(1, 3)) / inner
        return self.normalise_rows(x.reshape(1, n * hs * ws * c, inner), n, hs * ws, mean, mean_sq).reshape(x.shape)

    def normalise_rows(self, rows: torch.Tensor, n, positions: int, mean: torch.Tensor,
                       mean_sq: torch.Tensor) -> torch.Tensor:
        """GroupNorm of `rows` (1, N*P*C, S), rows ordered (sample, position, channel), from the (N, G)
        statistics E[x] and E[x^2]: one BatchNormalization whose mean and variance are each row's group
        statistics and whose scale and bias are each row's channel affine. Its epsilon is GroupNorm's
        (1e-5, which is also cuDNN's smallest: no runtime clamps it)."""
        groups, c = self.num_groups, self.num_channels
        per_group = c // groups
        count = n * positions * c
        var = (mean_sq - mean * mean).clamp(min=0)  # E[x^2] - E[x]^2 may round below 0 when std << |mean|

        def per_row(stat: torch.Tensor) -> torch.Tensor:
            return stat.reshape(n, 1, groups, 1).expand(n, positions, groups, per_group).reshape(count)

        def per_channel(param: torch.Tensor) -> torch.Tensor:
            return param.reshape(1, 1, c).expand(n, positions, c).reshape(count)

        # The running-statistics slots take no gradient; the export form is inference-only.
        return F.batch_norm(rows, per_row(mean).detach(), per_row(var).detach(), per_channel(self.weight),
                            per_channel(self.bias), False, 0.0, self.eps)


def building_block(in_channels: int, spec: tuple[tuple[int, int, int], ...]) -> nn.Sequential:
    """[center-pivot conv, GroupNorm, ReLU] per triple; Sequential indices match the authors' keys."""
    layers: list[nn.Module] = []
    for out_channels, kernel, stride in spec:
        layers += [
            CenterPivotConv4d(in_channels, out_channels, kernel, stride),
            GroupNorm6d(GROUPS, out_channels, eps=GN_EPS),
            nn.ReLU(inplace=True),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers)


class HPNLearner(nn.Module):
    def __init__(self, stage_channels: tuple[int, int, int]):
        """stage_channels: correlation layers per stage, deepest first (resnet50: 3, 6, 4)."""
        super().__init__()
        c4, c3, c2 = stage_channels
        self.encoder_layer4 = building_block(c4, SQUEEZE_C4)
        self.encoder_layer3 = building_block(c3, SQUEEZE_C3)
        self.encoder_layer2 = building_block(c2, SQUEEZE_C2)
        self.encoder_layer4to3 = building_block(128, MIX)
        self.encoder_layer3to2 = building_block(128, MIX)
        self.decoder1 = nn.Sequential(
            nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 64, 3, padding=1), nn.ReLU()
        )
        self.decoder2 = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 2, 3, padding=1))
        self.resize = Resizer()
        self.support_major = False  # export: the mixing runs in the (N, Hs, Ws, C, Hq, Wq) layout

    def prepare_support_major(self, hs: int, ws: int) -> None:
        """Export only: mix in the support-major layout over an (hs, ws) squeezed support grid."""
        for block in (self.encoder_layer4to3, self.encoder_layer3to2):
            for module in block:
                if isinstance(module, CenterPivotConv4d):
                    module.prepare_support_major(hs, ws)
        self.support_major = True

    def upsample_query_dims(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bilinearly resize the query dims of (N, C, Hq, Wq, Hs, Ws) to `size`."""
        if self.resize.use_matrices:
            return self.upsample_query_dims_in_place(x, size)
        # (N, C, Hq, Wq, Hs, Ws) -> (N, Hs, Ws, C, Hq, Wq): the resize acts on the last two dims.
        y = self.resize(x.permute(0, 4, 5, 1, 2, 3), size)
        return y.permute(0, 3, 4, 5, 1, 2)

    def upsample_query_dims_in_place(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The export form: the resize matrices multiply the query dims from the left, no permutes."""
        n, c, hq, wq, hs, ws = x.shape
        s = int(hs) * int(ws)
        ry = self.resize.matrix(int(hq), size[0])  # (Hq', Hq)
        rx = self.resize.matrix(int(wq), size[1])  # (Wq', Wq)
        y = torch.matmul(ry, x.reshape(n, c, hq, wq * s))  # (N, C, Hq', Wq*S)
        y = torch.matmul(rx, y.reshape(n, c * size[0], wq, s))  # (N, C*Hq', Wq', S)
        return y.reshape(n, c, size[0], size[1], hs, ws)

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        return self.decode(self.encode(pyramid))

    def encode(self, pyramid: list[torch.Tensor] | list[torch.Tensor | HaloInput]) -> torch.Tensor:
        """Squeeze and mix the 4D pyramid, then average out the support dims: (N, 128, Hq, Wq).

        An entry may be a HaloInput (export mode): its first block then runs without transposes.
        """
        sqz4 = self.squeeze(self.encoder_layer4, pyramid[0])
        sqz3 = self.squeeze(self.encoder_layer3, pyramid[1])
        sqz2 = self.squeeze(self.encoder_layer2, pyramid[2])
        if self.support_major:  # export: one transpose per squeezed stage, none in the mixing
            sqz4, sqz3, sqz2 = (t.permute(0, 4, 5, 1, 2, 3) for t in (sqz4, sqz3, sqz2))
        mix432 = self.mix(self.encoder_layer3to2, self.mix(self.encoder_layer4to3, sqz4, sqz3), sqz2)
        # the support average: (N, 128, Hq, Wq) for the decoder
        return mix432.mean(dim=(1, 2)) if self.support_major else mix432.flatten(4).mean(dim=-1)

    def mix(self, block: nn.Sequential, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        """block(coarse upsampled to fine's query size + fine). On the support-major layout (export,
        `support_major`) the upsampling multiplies the trailing query dims and the block runs
        `forward_support_major`; otherwise the tensors are (N, C, Hq, Wq, Hs, Ws)."""
        if self.support_major:
            return self.run_support_major(block, self.resize(coarse, tuple(fine.shape[-2:])) + fine)
        return block(self.upsample_query_dims(coarse, tuple(fine.shape[2:4])) + fine)

    @staticmethod
    def run_support_major(block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for module in block:
            if isinstance(module, CenterPivotConv4d | GroupNorm6d):
                x = module.forward_support_major(x)
            else:
                x = module(x)
        return x

    @staticmethod
    def squeeze(block: nn.Sequential, x: torch.Tensor | HaloInput) -> torch.Tensor:
        if not isinstance(x, HaloInput):
            return block(x)
        return block[1:](block[0].forward_halo(x))

    def first_blocks(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(kernel, support stride) of the first center-pivot conv of the C4, C3 and C2 squeeze blocks."""
        convs = (self.encoder_layer4[0], self.encoder_layer3[0], self.encoder_layer2[0])
        return tuple((c.conv2.kernel_size[0], c.support_stride) for c in convs)

    def decode(self, encoded: torch.Tensor) -> torch.Tensor:
        """2D decoder: (N, 128, Hq, Wq) -> logits (N, 2, 2Hq, 2Wq)."""
        decoded = self.decoder1(encoded)
        # The authors upsample to (2W, 2W) and assume square inputs; (2H, 2W) is the same there.
        decoded = self.resize(decoded, (2 * int(decoded.shape[-2]), 2 * int(decoded.shape[-1])))
        return self.decoder2(decoded)
