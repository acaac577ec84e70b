"""Tiny datasets in the authors' three folder layouts, for the data tests (a few classes, small images).

Images are bright where the mask marks the object and dark elsewhere, so a fake predictor that
thresholds the query image gets a non-trivial IoU.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

FSS_CLASSES = ("zebra_fish", "apple", "Boat")  # sorted: Boat, apple, zebra_fish (upper case first)
PASCAL_FOLD0_LINES = (  # <id>__<1-based class>: 11 entries, class 1 has 3 images, classes 2..5 have 2;
    # images 2008_000002 and 2008_000003 appear under two classes each
    "2008_000001__01",
    "2008_000002__02",
    "2008_000003__01",
    "2008_000004__03",
    "2008_000005__02",
    "2008_000003__03",
    "2008_000006__01",
    "2008_000007__05",
    "2008_000008__05",
    "2008_000009__04",
    "2008_000002__04",
)


def _image_and_labels(rng: np.random.Generator, h: int, w: int, label: int) -> tuple[Image.Image, np.ndarray]:
    labels = np.zeros((h, w), dtype=np.uint8)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    labels[y0 : y0 + h // 2, x0 : x0 + w // 2] = label
    img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    img[labels > 0] = rng.integers(180, 255, size=(int((labels > 0).sum()), 3), dtype=np.uint8)
    return Image.fromarray(img), labels


def make_fss(root: Path, classes: tuple[str, ...] = FSS_CLASSES, n_images: int = 10, seed: int = 0) -> Path:
    """DATA_ROOT/FSS-1000/<class>/<n>.jpg + <n>.png (RGB 0/255 masks, like the real set), plus a stray file."""
    rng = np.random.default_rng(seed)
    for cls in classes:
        d = root / "FSS-1000" / cls
        d.mkdir(parents=True)
        for n in range(1, n_images + 1):
            img, labels = _image_and_labels(rng, 12, 10, 255)
            img.save(d / f"{n}.jpg", quality=95)
            Image.fromarray(np.repeat(labels[..., None], 3, axis=2)).save(d / f"{n}.png")
        (d / "readme.txt").write_text("not an image")
    return root


def write_fss_split(root: Path, names: list[str], split: str = "test") -> Path:
    """splits/fss/<split>.txt with \\r\\n line ends and unsorted names, as the authors' file is."""
    path = root / "splits" / "fss" / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(f"{n}\r\n" for n in names).encode())
    return path


def make_pascal(root: Path, lines: tuple[str, ...] = PASCAL_FOLD0_LINES, fold: int = 0, seed: int = 0) -> Path:
    """DATA_ROOT/VOC2012/{JPEGImages,SegmentationClassAug} + splits/pascal/val/fold<f>.txt.

    Masks are grey PNGs of labels (class + 1) with a 255 border around the object, like SBD's.
    """
    rng = np.random.default_rng(seed)
    jpg, ann = root / "VOC2012" / "JPEGImages", root / "VOC2012" / "SegmentationClassAug"
    jpg.mkdir(parents=True)
    ann.mkdir(parents=True)
    by_id: dict[str, list[int]] = {}
    for line in lines:
        name, cc = line.split("__")
        by_id.setdefault(name, []).append(int(cc))
    for name, classes in by_id.items():
        h, w = int(rng.integers(14, 20)), int(rng.integers(14, 20))
        img, labels = _image_and_labels(rng, h, w, classes[0])
        if len(classes) > 1:  # a second object of another class in the bottom-right corner
            labels[-3:, -3:] = classes[1]
            arr = np.asarray(img).copy()
            arr[-3:, -3:] = 220
            img = Image.fromarray(arr)
        border = np.zeros_like(labels, dtype=bool)
        fg = labels > 0
        border[:-1] |= fg[:-1] != fg[1:]
        border[:, :-1] |= fg[:, :-1] != fg[:, 1:]
        labels[border & ~fg] = 255
        img.save(jpg / f"{name}.jpg", quality=95)
        Image.fromarray(labels).save(ann / f"{name}.png")
    split = root / "splits" / "pascal" / "val" / f"fold{fold}.txt"
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text("".join(f"{line}\n" for line in lines))
    return root


def coco_fold_classes(fold: int) -> list[int]:
    return [fold + 4 * v for v in range(20)]


def make_coco(root: Path, fold: int = 0, n_images: int = 6, seed: int = 0) -> Path:
    """DATA_ROOT/COCO2014/val2014/<file>.jpg, annotations/val2014/<file>.png and splits/coco/val/fold<f>.pkl.

    Every fold class lists 2..n_images images (a dict of all 80 classes, the others empty, as the
    authors' pickle); an image's mask carries the label of the first class that lists it.
    """
    rng = np.random.default_rng(seed)
    base = root / "COCO2014"
    (base / "val2014").mkdir(parents=True)
    (base / "annotations" / "val2014").mkdir(parents=True)
    names = [f"val2014/COCO_val2014_{i:012d}.jpg" for i in range(n_images)]
    by_class: dict[int, list[str]] = {c: [] for c in range(80)}
    for j, cls in enumerate(coco_fold_classes(fold)):
        k = 2 + (j % (n_images - 1))
        by_class[cls] = [names[(j + i) % n_images] for i in range(k)]
    first_label = {}
    for cls, members in by_class.items():
        for name in members:
            first_label.setdefault(name, cls + 1)
    for name in names:
        img, labels = _image_and_labels(rng, 16, 13, first_label.get(name, 1))
        img.save(base / name, quality=95)
        Image.fromarray(labels).save(base / "annotations" / name.replace(".jpg", ".png"))
    split = root / "splits" / "coco" / "val" / f"fold{fold}.pkl"
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_bytes(pickle.dumps(by_class))
    return root
