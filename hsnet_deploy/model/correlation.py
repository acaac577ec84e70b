"""Support masking and the hypercorrelation pyramid (authors' model/base/correlation.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hsnet_deploy.model.center_pivot import HaloInput, halo_rows
from hsnet_deploy.model.resize import Resizer

NORM_EPS = 1e-5  # added to the L2 norm, not under the square root (authors' Correlation)


def mask_support_features(feats: list[torch.Tensor], masks: torch.Tensor, resize: Resizer) -> list[torch.Tensor]:
    """Multiply each support map by its mask, resized bilinearly (align_corners=True) to the map's size.

    feats: maps of shape (N, C, h, w); masks: (N, H, W). One resize per distinct map size.
    """
    resized: dict[tuple[int, int], torch.Tensor] = {}
    out = []
    for feat in feats:
        size = (int(feat.shape[-2]), int(feat.shape[-1]))
        if size not in resized:
            resized[size] = resize(masks, size).unsqueeze(1)  # (N, 1, h, w)
        out.append(feat * resized[size])
    return out


def l2_normalise(feat: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, h*w), each position's channel vector divided by (its norm + eps)."""
    flat = feat.flatten(2)
    return flat / (torch.linalg.vector_norm(flat, dim=1, keepdim=True) + NORM_EPS)


def hypercorrelation(
    query_feats: list[torch.Tensor],
    support_feats: list[torch.Tensor],
    shots: int,
    stage_sizes: tuple[int, int, int],
) -> list[torch.Tensor]:
    """Cosine similarity of every query position with every support position, ReLU'd, stacked per stage.

    query_feats: maps (B, C, hq, wq); support_feats: maps (B*K, C, hs, ws), shot-major within a batch item.
    Returns [C4, C3, C2], each (B*K, n_layers, hq, wq, hs, ws), deepest stage first.

    The layers of one stage share their channels and size, so the small normalised FEATURES are stacked
    and one batched MatMul writes each stage straight into its final layout: stacking the correlations
    instead copies up to 500 MB per episode at K = 5 (figures: docs/benchmarks.md, "Notes on the figures").
    The query is normalised once and broadcast over the K shots, never copied.
    """
    n4, n3, _ = stage_sizes
    n = len(query_feats)
    bounds = ((n - n4, n), (n - n4 - n3, n - n4), (0, n - n4 - n3))
    pyramid = []
    for lo, hi in bounds:
        b, _, hq, wq = query_feats[lo].shape
        hs, ws = support_feats[lo].shape[-2:]
        q = torch.stack([l2_normalise(f) for f in query_feats[lo:hi]], dim=1)  # (B, L, C, hq*wq)
        s = torch.stack([l2_normalise(f) for f in support_feats[lo:hi]], dim=1)  # (B*K, L, C, hs*ws)
        q = q.transpose(2, 3).unsqueeze(1)  # (B, 1, L, hq*wq, C)
        s = s.reshape(b, shots, *s.shape[1:])  # (B, K, L, C, hs*ws)
        corr = torch.matmul(q, s).clamp(min=0)  # (B, K, L, hq*wq, hs*ws)
        pyramid.append(corr.reshape(b * shots, hi - lo, hq, wq, hs, ws))
    return pyramid


def stage_bounds(n_maps: int, stage_sizes: tuple[int, int, int]) -> tuple[tuple[int, int], ...]:
    """(lo, hi) map indices of C4, C3, C2 in backbone order (shallow to deep)."""
    n4, n3, _ = stage_sizes
    return ((n_maps - n4, n_maps), (n_maps - n4 - n3, n_maps - n4), (0, n_maps - n4 - n3))


def hypercorrelation_for_export(
    feats: list[torch.Tensor],
    batch: int,
    shots: int,
    masks: torch.Tensor | None,
    resize: Resizer,
    stage_sizes: tuple[int, int, int],
    first_blocks: tuple[tuple[int, int], ...],
    use_halo: bool = True,
) -> list[torch.Tensor | HaloInput]:
    """hypercorrelation in the layouts the learner's first center-pivot convs read without copies.

    feats: the joint backbone maps (B + B*K, C, h, w), queries first; masks: (B*K, H, W) or None.
    Fewer passes over the features: each stage's raw maps are stacked once, and the support mask and
    the L2 normalisation become one factor per position, m / (m * ||v|| + eps), which equals
    normalising the masked vector (||m v|| = m ||v|| for m >= 0; m = 0 gives exactly 0, as before);
    one Split then separates queries and supports.
    Per stage whose first block allows it (`halo_rows`) and pays for it: the support maps get Hp - Hs zero rows before
    the MatMul, so its output is conv2's input as it lies (zero vectors correlate to exactly 0, like
    the conv's zero padding), and a second, small MatMul with the support positions 0, s, 2s, ...
    writes conv1's pruned input, instead of slicing it out of the large tensor. Other stages are
    returned as by `hypercorrelation`.
    The ReLU is `torch.relu` (the authors clamp at 0: the same values), exported as a Relu node, which ONNX
    Runtime's INT8 graph folds into the correlation MatMul's requantisation; a Max(x, 0) stayed a float pass.
    """
    pyramid: list[torch.Tensor | HaloInput] = []
    for (lo, hi), (kernel, stride) in zip(stage_bounds(len(feats), stage_sizes), first_blocks):
        channels, hq, wq = (int(d) for d in feats[lo].shape[1:])
        hs, ws = hq, wq  # queries and supports share the backbone pass, hence the map size
        n_layers = hi - lo
        joint = torch.stack(feats[lo:hi], dim=1)  # (B + B*K, L, C, h, w)
        norm = torch.linalg.vector_norm(joint, dim=2, keepdim=True)  # (B + B*K, L, 1, h, w)
        if masks is None:
            factor = 1.0 / (norm + NORM_EPS)
        else:
            m = resize(masks, (hs, ws))
            m = torch.cat([m.new_ones((batch, hs, ws)), m]).reshape(batch + batch * shots, 1, 1, hs, ws)
            factor = m / (m * norm + NORM_EPS)
        q, s = torch.split(joint * factor, [batch, batch * shots])
        q = q.reshape(batch, n_layers, channels, hq * wq).transpose(2, 3).unsqueeze(1)  # (B, 1, L, hq*wq, C)
        # The zero rows cost a pass over the support features (C channels per position) to save passes over
        # the correlation (hq*wq per position): worth it only where the query grid outnumbers the channels
        # (C2 at 400x400: 2500 vs 512; not C3: 625 vs 1024, nor C4).
        rows = halo_rows(hs, kernel, stride) if use_halo and hq * wq > channels else None
        if rows is None:
            s = s.reshape(batch, shots, n_layers, channels, hs * ws)
            corr = torch.relu(torch.matmul(q, s))
            pyramid.append(corr.reshape(batch * shots, n_layers, hq, wq, hs, ws))
            continue
        # Padded as a 4D (maps, C, h, w) tensor with zeros along h only: ONNX Runtime's CUDA Pad has a kernel
        # of its own for that case; on the 5D tensor it ran its generic one (4.3 ms at B = 8 on an H200).
        maps = s.reshape(batch * shots * n_layers, channels, hs, ws)
        padded = F.pad(maps, (0, 0, 0, rows - hs)).reshape(batch, shots, n_layers, channels, rows * ws)
        corr = torch.relu(torch.matmul(q, padded))  # (B, K, L, hq*wq, rows*ws)
        halo = corr.reshape(batch * shots, n_layers, hq * wq * rows, ws)
        pruned_s = s[..., ::stride, ::stride]
        phs, pws = (int(d) for d in pruned_s.shape[-2:])
        pruned = torch.relu(torch.matmul(q, pruned_s.reshape(batch, shots, n_layers, channels, phs * pws)))
        pruned = pruned.reshape(batch * shots, n_layers, hq, wq, phs, pws)
        # Last, so that a graph's stage labels (export/stages.py) end the correlation here.
        plain = corr.reshape(batch * shots, n_layers, hq, wq, rows, ws)[..., :hs, :]
        pyramid.append(HaloInput(halo, pruned, plain))
    return pyramid
