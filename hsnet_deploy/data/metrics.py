"""The authors' few-shot segmentation metric (common/evaluation.py, common/logger.py).

Per class, background and foreground intersection and union pixel counts are summed over all episodes
of that class and only then divided: a class's IoU is not the mean of its episodes' IoUs.
mIoU = mean foreground IoU over the classes x 100; FB-IoU = mean of the background and foreground IoU
of the counts summed over all classes x 100. Ignored pixels (PASCAL's 255 border) count in neither.

Two deliberate differences from the authors' AverageMeter, neither of which changes a full run:
- counts are exact integers; the authors accumulate float32, which rounds sums above 2**24 pixels
  (relative error < 1e-7);
- mIoU averages the classes that were visited. The authors average all of the fold's classes, an
  unvisited one counting as 0; the two agree whenever every class is visited, as in every full protocol
  run, and a short `--episodes N` run is not dragged down by classes it never saw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def area_counts(
    pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(intersection, union) pixel counts, each int64 [background, foreground], of one prediction.

    `pred` and `gt` are {0, 1} masks of the same shape (values >= 0.5 are foreground, like the
    authors' 2-bin histogram); pixels where `ignore` is true are left out of every count.
    """
    p = np.asarray(pred) >= 0.5
    g = np.asarray(gt) >= 0.5
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} != ground truth shape {g.shape}")
    valid = np.ones(p.shape, dtype=bool) if ignore is None else ~np.asarray(ignore, dtype=bool)
    inter = np.array([np.count_nonzero(~p & ~g & valid), np.count_nonzero(p & g & valid)], dtype=np.int64)
    area_p = np.array([np.count_nonzero(~p & valid), np.count_nonzero(p & valid)], dtype=np.int64)
    area_g = np.array([np.count_nonzero(~g & valid), np.count_nonzero(g & valid)], dtype=np.int64)
    return inter, area_p + area_g - inter


class IoUAccumulator:
    """Running per-class counts; `to_dict` / `from_dict` round-trip through JSON for resumable runs."""

    def __init__(self, class_ids: Sequence[int]) -> None:
        self.class_ids = tuple(int(c) for c in class_ids)
        self.inter: dict[int, np.ndarray] = {}  # class -> int64 [bg, fg]
        self.union: dict[int, np.ndarray] = {}
        self.episodes = 0

    def add(self, class_id: int, inter: np.ndarray, union: np.ndarray) -> None:
        if class_id not in self.class_ids:
            raise ValueError(f"class {class_id} is not one of this fold's classes {self.class_ids}")
        zero = np.zeros(2, dtype=np.int64)
        self.inter[class_id] = self.inter.get(class_id, zero) + np.asarray(inter, dtype=np.int64)
        self.union[class_id] = self.union.get(class_id, zero) + np.asarray(union, dtype=np.int64)
        self.episodes += 1

    def update(self, class_id: int, pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> None:
        self.add(class_id, *area_counts(pred, gt, ignore))

    @property
    def visited(self) -> list[int]:
        return [c for c in self.class_ids if c in self.inter]

    def class_iou(self) -> dict[int, float]:
        """Foreground IoU (0..1) of each visited class; an empty union (the authors' max(union, 1)) gives 0."""
        return {c: float(self.inter[c][1] / max(self.union[c][1], 1)) for c in self.visited}

    @property
    def miou(self) -> float:
        ious = list(self.class_iou().values())
        return float(np.mean(ious) * 100) if ious else 0.0

    @property
    def fb_iou(self) -> float:
        if not self.inter:
            return 0.0
        inter = sum(self.inter.values())
        union = sum(self.union.values())
        return float(np.mean(inter / np.maximum(union, 1)) * 100)

    def to_dict(self) -> dict:
        return {
            "class_ids": list(self.class_ids),
            "episodes": self.episodes,
            "inter": {str(c): [int(x) for x in v] for c, v in self.inter.items()},
            "union": {str(c): [int(x) for x in v] for c, v in self.union.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> IoUAccumulator:
        acc = cls(d["class_ids"])
        acc.episodes = int(d["episodes"])
        acc.inter = {int(c): np.array(v, dtype=np.int64) for c, v in d["inter"].items()}
        acc.union = {int(c): np.array(v, dtype=np.int64) for c, v in d["union"].items()}
        return acc
