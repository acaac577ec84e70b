"""Support masking and the hypercorrelation pyramid (authors' model/base/correlation.py)."""

from __future__ import annotations

import torch

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
    The query is normalised once and broadcast over the K shots, never copied.
    Returns [C4, C3, C2], each (B*K, n_layers, hq, wq, hs, ws), deepest stage first.
    """
    corrs = []
    for q_feat, s_feat in zip(query_feats, support_feats):
        b, _, hq, wq = q_feat.shape
        hs, ws = s_feat.shape[-2:]
        q = l2_normalise(q_feat).transpose(1, 2).unsqueeze(1)  # (B, 1, hq*wq, C)
        s = l2_normalise(s_feat)
        s = s.reshape(b, shots, s.shape[1], s.shape[2])  # (B, K, C, hs*ws)
        corr = torch.matmul(q, s).clamp(min=0)  # (B, K, hq*wq, hs*ws)
        corrs.append(corr.reshape(b * shots, hq, wq, hs, ws))
    n4, n3, _ = stage_sizes
    stages = (corrs[len(corrs) - n4 :], corrs[len(corrs) - n4 - n3 : len(corrs) - n4], corrs[: len(corrs) - n4 - n3])
    return [torch.stack(stage, dim=1) for stage in stages]
