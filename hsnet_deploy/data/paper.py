"""The paper's figures (Min et al., ICCV 2021), shown beside `eval` results of the authors' weights."""

from __future__ import annotations

# mIoU (1-shot, 5-shot) per (dataset, backbone).
PAPER_MIOU = {
    ("fss", "resnet50"): (85.5, 87.8), ("fss", "resnet101"): (86.5, 88.5), ("fss", "vgg16"): (82.3, 85.8),
    ("pascal", "resnet50"): (64.0, 69.5), ("pascal", "resnet101"): (66.2, 70.4),
    ("coco", "resnet50"): (39.2, 46.9), ("coco", "resnet101"): (41.2, 49.5),
}


def paper_miou(dataset: str, backbone: str | None, shots: int, authors_weights: bool) -> float | None:
    """The paper's mIoU for this setting, or None where it does not apply (not the authors' weights, a
    backbone or shot count the paper does not report)."""
    pair = PAPER_MIOU.get((dataset, backbone))
    if not pair or not authors_weights or shots not in (1, 5):
        return None
    return pair[0 if shots == 1 else 1]
