"""Center-pivot 4D convolution (HSNet's contribution) as two reshaped 2D convolutions."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class HaloInput(NamedTuple):
    """A first squeeze block's input as the export-mode correlation writes it (see `halo_rows`).

    halo: (N, L, Hq*Wq*Hp, Ws), the correlation with Hp - Hs zero rows after each support grid;
    pruned: (N, L, Hq, Wq, Hs', Ws'), the correlation at the support positions 0, s, 2s, ... only;
    plain: (N, L, Hq, Wq, Hs, Ws), the correlation itself (a view of `halo`, for verification).
    """

    halo: torch.Tensor
    pruned: torch.Tensor
    plain: torch.Tensor


def halo_rows(support_side: int, kernel: int, stride: int) -> int | None:
    """Rows Hp per support grid that let conv2 run over (Hq*Wq*Hp, Ws) with no transpose, or None.

    With the support rows of every query position followed by Hp - Hs zero rows, Hp = stride * Hs',
    a stride-s conv over the flattened (query, support-row) axis puts output row Hs' * q + i at the
    window of support row s*i of query position q: the zero rows act as the padding between grids.
    That needs at least `pad` zero rows (the next grid's first window reaches back `pad` rows) and
    a window that does not reach the next grid's data (kernel - stride <= pad).
    """
    pad = kernel // 2
    out = (support_side + 2 * pad - kernel) // stride + 1
    rows = stride * out
    if stride < 2 or kernel - stride > pad or rows - support_side < pad:
        return None
    return rows


class CenterPivotConv4d(nn.Module):
    """A 4D conv whose kernel is non-zero only where it pivots on one of the two 2D centres.

    Input and output are 6D: (N, C, Hq, Wq, Hs, Ws). conv1 slides over the query dims at every
    support position, conv2 over the support dims at every query position; the output is their sum.
    The stride acts on the support dims only; conv1's branch picks support indices 0, s, 2s, ...
    so both branches land on the same support grid. Unlike the authors' module, the pruning is a
    slice recomputed per call, so a second input size works.

    `export_layout` (set by HSNet.prepare_export) computes the same sums with fewer layout copies:
    conv1 runs on the 6D tensor as it lies, viewed as (N, C, Hq, Wq*S) with dilation (1, S), so its
    branch needs no transpose; eager mode keeps the authors' formulation.
    """

    export_layout = False
    dilated_query = True  # export: conv1 dilated over the 6D tensor as it lies (ExportLayout.dilated_query_conv)
    single_bias = False  # export: conv1's bias moved into conv2's (ExportLayout.single_bias, prepare_single_bias)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, support_stride: int):
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size, padding=pad)
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size, stride=support_stride, padding=pad)
        self.support_stride = support_stride

    def prepare_single_bias(self, on: bool = True) -> None:
        """Export: one bias for the block, conv1's added into conv2's (`on`), or each its own. The branches are
        summed, so the sum is the same; ONNX Runtime's CUDA EP adds each Conv's bias in a kernel of its own
        (a pass over the block's output), which the other branch then saves."""
        self.single_bias = on
        if on:
            self.register_buffer("summed_bias", (self.conv1.bias + self.conv2.bias).detach(), persistent=False)

    def branch_biases(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(conv1's bias, conv2's bias) as the export applies them."""
        if self.single_bias:
            return None, self.summed_bias
        return self.conv1.bias, self.conv2.bias

    def support_conv(self, x: torch.Tensor) -> torch.Tensor:
        """conv2 with the bias `branch_biases` gives it (its own in eager mode: exactly `self.conv2(x)`)."""
        return F.conv2d(x, self.conv2.weight, self.branch_biases()[1], self.conv2.stride, self.conv2.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.support_stride
        n, c, hq, wq, hs, ws = x.shape
        out = self.query_conv(x[..., ::s, ::s] if s > 1 else x)
        hs_out, ws_out = out.shape[-2:]
        # (N, C, Hq, Wq, Hs, Ws) -> (N*Hq*Wq, C, Hs, Ws) -> conv2 -> (N, Co, Hq, Wq, Hs', Ws')
        sup = self.support_conv(x.permute(0, 2, 3, 1, 4, 5).reshape(n * hq * wq, c, hs, ws))
        sup = sup.reshape(n, hq, wq, self.conv2.out_channels, hs_out, ws_out).permute(0, 3, 1, 2, 4, 5)
        return out + sup

    def query_conv(self, pruned: torch.Tensor) -> torch.Tensor:
        """conv1 over the query dims of (N, C, Hq, Wq, Hs', Ws') at every support position, same shape out.

        The authors' form moves the support positions into the batch and back; the export form
        (`export_layout` with `dilated_query`) runs on the tensor as it lies: a Conv2d over (Hq, Wq*S)
        dilated by S = Hs'*Ws'."""
        n, c, hq, wq, hs, ws = pruned.shape
        co = self.conv1.out_channels
        if not (self.export_layout and self.dilated_query):
            y = self.batched_query_conv(pruned.permute(0, 4, 5, 1, 2, 3).reshape(n * hs * ws, c, hq, wq))
            return y.reshape(n, hs, ws, co, hq, wq).permute(0, 3, 4, 5, 1, 2)
        s = int(hs) * int(ws)
        pad = self.conv1.padding[0]
        y = F.conv2d(pruned.reshape(n, c, hq, wq * s), self.conv1.weight, self.branch_biases()[0],
                     padding=(pad, pad * s), dilation=(1, s))
        return y.reshape(n, co, hq, wq, hs, ws)

    def batched_query_conv(self, images: torch.Tensor) -> torch.Tensor:
        """conv1 over a batch of (C, Hq, Wq) maps, with the bias `branch_biases` gives it."""
        return F.conv2d(images, self.conv1.weight, self.branch_biases()[0], self.conv1.stride, self.conv1.padding)

    def dense_support_conv(self, hs: int, ws: int) -> tuple[torch.Tensor, torch.Tensor]:
        """conv2 over an (hs, ws) support grid written as one 1x1 conv over (hs*ws*C) channels.

        Row (i', j', co), column (i, j, c) of the weight is the conv2 tap that output position (i', j')
        applies to input position (i, j), read off conv2 itself by convolving the one-hot basis (zero
        where the kernel does not reach, as the conv's zero padding). On a 2 x 2 grid with a 3 x 3 kernel
        every output sees every input, so the dense form does exactly the conv's work, as one GEMM.
        """
        c, co = self.conv2.in_channels, self.conv2.out_channels
        with torch.no_grad():
            basis = torch.eye(hs * ws * c, dtype=self.conv2.weight.dtype).reshape(hs * ws * c, hs, ws, c)
            taps = F.conv2d(basis.permute(0, 3, 1, 2), self.conv2.weight, None, self.conv2.stride,
                            self.conv2.padding)  # (hs*ws*C, Co, hs', ws')
            hs_out, ws_out = taps.shape[-2:]
            weight = taps.permute(2, 3, 1, 0).reshape(hs_out * ws_out * co, hs * ws * c, 1, 1).contiguous()
            bias = self.branch_biases()[1].detach().repeat(hs_out * ws_out)
        return weight, bias

    def prepare_support_major(self, hs: int, ws: int) -> None:
        """Fix the support grid and precompute conv2's dense form for `forward_support_major`."""
        weight, bias = self.dense_support_conv(hs, ws)
        self.register_buffer("dense_weight", weight, persistent=False)
        self.register_buffer("dense_bias", bias, persistent=False)

    def forward_support_major(self, x: torch.Tensor) -> torch.Tensor:
        """forward on the support-major layout (N, Hs, Ws, C, Hq, Wq) -> (N, Hs', Ws', Co, Hq', Wq'),
        with no transposes: conv1 runs on each (pruned) support position's (C, Hq, Wq) map as a batch of
        images, conv2 is the dense 1x1 conv of `dense_support_conv` over (Hs*Ws*C, Hq, Wq). For the
        mixing blocks (2 x 2 support grids), where the 6D layout ran conv2 on Hq*Wq images of 2 x 2."""
        n, hs, ws, c, hq, wq = x.shape
        s = self.support_stride
        pruned = x[:, ::s, ::s] if s > 1 else x
        hs_out, ws_out = int(pruned.shape[1]), int(pruned.shape[2])
        co = self.conv1.out_channels
        q = self.batched_query_conv(pruned.reshape(n * hs_out * ws_out, c, hq, wq))
        sup = F.conv2d(x.reshape(n, hs * ws * c, hq, wq), self.dense_weight, self.dense_bias)
        return q.reshape(n, hs_out, ws_out, co, hq, wq) + sup.reshape(n, hs_out, ws_out, co, hq, wq)

    def forward_halo(self, inp: HaloInput) -> torch.Tensor:
        """forward on a first block's input as the export-mode correlation writes it: no transposes.

        conv2 runs over the flattened (query, support-row) axis of `inp.halo`, whose zero rows stand in
        for the padding between support grids (`halo_rows`); conv1 on `inp.pruned` as in query_conv.
        """
        n, _, hq, wq = inp.plain.shape[:4]
        out = self.query_conv(inp.pruned)
        hs_out, ws_out = out.shape[-2:]
        sup = self.support_conv(inp.halo)  # (N, Co, Hq*Wq*Hs', Ws')
        return out + sup.reshape(n, self.conv2.out_channels, hq, wq, hs_out, ws_out)
