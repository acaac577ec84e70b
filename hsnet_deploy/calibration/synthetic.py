"""Synthetic episodes and a 'balanced' seeded model, for gating without data and for tests.

A seeded random-weight HSNet predicts background everywhere on random episodes: its foreground-minus-
background logit margin is negative at every pixel, so mask IoU against FP32 is trivially 1 and says
nothing about a variant. `balance_decoder_bias` shifts the final decoder's foreground bias by the median
margin measured on a few episodes, so about half the pixels become foreground while every other weight
stays as seeded. The output resize is a convex combination (align_corners bilinear rows sum to 1), so a
bias shift moves every pixel's margin by exactly that amount: the spatial pattern is the network's own.
"""

from __future__ import annotations

import numpy as np

from hsnet_deploy.artifacts import INPUT_NAMES
from hsnet_deploy.calibration.episodes import EpisodeSample

FINAL_CONV = "hpn_learner.decoder2.2"  # Conv2d(64, 2): channel 1 is foreground


def synthetic_samples(n: int, img_size: int, seed: int = 0, shots: int = 1) -> list[EpisodeSample]:
    """Random-normal images with filled-ellipse support masks (each at least ~4% of the image)."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:img_size, 0:img_size].astype(np.float32)
    samples = []
    for i in range(n):
        masks = np.zeros((1, shots, img_size, img_size), dtype=np.float32)
        for j in range(shots):
            cy, cx, ry, rx = (rng.rand(4) * np.array([0.6, 0.6, 0.3, 0.3]) + 0.2) * img_size
            masks[0, j] = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.float32)
        feed = {
            "query_img": rng.randn(1, 3, img_size, img_size).astype(np.float32),
            "support_imgs": rng.randn(1, shots, 3, img_size, img_size).astype(np.float32),
            "support_masks": masks,
        }
        samples.append(EpisodeSample(f"synthetic-{seed}-{i}", 0, feed, None, None))
    return samples


def balance_decoder_bias(model, samples: list[EpisodeSample]) -> float:
    """Shift the foreground bias of the final conv (of an HSNet) by minus the median margin; returns the shift."""
    import torch

    margins = []
    with torch.no_grad():
        for s in samples:
            feeds = (torch.from_numpy(s.feed[k]) for k in INPUT_NAMES)
            logits, _ = model(*feeds)
            margins.append((logits[:, :, 1] - logits[:, :, 0]).flatten())
        shift = -float(torch.cat(margins).median())
        model.get_submodule(FINAL_CONV).bias[1] += shift
    return shift


def write_simple_layout(root, episodes: int, size: int = 96, shots: int = 1, seed: int = 0) -> None:
    """A calibration directory in the simple layout (episodes.py): per episode a query with its mask and
    `shots` supports with theirs. Objects are bright textured ellipses on dark noise, one colour per
    episode, so features look more like photographs than Gaussian noise does."""
    from pathlib import Path

    from PIL import Image

    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(episodes):
        folder = Path(root) / f"episode{i:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = rng.randint(120, 256, size=3)
        for stem in ["query", *(f"support{j + 1}" for j in range(shots))]:
            cy, cx, ry, rx = (rng.rand(4) * np.array([0.5, 0.5, 0.25, 0.25]) + np.array([0.25, 0.25, 0.1, 0.1])) * size
            fg = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            img = rng.randint(0, 80, size=(size, size, 3))
            img[fg] = np.clip(colour + rng.randint(-40, 40, size=(int(fg.sum()), 3)), 0, 255)
            Image.fromarray(img.astype(np.uint8)).save(folder / f"{stem}.png")
            Image.fromarray((fg * 255).astype(np.uint8)).save(folder / f"{stem}_mask.png")
