"""The best and worst episodes of an evaluation, kept as small thumbnails for the report's grid.

Only `keep` episodes of each end are held, each as a few 128-pixel uint8 images, so memory stays bounded
whatever the number of episodes; thumbnails are made only for an episode that enters one of the two sets.
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np
from PIL import Image

from hsnet_deploy.data.preprocess import IMAGENET_MEAN, IMAGENET_STD

THUMB = 128


def _image_thumb(chw: np.ndarray) -> np.ndarray:
    """A normalised (3, S, S) image back to uint8 RGB, THUMB pixels wide."""
    rgb = chw.transpose(1, 2, 0) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    img = Image.fromarray(np.clip(rgb * 255, 0, 255).astype(np.uint8))
    return np.asarray(img.resize((THUMB, THUMB), Image.BILINEAR))


def _mask_thumb(mask: np.ndarray) -> np.ndarray:
    img = Image.fromarray(((np.asarray(mask) >= 0.5) * 255).astype(np.uint8))
    return np.asarray(img.resize((THUMB, THUMB), Image.NEAREST))


class ExtremeEpisodes:
    """Collects the `keep` lowest- and highest-IoU episodes (foreground IoU of each episode).

    Episodes whose query has no foreground and whose prediction has none either have no IoU and are
    skipped. Call `offer` once per episode with its model inputs, prediction and ground truth.
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._best: list = []  # min-heap of (iou, tiebreak, row): the smallest of the best on top
        self._worst: list = []  # min-heap of (-iou, tiebreak, row)
        self._order = itertools.count()

    def offer(self, index: int, class_name: str, query_img: np.ndarray, support_img: np.ndarray,
              support_mask: np.ndarray, pred: np.ndarray, gt: np.ndarray, inter_fg: int, union_fg: int,
              ignore: np.ndarray | None = None) -> None:
        """`ignore`: pixels the metric skips (PASCAL's border), drawn grey in the ground truth."""
        if union_fg == 0:
            return
        iou = 100.0 * inter_fg / union_fg
        enters_best = len(self._best) < self.keep or iou > self._best[0][0]
        enters_worst = len(self._worst) < self.keep or -iou > self._worst[0][0]
        if not (enters_best or enters_worst):
            return
        row = {"index": index, "class_name": class_name, "iou": iou, "query": _image_thumb(query_img),
               "support": _image_thumb(support_img), "support_mask": _mask_thumb(support_mask),
               "pred": _mask_thumb(pred), "gt": _mask_thumb(gt)}
        if ignore is not None and ignore.any():
            row["gt"] = np.where(_mask_thumb(ignore) > 0, np.uint8(128), row["gt"])
        tie = next(self._order)
        if enters_best:
            (heapq.heappush if len(self._best) < self.keep else heapq.heappushpop)(self._best, (iou, tie, row))
        if enters_worst:
            (heapq.heappush if len(self._worst) < self.keep else heapq.heappushpop)(self._worst, (-iou, tie, row))

    def best(self) -> list[dict]:
        return [row for _, _, row in sorted(self._best, key=lambda t: (-t[0], t[1]))]

    def worst(self) -> list[dict]:
        return [row for _, _, row in sorted(self._worst, key=lambda t: (-t[0], t[1]))]

    def __call__(self, index: int, episode, tensors, pred: np.ndarray, counts: tuple[np.ndarray, np.ndarray]) -> None:
        """The `on_episode` hook of `data.evaluate.evaluate`."""
        at_own_size = tuple(pred.shape) == tuple(tensors.query_mask_orig.shape)
        gt = tensors.query_mask_orig if at_own_size else tensors.query_mask
        ignore = tensors.query_ignore_orig if at_own_size else tensors.query_ignore
        inter, union = counts
        self.offer(index, episode.class_name, tensors.query_img.numpy(), tensors.support_imgs[0].numpy(),
                   tensors.support_masks[0].numpy(), pred, gt.numpy(), int(inter[1]), int(union[1]),
                   ignore=ignore.numpy())
