"""Center-pivot 4D convolution (HSNet's contribution) as two reshaped 2D convolutions."""

from __future__ import annotations

import torch
from torch import nn


class CenterPivotConv4d(nn.Module):
    """A 4D conv whose kernel is non-zero only where it pivots on one of the two 2D centres.

    Input and output are 6D: (N, C, Hq, Wq, Hs, Ws). conv1 slides over the query dims at every
    support position, conv2 over the support dims at every query position; the output is their sum.
    The stride acts on the support dims only; conv1's branch picks support indices 0, s, 2s, ...
    so both branches land on the same support grid. Unlike the authors' module, the pruning is a
    slice recomputed per call, so a second input size works.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, support_stride: int):
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size, padding=pad)
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size, stride=support_stride, padding=pad)
        self.support_stride = support_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.support_stride
        n, c, hq, wq, hs, ws = x.shape

        pruned = x[..., ::s, ::s] if s > 1 else x
        hs_out, ws_out = pruned.shape[-2:]
        # (N, C, Hq, Wq, Hs', Ws') -> (N*Hs'*Ws', C, Hq, Wq)
        q = pruned.permute(0, 4, 5, 1, 2, 3).reshape(-1, c, hq, wq)
        q = self.conv1(q)
        co, hq_out, wq_out = q.shape[-3:]
        # (N*Hs'*Ws', Co, Hq', Wq') -> (N, Co, Hq', Wq', Hs', Ws')
        q = q.reshape(n, hs_out, ws_out, co, hq_out, wq_out).permute(0, 3, 4, 5, 1, 2)

        # (N, C, Hq, Wq, Hs, Ws) -> (N*Hq*Wq, C, Hs, Ws)
        sup = x.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, hs, ws)
        sup = self.conv2(sup)
        # (N*Hq*Wq, Co, Hs', Ws') -> (N, Co, Hq, Wq, Hs', Ws')
        sup = sup.reshape(n, hq, wq, co, hs_out, ws_out).permute(0, 3, 1, 2, 4, 5)
        return q + sup
