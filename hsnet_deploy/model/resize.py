"""Bilinear (align_corners=True) resizes, eagerly or as MatMuls with PyTorch's own weights.

Eager mode calls F.interpolate, exactly as the authors do. Export mode replaces each resize by
`Ry @ x @ Rx^T` with constant interpolation matrices read off PyTorch's own kernel (F.interpolate
applied to an identity). This matters for the support masks: the correlation L2-normalises each
support position, so a mask residue of 6e-11 counts fully and an exact 0 not at all. ONNX Runtime's
and TensorRT's Resize round differently and flip whole support columns; matrices taken from
PyTorch's kernel reproduce its zero pattern exactly, and as graph constants nobody re-derives them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def interpolation_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) matrix M with M @ v == bilinear align_corners resize of v, per PyTorch's kernel."""
    # Each column of the identity is a (in_size x 1) image; its resize is that input's weight per output.
    eye = torch.eye(in_size, dtype=torch.float32).reshape(in_size, 1, in_size, 1)
    with torch.no_grad():
        out = F.interpolate(eye, size=(out_size, 1), mode="bilinear", align_corners=True)
    return out.reshape(in_size, out_size).t().contiguous()


class Resizer(nn.Module):
    """Holds the interpolation matrices for one fixed input size; they are non-persistent buffers,
    so the model's state_dict keeps exactly the authors' keys."""

    def __init__(self) -> None:
        super().__init__()
        self.use_matrices = False

    def prepare(self, pairs: set[tuple[int, int]]) -> None:
        for in_size, out_size in sorted(pairs):
            name = f"m_{in_size}_{out_size}"
            if not hasattr(self, name):
                self.register_buffer(name, interpolation_matrix(in_size, out_size), persistent=False)
        self.use_matrices = True

    def matrix(self, in_size: int, out_size: int) -> torch.Tensor:
        """The prepared (out_size, in_size) interpolation matrix."""
        return getattr(self, f"m_{in_size}_{out_size}")

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Resize the last two dims of `x` (any rank >= 2) to `size`."""
        h, w = x.shape[-2:]
        if (int(h), int(w)) == tuple(size):
            return x
        if not self.use_matrices:
            lead = x.shape[:-2]
            y = F.interpolate(x.reshape(-1, 1, h, w), size=size, mode="bilinear", align_corners=True)
            return y.reshape(*lead, *size)
        ry, rx = self.matrix(int(h), size[0]), self.matrix(int(w), size[1])
        return torch.matmul(torch.matmul(ry, x), rx.t())
